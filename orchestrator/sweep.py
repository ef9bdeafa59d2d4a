"""`python -m orchestrator.sweep SPEC`: run a sweep spec on Ray Tune, resumably, into its results folder.

Order matters: the spec is validated, the results folder checked (same spec, writable, free space)
and the pending cells computed from the ledger, all before Ray starts; when nothing is pending Ray
never starts at all, so rerunning a finished sweep takes seconds.

Exit codes: 0 the sweep ran (failed trials are rows in the ledger, not errors of the command);
2 a mistake the user can fix (bad spec, spec changed under existing results, unwritable folder,
too many cells without --yes), with one sentence on stderr.

A search (`search: {method: optuna}`) runs its studies' remaining samples (num_samples minus the trials
already in the ledger); --retry-failed then lets new samples replace failed trials. FL stages are cached
under `<results root>/.stages` (or $GRNN_CACHE_DIR), so later sweeps on this machine reuse them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from grnn_engine.cli_values import OneLineParser, run_command, user_error
from grnn_engine.errors import GrnnError
from grnn_engine.trial_spec import TrialSpec
from orchestrator.progress import SweepSummary
from orchestrator.results import Ledger
from orchestrator.spec import OptunaSearch, Study, SweepSpec, load_spec

DEFAULT_RESULTS = "results"
MIN_FREE_BYTES = 100 * 2**20
BYTES_PER_TRIAL = 2**20  # a part plus an image grid, generously
DONE = {"COMPLETE"}
FAILED = {"FAILED", "TIMEOUT"}
SUBMIT_RESULTS = "$HOME/grnn-results"  # results root of a submitted job on the cluster's head node


class UsageError(Exception):
    """A mistake on the command line or in the results folder: print the sentence, exit 2."""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m orchestrator.sweep",
        description="Run a sweep spec (YAML) as Ray Tune trials; results go to <results>/<name>/.",
    )
    p.add_argument("spec", help="the sweep YAML, e.g. sweeps/quickstart.yaml")
    p.add_argument("--results", default=None,
                   help=f"results root (default: $GRNN_RESULTS or ./{DEFAULT_RESULTS})")
    p.add_argument("--dry-run", action="store_true", help="print the number of cells and the first few, then exit")
    p.add_argument("--fresh", action="store_true",
                   help="move an existing results folder of this name aside (to <name>.old-<time>) and start over")
    p.add_argument("--prune", action="store_true",
                   help="when the spec's grid dropped values: move the results of the cells it no longer has aside "
                   "(to <name>.pruned-<time>) and keep the rest")
    p.add_argument("--retry-failed", action="store_true", help="run FAILED and TIMEOUT cells again")
    p.add_argument("--compact", action="store_true", help="only rewrite trials.parquet from the parts")
    p.add_argument("--address", default=None, help="Ray cluster address (e.g. auto); default: embedded Ray")
    p.add_argument("--submit", action="store_true",
                   help="submit this sweep as a Ray job to the cluster (RAY_ADDRESS or --address) and return")
    p.add_argument("--yes", action="store_true", help="run even when the sweep has more cells than max_cells")
    p.add_argument("--max-concurrent", type=int, default=None, metavar="N",
                   help="run at most N trials at once (overrides the spec); a local Ray then takes only the "
                   "CPUs of N trials (N x resources.cpu)")
    return p


def results_root(arg: str | None) -> Path:
    return Path(arg or os.environ.get("GRNN_RESULTS") or DEFAULT_RESULTS)


def describe(cell: TrialSpec) -> str:
    """One short line per cell for --dry-run."""
    params = ",".join(f"{k}={v}" for k, v in sorted(cell.attack_params.items()))
    defense = cell.defense + (f"({','.join(f'{k}={v}' for k, v in sorted(cell.defense_params.items()))})"
                              if cell.defense_params else "")
    return (f"{cell.key()}  {cell.attack}({params}) victim={cell.victim} {cell.dataset} "
            f"bs={cell.batch_size} round={cell.fl_round} defense={defense} seed={cell.seed}")


def pending_cells(cells: list[TrialSpec], statuses: dict[str, str], retry_failed: bool) -> list[TrialSpec]:
    """Cells to run: no result yet, or a FAILED/TIMEOUT one with --retry-failed."""
    skip = DONE if retry_failed else DONE | FAILED
    return [c for c in cells if statuses.get(c.key()) not in skip]


def superseded_keys(ledger: Ledger, spec: SweepSpec, cells: list[TrialSpec], statuses: dict[str, str]) -> set[str]:
    """Keys in `ledger` (whose `statuses` these are) of results under an earlier revision of their attack (a
    preset re-tuned since): a grid cell's earlier keys, or in a search the trials of a study's earlier ids.
    Those cells (studies) run again under their new keys (ids)."""
    if not statuses:
        return set()
    if isinstance(spec.search, OptunaSearch):
        earlier = {old_id for study in spec.studies() for old_id in study.earlier_ids()}
        table = ledger.table() if earlier else None
        if table is None or "search_id" not in table.column_names:
            return set()
        return {key for key, search_id in zip(table.column("trial_key").to_pylist(),
                                              table.column("search_id").to_pylist(), strict=True)
                if search_id in earlier}
    return {key for cell in cells for key in cell.earlier_keys() if key in statuses}


def regridded(ledger: Ledger, spec: SweepSpec) -> bool:
    """Whether the spec `ledger` recorded differs from `spec` in its grid only. Settings outside the grid
    (utility_round, scheduler, ...) shape rows without entering their keys, so a folder run under other ones
    never continues, even where the keys still match."""
    if not ledger.spec_path.is_file():
        return False
    try:
        recorded = load_spec(ledger.spec_path)
    except GrnnError:  # written by an older schema, or edited by hand: not a spec this one can extend
        return False
    return spec.model_copy(update={"grid": recorded.grid}).spec_hash() == ledger.spec_hash()


def superseded_line(superseded: set[str]) -> str:
    """What --dry-run says of superseded results."""
    return (f"superseded results there (an earlier revision of their attack's settings): {len(superseded)}; "
            f"a run moves them aside and runs their cells again")


def dropped_keys(statuses: dict[str, str], cells: list[TrialSpec], superseded: set[str]) -> set[str]:
    """Results (keys of `statuses`) that are neither one of `cells` nor superseded by one: cells a grid dropped."""
    keys = {cell.key() for cell in cells} | superseded
    return {key for key in statuses if key not in keys}


def set_aside(ledger: Ledger, keys: set[str], tag: str, why: str) -> None:
    """Move the results of `keys` to `<folder>.<tag>-<time>/` and say so. They are kept, not deleted: real
    results, of cells this spec no longer computes."""
    if keys:
        target = aside_path(ledger.folder, tag)
        print(f"moved {ledger.set_aside(keys, target)} {why} to {target}")


def search_pending(spec: SweepSpec, ledger: Ledger, retry_failed: bool) -> int:
    """Trials a search has still to run: each study's num_samples minus its trials in the ledger (failed ones
    not counted with --retry-failed)."""
    done: dict[str, int] = {}
    if ledger.exists():
        df = ledger.load()
        if "search_id" in df.columns:
            for study_id, status in zip(df["search_id"], df["status"], strict=True):
                if isinstance(study_id, str) and (status in DONE or not retry_failed):
                    done[study_id] = done.get(study_id, 0) + 1
    return sum(max(0, s.num_samples - done.get(s.id, 0)) for s in spec.studies())


def describe_study(study: Study) -> str:
    """One short line per study for --dry-run."""
    space = ", ".join(f"{n}~{p.type}" for n, p in study.space.items()) or "no searched parameter"
    return f"{study.id}  {study.num_samples} trial(s): {space}"


def aside_path(folder: Path, tag: str) -> Path:
    """A free sibling of `folder` named `<name>.<tag>-<time>` (or `...-<n>`), for results set aside."""
    target = folder.with_name(f"{folder.name}.{tag}-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.{tag}-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    return target


def move_aside(folder: Path) -> Path:
    target = aside_path(folder, "old")
    folder.rename(target)
    return target


def check_folder(folder: Path, pending: int) -> None:
    """The results folder can be created and written, and has room for the results."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe.{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise UsageError(
            f"results folder {folder} is not writable ({err.strerror or err}); choose another with --results"
        ) from None
    need = MIN_FREE_BYTES + pending * BYTES_PER_TRIAL
    free = shutil.disk_usage(folder).free
    if free < need:
        raise UsageError(
            f"results folder {folder} has {free / 2**20:.0f} MiB free but this sweep needs about "
            f"{need / 2**20:.0f} MiB; free some space or choose another folder with --results"
        )


