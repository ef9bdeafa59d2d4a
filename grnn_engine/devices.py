"""The device rule every part of the engine follows: `auto` is the GPU Ray (or the user) made visible, else
the CPU. Its own module because both a trial and the FedAvg training it may start need it."""

from __future__ import annotations

import torch

from grnn_engine.errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(name: str) -> torch.device:
    """'auto' -> the GPU Ray (or the user) made visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was asked for but no GPU is visible; use 'auto' or 'cpu'")
    if not (name == "cpu" or name.startswith("cuda")):
        raise ConfigError(f"unknown device '{name}'; allowed: auto, cpu, cuda, cuda:N")
    return torch.device(name)
