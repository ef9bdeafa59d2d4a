"""Breaking points found by Optuna search vs by a dense grid, side by side (the search's accuracy check).

Runs the search sweep (sweeps/breakpoints.yaml by default) and its dense-grid twin, in which every searched
strength becomes `--grid-steps` values over the same range (log-spaced for loguniform, evenly spaced for
uniform and int, every value for categorical), both through `orchestrator.sweep` into `--results`. Then it
computes both breaking-point tables with `orchestrator.report.breaking_points` and prints them side by
side. The search agrees with the grid when, for every attack x batch size x defense, its breaking strength lies
within one grid step of the grid's (`within_one_step`), or both find none inside the range (broken at every
strength tried, or never). The line before last is JSON with each group's
values; the last line is JSON: {"search_trials": N, "grid_trials": M, "agree": true|false}.

Both sweeps resume: rerunning the same command continues where an interrupted run stopped.

Usage: python benchmarks/breakpoints.py                       # the real thing: sized for a GPU cluster
       python benchmarks/breakpoints.py --address auto        # on a running Ray cluster
       python benchmarks/breakpoints.py --cpu                 # a real CIFAR-10 run sized for a 2-core CPU
       python benchmarks/breakpoints.py --quick               # a CPU-sized smoke run on digits (minutes)
--cpu keeps the spec's data (CIFAR-10 test images from $GRNN_DATA_ROOT), victim, defenses and strength ranges,
and shortens the rest to fit about 40 minutes on 2 CPU cores: GRNN 300 iterations, DLG 100 L-BFGS steps, batch
sizes 1 and 4, seed 0, 8 grid steps and 4 samples per study (64 grid and 32 search trials). Its threshold is the
spec's 10 dB, which holds at those iterations too (measured undefended: GRNN 14-15 dB at batch 1 and 4, broken
6-8 dB; DLG 12.6 dB at batch 1 on seed 0's image, about 5 dB broken, but only 7 dB undefended at batch 4, so
DLG at batch 4 fails at every strength and its breaking strength is simply the weakest tested one).
--quick replaces the data, attacks, batch sizes and seeds by digits, iDLG at 20 iterations, batch 1, seed 0, with
a 6.5 dB threshold (what iDLG reaches on digits that fast), 8 grid steps and 4 samples per study; it checks the
machinery, not the claim.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from grnn_engine.cli_values import run_command
from orchestrator import sweep
from orchestrator.report import STRENGTH, breaking_points, within_one_step
from orchestrator.results import load
from orchestrator.spec import OptunaSearch, SearchParam, load_spec, parse_spec

# What --quick and --cpu replace in the spec (see the module doc); the grid keys go into its grid.
MODES: dict[str, dict[str, Any]] = {
    "quick": {
        "data": {"dataset": "digits", "root": None, "download": False, "image_size": 32, "split": "test",
                 "distinct_labels": False},
        "grid": {"attack": [{"name": "idlg", "params": {"iterations": 20}, "eval_every": 10}],
                 "batch_size": [1], "seed": [0]},
        "threshold": 6.5,
        "num_samples": 4,
        "grid_steps": 8,
    },
    "cpu": {
        "grid": {"attack": [{"name": "grnn", "params": {"iterations": 300}, "eval_every": 50},
                            {"name": "dlg", "params": {"iterations": 100}, "eval_every": 20}],
                 "batch_size": [1, 4], "seed": [0]},
        "threshold": 10.0,
        "num_samples": 4,
        "grid_steps": 8,
    },
}  # fmt: skip


def grid_steps(param: SearchParam, count: int) -> list[Any]:
    """`count` values spanning the searched range, as the dense grid uses them."""
    if param.type == "categorical":
        return list(param.values or [])
    low, high = float(param.low or 0.0), float(param.high or 0.0)
    if param.type == "loguniform" or (param.type == "int" and param.log):
        values = np.geomspace(low, high, count)
    else:
        values = np.linspace(low, high, count)
    if param.type == "int":
        return sorted({int(round(v)) for v in values})
    return [float(v) for v in values]


def twin_specs(
    spec_path: str, mode: str | None, steps: int
) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[Any]]]:
    """(search spec, grid spec, grid steps per searched parameter) as plain data; `mode` a key of MODES or None."""
    spec = load_spec(spec_path)
    if not isinstance(spec.search, OptunaSearch) or spec.search.breaking_point is None:
        raise SystemExit(f"{spec_path}: needs search: {{method: optuna, breaking_point: ...}}")
    data = yaml.safe_load(spec.to_yaml())
    if mode is not None:
        changes = MODES[mode]
        data["data"] = changes.get("data", data["data"])
        data["grid"].update(changes["grid"])
        data["search"]["breaking_point"]["threshold"] = changes["threshold"]
        data["search"]["num_samples"] = changes["num_samples"]
        data["resources"] = {"cpu": 1, "gpu": 0}
    searched = {name: SearchParam(**p) for name, p in data["search"]["params"].items()}
    values = {name: grid_steps(p, steps) for name, p in searched.items()}
    search = {**data, "name": f"{data['name']}-search"}
    grid = json.loads(json.dumps({**data, "name": f"{data['name']}-grid"}))
    grid["search"] = {"method": "grid"}
    for name, steps_of in values.items():
        family, _, param = name.partition(".params.")
        if family != "defense":
            raise SystemExit(f"{spec_path}: only defense strengths can be compared (got {name})")
        for entry in grid["grid"]["defense"]:
            if STRENGTH.get(entry["name"], ("",))[0] == param:
                entry.setdefault("params", {})[param] = steps_of
    parse_spec(search, "search twin")
    parse_spec(grid, "grid twin")
    return search, grid, values


def run_sweep(data: dict[str, Any], root: Path, extra: list[str]) -> pd.DataFrame:
    path = root / f"{data['name']}.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    sweep.run([str(path), "--results", str(root), "--yes", *extra])
    return load(root / data["name"])


def show(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spec", default="sweeps/breakpoints.yaml")
    parser.add_argument("--results", default="/tmp/grnn-breakpoints", help="results root of both sweeps")
    parser.add_argument(
        "--grid-steps", type=int, default=None, help="dense grid values per strength (default 16)"
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CPU-sized smoke run on digits (see above)")
    size.add_argument(
        "--cpu", action="store_true", help="real CIFAR-10 run sized for a 2-core CPU (see above)"
    )
    parser.add_argument("--address", default=None, help="Ray cluster address; default: embedded Ray")
    parser.add_argument("--max-concurrent", type=int, default=None)
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "cpu" if args.cpu else None
    steps = args.grid_steps or (MODES[mode]["grid_steps"] if mode else 16)
    search, grid, values = twin_specs(args.spec, mode, steps)
    threshold = search["search"]["breaking_point"]["threshold"]
    if threshold is None:
        threshold = search["success_psnr"]
    metric = search["search"]["breaking_point"]["metric"]
    extra = [*(["--address", args.address] if args.address else []),
             *(["--max-concurrent", str(args.max_concurrent)] if args.max_concurrent else [])]  # fmt: skip
    root = Path(args.results)
    start = time.perf_counter()
    searched = run_sweep(search, root, extra)
    search_s = time.perf_counter() - start
    gridded = run_sweep(grid, root, extra)
    grid_s = time.perf_counter() - start - search_s

    found = breaking_points(searched, metric=metric, threshold=threshold)
    dense = breaking_points(gridded, metric=metric, threshold=threshold)
    keys = list(dense.columns[: dense.columns.get_loc("param")])  # context, attack, batch_size, defense
    table = dense.merge(found, on=keys, how="outer", suffixes=("_grid", "_search"))
    groups = []
    print(f"\nbreaking points ({metric} below {threshold:g}): dense grid of {steps} steps vs Optuna search")
    print(f"{'attack':8s} {'batch':>5s} {'defense':10s} {'grid (low, at]':>22s} {'search (low, at]':>22s} "
          f"{'trials g/s':>10s}  agree")  # fmt: skip
    for _, row in table.iterrows():
        param, direction = STRENGTH[row["defense"]]
        name = f"defense.params.{param}"
        grid_at = None if pd.isna(row["breaking_strength_grid"]) else float(row["breaking_strength_grid"])
        search_at = (
            None if pd.isna(row["breaking_strength_search"]) else float(row["breaking_strength_search"])
        )
        # Broken at every strength either method tried: both find that the attack fails already at the weak end
        # of the range, the mirror image of "never broken" (None on both sides). There is no breaking point
        # inside the range to compare; the search's weakest sample merely lies above the grid's weakest step.
        below = grid_at is not None and pd.isna(row["strength_low_grid"])
        both_below = below and search_at is not None and pd.isna(row["strength_low_search"])
        agree = both_below or within_one_step(search_at, grid_at, values[name], direction)
        groups.append({
            **{k: row[k] for k in keys}, "grid": grid_at, "search": search_at,
            "grid_low": None if pd.isna(row["strength_low_grid"]) else float(row["strength_low_grid"]),
            "search_low": None if pd.isna(row["strength_low_search"]) else float(row["strength_low_search"]),
            "below_range": below, "agree": agree,
        })  # fmt: skip
        print(
            f"{row['attack']:8s} {int(row['batch_size']):5d} {row['defense']:10s} "
            f"{'(' + show(row['strength_low_grid']) + ', ' + show(grid_at) + ']':>22s} "
            f"{'(' + show(row['strength_low_search']) + ', ' + show(search_at) + ']':>22s} "
            f"{show(row['trials_grid']) + '/' + show(row['trials_search']):>10s}  {agree}"
            + ("  (broken at every tested strength: below the range)" if below else "")
            + (" by both" if both_below else "")
        )
    agree = bool(groups) and all(g["agree"] for g in groups)
    print(
        f"search used {len(searched)} trials, the grid {len(gridded)} "
        f"({'at most' if len(searched) <= len(gridded) / 2 else 'more than'} half); "
        f"this run took {search_s / 60:.1f} + {grid_s / 60:.1f} min (search + grid, resumed trials not counted)"
    )
    print(json.dumps({"groups": groups}, default=str))
    print(json.dumps({"search_trials": len(searched), "grid_trials": len(gridded), "agree": agree}))
    return 0


if __name__ == "__main__":
    run_command(main)
