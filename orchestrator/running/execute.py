"""Worker side: one cell run to a TrialResult, whatever happens (errors, out of memory, time limit).

Also the per-process resets and device choice that every trainable (single or packed) applies before a cell.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from grnn_engine import TrialResult, TrialSpec, run_trial
from orchestrator.running.stages import StageContext
from orchestrator.running.watchdog import TrialTimeout, Watchdog


def reset_process_state(seed: int, cpus: float) -> None:
    """Actors are reused across trials: reset what one trial could leave behind for the next."""
    import numpy as np
    import torch

    torch.set_num_threads(max(1, int(cpus)))
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def trial_device(spec_device: str, gpu: float) -> str:
    """The device a trial runs on: the spec's, or for 'auto' the GPU Ray granted it (else the CPU)."""
    if spec_device != "auto":
        return spec_device
    import torch

    # Ray makes exactly the granted GPUs visible; a trial that asked for none stays on the CPU.
    return "cuda" if gpu > 0 and torch.cuda.is_available() else "cpu"


def is_oom(err: BaseException) -> bool:
    """Whether `err` is an out-of-memory error (of the GPU, or of a CPU allocation past a memory cap)."""
    import torch

    if isinstance(err, MemoryError | torch.cuda.OutOfMemoryError):
        return True
    # A CPU allocation past a memory cap surfaces as a plain RuntimeError from torch's allocator.
    text = str(err)
    return isinstance(err, RuntimeError) and ("DefaultCPUAllocator" in text or "can't allocate memory" in text)


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
        nonlocal context
        try:
            if load_stage is not None:
                loaded = load_stage()
                context = loaded
            result = run_trial(spec, stage_state=context.stage, progress=progress)
            context.annotate(result)
            return result
        except Exception as err:  # noqa: BLE001  (any trial error becomes a FAILED row; the sweep goes on)
            if is_oom(err):
                free_gpu_memory()
                error_type = "OutOfMemory"
            else:
                error_type = type(err).__name__
            message = str(err).strip() or repr(err)
            failed = TrialResult.failed(
                spec, error_type=error_type, error=message[:2000], wall_s=time.perf_counter() - start
            )
            context.annotate(failed)
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


def free_gpu_memory() -> None:
    """Give the GPU memory a failed trial left cached back, so that the next trial of this worker has it."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()

