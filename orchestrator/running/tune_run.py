"""Driver side: a sweep's pending cells (`run_cells`) or its search (`run_search`) as ONE Ray Tune run each.

Both go through `run_trials`: the FL stages the trials need are prepared first (orchestrator.running.stages; grid
cells whose chain failed get their FAILED rows at once), then Tune runs the trials with actor reuse, the optional
grouped ASHA scheduler, and the ledger callback that writes each row the moment it arrives. A grid run hands Tune
its cells by key (packed with `pack` > 1, orchestrator.running.packing); a search run hands it a StudySearcher.
Tune's own experiment folder lives in a temporary folder outside the results and is removed when the run ends.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray import tune
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from grnn_engine import TrialResult, TrialSpec
from orchestrator.progress import Progress, SweepStats, SweepSummary
from orchestrator.running.asha import GroupedAsha, asha_limits, grid_group
from orchestrator.running.ledger_callback import LedgerCallback
from orchestrator.running.options import RunOptions, slots_or_error
from orchestrator.running.optuna_search import (
    StudySearcher,
    searched_rows,
    stage_depends_on_sample,
    study_runs,
)
from orchestrator.running.packing import packed_fit
from orchestrator.running.scoring import Scoring
from orchestrator.running.stages import prepare_stages
from orchestrator.running.trainable import trainable

if TYPE_CHECKING:
    from orchestrator.results import Ledger
    from orchestrator.spec import OptunaSearch, Study

TUNE_DIR = ".tune"  # where earlier versions kept Tune's experiment folder, inside the results (removed)
_TUNE_PREFIX = "grnn-tune-"


@dataclasses.dataclass
class TrialSource:
    """What one Tune run runs: the cells of a grid (by trial key), or the trials a searcher samples."""

    total: int  # trials this run will try
    spec_count: int  # cells (grid) or studies (search) of the spec, for the summary
    stage_cells: list[TrialSpec]  # cells whose FL stages are prepared before the trials
    cells: dict[str, TrialSpec] = dataclasses.field(default_factory=dict)  # grid: the cells by key
    asha_groups: dict[str, tuple[str, int, int]] | None = None  # grid: ASHA (group, max_t, grace) by key
    searcher: StudySearcher | None = None  # search: samples the trials (cells stays empty)
    scoring: Scoring | None = None  # search: what the final report adds for the searcher


def run_cells(
    cells: Sequence[TrialSpec],
    ledger: Ledger,
    options: RunOptions,
    *,
    progress_stream: Any = None,
    live: bool | None = None,
    strict_resources: bool = True,
    log: Callable[[str], None] | None = print,
    callbacks: Sequence[tune.Callback] = (),
) -> SweepSummary:
    """Run `cells` on the running Ray (see ray_start.start_ray) and write every result to `ledger`.

    With `strict_resources` a trial that cannot fit the cluster as it is now is a ConfigError; without it (a
    cluster that may autoscale) the sweep waits for Tune to find room. With `options.pack` > 1, compatible cells
    share one Tune trial (orchestrator.running.packing); still one row per cell. `callbacks` are more Tune
    callbacks, called before the ledger's (e.g. a benchmark's timing).
    """
    if not ray.is_initialized():
        raise RuntimeError("call start_ray() before run_cells()")
    by_key = {c.key(): c for c in absolute_data_roots(cells)}
    groups = None
    if options.scheduler is not None:
        groups = {k: (grid_group(c), *asha_limits(options.scheduler, c)) for k, c in by_key.items()}
    source = TrialSource(
        total=len(by_key), spec_count=len(by_key), stage_cells=list(by_key.values()), cells=by_key,
        asha_groups=groups,
    )  # fmt: skip
    return run_trials(source, ledger, options, progress_stream=progress_stream, live=live,
                      strict_resources=strict_resources, log=log, callbacks=callbacks)  # fmt: skip


def run_search(
    studies: Sequence[Study],
    search: OptunaSearch,
    success_psnr: float,
    ledger: Ledger,
    options: RunOptions,
    *,
    progress_stream: Any = None,
    live: bool | None = None,
    strict_resources: bool = True,
    log: Callable[[str], None] | None = print,
    callbacks: Sequence[tune.Callback] = (),
) -> SweepSummary:
    """Run the studies of a search (SweepSpec.studies()) in one Tune run and write every trial to `ledger`;
    trials already in the ledger are fed back to their study and count against its num_samples."""
    if not ray.is_initialized():
        raise RuntimeError("call start_ray() before run_search()")
    studies = [dataclasses.replace(s, cell=absolute_data_roots([s.cell])[0]) for s in studies]
    scoring = Scoring.of(search, success_psnr)
    runs, known = study_runs(studies, search, scoring, searched_rows(ledger), options)
    total = sum(run.remaining for run in runs)
    # A study whose samples attack different stages (FL settings, victim, round) loads each in its trial.
    pending = [run.study.cell for run in runs if run.remaining > 0 and not stage_depends_on_sample(run.study)]
    source = TrialSource(
        total=total, spec_count=len(studies), stage_cells=pending, scoring=scoring,
        searcher=StudySearcher(runs, search.max_concurrent, scoring, known),
    )  # fmt: skip
    return run_trials(source, ledger, options, progress_stream=progress_stream, live=live,
                      strict_resources=strict_resources, log=log, callbacks=callbacks)  # fmt: skip


def run_trials(
    source: TrialSource,
    ledger: Ledger,
    options: RunOptions,
    *,
    progress_stream: Any = None,
    live: bool | None = None,
    strict_resources: bool = True,
    log: Callable[[str], None] | None = print,
    callbacks: Sequence[tune.Callback] = (),
) -> SweepSummary:
    """Prepare the FL stages of `source`, run its trials in one Tune run, write every row; the run's summary."""
    slots = slots_or_error(options, strict_resources)
    stats = SweepStats(total=source.total)
    if source.total == 0:
        return _summary(options, ledger, source.spec_count, stats, 0.0, slots)
    plan = prepare_stages(
        source.stage_cells, cpu=options.cpu, gpu=options.gpu, cache_dir=options.cache_dir,
        utility_round=options.utility_round, log=log,
    )  # fmt: skip
    progress = Progress(stats, stream=progress_stream, live=live)
    scheduler = GroupedAsha(options.scheduler, source.asha_groups) if options.scheduler is not None else None
    callback = LedgerCallback(ledger, source.cells, progress, options.trial_timeout_s, scheduler)
    wall = 0.0
    try:
        runnable: dict[str, TrialSpec] = {}
        for key, cell in source.cells.items():
            failure = plan.failure_of(cell)
            if failure is None:
                runnable[key] = cell
            else:
                callback.write_row(TrialResult.failed(cell, error_type=failure[0], error=failure[1]).to_row(), None)
        kwargs: dict[str, Any] = {"stages": plan}
        fit_args: dict[str, Any] = {"scheduler": scheduler, "callbacks": [*callbacks, callback]}
        if source.searcher is not None:
            kwargs["scoring"] = source.scoring
            fit_args.update(param_space={}, num_samples=source.total, search_alg=source.searcher)
        elif runnable:
            kwargs["cells"] = {k: dataclasses.asdict(c) for k, c in runnable.items()}
            fit_args["param_space"] = {"trial_key": tune.grid_search(list(runnable))}
            if options.pack > 1:  # compatible cells share one Tune trial
                kwargs, packed = packed_fit(runnable, options.pack, callback, kwargs)
                fit_args.update(packed)
        if source.searcher is not None or runnable:
            wall = fit(ledger, options, slots, kwargs, **fit_args)
    finally:
        progress.close()
    return _summary(options, ledger, source.spec_count, stats, wall, slots)


