"""Runs a sweep's pending cells as Ray Tune trials and writes each result to the ledger as it arrives.

Worker side: `trainable` runs one cell through `grnn_engine.run_trial`, reports intermediate metrics
every `eval_every` iterations, and always ends with one final report carrying the whole result row
(and the image as base64): a trial that raises, runs out of memory or overruns `trial_timeout_s`
still ends with a row (FAILED or TIMEOUT), so Tune's own failure handling (`max_failures`) only
comes into play when a worker process dies.

Driver side: `LedgerCallback` writes each final row to `parts/<key>.parquet` the moment Tune hands
it over, so a killed driver keeps everything that finished; the ledger, not Tune's experiment state,
is what a rerun resumes from (Tune's restore re-ran finished trials in our measurements).
"""

from __future__ import annotations

import base64
import ctypes
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
from ray import tune

from grnn_engine import TrialResult, TrialSpec, run_trial
from grnn_engine.errors import ConfigError
from orchestrator.progress import Progress, SweepStats, SweepSummary
from orchestrator.results import Ledger

TUNE_DIR = ".tune"  # Tune's own experiment storage, hidden inside the sweep's results folder

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
_WORKER_ENV = ("RAY_CHDIR_TO_TRIAL_DIR", "GRNN_DATA_ROOT")


def _project_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def start_ray(
    address: str | None = None, num_cpus: int | None = None, temp_dir: str | None = None
) -> bool:
    """Start (or connect to) Ray quietly; returns True when this call started it (then shut it down).

    Embedded by default: `num_cpus` (default all cores), no dashboard. With `address` (or RAY_ADDRESS
    set, as inside a submitted Ray job) it connects to that cluster instead.
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
            num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, _temp_dir=temp_dir, **common
        )
    return True


# ---------------------------------------------------------------------------------------------------
# Worker side


class TrialTimeout(BaseException):
    """Raised inside a trial by its watchdog. BaseException: the engine's `except Exception` must not eat it."""


def _async_raise(thread_id: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None)


class Watchdog:
    """Interrupts the trial's thread with TrialTimeout once `timeout_s` has passed.

    Tune can only stop a trial between reports, and a trial may hang inside one step, so the check
    lives in the trial: a thread raises TrialTimeout asynchronously in the trial's thread (delivered at
    its next Python bytecode, i.e. between torch operations). It never fires while the trial is inside
    `tune.report` (Tune's own bookkeeping must not be torn); the progress callback checks `expired`
    right after reporting instead. If the trial is stuck in one native call for `grace_s` past the
    deadline, the worker process exits; the driver then records the trial as TIMEOUT.
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
                    self.fired = True
                    _async_raise(self._target, TrialTimeout)
                elif self.fired and now >= self._deadline + self.grace_s:
                    # Stuck in native code: only ending the process frees the slot.
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

    return isinstance(err, MemoryError | torch.cuda.OutOfMemoryError)


def execute_cell(
    spec: TrialSpec,
    report: Callable[[dict[str, Any]], None],
    trial_timeout_s: float | None = None,
) -> TrialResult:
    """Run one cell and turn every way it can end into a TrialResult (never raises for a trial's fault)."""
    start = time.perf_counter()
    watchdog = Watchdog(trial_timeout_s) if trial_timeout_s else None

    def progress(metrics: dict[str, Any]) -> None:
        clean = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
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
            return run_trial(spec, progress=progress)
        except Exception as err:  # noqa: BLE001  (any trial error becomes a FAILED row; the sweep goes on)
            if _is_oom(err):
                _free_gpu_memory()
                error_type = "OutOfMemory"
            else:
                error_type = type(err).__name__
            message = str(err).strip() or repr(err)
            return TrialResult.failed(
                spec, error_type=error_type, error=message[:2000], wall_s=time.perf_counter() - start
            )

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


def final_metrics(result: TrialResult) -> dict[str, Any]:
    """The last report of a trial: a few scalars for Tune, plus the row and image for the driver."""
    row = result.to_row()
    psnr = row.get("psnr")
    return {
        "final": True,
        "trial_key": row["trial_key"],
        "status": result.status,
        "psnr": psnr if isinstance(psnr, int | float) and math.isfinite(psnr) else None,
        "wall_s": result.wall_s,
        # JSON text: Tune flattens nested dicts ("row/attack.lr"); a string travels untouched.
        "row_json": json.dumps(row),
        "png_b64": base64.b64encode(result.image_png).decode("ascii") if result.image_png else "",
    }


def trainable(
    config: dict[str, Any],
    cells: dict[str, dict[str, Any]] | None = None,
    cpu: float = 1.0,
    gpu: float = 0.0,
    trial_timeout_s: float | None = None,
) -> None:
    """Tune function trainable: `config["trial_key"]` names the cell in `cells` (TrialSpec fields)."""
    assert cells is not None
    key = config["trial_key"]
    fields = dict(cells[key])
    _reset_process_state(int(fields.get("seed", 0)), cpu)
    fields["device"] = _device(str(fields.get("device", "auto")), gpu)
    spec = TrialSpec(**fields)
    result = execute_cell(spec, tune.report, trial_timeout_s)
    tune.report(final_metrics(result))


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
    """Driver side: writes each trial's final row to the ledger as soon as Tune delivers it."""

    def __init__(
        self,
        ledger: Ledger,
        cells: dict[str, TrialSpec],
        progress: Progress,
        trial_timeout_s: float | None = None,
    ) -> None:
        self.ledger = ledger
        self.cells = cells
        self.progress = progress
        self.trial_timeout_s = trial_timeout_s
        self.started_at: dict[str, float] = {}
        self.written: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into tuner.pkl (for Tuner.restore, which we never use); the live
        # display holds a terminal stream, which does not pickle.
        return {**self.__dict__, "progress": None}

    def _write(self, row: dict[str, Any], png: bytes | None) -> None:
        row["ray_version"] = ray.__version__
        self.ledger.write_part(row, png)
        key = row["trial_key"]
        self.written.add(key)
        spec = self.cells.get(key)
        label = f"{spec.attack} {spec.victim} bs={spec.batch_size} {spec.defense}" if spec else ""
        self.progress.finished(key, row.get("status", "FAILED"), row.get("psnr"), row.get("wall_s"), label)

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        key = trial.config["trial_key"]
        self.started_at[key] = time.monotonic()
        self.progress.started(key)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any) -> None:
        if not result.get("final"):
            return
        # Popped so that Tune's experiment state does not keep every row and image in memory and on disk.
        row = json.loads(result.pop("row_json"))
        png_text = result.pop("png_b64", "")
        self._write(row, base64.b64decode(png_text) if png_text else None)

    def _write_failure(self, trial: Any) -> None:
        key = trial.config["trial_key"]
        if key in self.written or key not in self.cells:
            return
        elapsed = time.monotonic() - self.started_at.get(key, time.monotonic())
        status, error_type, error = _failure_from_trial(trial, elapsed, self.trial_timeout_s)
        failed = TrialResult.failed(self.cells[key], status=status, error_type=error_type, error=error, wall_s=elapsed)
        self._write(failed.to_row(), None)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._write_failure(trial)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._write_failure(trial)  # no-op when the final report was written


