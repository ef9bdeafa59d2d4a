"""A user's own victim model, given by import path: `victim: {name: "mypkg.models:make_net"}`.

The path names a callable (a function or an nn.Module class) that returns an `nn.Module` classifier of
images. It is called with the victim's params, plus `num_classes` and `image_size` when its signature
takes them (or takes **kwargs), under the trial's seed, so the same seed gives the same initial weights.
The model is checked at once with one forward pass: it must take a batch of images (B, 3, S, S), or
(B, 1, S, S) for a grey model, and return logits (B, num_classes). A grey model is given the first
channel of grey data (the datasets replicate grey to 3 channels), so the attacks reconstruct 1-channel
images; colour data for a grey model is refused.

Trial keys stay content-addressed: `grnn_engine.victims.victim_fingerprint` hashes the model's
architecture and initial weights (built at seed 0 with 10 classes, whatever the dataset: the driver of a
sweep may not hold the data), and the trial's `victim_fingerprint` carries it into the key, so a changed
model file gives new keys and new FL stages, never stale rows.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor, nn

from grnn_engine.errors import ConfigError
from grnn_engine.registry import Registry, is_import_path

__all__ = ["build_user_victim", "input_channels", "is_import_path", "model_fingerprint", "to_victim_channels",
           "victim_channels"]

# Image channels a victim may take, in the order they are tried: colour first, as the data comes.
_CHANNELS = (3, 1)


def build_user_victim(
    registry: Registry[nn.Module],
    path: str,
    *,
    num_classes: int,
    image_size: int,
    params: dict[str, Any],
    check_output: bool = True,
) -> nn.Module:
    """Call the user's factory at `path` (seeded by the caller) and check what it returns (`check_output`:
    also one forward pass, see `input_channels`)."""
    taken = registry.parameters(path)
    takes_any = registry.takes_any(path)
    sizing = {"num_classes": num_classes, "image_size": image_size}
    for name in sizing:
        if name in params:
            raise ConfigError(
                f"victim '{path}': '{name}' is set from the dataset and the sweep, not as a victim param; "
                f"allowed: the factory's own params ({', '.join(p for p in taken if p not in sizing) or 'none'})"
            )
    kwargs = dict(params)
    kwargs.update({k: v for k, v in sizing.items() if k in taken or takes_any})
    try:
        model = registry.create(path, **kwargs)
    except ConfigError:
        raise
    except Exception as exc:  # the user's factory raised: report it in one line, with what it was given
        shown = ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items())) or "no arguments"
        raise ConfigError(
            f"victim '{path}' raised {type(exc).__name__} when called with {shown}: {_first_line(exc)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"victim '{path}' returned a {type(model).__name__}; allowed: a torch.nn.Module"
        )
    model = model.to(torch.float32).eval()
    if check_output:
        input_channels(model, path, num_classes=num_classes, image_size=image_size)  # fails now, not mid-trial
    return model


def input_channels(model: nn.Module, path: str, *, num_classes: int, image_size: int) -> int:
    """The image channels the model takes (3 or 1), found by one forward pass of zeros per try; the output
    must be logits (1, num_classes)."""
    failures = []
    for channels in _CHANNELS:
        probe = torch.zeros((1, channels, image_size, image_size), device=_device_of(model))
        try:
            with torch.no_grad():
                out = model(probe)
        except Exception as exc:  # the model cannot take this shape: try the next
            failures.append(f"{tuple(probe.shape)}: {type(exc).__name__}: {_first_line(exc)}")
            continue
        if not isinstance(out, Tensor) or tuple(out.shape) != (1, num_classes):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ConfigError(
                f"victim '{path}' returns {got} for a batch of shape {tuple(probe.shape)}, but the data has "
                f"{num_classes} classes; allowed: logits of shape (B, {num_classes})"
            )
        return channels
    raise ConfigError(
        f"victim '{path}' cannot take {image_size}x{image_size} images ({'; '.join(failures)}); "
        f"allowed: a classifier of images (B, 3 or 1, {image_size}, {image_size})"
    )


def victim_channels(model: nn.Module, victim: str, *, num_classes: int, image_size: int) -> int:
    """The image channels victim `victim` takes: 3 for a registered one, probed for a user's model."""
    if not is_import_path(victim):
        return 3
    return input_channels(model, victim, num_classes=num_classes, image_size=image_size)


def to_victim_channels(images: Tensor, channels: int, victim: str) -> Tensor:
    """The batch as the victim takes it: unchanged for 3 channels; the first channel of grey data for 1."""
    if images.shape[1] == channels:
        return images
    grey = torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    if not grey:
        raise ConfigError(
            f"victim '{victim}' takes 1-channel images but the data is in colour; allowed: a grey dataset "
            "(digits, mnist, att_faces) or a victim that takes 3 channels"
        )
    return images[:, :1].contiguous()


def model_fingerprint(model: nn.Module) -> str:
    """16 hex digits of SHA-256 over the model's architecture and its parameters and buffers."""
    digest = hashlib.sha256(repr(model).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _device_of(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"
