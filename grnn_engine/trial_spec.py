"""TrialSpec: everything that defines one attack trial, as plain data, with a stable key."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Fields that say where or how a trial runs, not what it computes: left out of its key, so the same
# cell gets the same key on every machine.
_NOT_IN_KEY = {"data_root", "device", "download"}

# Seeds seed 64-bit torch generators, plus a small offset for the defense's stream: 2**62 leaves room.
SEED_MAX = 2**62


@dataclass(frozen=True)
class TrialSpec:
    """One attack trial. Every field is plain data (str, int, float, bool, list, dict)."""

    attack: str = "grnn"
    attack_params: dict[str, Any] = field(default_factory=dict)
    victim: str = "lenet"
    victim_params: dict[str, Any] = field(default_factory=dict)
    # A user's victim by import path: the hash of its architecture and initial weights
    # (grnn_engine.victims.victim_fingerprint), so its trials are content-addressed; None otherwise.
    victim_fingerprint: str | None = None
    dataset: str = "digits"
    data_root: str | None = None
    download: bool = False
    split: str = "test"
    image_size: int = 32
    batch_size: int = 1
    indices: list[int] | None = None  # explicit images of the private batch; else chosen from the seed
    distinct_labels: bool = False
    fl_round: int = 0
    fl: dict[str, Any] = field(default_factory=dict)  # FedAvg settings of the training stage
    update: str = "fedsgd"
    update_params: dict[str, Any] = field(default_factory=dict)  # fedavg: local_steps, local_lr
    defense: str = "none"
    defense_params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    success_psnr: float = 20.0
    eval_every: int = 50
    device: str = "auto"
    # Face re-identification (grnn_engine.reid): an identifier name scores the reconstruction; None skips it.
    reid: str | None = None
    reid_params: dict[str, Any] = field(default_factory=dict)

    def canonical(self, revision: int | None = None) -> dict[str, Any]:
        """The fields that define what is computed, as a JSON-ready dict; `revision` None: the attack's
        current revision (`Attack.revision`), else the one given (an earlier revision's canonical form)."""
        out = {k: v for k, v in asdict(self).items() if k not in _NOT_IN_KEY}
        if self.reid is None:
            # Left out when unset, so the keys of trials specified before reid existed do not change.
            del out["reid"], out["reid_params"]
        if self.victim_fingerprint is None:
            del out["victim_fingerprint"]  # likewise: registered victims' keys stay as they were
        if revision is None:
            revision = _attack_revision(self.attack, self.attack_params)
        if revision:
            out["attack_revision"] = revision  # likewise: left out at 0, the revision of every attack until re-tuned
        return out

    def key(self, revision: int | None = None) -> str:
        """Stable 16-hex-digit hash of the canonical JSON (sorted keys): same cell, same key, anywhere."""
        text = json.dumps(self.canonical(revision), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def earlier_keys(self) -> list[str]:
        """The keys this cell had under its attack's earlier revisions (0 up to the current one, excluded):
        results under them were computed by settings since re-tuned, and are superseded by this cell's."""
        return [self.key(r) for r in range(_attack_revision(self.attack, self.attack_params))]

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _attack_revision(attack: str, params: dict[str, Any]) -> int:
    """The registered attack's `Attack.revision` for these parameters; 0 for a name the registry lacks (the
    spec's validation reports it)."""
    from grnn_engine.attacks import ATTACKS  # here: the attacks import torch, and a TrialSpec is plain data

    if attack not in ATTACKS:
        return 0
    revision = getattr(ATTACKS.get(attack), "revision", None)
    return int(revision(params)) if revision is not None else 0
