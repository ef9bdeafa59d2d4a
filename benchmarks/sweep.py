"""Sweep throughput: one fixed small sweep run every way a lab would run it, timed.

The sweep: digits, lenet, GRNN (paper loop), B = 1, `--cells` seeds, `--iterations` iterations per trial
(a few seconds each). Phases (`--phases`, all by default):
- ray1, ray2: the runner (orchestrator.running.tune_run.run_cells, as `python -m orchestrator.sweep` drives it) on an
  embedded Ray with 1 and 2 CPUs, one CPU per trial;
- ray2pack: the same as ray2 with `pack: N` (`--pack`, default 3): N cells per Ray trial, run together by
  grnn_engine.batched (orchestrator.running.packing); trials per hour still count cells;
- cluster: the same on a ray.cluster_utils.Cluster of 2 worker nodes x 1 CPU (head with 0 CPUs);
- mp: a plain multiprocessing pool of 2 processes calling run_trial, the floor any scheduler is held to;
- batched: in this process, 1 thread, trials per hour of run_trial one by one against
  grnn_engine.batched.run_trials_batched packs of N = 1, 4, 16 (`--batched-iterations` per trial).

Figures:
- trials per hour: trials / wall time of the sweep (the whole run_cells call: FL stage preparation, Tune,
  workers' start-up and the trials; Ray's own start-up, paid once per sweep, is left out and shown);
- sweep efficiency: sum of the trials' engine time (run_trial's wall_s) / (slots x sweep wall time);
  `efficiency_steady_*` uses the time from the first trial's start to the last one's end instead, the
  value a long sweep tends to once the fixed start-up (`before_first_trial_s`) is amortised;
- Ray overhead per trial: the trial's wall time as the driver sees it (Tune's trial start to its final result
  arriving) minus the engine's own wall time for that trial (median; the mean beside it).
  `overhead_frac` = median overhead / 10 s, the issue's reference trial (goal < 0.05);
  `overhead_frac_measured` = median overhead / this sweep's median trial time.

The machine this runs on may be shared: the load average is printed at the start and the end of each phase;
quote it beside any figure. Ends with one JSON line (`efficiency_2cpu`, `overhead_frac`, `trials_per_hour`,
and the other figures).

Usage: python benchmarks/sweep.py [--cells 6] [--iterations 100] [--pack 3]
                                 [--phases ray1 ray2 ray2pack cluster mp batched]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from grnn_engine import TrialSpec, run_trial
from grnn_engine.batched import run_trials_batched
from grnn_engine.cli_values import run_command

# Quiet, local Ray: no usage reporting, no token auth for a local cluster (as the tests run it).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

PHASES = ("ray1", "ray2", "ray2pack", "cluster", "mp", "batched")
REFERENCE_TRIAL_S = 10.0  # the goal: Ray overhead < 5% of a 10-second trial
PACKS = (1, 4, 16)


def sweep_cells(cells: int, iterations: int, eval_every: int) -> list[TrialSpec]:
    """The fixed sweep, expanded by the sweep spec parser exactly as a YAML spec would be."""
    from orchestrator.spec import parse_spec

    spec = parse_spec({
        "name": "bench-sweep",
        "data": {"dataset": "digits", "image_size": 32},
        "grid": {
            "victim": ["lenet"], "batch_size": [1], "seed": cells,
            "attack": [{"name": "grnn", "params": {"iterations": iterations}, "eval_every": eval_every}],
        },
        "resources": {"cpu": 1},
    })
    return spec.cells()


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs"


# --- Ray phases -------------------------------------------------------------------------------------


def trial_timer() -> tuple[Any, dict[str, dict[str, float]]]:
    """A Tune callback that times every trial as the driver sees it (instrumentation only), handed to run_cells.

    Returns (callback, {trial_key: {"start", "end", "engine_s"}}), the dict filled while run_cells runs.
    """
    from ray import tune

    times: dict[str, dict[str, float]] = {}

    class TrialTimer(tune.Callback):
        def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            times.setdefault(trial.config["trial_key"], {})["start"] = time.monotonic()

        def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any) -> None:
            if result.get("final"):
                entry = times.setdefault(trial.config["trial_key"], {})
                entry["end"] = time.monotonic()
                entry["engine_s"] = float(result.get("wall_s") or 0.0)

    return TrialTimer(), times


def ray_phase(name: str, cells: list[TrialSpec], work: Path, *, num_cpus: int | None = None,
              cluster_nodes: int = 0, pack: int = 1) -> dict[str, Any]:
    """Run `cells` through run_cells on an embedded Ray (num_cpus) or a local multi-node cluster.

    With pack > 1 a Ray trial holds several cells, so only the sweep-level figures are kept (trials per
    hour and efficiency, counted in cells); per-trial overheads are those of packs, not comparable.
    """
    import ray

    from orchestrator.results import Ledger
    from orchestrator.running.options import RunOptions
    from orchestrator.running.ray_start import start_ray
    from orchestrator.running.stages import needs_stage_tasks
    from orchestrator.running.tune_run import run_cells

    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's Unix socket paths are limited
    os.environ["RAY_TMPDIR"] = ray_tmp
    cluster = None
    print(f"# {name}: {len(cells)} trials; {load()}", flush=True)
    t0 = time.monotonic()
    try:
        if cluster_nodes:
            from ray.cluster_utils import Cluster

            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
            for _ in range(cluster_nodes):
                cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            start_ray(address=cluster.address)
        else:
            # as `python -m orchestrator.sweep` starts it: a worker pool only for FL stage tasks
            start_ray(num_cpus=num_cpus, temp_dir=ray_tmp, worker_pool=needs_stage_tasks(cells))
        ray_start_s = time.monotonic() - t0
        ledger = Ledger(work / name, sweep=name)
        # A fresh stage cache per phase: every phase prepares the same stages, none inherits another's.
        options = RunOptions(name=name, cpu=1.0, pack=pack, cache_dir=str(work / f"{name}-stages"))
        timer, times = trial_timer()
        call = time.monotonic()
        summary = run_cells(cells, ledger, options, progress_stream=io.StringIO(), live=False, callbacks=[timer])
        wall = time.monotonic() - call
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        os.environ.pop("RAY_TMPDIR", None)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if summary.complete != len(cells):
        print(f"# {name}: only {summary.complete} of {len(cells)} trials completed (see {ledger.folder})")
    if pack > 1:
        # `times` holds Ray trials (packs); the cells' engine time is the rows' wall_s, summed by the summary.
        spans = [t for t in times.values() if {"start", "end"} <= set(t)]
        first, last = min(t["start"] for t in spans), max(t["end"] for t in spans)
        print(f"# {name}: done; {load()}", flush=True)
        return {
            "trials": summary.ran, "slots": summary.slots, "wall_s": wall, "ray_start_s": ray_start_s,
            "trials_per_hour": summary.ran / wall * 3600, "efficiency": summary.trial_wall_s / (summary.slots * wall),
            "efficiency_steady": summary.trial_wall_s / (summary.slots * (last - first)),
            "before_first_trial_s": first - call,
        }  # fmt: skip
    timed = [t for t in times.values() if {"start", "end", "engine_s"} <= set(t)]
    overheads = [t["end"] - t["start"] - t["engine_s"] for t in timed]
    engine = [t["engine_s"] for t in timed]
    first_start, last_end = min(t["start"] for t in timed), max(t["end"] for t in timed)
    out = {
        "trials": summary.ran, "slots": summary.slots, "wall_s": wall, "ray_start_s": ray_start_s,
        "trials_per_hour": summary.ran / wall * 3600,
        # The whole run_cells call is the sweep's wall time (stage preparation, Tune, workers' start-up).
        "efficiency": sum(engine) / (summary.slots * wall),
        # From the first trial's start to the last trial's end: what a long sweep tends to.
        "efficiency_steady": sum(engine) / (summary.slots * (last_end - first_start)),
        "before_first_trial_s": first_start - call,
        "trial_s": statistics.median(engine), "overhead_s": statistics.median(overheads),
        "overhead_mean_s": statistics.fmean(overheads),
    }
    print(f"# {name}: done; {load()}", flush=True)
    return out


# --- plain multiprocessing baseline ------------------------------------------------------------------


def _pool_init() -> None:
    torch.set_num_threads(1)


def _pool_trial(fields: dict[str, Any]) -> tuple[str, float]:
    result = run_trial(TrialSpec(**fields))
    return result.status, result.wall_s


def pool_phase(cells: list[TrialSpec], processes: int) -> dict[str, Any]:
    print(f"# mp: {len(cells)} trials on a pool of {processes}; {load()}", flush=True)
    start = time.monotonic()
    # spawn: fresh interpreters, as Ray's workers are; their start-up is part of the wall time.
    with multiprocessing.get_context("spawn").Pool(processes, initializer=_pool_init) as pool:
        done = pool.map(_pool_trial, [dataclasses.asdict(c) for c in cells], chunksize=1)
    wall = time.monotonic() - start
    engine = [w for _, w in done]
    print(f"# mp: done; {load()}", flush=True)
    return {
        "trials": len(done), "slots": processes, "wall_s": wall, "trials_per_hour": len(done) / wall * 3600,
        "efficiency": sum(engine) / (processes * wall), "trial_s": statistics.median(engine),
    }


# --- batched executor ---------------------------------------------------------------------------------


def batched_phase(iterations: int, eval_every: int, one_by_one: int) -> dict[str, float]:
    """Trials per hour in one process, 1 thread: run_trial one by one vs packs of N in run_trials_batched."""
    torch.set_num_threads(1)
    cells = [dataclasses.replace(c, device="cpu") for c in sweep_cells(max(PACKS), iterations, eval_every)]
    # Imports, data caches and torch.func's first-use set-up, outside the timings.
    warm = [dataclasses.replace(c, attack_params={"iterations": 2}) for c in cells[:2]]
    run_trial(warm[0])
    run_trials_batched(warm)
    print(f"# batched: {iterations} iterations per trial; {load()}", flush=True)

    def one_by_one_s(todo: list[TrialSpec]) -> float:
        start = time.perf_counter()
        for cell in todo:
            run_trial(cell)
        return time.perf_counter() - start

    # Half the one-by-one trials before the packs and half after: a machine whose load drifts (shared)
    # then biases neither side.
    half = max(1, one_by_one // 2)
    elapsed = one_by_one_s(cells[:half])
    packs: dict[str, float] = {}
    for n in PACKS:
        start = time.perf_counter()
        run_trials_batched(cells[:n])
        packs[f"n{n}"] = n / (time.perf_counter() - start) * 3600
    elapsed += one_by_one_s(cells[half:2 * half])
    base = 2 * half / elapsed * 3600
    out = {"one_by_one": base, **packs}
    print(f"{'mode':12} {'trials/hour':>12} {'x one-by-one':>13}")
    print(f"{'one-by-one':12} {base:12.0f} {1.0:13.2f}")
    for n in PACKS:
        tph = packs[f"n{n}"]
        print(f"{'batched N=' + str(n):12} {tph:12.0f} {tph / base:13.2f}", flush=True)
    print(f"# batched: done; {load()}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=6, help="trials in the sweep (seeds 0..N-1)")
    parser.add_argument("--iterations", type=int, default=100, help="GRNN iterations per trial")
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--batched-iterations", type=int, default=30)
    parser.add_argument("--pack", type=int, default=3, help="cells per Ray trial in the ray2pack phase")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# torch {torch.__version__}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}; {load()}")
    cells = sweep_cells(args.cells, args.iterations, args.eval_every)
    work = Path(tempfile.mkdtemp(prefix="grnn-bench-sweep-"))
    figures: dict[str, Any] = {}
    rows: dict[str, dict[str, Any]] = {}
    try:
        if "ray1" in args.phases:
            rows["ray 1 CPU"] = ray_phase("ray1", cells, work, num_cpus=1)
        if "ray2" in args.phases:
            rows["ray 2 CPUs"] = ray_phase("ray2", cells, work, num_cpus=2)
        if "ray2pack" in args.phases:
            rows[f"ray2 pack{args.pack}"] = ray_phase("ray2pack", cells, work, num_cpus=2, pack=args.pack)
        if "cluster" in args.phases:
            rows["cluster 2x1"] = ray_phase("cluster", cells, work, cluster_nodes=2)
        if "mp" in args.phases:
            rows["mp pool 2"] = pool_phase(cells, 2)
        if rows:
            columns = [("slots", "d"), ("trials", "d"), ("wall_s", ".1f"), ("trials_per_hour", ".0f"),
                       ("efficiency", ".2f"), ("efficiency_steady", ".2f"), ("trial_s", ".2f"),
                       ("overhead_s", ".3f"), ("overhead_mean_s", ".3f"), ("before_first_trial_s", ".1f"),
                       ("ray_start_s", ".1f")]
            print("mode        " + " ".join(name for name, _ in columns))
            for mode, r in rows.items():
                cells_text = [format(r[k], fmt).rjust(len(k)) if k in r else "-".rjust(len(k)) for k, fmt in columns]
                print(f"{mode:11} " + " ".join(cells_text))
        if "batched" in args.phases:
            batched = batched_phase(args.batched_iterations, args.eval_every, one_by_one=4)
            figures.update({f"batched_trials_per_hour_{k}": round(v) for k, v in batched.items()})
            figures.update({f"batched_speedup_{k}": round(v / batched["one_by_one"], 3)
                            for k, v in batched.items() if k != "one_by_one"})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    keys = {"ray 1 CPU": "1cpu", "ray 2 CPUs": "2cpu", "cluster 2x1": "cluster_2x1", "mp pool 2": "mp_2",
            f"ray2 pack{args.pack}": f"2cpu_pack{args.pack}"}
    for mode, r in rows.items():
        figures[f"efficiency_{keys[mode]}"] = round(r["efficiency"], 3)
        if "efficiency_steady" in r:
            figures[f"efficiency_steady_{keys[mode]}"] = round(r["efficiency_steady"], 3)
        figures[f"trials_per_hour_{keys[mode]}"] = round(r["trials_per_hour"])
    if f"ray2 pack{args.pack}" in rows:  # beside trials_per_hour: the same sweep on 2 CPUs, packed
        figures[f"trials_per_hour_pack{args.pack}"] = round(rows[f"ray2 pack{args.pack}"]["trials_per_hour"])
    if "ray 2 CPUs" in rows:
        r = rows["ray 2 CPUs"]
        figures["trials_per_hour"] = round(r["trials_per_hour"])
        figures["overhead_s"] = round(r["overhead_s"], 3)
        figures["overhead_mean_s"] = round(r["overhead_mean_s"], 3)
        figures["overhead_frac"] = round(r["overhead_s"] / REFERENCE_TRIAL_S, 4)
        figures["overhead_frac_measured"] = round(r["overhead_s"] / r["trial_s"], 4)
        figures["trial_s"] = round(r["trial_s"], 3)
        figures["before_first_trial_s_2cpu"] = round(r["before_first_trial_s"], 1)
    figures["load_average"] = round(os.getloadavg()[0], 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    run_command(main)