@dataclasses.dataclass
class RunOptions:
    """How to run the pending cells (from the spec, possibly overridden on the command line)."""

    name: str
    cpu: float = 1.0
    gpu: float = 0.0
    max_concurrent: int | None = None
    trial_timeout_s: float | None = None
    max_failures: int = 0


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


def run_cells(
    cells: Sequence[TrialSpec],
    ledger: Ledger,
    options: RunOptions,
    *,
    progress_stream: Any = None,
    live: bool | None = None,
    strict_resources: bool = True,
) -> SweepSummary:
    """Run `cells` on the running Ray (see start_ray) and write every result to `ledger`.

    With `strict_resources` a trial that cannot fit the cluster as it is now is a ConfigError; without
    it (a cluster that may autoscale) the sweep waits for Tune to find room.
    """
    if not ray.is_initialized():
        raise RuntimeError("call start_ray() before run_cells()")
    cells = _absolute_data_roots(cells)
    by_key = {c.key(): c for c in cells}
    slots = concurrent_slots(options)
    if slots < 1 and not strict_resources:
        slots = 1
    if slots < 1:
        have = ray.cluster_resources()
        raise ConfigError(
            f"each trial asks for cpu={options.cpu:g}, gpu={options.gpu:g} but the Ray cluster has "
            f"CPU={have.get('CPU', 0):g}, GPU={have.get('GPU', 0):g}; lower resources in the spec"
        )
    stats = SweepStats(total=len(by_key))
    progress = Progress(stats, stream=progress_stream, live=live)
    callback = LedgerCallback(ledger, by_key, progress, options.trial_timeout_s)
    storage = ledger.folder.resolve() / TUNE_DIR
    run_name = f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    fn = tune.with_parameters(
        trainable,
        cells={k: dataclasses.asdict(c) for k, c in by_key.items()},
        cpu=options.cpu,
        gpu=options.gpu,
        trial_timeout_s=options.trial_timeout_s,
    )
    tuner = tune.Tuner(
        tune.with_resources(fn, {"cpu": options.cpu, "gpu": options.gpu}),
        param_space={"trial_key": tune.grid_search(list(by_key))},
        tune_config=tune.TuneConfig(
            num_samples=1,
            max_concurrent_trials=options.max_concurrent or slots,
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
        progress.close()
    # Tune's experiment folder holds nothing the ledger lacks (no checkpoints); keep the results tidy.
    shutil.rmtree(storage / run_name, ignore_errors=True)
    try:
        storage.rmdir()
    except OSError:
        pass
    return SweepSummary(
        name=options.name, cells=len(by_key), ran=stats.done, complete=stats.complete, failed=stats.failed,
        timeout=stats.timeout, wall_s=wall, trial_wall_s=stats.trial_wall_s, slots=slots,
        results_path=str(ledger.trials_path),
    )


def stop_ray(started: bool) -> None:
    if started and ray.is_initialized():
        ray.shutdown()


__all__ = [
    "LedgerCallback", "RunOptions", "TrialTimeout", "Watchdog", "concurrent_slots", "execute_cell",
    "final_metrics", "run_cells", "start_ray", "stop_ray", "trainable",
]

if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `python -m orchestrator.sweep SPEC`")