def check_local_resources(cpu: float, gpu: float) -> None:
    """On the embedded Ray, a trial must fit this machine, or Tune would wait for it forever."""
    cores = os.cpu_count() or 1
    if cpu > cores:
        raise UsageError(
            f"each trial asks for resources.cpu={cpu:g} but this machine has {cores} CPUs; "
            f"lower resources.cpu or run on a cluster with --address"
        )
    if gpu > 0:
        import torch

        if torch.cuda.device_count() == 0:
            raise UsageError(
                f"each trial asks for resources.gpu={gpu:g} but this machine has no GPU; "
                f"set resources.gpu: 0 or run on a cluster with --address"
            )


def submitted_results_root(results: str | None) -> str:
    """Where a submitted job writes: an absolute --results as given, else SUBMIT_RESULTS on the head node."""
    # A relative root would land inside the job's temporary copy of the working dir, deleted later.
    return results if results and os.path.isabs(results) else SUBMIT_RESULTS


def submit_command(argv: Sequence[str]) -> str:
    """The entrypoint a submitted job runs on the cluster: this command, minus --submit, on the cluster."""
    args = build_parser().parse_args(list(argv))
    spec = Path(args.spec)
    if spec.is_absolute():
        # The job runs in an uploaded copy of the current folder: the spec must travel with it.
        try:
            spec = spec.resolve().relative_to(Path.cwd().resolve())
        except ValueError:
            raise UsageError(
                f"spec {args.spec} is outside the current folder {Path.cwd()}, which is what --submit "
                f"uploads; run from the project folder with a spec inside it (e.g. sweeps/x.yaml)"
            ) from None
    parts = ["python", "-m", "orchestrator.sweep", shlex.quote(spec.as_posix()), "--address", "auto"]
    root = submitted_results_root(args.results)
    parts += ["--results", shlex.quote(root) if root != SUBMIT_RESULTS else f'"{SUBMIT_RESULTS}"']
    for flag in ("fresh", "retry_failed", "yes"):
        if getattr(args, flag):
            parts.append("--" + flag.replace("_", "-"))
    if args.max_concurrent:
        parts += ["--max-concurrent", str(args.max_concurrent)]
    return " ".join(parts)


