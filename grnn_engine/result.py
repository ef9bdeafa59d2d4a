"""TrialResult: the plain-data outcome of one trial, which becomes one Parquet row."""

from __future__ import annotations

import functools
import json
import math
import socket
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from grnn_engine.trial_spec import TrialSpec

COMPLETE, FAILED, TIMEOUT = "COMPLETE", "FAILED", "TIMEOUT"

# Metrics every row carries; null when the trial did not complete.
METRIC_COLUMNS = (
    "psnr", "ssim", "mse", "label_acc", "label_set_acc", "success", "psnr_per_image", "ssim_per_image",
    "mse_per_image", "labels_true", "labels_recovered", "matching", "indices",
)
# Face re-identification (grnn_engine.reid), only in rows of trials run with `reid` set; null when the trial
# did not complete. top1/top5: fraction of the batch whose true identity is ranked first / in the top 5;
# rank: mean rank of the true identity (1 = first); for the reconstruction, the clean photo (ceiling) and
# uniform noise (floor). reid_identity: per image (truth order) the identity ranked first for the reconstruction.
REID_COLUMNS = (
    "reid_top1", "reid_top5", "reid_rank", "reid_clean_top1", "reid_clean_top5", "reid_clean_rank",
    "reid_random_top1", "reid_random_top5", "reid_random_rank", "reid_identity", "reid_rank_per_image",
)


@functools.cache
def versions() -> dict[str, str]:
    """torch and project versions and the project's git sha ('unknown' outside a checkout)."""
    try:
        project = metadata.version("grnn-sweep")
    except metadata.PackageNotFoundError:
        project = "unknown"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
    return {"torch_version": torch.__version__, "project_version": project, "git_sha": sha or "unknown"}


def _flatten(prefix: str, params: dict[str, Any]) -> dict[str, Any]:
    """{'sigma': 0.1} -> {'defense.sigma': 0.1}; nested or list values become JSON text to keep one type."""
    out: dict[str, Any] = {}
    for k, v in sorted(params.items()):
        out[f"{prefix}.{k}"] = json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else v
    return out


@dataclass
class TrialResult:
    """What one trial produced. `to_row()` is the flat row; `image_png` the truth-vs-reconstruction grid."""

    spec: TrialSpec
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    error_type: str | None = None
    error: str | None = None
    model_acc: float | None = None
    model_loss: float | None = None
    # (epsilon, delta) the attacked model's DP-SGD training had spent by its round (a dp_sgd chain under a
    # sweep's `utility: true`); None for any other model.
    model_dp_epsilon: float | None = None
    model_dp_delta: float | None = None
    # Test accuracy of the stage trained with the trial's defense applied by every client (a sweep's
    # `utility: true`): what the defense costs the federation. None when not measured.
    utility_acc: float | None = None
    # (epsilon, delta) of that training when the defense was DP-SGD (dp_sgd under utility): the privacy it
    # bought at that accuracy. None otherwise.
    utility_dp_epsilon: float | None = None
    utility_dp_delta: float | None = None
    wall_s: float = 0.0
    attack_s: float = 0.0
    iterations: int = 0
    device: str = "cpu"
    history: list[dict[str, float]] = field(default_factory=list)
    image_png: bytes | None = None
    hostname: str = field(default_factory=socket.gethostname)

    @property
    def key(self) -> str:
        return self.spec.key()

    @property
    def s_per_iter(self) -> float | None:
        return self.attack_s / self.iterations if self.iterations else None

    @classmethod
    def failed(
        cls, spec: TrialSpec, *, error_type: str, error: str, status: str = FAILED, wall_s: float = 0.0
    ) -> TrialResult:
        return cls(spec=spec, status=status, error_type=error_type, error=error, wall_s=wall_s)

    def to_row(self) -> dict[str, Any]:
        s = self.spec
        row: dict[str, Any] = {
            "trial_key": self.key,
            "attack": s.attack, **_flatten("attack", s.attack_params),
            "victim": s.victim, **_flatten("victim", s.victim_params),
            # a user's model by import path: what its key's fingerprint was (absent for registered victims)
            **({"victim_fingerprint": s.victim_fingerprint} if s.victim_fingerprint is not None else {}),
            "dataset": s.dataset, "split": s.split, "image_size": s.image_size,
            "batch_size": s.batch_size, "fl_round": s.fl_round, **_flatten("fl", s.fl),
            "update": s.update, **_flatten("update", s.update_params),
            "defense": s.defense, **_flatten("defense", s.defense_params),
            "seed": s.seed, "success_psnr": s.success_psnr,
            "status": self.status, "error_type": self.error_type, "error": self.error,
        }
        row.update({name: self.metrics.get(name) for name in METRIC_COLUMNS})
        if s.reid is not None:
            row["reid"] = s.reid
            row.update(_flatten("reid", s.reid_params))
            row.update({name: self.metrics.get(name) for name in REID_COLUMNS})
        row.update(
            {
                "model_acc": self.model_acc,
                "model_loss": self.model_loss,
                "model_dp_epsilon": self.model_dp_epsilon,
                "model_dp_delta": self.model_dp_delta,
                "utility_acc": self.utility_acc,
                "utility_dp_epsilon": self.utility_dp_epsilon,
                "utility_dp_delta": self.utility_dp_delta,
                "wall_s": self.wall_s,
                "s_per_iter": self.s_per_iter,
                "iterations": self.iterations,
                "device": self.device,
                "hostname": self.hostname,
                **versions(),
                "history_json": json.dumps(self.history),
            }
        )
        return row

    def is_finite(self) -> bool:
        """False when a scalar metric is NaN or infinite."""
        values = [self.metrics.get(k) for k in ("psnr", "ssim", "mse")]
        return all(isinstance(v, int | float) and math.isfinite(v) for v in values)