def fit(
    ledger: Ledger,
    options: RunOptions,
    slots: int,
    trainable_kwargs: dict[str, Any],
    *,
    callbacks: list[tune.Callback],
    param_space: dict[str, Any],
    num_samples: int = 1,
    search_alg: Searcher | None = None,
    scheduler: TrialScheduler | None = None,
    trainable_fn: Callable[..., None] | None = None,
) -> float:
    """One Tune run of `trainable` (or `trainable_fn`, e.g. the packed one) into the ledger; returns its wall time.

    Tune's experiment folder (its state, tuner.pkl) goes to a temporary folder outside the results, removed
    when the run ends: the ledger is all a rerun reads, and nothing pickled ever lands in a results folder,
    even when the driver is killed.
    """
    # Earlier versions kept Tune's folder here; a driver killed then left it behind.
    shutil.rmtree(ledger.folder / TUNE_DIR, ignore_errors=True)
    storage = _tune_storage()
    run_name = f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    fn = tune.with_parameters(
        trainable_fn or trainable, cpu=options.cpu, gpu=options.gpu, trial_timeout_s=options.trial_timeout_s,
        **trainable_kwargs,
    )
    tuner = tune.Tuner(
        tune.with_resources(fn, {"cpu": options.cpu, "gpu": options.gpu}),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            num_samples=num_samples,
            max_concurrent_trials=options.max_concurrent or slots,
            search_alg=search_alg,
            scheduler=scheduler,
            reuse_actors=True,
            trial_name_creator=lambda t: t.config["trial_key"],
            trial_dirname_creator=lambda t: t.config["trial_key"],
        ),
        run_config=tune.RunConfig(
            name=run_name,
            storage_path=str(storage),
            verbose=0,
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=options.max_failures, fail_fast=False),
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
        ),
    )
    start = time.monotonic()
    try:
        tuner.fit()
    finally:
        wall = time.monotonic() - start
        shutil.rmtree(storage, ignore_errors=True)  # nothing the ledger lacks (no checkpoints)
    return wall


def absolute_data_roots(cells: Sequence[TrialSpec]) -> list[TrialSpec]:
    """The cells with a relative data root that exists here made absolute (not part of the key): the driver's
    relative path means the same folder to every local worker, whatever its working directory."""
    out = []
    for c in cells:
        if c.data_root and not os.path.isabs(c.data_root) and os.path.exists(c.data_root):
            c = dataclasses.replace(c, data_root=os.path.abspath(c.data_root))
        out.append(c)
    return out


def _tune_storage() -> Path:
    """A new folder `grnn-tune-<pid>-*` for Tune's experiment state, in Ray's temp root ($RAY_TMPDIR, else the
    system's). Folders of drivers that no longer run (killed before they could remove theirs) are removed."""
    root = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir())
    for old in root.glob(f"{_TUNE_PREFIX}*"):
        pid = old.name[len(_TUNE_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{_TUNE_PREFIX}{os.getpid()}-", dir=root))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _summary(options: RunOptions, ledger: Ledger, cells: int, stats: SweepStats, wall: float, slots: int) -> SweepSummary:
    return SweepSummary(
        name=options.name, cells=cells, ran=stats.done, complete=stats.complete, failed=stats.failed,
        timeout=stats.timeout, wall_s=wall, trial_wall_s=stats.trial_wall_s, slots=slots,
        results_path=str(ledger.trials_path), first_trial_s=stats.first_trial_s,
    )  # fmt: skip
