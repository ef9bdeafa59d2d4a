"""AuditConfig: what a federation's leakage audit attacks, how often, and where its rows go.

A user writes it as a dict (or YAML) next to their ServerApp; every mistake is one `ConfigError` sentence
naming the bad value and what is allowed, raised when the audit is built, before the federation starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from grnn_engine.attacks.base import ATTACKS
from grnn_engine.errors import ConfigError, GrnnError
from grnn_engine.victims import VICTIMS


class AttackSetting(BaseModel):
    """One attack the audit runs on every sampled update: a name in the attack registry and its parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        ATTACKS.check(name)  # ConfigError with the known names and the closest one
        return name


class AuditConfig(BaseModel):
    """Settings of a federation audit. Defaults are the cheapest audit that still says something."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Where the rows go: <results>/<name>/ (the project's ledger: parts/, images/, trials.parquet).
    name: str = "flower_audit"
    results: str = "results"
    # How much of the federation is attacked: every N-th round, K sampled client updates of that round
    # (None: all of them), each by every attack listed.
    every: int = Field(1, ge=1)
    clients: int | None = Field(None, ge=1)
    attacks: list[AttackSetting] = Field(min_length=1)
    # The model the global arrays are loaded into: a victim of the registry (or, from Python, any
    # `model_fn` handed to the audit, which then overrides these two).
    victim: str = "lenet"
    victim_params: dict[str, Any] = Field(default_factory=dict)
    image_size: int = Field(32, ge=8, le=512)
    num_classes: int | None = Field(None, ge=2)
    # How the clients train: `local_steps` SGD steps at `local_lr` on their whole batch. One step makes the
    # update a FedSGD gradient, (global - local) / local_lr; more make it a FedAvg update.
    local_steps: int = Field(1, ge=1)
    local_lr: float = Field(gt=0)
    # The reply's MetricRecord key holding the client's example count (the attacked batch size).
    examples_key: str = "num-examples"
    # Updates from more examples than this are not attacked (logged and skipped).
    max_batch_size: int = Field(16, ge=1)
    # Attacks as Ray tasks (the round goes on while they run; rows land as they finish) or inline.
    use_ray: bool = False
    cpus_per_attack: float = Field(1.0, gt=0)
    seed: int = Field(0, ge=0)
    eval_every: int = Field(50, ge=1)
    success_psnr: float = 20.0
    device: str = "cpu"
    # Where the auditor finds the datasets the test federation's clients name in their truth record.
    data_root: str | None = None

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not name or name.startswith(".") or any(c in name for c in "/\\\0") or len(name) > 100:
            raise ValueError("must be a folder name (1-100 characters, no path separator, not hidden)")
        return name

    @field_validator("victim")
    @classmethod
    def _known_victim(cls, name: str) -> str:
        VICTIMS.check(name)
        return name

    @property
    def folder(self) -> Path:
        return Path(self.results) / self.name

    def update_kind(self) -> str:
        return "fedsgd" if self.local_steps == 1 else "fedavg"


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(AuditConfig.model_fields)
        return f"audit config: unknown setting '{where}'; allowed: {allowed}"
    if first["type"] == "missing":
        return f"audit config: '{where}' is required"
    return f"audit config: {where}={first.get('input')!r} is invalid: {message}"


def load_audit_config(source: AuditConfig | Mapping[str, Any] | str | Path) -> AuditConfig:
    """An AuditConfig from itself, a dict, or a YAML file; ConfigError (one sentence) when invalid."""
    if isinstance(source, AuditConfig):
        return source
    if isinstance(source, str | Path):
        path = Path(source)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise ConfigError(f"audit config {path} cannot be read: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"audit config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"audit config {path} must be a mapping of settings, not {type(data).__name__}")
        source = data
    try:
        config = AuditConfig.model_validate(dict(source))
    except ValidationError as err:
        raise ConfigError(_first_error(err)) from None
    except GrnnError:
        raise
    for attack in config.attacks:
        ATTACKS.create(attack.name, **attack.params)  # unknown or bad parameters fail here, not mid-federation
    return config
