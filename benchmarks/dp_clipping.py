"""DP-SGD's per-example clipping: this engine's (torch.func vmap, grnn_engine.defenses.DPSGD) against
Opacus's GradSampleModule (per-sample gradients by hooks), on the same model and batch, 1 torch thread.

Prints one JSON line: milliseconds per clipped-and-summed batch for each, their ratio, and the largest
difference between the two clipped sums (they compute the same quantity).
Usage: python benchmarks/dp_clipping.py [--batch 32] [--repeats 20] [--victim lenet]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from grnn_engine import create_victim
from grnn_engine.attacks.base import trainable_parameters
from grnn_engine.cli_values import run_command
from grnn_engine.defenses import clip_per_example, per_example_gradients


def ours(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> list[torch.Tensor]:
    return [g.sum(0) for g in clip_per_example(per_example_gradients(model, x, y), clip)]


def opacus_sum(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> list[torch.Tensor]:
    module.zero_grad(set_to_none=True)
    F.cross_entropy(module(x), y, reduction="sum").backward()
    per = [p.grad_sample for p in module.parameters()]
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per]).norm(dim=0)
    factor = (clip / (norms + 1e-12)).clamp(max=1.0)
    return [(g * factor.view(-1, *([1] * (g.dim() - 1)))).sum(0) for g in per]


def timed(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--victim", default="lenet")
    args = p.parse_args()
    from opacus import GradSampleModule

    torch.set_num_threads(1)
    model = create_victim(args.victim, num_classes=10, seed=0)
    for q in trainable_parameters(model):
        q.requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(args.batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (args.batch,), generator=gen)
    # Opacus records activations only in train mode (the same function for a model without BatchNorm/dropout)
    wrapped = GradSampleModule(create_victim(args.victim, num_classes=10, seed=0).train())
    ours_ms = timed(lambda: ours(model, x, y, 1.0), args.repeats)
    opacus_ms = timed(lambda: opacus_sum(wrapped, x, y, 1.0), args.repeats)
    a, b = ours(model, x, y, 1.0), opacus_sum(wrapped, x, y, 1.0)
    diff = max(float((u - v).abs().max()) for u, v in zip(a, b, strict=True))
    print(json.dumps({"victim": args.victim, "batch": args.batch, "ours_ms": round(ours_ms, 2),
                      "opacus_ms": round(opacus_ms, 2), "opacus_over_ours": round(opacus_ms / ours_ms, 2),
                      "max_abs_diff": diff}))  # fmt: skip


if __name__ == "__main__":
    run_command(main)
