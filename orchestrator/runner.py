"""Runs a sweep's pending cells (or its search) as Ray Tune trials and writes each result to the ledger.

Worker side: `trainable` runs one cell through `grnn_engine.run_trial`, reports intermediate metrics
every `eval_every` iterations, and always ends with one final report carrying the whole result row
(and the image as base64): a trial that raises, runs out of memory or overruns `trial_timeout_s`
still ends with a row (FAILED or TIMEOUT), so Tune's own failure handling (`max_failures`) only
comes into play when a worker process dies.

Training stages: before any trial runs, `prepare_stages` trains every FedAvg chain the trials need
(`grnn_engine.fl.stage_requests`), each chain once, as parallel Ray tasks with the trials' resources, into
the content-addressed stage cache (on one machine it survives between sweeps). A chain that trials only need
at round 0 (the untrained, seeded model) gets no task: each such trial builds it and measures its accuracy
itself (`round_zero_stage`), which costs a fraction of a second, where a task costs a worker's start-up
before the first trial may start. Each task returns its
stages as objects in Ray's object store and the driver keeps its own copy of each (so a lost worker node
takes none with it); a trial fetches its own (`StagePlan`), so trials on other nodes need no shared disk, and
falls back to the cache when the fetch fails. A chain that fails gives every trial that needs it a FAILED
row; the sweep goes on. A trial whose chain was not planned (a search that samples FL settings) loads or
trains it through the cache itself.

Search: `run_search` runs every study of `search: {method: optuna}` in ONE Tune run: `StudySearcher` hands
Tune the next trial of the study whose turn it is, from that study's own `ray.tune.search.optuna.OptunaSearch`
(TPE, NSGA-II or random), at most `search.max_concurrent` at once per study. Rows already in the ledger are
fed back to their study first (`add_evaluated_point`), so a search resumes where it stopped.
Early stopping: with `scheduler: asha`, `GroupedAsha` runs one Ray Tune ASHAScheduler per group of comparable
trials on the attacks' intermediate reports; a trial it stops gets a COMPLETE row scored at the iteration it
reached (psnr only, from its last evaluation) with `stopped_early` and `stopped_at`.

Driver side: `LedgerCallback` writes each final row to `parts/<key>.parquet` the moment Tune hands
it over, so a killed driver keeps everything that finished; the ledger, not Tune's experiment state,
is what a rerun resumes from (Tune's restore re-ran finished trials in our measurements). Tune's own
experiment folder lives in a temporary folder outside the results and is removed when the run ends.
"""

from __future__ import annotations

import base64
import ctypes
import dataclasses
import importlib._bootstrap
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from grnn_engine import TrialResult, TrialSpec, run_trial
from grnn_engine.errors import ConfigError
from orchestrator.progress import Progress, SweepStats, SweepSummary

if TYPE_CHECKING:  # the workers import this module for its trainable: no pandas, pyarrow or pydantic there
    from orchestrator.results import Ledger
    from orchestrator.spec import Asha, OptunaSearch, SearchParam, Study

TUNE_DIR = ".tune"  # where earlier versions kept Tune's experiment folder, inside the results (removed)
STAGES_DIR = ".stages"  # the stage cache under a results root (unless $GRNN_CACHE_DIR says otherwise)
STAGE_FETCH_TIMEOUT_S = 120.0  # a trial's wait for its stage object before it loads or trains it itself

# Set before Tune runs. Auto loggers would copy every result (PNG included) into result.json and
# progress.csv for nothing; the new console output prints a banner even at verbose=0; Tune prints a
# traceback per failed trial, which the ledger already records; chdir into the trial folder would
# break relative data paths.
_QUIET_ENV = {
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_PRINT_ALL_TRIAL_ERRORS": "0",
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
}
# Only these reach the workers of a cluster (embedded workers inherit the driver's environment).
_WORKER_ENV = ("RAY_CHDIR_TO_TRIAL_DIR", "GRNN_DATA_ROOT", "GRNN_CACHE_DIR")
# What an embedded Ray's workers import as they start, before any work reaches them: torch, the engine and Tune's
# function trainable take seconds to import, and Ray starts as many workers as there are CPUs with the first
# driver, so the trials' actors (which take those workers) start warm instead of importing after Tune asked.
WORKER_PRELOAD = ("orchestrator.runner",)


def _project_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def start_ray(
    address: str | None = None, num_cpus: int | None = None, temp_dir: str | None = None
) -> bool:
    """Start (or connect to) Ray quietly; returns True when this call started it (then shut it down).

    Embedded by default: `num_cpus` (default all cores), no dashboard, workers that import the trial code
    as they start (WORKER_PRELOAD; ray.init does not wait for them). With `address` (or RAY_ADDRESS set, as
    inside a submitted Ray job) it connects to that cluster instead.
    """
    os.environ.update(_QUIET_ENV)
    if ray.is_initialized():
        return False
    common: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
    if address or os.environ.get("RAY_ADDRESS"):
        env = {k: os.environ[k] for k in _WORKER_ENV if k in os.environ}
        ray.init(address=address or None, runtime_env={"env_vars": env}, **common)
    else:
        # Embedded workers inherit this environment: let them import the project from a plain checkout.
        root = _project_root()
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])
        ray.init(
            num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, _temp_dir=temp_dir,
            _system_config={"preload_python_modules": list(WORKER_PRELOAD)}, **common,
        )
    return True


# ---------------------------------------------------------------------------------------------------
# Worker side


class TrialTimeout(BaseException):
    """Raised inside a trial by its watchdog. BaseException: the engine's `except Exception` must not eat it."""


def _async_raise(thread_id: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None)


def _importing(thread_id: int) -> bool:
    """Whether `thread_id` is inside an import (holds one of the import system's per-module locks).

    An exception raised there leaves the package half-imported in sys.modules: its finished submodules stay,
    it is dropped, and the next import of it in this (reused) process fails with "partially initialized
    module". CPython keeps those locks in importlib._bootstrap._module_locks (name -> weakref to the lock).
    """
    for ref in list(getattr(importlib._bootstrap, "_module_locks", {}).values()):
        lock = ref()
        if lock is not None and getattr(lock, "owner", None) == thread_id:
            return True
    return False


