"""The knob search behind GRNN's `strong` preset, kept so that the preset can be re-derived.

Each variant is a dict of grnn attack parameters; each is run on the same real images (one batch per
seed) and scored by mean matched PSNR and label accuracy. The truth is used here only to *score* the
variants, offline, as any benchmark does; the attack itself never sees it. Every result is appended as one
JSON line to the log (default /tmp/grnn_strength_search.log), so a long screen can be read while it runs.

The named stages are the screens that were run, in order; `--variant NAME=JSON` adds ad-hoc ones.

Usage: python benchmarks/strength_search.py --stage optimizer --seeds 0 1 2 3 --batch-sizes 1
       python benchmarks/strength_search.py --variant 'mine={"preset": "strong", "restarts": 2}'
Compute is counted as victim gradient evaluations: iterations * restarts + refine_iterations (paper: 1000).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from grnn_engine import TrialSpec, run_trial
from grnn_engine.cli_values import run_command

PAPER: dict[str, Any] = {"preset": "paper"}

# The base of the soft-pool screen: the paper's generator and optimiser with the strong preset's other choices.
_SOFT: dict[str, Any] = {"preset": "paper", "iterations": 2000, "labels": "inferred", "select": "best",
                         "chroma_weight": 3.0, "refine_iterations": 1000, "refine_lr": 0.1}

# The screens, in the order they were run; each winner fed the next. See the README for the numbers.
STAGES: dict[str, dict[str, dict[str, Any]]] = {
    "baseline": {"paper": PAPER},
    "optimizer": {
        "paper": PAPER,
        "adam1e-4": {"optimizer": "adam", "lr": 1e-4},
        "adam3e-4": {"optimizer": "adam", "lr": 3e-4},
        "adam1e-3": {"optimizer": "adam", "lr": 1e-3},
        "adam3e-3": {"optimizer": "adam", "lr": 3e-3},
        "rms3e-4": {"lr": 3e-4},
    },
    # Measured when the pixel refinement used Adam (all worse than paper2k); it now uses momentum SGD.
    "refine": {
        "refine1k_lr1e-2": {"refine_iterations": 1000, "refine_lr": 0.01},
        "refine1k_lr3e-2": {"refine_iterations": 1000, "refine_lr": 0.03},
        "refine1k_lr3e-3": {"refine_iterations": 1000, "refine_lr": 0.003},
        "paper2k": {"iterations": 2000},
    },
    "prior": {
        "tv1e-2": {"tv_weight": 1e-2},
        "tv1e-1": {"tv_weight": 1e-1},
        "tv1": {"tv_weight": 1.0},
        "cos0.1": {"cosine_weight": 0.1},
        "cos1": {"cosine_weight": 1.0},
    },
    "generator": {
        "norm_none": {"generator_norm": "none"},
        "norm_none_adam1e-3": {"generator_norm": "none", "optimizer": "adam", "lr": 1e-3},
        "width64": {"width": 64},
        "noise512": {"noise_dim": 512},
        "inferred_best": {"labels": "inferred", "select": "best"},
        "cosine_sched": {"schedule": "cosine"},
    },
    # At the 3x budget (3000 victim gradient evaluations), at batch 1 and 4.
    "budget": {
        "paper3k": {"iterations": 3000},
        "r3_best": {"restarts": 3, "labels": "inferred", "select": "best"},
        "r3x900_mean_ref300": {"restarts": 3, "iterations": 900, "labels": "inferred", "select": "best",
                               "combine": "mean", "refine_iterations": 300, "refine_tv_weight": 1.0,
                               "chroma_weight": 3.0},
        "r2_mean_ref1k": {"restarts": 2, "labels": "inferred", "select": "best", "combine": "mean",
                          "refine_iterations": 1000, "refine_tv_weight": 1.0, "chroma_weight": 3.0},
        "3k_chroma_tv": {"iterations": 3000, "labels": "inferred", "select": "best", "tv_weight": 0.1,
                         "chroma_weight": 3.0},
    },
    # The two winners above combined.
    "combined": {
        "r3x900_mean_ref300_tv": {"restarts": 3, "iterations": 900, "labels": "inferred", "select": "best",
                                  "combine": "mean", "refine_iterations": 300, "refine_tv_weight": 1.0,
                                  "chroma_weight": 3.0, "tv_weight": 0.1},
        "2700_ref300_tv": {"iterations": 2700, "labels": "inferred", "select": "best", "tv_weight": 0.1,
                           "chroma_weight": 3.0, "refine_iterations": 300, "refine_tv_weight": 1.0},
        "r3x900_mean_ref300_tv_cos": {"restarts": 3, "iterations": 900, "labels": "inferred", "select": "best",
                                      "combine": "mean", "refine_iterations": 300, "refine_tv_weight": 1.0,
                                      "chroma_weight": 3.0, "tv_weight": 0.1, "cosine_weight": 1.0},
    },
    # 2026-11-30: the victim's max-pools softened and annealed back to the exact model (attacks/soft_pool.py),
    # which lets the fit reach a 25-60x lower gradient loss; all at 3000 evaluations but the first.
    "soft_pool": {
        "soft_1k_ref1k": {**_SOFT, "iterations": 1000, "refine_lr": 0.3, "soft_pool": 0.1, "soft_pool_end": 1e-3,
                          "tv_weight": 0.1, "refine_tv_weight": 0.1},
        "soft_2k_ref1k": {**_SOFT, "soft_pool": 0.1, "soft_pool_end": 1e-3, "tv_weight": 0.1,
                          "refine_tv_weight": 0.1},
        "soft_r2x1500": {**_SOFT, "iterations": 1500, "restarts": 2, "refine_iterations": 0, "soft_pool": 0.1,
                         "soft_pool_end": 1e-3, "tv_weight": 0.1},
        "soft_hot_tv0.3": {**_SOFT, "soft_pool": 0.3, "soft_pool_end": 3e-3, "tv_weight": 0.3,
                           "refine_tv_weight": 0.1},
    },
}


def compute_cost(params: dict[str, Any]) -> int:
    """Victim gradient evaluations of one attack with these parameters (the preset's values filled in)."""
    from grnn_engine.attacks.grnn import PRESETS

    knobs = {**PRESETS[params.get("preset", "paper")], **params}
    return int(knobs["iterations"]) * int(knobs["restarts"]) + int(knobs["refine_iterations"])


def run_variant(name: str, params: dict[str, Any], *, dataset: str, data_root: str | None, victim: str,
                batch_size: int, seeds: list[int], log: str) -> dict[str, Any]:
    """Run one variant over the seeds; log and return its summary."""
    psnrs, accs, times = [], [], []
    for seed in seeds:
        start = time.perf_counter()
        result = run_trial(TrialSpec(attack="grnn", attack_params=params, dataset=dataset, data_root=data_root,
                                     victim=victim, batch_size=batch_size, seed=seed, eval_every=10_000))
        times.append(time.perf_counter() - start)
        psnr = float(result.metrics.get("psnr", float("nan")))
        acc = float(result.metrics.get("label_acc", float("nan")))
        psnrs.append(psnr)
        accs.append(acc)
    summary = {
        "variant": name, "params": params, "dataset": dataset, "victim": victim, "batch_size": batch_size,
        "seeds": seeds, "psnr_mean": statistics.fmean(psnrs), "psnr": [round(p, 2) for p in psnrs],
        "label_acc_mean": statistics.fmean(accs), "cost": compute_cost(params), "s_per_trial": statistics.fmean(times),
    }
    with open(log, "a") as f:
        f.write(json.dumps(summary) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=sorted(STAGES), action="append", default=[])
    parser.add_argument("--variant", action="append", default=[], help="NAME=JSON of grnn parameters")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data-root", default="/work/shared/data")
    parser.add_argument("--victim", default="lenet")
    parser.add_argument("--log", default="/tmp/grnn_strength_search.log")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    variants: dict[str, dict[str, Any]] = {}
    for stage in args.stage:
        variants.update(STAGES[stage])
    for text in args.variant:
        name, _, spec = text.partition("=")
        variants[name] = json.loads(spec)
    if not variants:
        parser.error("give at least one --stage or --variant")
    for batch_size in args.batch_sizes:
        for name, params in variants.items():
            s = run_variant(name, params, dataset=args.dataset, data_root=args.data_root, victim=args.victim,
                            batch_size=batch_size, seeds=args.seeds, log=args.log)
            print(f"B={batch_size} {name:28s} psnr {s['psnr_mean']:6.2f} {s['psnr']} label_acc "
                  f"{s['label_acc_mean']:.2f} cost {s['cost']} {s['s_per_trial']:.1f}s/trial", flush=True)
    return 0


if __name__ == "__main__":
    run_command(main)