def submit(argv: Sequence[str], spec: SweepSpec, address: str | None, results: str | None) -> int:
    import logging

    from ray.job_submission import JobSubmissionClient

    entrypoint = submit_command(argv)
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk"):  # INFO lines per uploaded/ignored file
        logging.getLogger(name).setLevel(logging.WARNING)
    job_id = f"sweep-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        client = JobSubmissionClient(address if address and address != "auto" else None)
        job_id = client.submit_job(
            entrypoint=entrypoint, submission_id=job_id, runtime_env={"working_dir": "."},
            metadata={"sweep": spec.name, "spec_hash": spec.spec_hash()},
        )
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise UsageError(f"could not submit the sweep to the Ray cluster ({err}); is RAY_ADDRESS or --address set?") from None
    print(f"submitted sweep '{spec.name}' as Ray job {job_id}")
    print(f"  follow it:   ray job logs -f {job_id}")
    print(f"  progress:    python -m orchestrator.status {submitted_results_root(results)}/{spec.name}"
          f"   (on the head node)")
    print(f"  stop it:     ray job stop {job_id}")
    return 0


def run(argv: Sequence[str] | None = None) -> SweepSummary | None:
    """The command, returning the summary (None for --dry-run, --compact and --submit). Raises on errors."""
    started_ns = time.time_ns()  # temporaries older than this belong to writers that died (see below)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise UsageError(f"--max-concurrent must be >= 1 (got {args.max_concurrent})")
    spec = load_spec(args.spec)
    searching = isinstance(spec.search, OptunaSearch)
    # Before expanding anything: a grid of 1e8 cells must ask for --yes, not fill memory first.
    if spec.cell_count() > spec.max_cells and not (args.yes or args.dry_run or args.compact):
        raise UsageError(
            f"sweep '{spec.name}' has {spec.cell_count()} cells, more than its max_cells={spec.max_cells}; "
            f"pass --yes to run it anyway, or raise max_cells in the spec"
        )
    cells = spec.cells()
    todo: list[TrialSpec]
    trials = spec.trial_count()
    ledger = Ledger(results_root(args.results) / spec.name, sweep=spec.name)
    same_spec = ledger.spec_hash() in (None, spec.spec_hash())
    # What the folder holds, read once (with --fresh none of it counts): every decision below is about it.
    statuses = ledger.statuses() if ledger.exists() and not args.fresh else {}
    superseded = superseded_keys(ledger, spec, cells, statuses)
    # A grid spec that only adds cells (more seeds, batch sizes, defenses ...) continues its folder: every result
    # there is a cell of the new spec, so the folder stays one sweep, recorded by the new spec.yaml. One that
    # dropped cells continues only with --prune, which sets their results aside.
    new_grid = not same_spec and not searching and not args.fresh and regridded(ledger, spec)
    dropped = dropped_keys(statuses, cells, superseded) if new_grid else set()
    grown = new_grid and not dropped
    pruning = new_grid and bool(dropped) and args.prune
    continues = same_spec or grown or pruning  # the folder's results count for this spec

    if args.dry_run:
        if searching:
            studies = spec.studies()
            print(f"sweep '{spec.name}': {len(studies)} studies, {trials} trials in all")
            for study in studies[:5]:
                print("  " + describe_study(study))
            if len(studies) > 5:
                print(f"  ... and {len(studies) - 5} more")
            if ledger.exists() and continues and not args.fresh:
                left = search_pending(spec, ledger, args.retry_failed)
                print(f"{trials - left} already have results in {ledger.folder}; {left} to run")
                if superseded:
                    print(superseded_line(superseded))
            return None
        print(f"sweep '{spec.name}': {len(cells)} cells")
        for cell in cells[:5]:
            print("  " + describe(cell))
        if len(cells) > 5:
            print(f"  ... and {len(cells) - 5} more")
        if ledger.exists() and continues and not args.fresh:
            todo = pending_cells(cells, statuses, args.retry_failed)
            print(f"{len(cells) - len(todo)} already have results in {ledger.folder}; {len(todo)} to run")
            if superseded:
                print(superseded_line(superseded))
        if dropped:
            print(f"results there of cells this grid dropped: {len(dropped)}; "
                  + ("--prune moves them aside" if pruning else "a run refuses them without --prune"))
        return None

    if args.compact:
        if not ledger.exists():
            raise UsageError(f"{ledger.folder} is not a results folder (no spec.yaml, parts/ or trials.parquet)")
        path = ledger.compact()
        print(f"compacted {len(ledger.part_paths())} parts into {path}")
        return None

    if trials > spec.max_cells and not args.yes:
        what = "trials" if searching else "cells"
        raise UsageError(
            f"sweep '{spec.name}' has {trials} {what}, more than its max_cells={spec.max_cells}; "
            f"pass --yes to run it anyway, or raise max_cells in the spec"
        )
    if args.submit:
        submit(argv, spec, args.address, args.results)
        return None

    if dropped and not continues and not args.fresh:
        raise UsageError(
            f"{ledger.folder} holds results of {len(dropped)} cells this spec's grid dropped (a grid may only gain "
            f"values); pass --prune to move those results aside and keep the rest, --fresh to move all of them "
            f"aside, or give the sweep a new name"
        )
    if not continues and not args.fresh:
        raise UsageError(
            f"{ledger.spec_path} was written by a different spec (hash {ledger.spec_hash()}, this one "
            f"{spec.spec_hash()}; a grid may only gain values); pass --fresh to move the old results aside, or "
            f"give the sweep a new name"
        )
    if grown:
        print(f"the spec of {ledger.folder} grew: the results there are cells of this spec and stay")
    if args.fresh and ledger.folder.exists():
        moved = move_aside(ledger.folder)
        print(f"--fresh: moved the previous results to {moved}")

    if searching:
        todo = []
        left = search_pending(spec, ledger, args.retry_failed)
    else:
        todo = pending_cells(cells, statuses, args.retry_failed)
        left = len(todo)
    check_folder(ledger.folder, left)
    set_aside(ledger, superseded, "superseded",
              "superseded results (an earlier revision of their attack's settings: a re-tuned preset; their cells "
              "run again)")
    set_aside(ledger, dropped if pruning else set(), "pruned", "results of cells this grid dropped (--prune)")
    ledger.write_spec(spec.to_yaml(), spec.spec_hash())

    if not left:
        ledger.close_run(started_ns)
        summary = SweepSummary(
            name=spec.name, cells=trials, ran=0, complete=0, failed=0, timeout=0, wall_s=0.0,
            trial_wall_s=0.0, slots=0, results_path=str(ledger.trials_path),
        )
        what = "trials" if searching else "cells"
        print(f"sweep '{spec.name}': nothing to run, all {trials} {what} have results in {ledger.folder}")
        return summary

    embedded = not (args.address or os.environ.get("RAY_ADDRESS"))
    if embedded:
        check_local_resources(spec.resources.cpu, spec.resources.gpu)

    what = "trials" if searching else "cells"
    print(f"sweep '{spec.name}': {left} of {trials} {what} to run "
          f"({trials - left} already have results)", flush=True)
    # Ray first, and only then Tune and the rest of the runner (seconds of imports, which nothing above
    # needs): Ray's own processes start while this process imports Tune.
    from orchestrator.running import ray_start
    from orchestrator.running.stages import needs_stage_tasks, stage_cache_dir

    studies = spec.studies() if searching else []
    staged = [s.cell for s in studies] if searching else todo
    max_concurrent = args.max_concurrent or spec.max_concurrent
    # An embedded Ray gets only the CPUs of the trials that may run at once (a cluster is as it is), and a
    # worker pool only when FL stage tasks will run (see ray_start).
    started = ray_start.start_ray(
        args.address, num_cpus=ray_start.embedded_cpus(max_concurrent, spec.resources.cpu),
        worker_pool=needs_stage_tasks(staged, spec.utility_at),
    )
    try:
        from orchestrator.running import tune_run
        from orchestrator.running.options import RunOptions

        options = RunOptions(
            name=spec.name, cpu=spec.resources.cpu, gpu=spec.resources.gpu,
            max_concurrent=max_concurrent, trial_timeout_s=spec.trial_timeout_s,
            max_failures=spec.max_failures, cache_dir=stage_cache_dir(results_root(args.results)),
            utility_round=spec.utility_at, scheduler=spec.scheduler, retry_failed=args.retry_failed,
            pack=spec.pack,
        )  # fmt: skip
        if isinstance(spec.search, OptunaSearch):
            summary = tune_run.run_search(
                studies, spec.search, spec.success_psnr, ledger, options, strict_resources=embedded
            )
        else:
            summary = tune_run.run_cells(todo, ledger, options, strict_resources=embedded)
    finally:
        ledger.close_run(started_ns)
        ray_start.stop_ray(started)
    summary.cells = trials
    print(summary.format())
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run(argv)
    except (GrnnError, UsageError) as err:
        return user_error(err)
    return 0


if __name__ == "__main__":
    run_command(main)