class Watchdog:
    """Interrupts the trial's thread with TrialTimeout once `timeout_s` has passed.

    Tune can only stop a trial between reports, and a trial may hang inside one step, so the check
    lives in the trial: a thread raises TrialTimeout asynchronously in the trial's thread (delivered at
    its next Python bytecode, i.e. between torch operations). It never fires while the trial is inside
    `tune.report` (Tune's own bookkeeping must not be torn); the progress callback checks `expired`
    right after reporting instead. Nor while the trial imports a module: the raise waits until the
    import is done, or the reused worker would keep a half-imported package (see `_importing`). If the
    trial is stuck in one native call (or import) for `grace_s` past the deadline, the worker process
    exits; the driver then records the trial as TIMEOUT.
    """

    def __init__(self, timeout_s: float, grace_s: float | None = None) -> None:
        self.timeout_s = timeout_s
        self.grace_s = grace_s if grace_s is not None else max(30.0, 0.5 * timeout_s)
        self._target = threading.get_ident()
        self._deadline = time.monotonic() + timeout_s
        self._lock = threading.Lock()
        self._done = False
        self._in_report = 0
        self.fired = False
        self.deferred = False  # the deadline passed while the trial was importing
        self._thread = threading.Thread(target=self._watch, name="trial-watchdog", daemon=True)

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self._deadline

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Idempotent. The watchdog fires at most once, so a second call always completes."""
        with self._lock:
            self._done = True
            if self.fired:
                # A raise still pending (fired while the trial was finishing) must not escape later.
                _async_raise(self._target, None)

    def reporting(self, active: bool) -> None:
        with self._lock:
            self._in_report += 1 if active else -1

    def _watch(self) -> None:
        while True:
            with self._lock:
                if self._done:
                    return
                now = time.monotonic()
                if not self.fired and now >= self._deadline and not self._in_report:
                    if _importing(self._target):
                        self.deferred = True  # raised once the import is done (or the grace period ends)
                    else:
                        self.fired = True
                        _async_raise(self._target, TrialTimeout)
                elif (self.fired or self.deferred) and now >= self._deadline + self.grace_s:
                    # Stuck in native code (or in an import): only ending the process frees the slot.
                    os._exit(3)
            time.sleep(0.1)


def _reset_process_state(seed: int, cpus: float) -> None:
    """Actors are reused across trials: reset what one trial could leave behind for the next."""
    import numpy as np
    import torch

    torch.set_num_threads(max(1, int(cpus)))
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _device(spec_device: str, gpu: float) -> str:
    if spec_device != "auto":
        return spec_device
    import torch

    # Ray makes exactly the granted GPUs visible; a trial that asked for none stays on the CPU.
    return "cuda" if gpu > 0 and torch.cuda.is_available() else "cpu"


def _is_oom(err: BaseException) -> bool:
    import torch

    if isinstance(err, MemoryError | torch.cuda.OutOfMemoryError):
        return True
    # A CPU allocation past a memory cap surfaces as a plain RuntimeError from torch's allocator.
    text = str(err)
    return isinstance(err, RuntimeError) and ("DefaultCPUAllocator" in text or "can't allocate memory" in text)


class StageFailed(Exception):
    """The FedAvg chain a trial attacks could not be trained; its message says why."""


@dataclasses.dataclass
class StageContext:
    """What a trial knows about its global model once its stage is loaded (added to every report)."""

    stage: dict[str, Any] | None = None
    utility_acc: float | None = None

    def metrics(self) -> dict[str, float]:
        out = {}
        if self.stage is not None:
            for name in ("model_acc", "model_loss"):
                value = self.stage.get(name)
                if isinstance(value, int | float) and math.isfinite(value):
                    out[name] = float(value)
        if self.utility_acc is not None:
            out["utility_acc"] = float(self.utility_acc)
        return out


def execute_cell(
    spec: TrialSpec,
    report: Callable[[dict[str, Any]], None],
    trial_timeout_s: float | None = None,
    load_stage: Callable[[], StageContext] | None = None,
) -> TrialResult:
    """Run one cell and turn every way it can end into a TrialResult (never raises for a trial's fault).

    `load_stage` fetches (or trains) the trial's FL stage; it runs inside the trial's time limit and error
    handling, so a stage that cannot be had is a FAILED row like any other trial error.
    """
    start = time.perf_counter()
    watchdog = Watchdog(trial_timeout_s) if trial_timeout_s else None
    context = StageContext()

    def progress(metrics: dict[str, Any]) -> None:
        clean = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        clean.update(context.metrics())
        if watchdog is None:
            report(clean)
            return
        watchdog.reporting(True)
        try:
            report(clean)
        finally:
            watchdog.reporting(False)
        if watchdog.expired:
            raise TrialTimeout

    def attempt() -> TrialResult:
        try:
            if load_stage is not None:
                loaded = load_stage()
                context.stage, context.utility_acc = loaded.stage, loaded.utility_acc
            result = run_trial(spec, stage_state=context.stage, progress=progress)
            result.utility_acc = context.utility_acc
            return result
        except Exception as err:  # noqa: BLE001  (any trial error becomes a FAILED row; the sweep goes on)
            if _is_oom(err):
                _free_gpu_memory()
                error_type = "OutOfMemory"
            else:
                error_type = type(err).__name__
            message = str(err).strip() or repr(err)
            failed = TrialResult.failed(
                spec, error_type=error_type, error=message[:2000], wall_s=time.perf_counter() - start
            )
            failed.utility_acc = context.utility_acc
            return failed

    # The watchdog's one asynchronous TrialTimeout can land anywhere below, even inside stop() or an
    # except clause; the outer handler catches it wherever it lands and stops the watchdog again.
    try:
        try:
            if watchdog is not None:
                watchdog.start()
            return attempt()
        finally:
            if watchdog is not None:
                watchdog.stop()
    except TrialTimeout:
        if watchdog is not None:
            watchdog.stop()
        return TrialResult.failed(
            spec, status="TIMEOUT", error_type="Timeout",
            error=f"trial ran past trial_timeout_s={trial_timeout_s:g} s and was stopped",
            wall_s=time.perf_counter() - start,
        )


def _free_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _float(value: Any) -> float | None:
    """The value as a float when it is a finite number, else None."""
    return float(value) if _finite(value) else None


# Numbers of a row that a search may optimise; the final report carries each (None when missing).
_RESULT_METRICS = ("psnr", "ssim", "mse", "label_acc", "model_acc", "utility_acc")


@dataclasses.dataclass(frozen=True)
class Scoring:
    """The numbers a search optimises, as Tune result keys, with 'min'/'max' for each.

    A breaking-point search optimises `breaking_distance` = |metric - threshold|, which every report that
    holds the metric carries (so a trial ASHA stops still tells its study how close it came).
    """

    metrics: tuple[str, ...]
    modes: tuple[str, ...]
    breaking_metric: str | None = None
    threshold: float | None = None

    @classmethod
    def of(cls, search: OptunaSearch, success_psnr: float) -> Scoring:
        bp = search.breaking_point
        if bp is not None:
            threshold = bp.threshold if bp.threshold is not None else success_psnr
            return cls(("breaking_distance",), ("min",), bp.metric, float(threshold))
        return cls(tuple(o.metric for o in search.objectives or ()), tuple(search.directions()))

    def extra(self, metrics: dict[str, Any]) -> dict[str, float]:
        """What a report adds for the searcher (the breaking distance, when its metric is there)."""
        if self.breaking_metric is None or self.threshold is None:
            return {}
        value = _float(metrics.get(self.breaking_metric))
        return {} if value is None else {"breaking_distance": abs(value - self.threshold)}

    def values(self, metrics: dict[str, Any]) -> dict[str, float] | None:
        """The objective values of a report or row, or None when one is missing (the trial failed)."""
        merged = {**metrics, **self.extra(metrics)}
        out = {m: _float(merged.get(m)) for m in self.metrics}
        return None if any(v is None for v in out.values()) else {m: v for m, v in out.items() if v is not None}


def final_metrics(result: TrialResult, scoring: Scoring | None = None) -> dict[str, Any]:
    """The last report of a trial: a few scalars for Tune (and its searcher), plus the row and image for the driver."""
    row = result.to_row()
    out: dict[str, Any] = {
        "final": True,
        "trial_key": row["trial_key"],
        "status": result.status,
        "wall_s": result.wall_s,
        # JSON text: Tune flattens nested dicts ("row/attack.lr"); a string travels untouched.
        "row_json": json.dumps(row),
        "png_b64": base64.b64encode(result.image_png).decode("ascii") if result.image_png else "",
    }
    for name in _RESULT_METRICS:
        out[name] = _float(row.get(name))
    if scoring is not None:
        out.update(scoring.extra(out))
    return out


# ---------------------------------------------------------------------------------------------------
# Training stages


def _stage_id(chain: str, fl_round: int) -> str:
    return f"{chain}:{fl_round}"


@dataclasses.dataclass
class StagePlan:
    """The trained stages of a sweep, handed to every trial (pickled with the trainable; refs stay refs).

    refs: "<chain key>:<round>" -> object ref of the stage dict (state_dict, model_acc, ...), driver-owned;
    accuracy: the same ids -> the stage's test accuracy (utility lookups need no fetch); errors: chain key
    -> (exception type, message) of a chain that failed; trained/cached: chain keys that were trained now /
    found complete in the cache (a chain needed at round 0 only has no task: its trials build the stage).
    """

    cache_dir: str | None = None
    utility_round: int | None = None
    refs: dict[str, Any] = dataclasses.field(default_factory=dict)
    accuracy: dict[str, float] = dataclasses.field(default_factory=dict)
    errors: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    trained: list[str] = dataclasses.field(default_factory=list)
    cached: list[str] = dataclasses.field(default_factory=list)

    def failure_of(self, spec: TrialSpec) -> tuple[str, str] | None:
        """(error type, message) when the chain of `spec` failed and the trial needs it, else None.

        A trial at round 0 without utility does not need its stage (run_trial builds the untrained model;
        only model_acc is then missing), so a round-0 failure, e.g. a dataset without a test split to
        measure accuracy on, does not fail it."""
        from grnn_engine.fl import chain_key

        error = self.errors.get(chain_key(spec))
        if error is None or not self.needs_training(spec):
            return None
        return error[0], f"FL training stage failed: {error[1]}"[:2000]

    def needs_training(self, spec: TrialSpec) -> bool:
        """Whether the trial cannot run without its chain's stage (a trained round, or utility under its defense)."""
        return spec.fl_round > 0 or (self.utility_round is not None and "defense" in spec.fl)

    def load(self, spec: TrialSpec) -> StageContext:
        """The trial's stage (from the object store, else the cache, training it there if need be) and its
        utility accuracy. Runs on the worker."""
        from grnn_engine import fl

        failure = self.failure_of(spec)
        if failure is not None:
            raise StageFailed(failure[1])
        chain = fl.chain_key(spec)
        ref = self.refs.get(_stage_id(chain, spec.fl_round))
        stage = _fetch_stage(ref) if ref is not None else None
        if stage is None and self.needs_training(spec):
            stage = fl.stage_for_trial(spec, self.cache_dir)
        elif stage is None and chain not in self.errors:
            try:  # round 0 only measures the untrained model's accuracy: nice to have, never fatal
                stage = round_zero_stage(spec, self.cache_dir)
            except Exception:  # noqa: BLE001  (the trial runs on the model run_trial builds)
                stage = None
        utility = None
        if self.utility_round is not None and "defense" in spec.fl:
            utility = self.accuracy.get(_stage_id(chain, self.utility_round))
            if utility is None:
                at = dataclasses.replace(spec, fl_round=self.utility_round)
                utility = float(fl.stage_for_trial(at, self.cache_dir)["model_acc"])
        return StageContext(stage=stage, utility_acc=utility)


# The test split last decoded in this worker process (data identity -> ImageSet, whose images decode once):
# the round-0 trials of one dataset that a reused worker runs one after another share it.
_test_split: dict[tuple[str, str | None, int], Any] = {}


def round_zero_stage(spec: TrialSpec, cache_dir: str | None) -> dict[str, Any]:
    """The round-0 stage of `spec` (its untrained, seeded model and that model's test accuracy), from the cache
    or built and measured now in this process, on the trial's device, and cached (as fl.stage_for_trial)."""
    from grnn_engine import fl, load_dataset
    from grnn_engine.trial import resolve_device

    (request,) = fl.stage_requests([dataclasses.replace(spec, fl_round=0)])
    device = resolve_device(spec.device)
    if request.cached(cache_dir):
        return request.train(cache_dir=cache_dir, device=device)[0]
    identity = request.data_identity()
    if identity not in _test_split:
        _test_split.clear()  # one split at a time: CIFAR-10's test images are 120 MB decoded
        _test_split[identity] = load_dataset(spec.dataset, root=spec.data_root, split="test",
                                             image_size=spec.image_size)  # fmt: skip
    return request.train(cache_dir=cache_dir, device=device, test_set=_test_split[identity])[0]


def _fetch_stage(ref: Any) -> dict[str, Any] | None:
    """The stage behind `ref`, or None when it cannot be had in STAGE_FETCH_TIMEOUT_S (its node and the
    driver that owns it are gone, the object store is wedged): the trial then loads or trains it through the
    cache itself, rather than wait for Ray to rebuild it with resources the waiting trials hold."""
    try:
        return cast(dict[str, Any], ray.get(ref, timeout=STAGE_FETCH_TIMEOUT_S))
    except ray.exceptions.RayError:
        return None


def _train_chains(requests: list[Any], cache_dir: str | None, cpu: float, gpu: float) -> tuple[Any, ...]:
    """Ray task: FedAvg chains -> (a summary per chain, then every chain's stages of its requested rounds, in
    order). Several chains share one task only when none needs training (see `_task_groups`)."""
    import torch

    from grnn_engine import fl

    torch.set_num_threads(max(1, int(cpu)))
    device = "cuda" if gpu > 0 and torch.cuda.is_available() else "cpu"
    cached = [request.cached(cache_dir) for request in requests]
    before = fl.chains_trained
    chains = fl.train_chains(requests, cache_dir=cache_dir, device=device)
    summaries = [
        {
            "trained": fl.chains_trained > before and request.rounds != (0,),
            "cached": was_cached,
            "accuracy": {int(r): float(s["model_acc"]) for r, s in stages.items()},
        }
        for request, was_cached, stages in zip(requests, cached, chains, strict=True)
    ]
    return (summaries, *(stages[r] for request, stages in zip(requests, chains, strict=True) for r in request.rounds))


def _task_groups(requests: Sequence[Any], parallel: int) -> list[list[Any]]:
    """One Ray task per chain that trains. The untrained (round-0-only) chains of one dataset split and image
    size are dealt to at most `parallel` tasks (the slots the cluster has for them), so that the split,
    decoded to measure each untrained model's accuracy, is decoded once per task rather than once per seed
    and victim (10,000 JPEGs for CIFAR-10: seconds each), while large victims still evaluate in parallel."""
    trained = [[r] for r in requests if r.rounds != (0,)]
    untrained: dict[Any, list[Any]] = {}
    for request in requests:
        if request.rounds == (0,):
            untrained.setdefault(request.data_identity(), []).append(request)
    dealt = []
    for chains in untrained.values():
        tasks = min(len(chains), max(1, parallel))
        dealt += [chains[i::tasks] for i in range(tasks)]
    return trained + dealt


def _own(ref: Any) -> Any:
    """A copy of a task's returned object that the driver owns (ray.put), or None when it is lost already.

    A task's return value lives on the node that ran it and is owned through that task: when the node is
    lost, a trial that fetches it waits while Ray re-runs the task, which needs a CPU the waiting trials
    hold, and the sweep hangs. The driver's copy lives in the driver's object store and needs no task."""
    try:
        return ray.put(ray.get(ref))
    except ray.exceptions.RayError:
        return None


def stage_cache_dir(results_root: str | os.PathLike[str]) -> str:
    """Where stages are cached: $GRNN_CACHE_DIR, else `<results root>/.stages` (shared by its sweeps)."""
    chosen = os.environ.get("GRNN_CACHE_DIR") or os.path.join(os.fspath(results_root), STAGES_DIR)
    return os.path.abspath(os.path.expanduser(chosen))


def prepare_stages(
    cells: Sequence[TrialSpec],
    *,
    cpu: float = 1.0,
    gpu: float = 0.0,
    cache_dir: str | None = None,
    utility_round: int | None = None,
    log: Callable[[str], None] | None = None,
) -> StagePlan:
    """Train every FedAvg chain `cells` need, each once, as parallel Ray tasks; wait for all of them.

    A chain that the cells need at round 0 only gets no task: its stage is the untrained, seeded model with its
    test accuracy, which each trial builds itself (round_zero_stage, from the cache when it is there). With
    `utility_round`, cells trained under their defense (TrialSpec.fl["defense"]) also need that round.
    Invalid FL settings raise ConfigError before anything runs; a chain that fails is recorded in
    `errors`, never raised.
    """
    from grnn_engine import fl

    plan = StagePlan(cache_dir=cache_dir, utility_round=utility_round)
    specs = list(cells)
    if utility_round is not None:
        specs += [dataclasses.replace(c, fl_round=utility_round) for c in cells if "defense" in c.fl]
    requests = fl.stage_requests(specs)  # raises ConfigError for invalid FL settings, before anything runs
    # A chain needed at round 0 only by trials that can do without it is built by those trials themselves
    # (StagePlan.load -> round_zero_stage): no task, no worker to start before the first trial.
    needed = {fl.chain_key(c) for c in cells if plan.needs_training(c)}
    requests = [r for r in requests if r.rounds != (0,) or r.key() in needed]
    if not requests:
        return plan
    start = time.monotonic()
    if log:
        rounds = sum(len(r.rounds) for r in requests)
        log(f"FL stages: {len(requests)} chains ({rounds} stages) to load or train, cache {cache_dir}")
    task = ray.remote(_train_chains)
    submitted = []
    resources = ray.cluster_resources()
    parallel = int(resources.get("GPU", 0) // gpu) if gpu > 0 else int(resources.get("CPU", 1) // max(cpu, 1e-3))
    for group in _task_groups(requests, parallel):
        refs: list[Any] = task.options(  # type: ignore[assignment]  # num_returns > 1: a list of refs
            num_cpus=cpu, num_gpus=gpu, num_returns=1 + sum(len(r.rounds) for r in group), max_retries=1,
            name=f"fl-chain-{group[0].key()[:8]}" + (f"+{len(group) - 1}" if len(group) > 1 else ""),
        ).remote(group, cache_dir, cpu, gpu)  # fmt: skip
        submitted.append((group, refs))
    while submitted:  # popped: the task's own objects are freed once the driver holds its copies
        group, refs = submitted.pop(0)
        try:
            summaries = ray.get(refs[0])
        except Exception as err:  # noqa: BLE001  (a failed chain fails its trials, not the sweep)
            cause = getattr(err, "cause", None) or err
            text = str(cause).strip().splitlines()
            for request in group:
                plan.errors[request.key()] = (type(cause).__name__, (text[-1] if text else repr(cause))[:1500])
            for ref in refs[1:]:  # fetched too, or Ray prints each unfetched error with its traceback
                try:
                    ray.get(ref)
                except Exception:  # noqa: BLE001, S110  (the same error, recorded above)
                    pass
            continue
        stage_refs = iter(refs[1:])
        for request, summary in zip(group, summaries, strict=True):
            chain = request.key()
            if summary["trained"]:
                plan.trained.append(chain)
            elif summary["cached"]:
                plan.cached.append(chain)
            for r in request.rounds:
                owned = _own(next(stage_refs))
                if owned is not None:  # else the trials load the stage from the cache (or train it) themselves
                    plan.refs[_stage_id(chain, r)] = owned
            for r, acc in summary["accuracy"].items():
                plan.accuracy[_stage_id(chain, r)] = acc
    if log:
        log(
            f"FL stages ready in {time.monotonic() - start:.1f} s: {len(plan.trained)} chains trained, "
            f"{len(plan.cached)} from the cache, {len(plan.errors)} failed"
        )
        for chain, (kind, message) in list(plan.errors.items())[:3]:
            log(f"  chain {chain[:8]} failed: {kind}: {message}")
    return plan


def trainable(
    config: dict[str, Any],
    cells: dict[str, dict[str, Any]] | None = None,
    cpu: float = 1.0,
    gpu: float = 0.0,
    trial_timeout_s: float | None = None,
    stages: StagePlan | None = None,
    scoring: Scoring | None = None,
) -> None:
    """Tune function trainable: `config["trial_key"]` names the cell in `cells` (TrialSpec fields), or
    `config["cell_json"]` holds it (a searched trial)."""
    key = config["trial_key"]
    fields = dict(cells[key]) if cells and key in cells else json.loads(config["cell_json"])
    _reset_process_state(int(fields.get("seed", 0)), cpu)
    fields["device"] = _device(str(fields.get("device", "auto")), gpu)
    spec = TrialSpec(**fields)
    if scoring is None:
        report = tune.report
    else:

        def report(metrics: dict[str, Any]) -> None:
            tune.report({**metrics, **scoring.extra(metrics)})

    load = (lambda: stages.load(spec)) if stages is not None else None
    result = execute_cell(spec, report, trial_timeout_s, load)
    tune.report(final_metrics(result, scoring))


# ---------------------------------------------------------------------------------------------------
# Driver side


def _failure_from_trial(trial: Any, elapsed: float, trial_timeout_s: float | None) -> tuple[str, str, str]:
    """(status, error_type, error) for a trial that ended without its final report (worker died)."""
    text = ""
    try:
        text = str(trial.get_error() or "")
    except Exception:  # noqa: BLE001  (the error file is best effort)
        text = ""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    message = lines[-1] if lines else "the trial's worker process ended without a result"
    if trial_timeout_s and elapsed >= trial_timeout_s:
        return "TIMEOUT", "Timeout", f"trial ran past trial_timeout_s={trial_timeout_s:g} s and its worker was ended"
    if "OutOfMemoryError" in text or "MemoryError" in text:
        return "FAILED", "OutOfMemory", message[:2000]
    return "FAILED", "WorkerDied", message[:2000]


class LedgerCallback(tune.Callback):
    """Driver side: writes each trial's final row to the ledger as soon as Tune delivers it.

    Searched trials add `search_id` (their study) and `search_params` (the sampled values as JSON); with a
    scheduler every row has `stopped_early` and `stopped_at` (the attack iteration it was stopped at).
    """

    def __init__(
        self,
        ledger: Ledger,
        cells: dict[str, TrialSpec],
        progress: Progress,
        trial_timeout_s: float | None = None,
        scheduler: GroupedAsha | None = None,
    ) -> None:
        self.ledger = ledger
        self.cells = cells
        self.progress = progress
        self.trial_timeout_s = trial_timeout_s
        self.scheduler = scheduler
        self.started_at: dict[str, float] = {}
        self.written: set[str] = set()
        # Intermediate reports per trial key: the history of a trial the scheduler stops.
        self.history: dict[str, list[dict[str, float]]] = {}
        # Tune trial key of a packed trial -> its cells' keys (set by orchestrator.packing.packed_fit).
        self.packs: dict[str, list[str]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into tuner.pkl (for Tuner.restore, which we never use); the live
        # display holds a terminal stream, which does not pickle.
        return {**self.__dict__, "progress": None}

    def _spec_of(self, trial: Any) -> TrialSpec | None:
        key = trial.config["trial_key"]
        if key in self.cells:
            return self.cells[key]
        text = trial.config.get("cell_json")
        return TrialSpec(**json.loads(text)) if text else None

    def _extra(self, trial: Any | None) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        config = trial.config if trial is not None else {}
        if "study" in config:
            extra["search_id"] = config["study"]
            extra["search_params"] = config.get("sampled_json", "{}")
        if self.scheduler is not None:
            extra["stopped_early"] = False
            extra["stopped_at"] = None
        return extra

    def write_row(
        self, row: dict[str, Any], png: bytes | None, trial: Any | None = None, stopped_at: int | None = None
    ) -> None:
        row.update(self._extra(trial))
        if stopped_at is not None:
            row.update(stopped_early=True, stopped_at=stopped_at)
        row["ray_version"] = ray.__version__
        self.ledger.write_part(row, png)
        key = row["trial_key"]
        self.written.add(key)
        spec = self.cells.get(key) or (self._spec_of(trial) if trial is not None else None)
        label = f"{spec.attack} {spec.victim} bs={spec.batch_size} {spec.defense}" if spec else ""
        self.progress.finished(key, row.get("status", "FAILED"), row.get("psnr"), row.get("wall_s"), label)

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        key = trial.config["trial_key"]
        for cell in self.packs.get(key, [key]):  # a packed trial starts all its cells at once
            self.started_at[cell] = time.monotonic()
            self.progress.started(cell)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any) -> None:
        if not result.get("final"):
            if self.scheduler is not None and "iteration" in result:
                entry = {k: float(result[k]) for k in ("iteration", "grad_loss", "psnr") if _finite(result.get(k))}
                entry.update({k: result[k] for k in ("model_acc", "model_loss", "utility_acc") if _finite(result.get(k))})
                self.history.setdefault(trial.config["trial_key"], []).append(entry)
            return
        # Popped so that Tune's experiment state does not keep every row and image in memory and on disk.
        row = json.loads(result.pop("row_json"))
        png_text = result.pop("png_b64", "")
        self.history.pop(row["trial_key"], None)
        self.write_row(row, base64.b64decode(png_text) if png_text else None, trial)

    def _write_stopped(self, trial: Any, spec: TrialSpec, elapsed: float) -> None:
        """A trial the scheduler stopped: COMPLETE, scored by its last evaluation (psnr) at that iteration."""
        key = spec.key()
        history = self.history.pop(key, [])
        last = history[-1] if history else {}
        psnr = last.get("psnr")
        at = self.scheduler.stopped.get(trial.trial_id) if self.scheduler else None
        at = int(at if at is not None else last.get("iteration", 0))
        result = TrialResult(
            spec=spec, status="COMPLETE",
            metrics={"psnr": psnr, "success": bool(psnr >= spec.success_psnr) if psnr is not None else None},
            model_acc=last.get("model_acc"), model_loss=last.get("model_loss"), utility_acc=last.get("utility_acc"),
            wall_s=elapsed, attack_s=elapsed, iterations=at,
            history=[{k: v for k, v in h.items() if k in ("iteration", "grad_loss", "psnr")} for h in history],
        )  # fmt: skip
        self.write_row(result.to_row(), None, trial, stopped_at=at)

    def _write_failure(self, trial: Any) -> None:
        key = trial.config["trial_key"]
        if key in self.packs:
            from orchestrator.packing import write_pack_failures

            write_pack_failures(self, trial, self.packs[key])
            return
        spec = self._spec_of(trial)
        if key in self.written or spec is None:
            return
        elapsed = time.monotonic() - self.started_at.get(key, time.monotonic())
        if self.scheduler is not None and trial.trial_id in self.scheduler.stopped:
            self._write_stopped(trial, spec, elapsed)
            return
        status, error_type, error = _failure_from_trial(trial, elapsed, self.trial_timeout_s)
        failed = TrialResult.failed(spec, status=status, error_type=error_type, error=error, wall_s=elapsed)
        self.write_row(failed.to_row(), None, trial)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._write_failure(trial)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._write_failure(trial)  # no-op when the final report was written


# ---------------------------------------------------------------------------------------------------
# Early stopping


def _attack_iterations(cell: TrialSpec, space: dict[str, SearchParam] | None = None) -> int:
    """The most iterations a trial of this cell (or study) runs: ASHA's max_t is one more."""
    from grnn_engine import ATTACKS

    iterations = int(getattr(ATTACKS.create(cell.attack, **cell.attack_params), "iterations", 0) or 0)
    searched = (space or {}).get("attack.params.iterations")
    if searched is not None:
        iterations = max([iterations, *(int(v) for v in searched.ends() if _finite(v))])
    return max(iterations, 1)


def asha_limits(settings: Asha, cell: TrialSpec, space: dict[str, SearchParam] | None = None) -> tuple[int, int]:
    """(max_t, grace_period) in attack iterations for trials of `cell`. max_t lies past the last iteration,
    so ASHA never ends a trial that is about to finish (its final row would be lost)."""
    max_t = _attack_iterations(cell, space) + 1
    grace = settings.grace_period or 2 * cell.eval_every
    return max_t, min(grace, max_t)


def grid_group(cell: TrialSpec) -> str:
    """The ASHA group of a grid cell: trials of one attack setting, victim, data, batch size and round compete."""
    keep = ("attack", "attack_params", "victim", "victim_params", "dataset", "image_size", "split", "batch_size",
            "fl_round", "update", "update_params", "eval_every")  # fmt: skip
    return json.dumps({k: getattr(cell, k) for k in keep}, sort_keys=True, default=str)


class GroupedAsha(FIFOScheduler):
    """One Ray Tune ASHAScheduler per group of comparable trials, on the attacks' intermediate reports
    (time = the attack iteration). A trial's group, max_t and grace period come from its config (`group`,
    `max_t`, `grace`; searched trials) or from `groups` by trial key (grid cells). Records in `stopped` the
    iteration at which each trial was stopped (by Tune trial id)."""

    def __init__(self, settings: Asha, groups: dict[str, tuple[str, int, int]] | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.groups = groups or {}
        self._schedulers: dict[str, ASHAScheduler] = {}
        self.stopped: dict[str, int] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True

    def _of(self, trial: Any) -> ASHAScheduler:
        config = trial.config
        if "group" in config:
            group, max_t, grace = config["group"], int(config["max_t"]), int(config["grace"])
        else:
            group, max_t, grace = self.groups[config["trial_key"]]
        if group not in self._schedulers:
            self._schedulers[group] = ASHAScheduler(
                time_attr="iteration", metric=self.settings.metric, mode=self.settings.mode, max_t=max_t,
                grace_period=grace, reduction_factor=self.settings.reduction_factor,
                brackets=self.settings.brackets,
            )  # fmt: skip
        return self._schedulers[group]

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get("final"):
            return TrialScheduler.CONTINUE  # the trial is ending anyway, with its row
        action = self._of(trial).on_trial_result(tune_controller, trial, result)
        if _finite(result.get("iterations")) and result.get("iteration", 0) >= result["iterations"]:
            # The attack has run its last step: stopping now would save nothing but lose the scored row.
            return TrialScheduler.CONTINUE
        if action == TrialScheduler.STOP:
            self.stopped[trial.trial_id] = int(result.get("iteration", 0))
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        try:
            self._of(trial).on_trial_remove(tune_controller, trial)
        except KeyError:  # already forgotten on completion
            pass

    def debug_string(self) -> str:
        return f"GroupedAsha: {len(self._schedulers)} groups, {len(self.stopped)} trials stopped"


# ---------------------------------------------------------------------------------------------------
# Search


def _distribution(param: SearchParam) -> Any:
    import optuna

    d = optuna.distributions
    if param.type == "categorical":
        return d.CategoricalDistribution(list(param.values or []))
    if param.type == "int":
        return d.IntDistribution(int(param.low or 0), int(param.high or 0), log=param.log)
    return d.FloatDistribution(float(param.low or 0.0), float(param.high or 0.0), log=param.type == "loguniform")


def _sampler(name: str, seed: int, num_samples: int) -> Any:
    import optuna

    s = optuna.samplers
    if name == "nsga2":
        # Generations as large as a quarter of the budget (at least 2), so that several of them evolve.
        return s.NSGAIISampler(seed=seed, population_size=max(2, min(50, num_samples // 4)))
    if name == "random":
        return s.RandomSampler(seed=seed)
    # TPE's default of 10 random start-up trials would spend a whole small study at random.
    startup = max(2, min(10, num_samples // 4))
    return s.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)


def _study_seed(seed: int, study_id: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{study_id}".encode()).digest()[:4], "little")


def _optuna_search_class() -> type:
    import optuna
    from ray.tune.search.optuna import OptunaSearch as RayOptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one INFO line per study and trial otherwise

    class LedgerOptunaSearch(RayOptunaSearch):
        """Ray's OptunaSearch, whose add_evaluated_point also takes several objective values (a list)."""

        def add_evaluated_point(
            self, parameters: dict, value: Any, error: bool = False, pruned: bool = False,
            intermediate_values: list[float] | None = None,
        ) -> None:  # fmt: skip
            if not isinstance(value, list) or error or pruned:
                super().add_evaluated_point(parameters, value, error, pruned, intermediate_values)
                return
            import optuna

            trial = optuna.trial.create_trial(
                state=optuna.trial.TrialState.COMPLETE, values=value, params=parameters,
                distributions=cast(dict, self._space),
            )  # fmt: skip
            cast(optuna.Study, self._ot_study).add_trial(trial)

    return LedgerOptunaSearch


@dataclasses.dataclass
class StudyRun:
    """One study inside the search run: its Optuna searcher (None for a study without a space), the trials it
    may still start, the ones running, and what the scheduler needs in each config."""

    study: Study
    searcher: Any
    remaining: int
    running: set[str] = dataclasses.field(default_factory=set)
    config_extra: dict[str, Any] = dataclasses.field(default_factory=dict)


_MAX_REPEATS = 20  # samples drawn in a row that all repeat earlier trials: the study has nothing new left


class StudySearcher(Searcher):
    """Hands Tune the trials of many studies in one run: round robin over the studies that may start a trial
    (budget left, fewer than `max_concurrent` running), each sampled by its own OptunaSearch.

    A sample whose trial key exists already (a categorical or integer space repeats itself) is not run twice:
    its study is told the known value at once. Returns FINISHED when every study has spent its budget.
    """

    def __init__(self, runs: list[StudyRun], max_concurrent: int, scoring: Scoring,
                 known: dict[str, dict[str, float] | None] | None = None) -> None:  # fmt: skip
        super().__init__(metric=None, mode=None)  # no metric: Tune must not check reports for one
        self.runs = runs
        self.max_concurrent = max_concurrent
        self.scoring = scoring
        self.known: dict[str, dict[str, float] | None] = dict(known or {})
        self._live: dict[str, tuple[StudyRun, str, str]] = {}  # Tune trial id -> (run, optuna id, key)
        self._turn = 0

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True

    def _left(self) -> bool:
        return any(run.remaining > 0 for run in self.runs)

    def suggest(self, trial_id: str) -> dict | str | None:  # type: ignore[override]  # str: Searcher.FINISHED
        n = len(self.runs)
        for step in range(n):
            run = self.runs[(self._turn + step) % n]
            if run.remaining <= 0 or len(run.running) >= self.max_concurrent:
                continue
            config = self._sample(run, trial_id)
            if config is not None:
                self._turn = (self._turn + step + 1) % n
                return config
        return None if self._left() else Searcher.FINISHED

    def _sample(self, run: StudyRun, trial_id: str) -> dict | None:
        live_keys = {key for _, _, key in self._live.values()}
        for attempt in range(_MAX_REPEATS):
            if run.remaining <= 0:
                return None
            optuna_id = f"{trial_id}.{attempt}"
            sampled = run.searcher.suggest(optuna_id) if run.searcher is not None else {}
            spec = run.study.trial(sampled)
            key = spec.key()
            run.remaining -= 1
            if key not in self.known and key not in live_keys:
                run.running.add(trial_id)
                self._live[trial_id] = (run, optuna_id, key)
                return {
                    "trial_key": key, "study": run.study.id,
                    "cell_json": json.dumps(dataclasses.asdict(spec)),
                    "sampled_json": json.dumps(sampled, sort_keys=True), **run.config_extra,
                }  # fmt: skip
            if run.searcher is not None:  # a repeat: Optuna learns the known value, nothing runs twice
                value = self.known.get(key)
                run.searcher.on_trial_complete(optuna_id, result=value, error=value is None)
        run.remaining = 0
        return None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass  # studies learn from final values only (no Optuna pruner; ASHA does the early stopping)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        entry = self._live.pop(trial_id, None)
        if entry is None:
            return
        run, optuna_id, key = entry
        run.running.discard(trial_id)
        values = None if error else self.scoring.values(result or {})
        self.known[key] = values
        if run.searcher is not None:
            run.searcher.on_trial_complete(optuna_id, result=values, error=values is None)

    def save(self, checkpoint_path: str) -> None:
        pass  # the ledger is what a search resumes from (see run_search)

    def restore(self, checkpoint_path: str) -> None:
        pass


@dataclasses.dataclass
class RunOptions:
    """How to run the pending cells (from the spec, possibly overridden on the command line)."""

    name: str
    cpu: float = 1.0
    gpu: float = 0.0
    max_concurrent: int | None = None
    trial_timeout_s: float | None = None
    max_failures: int = 0
    cache_dir: str | None = None  # the stage cache (see stage_cache_dir); None: grnn_engine.fl's default
    utility_round: int | None = None  # the spec's utility round (None without utility)
    scheduler: Asha | None = None
    retry_failed: bool = False  # search: failed trials do not count against a study's budget
    pack: int = 1  # grid cells per Tune trial, run together by grnn_engine.batched (orchestrator.packing)


def concurrent_slots(options: RunOptions) -> int:
    """How many trials can run at once: min(max_concurrent, CPUs // cpu per trial, GPUs // gpu)."""
    resources = ray.cluster_resources()
    slots = math.floor(resources.get("CPU", 0) / options.cpu + 1e-9) if options.cpu > 0 else 10**9
    if options.gpu > 0:
        slots = min(slots, math.floor(resources.get("GPU", 0) / options.gpu + 1e-9))
    if options.max_concurrent:
        slots = min(slots, options.max_concurrent)
    return int(slots)


def _absolute_data_roots(cells: Sequence[TrialSpec]) -> list[TrialSpec]:
    # The driver's relative data path means the same folder to every local worker; not part of the key.
    out = []
    for c in cells:
        if c.data_root and not os.path.isabs(c.data_root) and os.path.exists(c.data_root):
            c = dataclasses.replace(c, data_root=os.path.abspath(c.data_root))
        out.append(c)
    return out


def _slots_or_error(options: RunOptions, strict_resources: bool) -> int:
    slots = concurrent_slots(options)
    if slots < 1 and not strict_resources:
        slots = 1
    if slots < 1:
        have = ray.cluster_resources()
        raise ConfigError(
            f"each trial asks for cpu={options.cpu:g}, gpu={options.gpu:g} but the Ray cluster has "
            f"CPU={have.get('CPU', 0):g}, GPU={have.get('GPU', 0):g}; lower resources in the spec"
        )
    return slots


def _fit(
    ledger: Ledger,
    options: RunOptions,
    callback: LedgerCallback,
    slots: int,
    trainable_kwargs: dict[str, Any],
    *,
    param_space: dict[str, Any],
    num_samples: int = 1,
    search_alg: Searcher | None = None,
    scheduler: TrialScheduler | None = None,
    trainable_fn: Callable[..., None] | None = None,
) -> float:
    """One Tune run of `trainable` (or `trainable_fn`, e.g. orchestrator.packing's) into the ledger; returns its wall time.

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
            callbacks=[callback],
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


_TUNE_PREFIX = "grnn-tune-"


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


def run_cells(
    cells: Sequence[TrialSpec],
    ledger: Ledger,
    options: RunOptions,
    *,
    progress_stream: Any = None,
    live: bool | None = None,
    strict_resources: bool = True,
    log: Callable[[str], None] | None = print,
) -> SweepSummary:
    """Run `cells` on the running Ray (see start_ray) and write every result to `ledger`.

    The FL stages the cells attack are trained first (prepare_stages); cells whose chain failed get their
    FAILED rows at once. With `strict_resources` a trial that cannot fit the cluster as it is now is a
    ConfigError; without it (a cluster that may autoscale) the sweep waits for Tune to find room. With
    `options.pack` > 1, compatible cells share one Tune trial (orchestrator.packing); still one row per cell.
    """
    if not ray.is_initialized():
        raise RuntimeError("call start_ray() before run_cells()")
    cells = _absolute_data_roots(cells)
    by_key = {c.key(): c for c in cells}
    slots = _slots_or_error(options, strict_resources)
    plan = prepare_stages(
        list(by_key.values()), cpu=options.cpu, gpu=options.gpu, cache_dir=options.cache_dir,
        utility_round=options.utility_round, log=log,
    )  # fmt: skip
    stats = SweepStats(total=len(by_key))
    progress = Progress(stats, stream=progress_stream, live=live)
    runnable: dict[str, TrialSpec] = {}
    scheduler = None
    if options.scheduler is not None:
        groups = {k: (grid_group(c), *asha_limits(options.scheduler, c)) for k, c in by_key.items()}
        scheduler = GroupedAsha(options.scheduler, groups)
    callback = LedgerCallback(ledger, by_key, progress, options.trial_timeout_s, scheduler)
    wall = 0.0
    try:
        for key, cell in by_key.items():
            failure = plan.failure_of(cell)
            if failure is None:
                runnable[key] = cell
            else:
                callback.write_row(TrialResult.failed(cell, error_type=failure[0], error=failure[1]).to_row(), None)
        if runnable:
            kwargs: dict[str, Any] = {"cells": {k: dataclasses.asdict(c) for k, c in runnable.items()}, "stages": plan}
            fit: dict[str, Any] = {"param_space": {"trial_key": tune.grid_search(list(runnable))}}
            if options.pack > 1:  # compatible cells share one Tune trial (orchestrator.packing)
                from orchestrator.packing import packed_fit

                kwargs, fit = packed_fit(runnable, options.pack, callback, kwargs)
            wall = _fit(ledger, options, callback, slots, kwargs, scheduler=scheduler, **fit)
    finally:
        progress.close()
    return _summary(options, ledger, len(by_key), stats, wall, slots)


def _stage_depends_on_sample(study: Study) -> bool:
    """Whether a study's trials attack different stages for different samples (then each loads its own)."""
    for name in study.space:
        if name == "fl_round" or name.startswith(("fl.", "victim.")):
            return True
        if name.startswith("defense.") and "defense" in study.cell.fl:  # utility: trained under the defense
            return True
    return False


def _ledger_rows(ledger: Ledger) -> list[dict[str, Any]]:
    if not ledger.exists():
        return []
    df = ledger.load()
    if "search_id" not in df.columns:
        return []
    return [r for r in df.to_dict("records") if isinstance(r.get("search_id"), str)]


def _study_runs(
    studies: Sequence[Study], search: OptunaSearch, scoring: Scoring, rows: list[dict[str, Any]],
    options: RunOptions,
) -> tuple[list[StudyRun], dict[str, dict[str, float] | None]]:  # fmt: skip
    """A StudyRun per study, with the ledger's trials fed back to its searcher and taken off its budget."""
    search_class = _optuna_search_class()
    by_study: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_study.setdefault(row["search_id"], []).append(row)
    known: dict[str, dict[str, float] | None] = {}
    runs = []
    single = len(scoring.metrics) == 1
    for study in studies:
        searcher = None
        if study.space:
            searcher = search_class(
                space={name: _distribution(p) for name, p in study.space.items()},
                metric=scoring.metrics[0] if single else list(scoring.metrics),
                mode=scoring.modes[0] if single else list(scoring.modes),
                sampler=_sampler(search.sampler_name(), _study_seed(search.seed, study.id), study.num_samples),
                study_name=study.id,
            )  # fmt: skip
        done = 0
        for row in by_study.get(study.id, []):
            complete = row.get("status") == "COMPLETE"
            values = scoring.values(row) if complete else None
            known[row["trial_key"]] = values
            if complete or not options.retry_failed:
                done += 1
            if searcher is None:
                continue
            params = json.loads(row.get("search_params") or "{}")
            if set(params) != set(study.space):
                continue  # a row of another space (cannot happen under the same spec hash)
            if values is not None:
                value = [values[m] for m in scoring.metrics]
                searcher.add_evaluated_point(params, value[0] if single else value)
            elif not options.retry_failed:
                searcher.add_evaluated_point(params, None, error=True)
        extra: dict[str, Any] = {}
        if options.scheduler is not None:
            max_t, grace = asha_limits(options.scheduler, study.cell, study.space)
            extra = {"group": study.id, "max_t": max_t, "grace": grace}
        runs.append(StudyRun(study=study, searcher=searcher, remaining=max(0, study.num_samples - done),
                             config_extra=extra))  # fmt: skip
    return runs, known


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
) -> SweepSummary:
    """Run the studies of a search (SweepSpec.studies()) in one Tune run and write every trial to `ledger`;
    trials already in the ledger are fed back to their study and count against its num_samples."""
    if not ray.is_initialized():
        raise RuntimeError("call start_ray() before run_search()")
    studies = [dataclasses.replace(s, cell=_absolute_data_roots([s.cell])[0]) for s in studies]
    scoring = Scoring.of(search, success_psnr)
    runs, known = _study_runs(studies, search, scoring, _ledger_rows(ledger), options)
    total = sum(run.remaining for run in runs)
    slots = _slots_or_error(options, strict_resources)
    stats = SweepStats(total=total)
    if total == 0:
        return _summary(options, ledger, len(studies), stats, 0.0, slots)
    pending = [run.study.cell for run in runs if run.remaining > 0 and not _stage_depends_on_sample(run.study)]
    plan = prepare_stages(
        pending, cpu=options.cpu, gpu=options.gpu, cache_dir=options.cache_dir,
        utility_round=options.utility_round, log=log,
    )  # fmt: skip
    progress = Progress(stats, stream=progress_stream, live=live)
    scheduler = GroupedAsha(options.scheduler) if options.scheduler is not None else None
    callback = LedgerCallback(ledger, {}, progress, options.trial_timeout_s, scheduler)
    searcher = StudySearcher(runs, search.max_concurrent, scoring, known)
    try:
        wall = _fit(
            ledger, options, callback, slots, {"stages": plan, "scoring": scoring},
            param_space={}, num_samples=total, search_alg=searcher, scheduler=scheduler,
        )  # fmt: skip
    finally:
        progress.close()
    return _summary(options, ledger, len(studies), stats, wall, slots)


def stop_ray(started: bool) -> None:
    if started and ray.is_initialized():
        ray.shutdown()


__all__ = [
    "GroupedAsha", "LedgerCallback", "RunOptions", "Scoring", "StageContext", "StageFailed", "StagePlan",
    "StudyRun", "StudySearcher", "TrialTimeout", "Watchdog", "asha_limits", "concurrent_slots", "execute_cell",
    "final_metrics", "grid_group", "prepare_stages", "run_cells", "run_search", "stage_cache_dir", "start_ray",
    "stop_ray", "trainable",
]

if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `python -m orchestrator.sweep SPEC`")
