"""One audited update attacked by one attack: plain data in, one ledger row (and image) out.

`run_audit_job` is what runs inline or as a Ray task. It only wires engine pieces: the global model the
server sent, the update the client sent back as the engine's `SharedUpdate`, an attack from the registry,
and, when the client's true batch is known to the auditor (a test federation), the engine's own scoring
(`prepare`-style `PreparedTrial` + `finish_trial`). Without the truth the row carries the reconstruction
(image and recovered labels) and no PSNR.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from grnn_engine.attacks.base import ATTACKS, Reconstruction, SharedUpdate
from grnn_engine.data import load_dataset
from grnn_engine.errors import ConfigError
from grnn_engine.image_grid import grid_png
from grnn_engine.result import COMPLETE, FAILED, TrialResult
from grnn_engine.trial import PreparedTrial, finish_trial, resolve_device
from grnn_engine.trial_spec import TrialSpec

FL_FRAMEWORK = "flower"


@dataclass(frozen=True)
class Truth:
    """Where the auditor finds the client's private batch: a dataset split and the indices it trained on."""

    dataset: str
    split: str
    indices: tuple[int, ...]
    data_root: str | None = None


@dataclass
class AuditJob:
    """Everything one attack on one client update needs; picklable, so it can travel to a Ray worker."""

    key: str
    audit_run: str
    server_round: int
    client_id: str
    attack: str
    attack_params: dict[str, Any]
    model_fn: Callable[[], nn.Module]
    victim: str
    victim_params: dict[str, Any]
    global_state: dict[str, Tensor]  # the model the server sent, by state_dict name
    local_params: dict[str, Tensor]  # the client's trainable parameters after its local training, by name
    num_classes: int
    image_shape: tuple[int, int, int]
    batch_size: int
    local_steps: int
    local_lr: float
    truth: Truth | None = None
    seed: int = 0
    eval_every: int = 50
    success_psnr: float = 20.0
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)  # more columns for the row (e.g. the strategy's name)

    def spec(self) -> TrialSpec:
        """The row's description in the ledger's own terms; fl_round counts the aggregations before it."""
        kind = "fedsgd" if self.local_steps == 1 else "fedavg"
        return TrialSpec(
            attack=self.attack, attack_params=dict(self.attack_params), victim=self.victim,
            victim_params=dict(self.victim_params),
            dataset=self.truth.dataset if self.truth else "unknown",
            split=self.truth.split if self.truth else "unknown",
            image_size=self.image_shape[-1], batch_size=self.batch_size,
            indices=list(self.truth.indices) if self.truth else None,
            fl_round=self.server_round - 1, update=kind,
            update_params={} if kind == "fedsgd" else {"local_steps": self.local_steps, "local_lr": self.local_lr},
            seed=self.seed, success_psnr=self.success_psnr, eval_every=self.eval_every, device=self.device,
        )  # fmt: skip


@dataclass
class AuditOutcome:
    """What a job hands back to the ledger writer: the row and the PNG (truth above reconstruction, or the
    reconstruction alone when the truth is unknown)."""

    row: dict[str, Any]
    image_png: bytes | None


def global_model(job: AuditJob, device: torch.device) -> nn.Module:
    """The user's architecture with the server's global arrays, eval mode, every parameter differentiable."""
    model = job.model_fn()
    model.load_state_dict(job.global_state)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model.to(device)


def shared_update(job: AuditJob, model: nn.Module) -> SharedUpdate:
    """The client's update as the engine's attacker receives it.

    One local step at lr makes the update a FedSGD gradient: (global - local) / lr. More steps are a FedAvg
    delta (local - global), which the attacks read as the mean gradient it implies.
    """
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    missing = [n for n in names if n not in job.local_params]
    if missing:
        raise ConfigError(f"the client update has no array for the model's parameter '{missing[0]}'")
    delta = tuple(
        (job.local_params[n].to(torch.float32) - job.global_state[n].to(torch.float32)).to(p.device)
        for n, p in zip(names, (p for p in model.parameters() if p.requires_grad), strict=True)
    )
    if job.local_steps == 1:
        return SharedUpdate(tensors=tuple(-d / job.local_lr for d in delta), kind="fedsgd")
    return SharedUpdate(tensors=delta, kind="fedavg", local_steps=job.local_steps, local_lr=job.local_lr)


