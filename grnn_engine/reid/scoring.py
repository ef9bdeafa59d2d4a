"""reid_metrics: the reid columns of one trial, for the matched reconstruction, the clean photos (the
ceiling: what a perfect attack reaches) and uniform noise (the floor: chance)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from grnn_engine.reid.identifier import Identifier

__all__ = ["TOP_K", "reid_metrics"]

TOP_K = 5
# The floor's noise has its own stream, so it is the same whatever the attack drew.
_RANDOM_STREAM = 2_000_003


def _summary(prefix: str, ranks: Tensor) -> dict[str, float]:
    r = ranks.double()
    return {
        f"{prefix}_top1": float((r <= 1).double().mean()),
        f"{prefix}_top5": float((r <= TOP_K).double().mean()),
        f"{prefix}_rank": float(r.mean()),
    }


def reid_metrics(
    identifier: Identifier, recon: Tensor, truth: Tensor, labels: Tensor, *, seed: int = 0
) -> dict[str, Any]:
    """The reid columns of one trial: top-1/top-5 hit rates and mean rank of the true identity for the
    matched reconstruction (`recon[i]` matched to `truth[i]`), the clean photos (ceiling) and uniform
    noise (floor), plus per image the identity ranked first for the reconstruction and its true rank."""
    recon, truth = recon.detach().cpu(), truth.detach().cpu()
    labels = labels.detach().cpu().long()
    generator = torch.Generator().manual_seed(int(seed) + _RANDOM_STREAM)
    noise = torch.rand(truth.shape, generator=generator)
    recon_ranks = identifier.ranks(recon, labels)
    return {
        **_summary("reid", recon_ranks),
        **_summary("reid_clean", identifier.ranks(truth, labels)),
        **_summary("reid_random", identifier.ranks(noise, labels)),
        "reid_identity": [int(v) for v in identifier.top1(recon)],
        "reid_rank_per_image": [int(v) for v in recon_ranks],
    }