def _prepared(job: AuditJob, model: nn.Module, shared: SharedUpdate, device: torch.device,
              generator: torch.Generator, start: float) -> PreparedTrial | None:
    """The engine's PreparedTrial around the client's true batch, or None when the truth is unknown."""
    if job.truth is None:
        return None
    images_set = load_dataset(job.truth.dataset, root=job.truth.data_root, split=job.truth.split,
                              image_size=job.image_shape[-1])  # fmt: skip
    indices = images_set.check_indices(job.truth.indices)
    if len(indices) != job.batch_size:
        raise ConfigError(
            f"client {job.client_id} reports {job.batch_size} examples but its truth record lists "
            f"{len(indices)} indices; they must agree"
        )
    return PreparedTrial(
        spec=job.spec(), start=start, device=device, attack=ATTACKS.create(job.attack, **job.attack_params),
        images_set=images_set, images=images_set.load(indices).to(device),
        labels=images_set.labels[indices].clone().to(device), indices=indices, identifier=None, model=model,
        model_facts={}, generator=generator, shared=shared,
    )  # fmt: skip


def _unscored(job: AuditJob, recon: Reconstruction, attack_s: float, start: float, device: torch.device) -> TrialResult:
    result = TrialResult(spec=job.spec(), status=COMPLETE, attack_s=attack_s, device=str(device),
                         iterations=int(recon.history[-1]["iteration"]) if recon.history else 0,
                         history=recon.history)  # fmt: skip
    if not torch.isfinite(recon.images).all():
        result.status, result.error_type = FAILED, "NonFinite"
        result.error = f"{job.attack} produced non-finite images"
    else:
        result.metrics = {"labels_recovered": [int(v) for v in recon.labels.cpu().tolist()]}
        result.image_png = grid_png(recon.images)  # one row: no truth to put above them
    result.wall_s = time.perf_counter() - start
    return result


def _attack(job: AuditJob, start: float) -> TrialResult:
    device = resolve_device(job.device)
    model = global_model(job, device)
    shared = shared_update(job, model)
    generator = torch.Generator().manual_seed(job.seed)
    prepared = _prepared(job, model, shared, device, generator, start)
    attack = prepared.attack if prepared is not None else ATTACKS.create(job.attack, **job.attack_params)
    attack_start = time.perf_counter()
    recon = attack.reconstruct(
        model, shared, num_classes=job.num_classes, batch_size=job.batch_size, image_shape=job.image_shape,
        generator=generator, evaluate=prepared.evaluate if prepared is not None else None,
        eval_every=job.eval_every,
    )  # fmt: skip
    attack_s = time.perf_counter() - attack_start
    if prepared is None:
        return _unscored(job, recon, attack_s, start, device)
    return finish_trial(prepared, recon, attack_s=attack_s)


def run_audit_job(job: AuditJob) -> AuditOutcome:
    """Attack one update and describe it as one ledger row. A failing attack is a FAILED row, not a crash of
    the federation: the error type and its one-line message land in the ledger's failures table."""
    start = time.perf_counter()
    try:
        result = _attack(job, start)
    except Exception as err:  # noqa: BLE001  (recorded in the row; the federation must go on)
        message = str(err).splitlines()[0] if str(err) else traceback.format_exc().splitlines()[-1]
        result = TrialResult.failed(job.spec(), error_type=type(err).__name__, error=message,
                                    wall_s=time.perf_counter() - start)  # fmt: skip
    row = result.to_row()
    row.update({
        "trial_key": job.key, "fl_framework": FL_FRAMEWORK, "server_round": job.server_round,
        "client_id": job.client_id, "audit_run": job.audit_run, **job.extra,
    })  # fmt: skip
    return AuditOutcome(row=row, image_png=result.image_png)
