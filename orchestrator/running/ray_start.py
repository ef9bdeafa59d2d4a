"""Starts (or connects to) the Ray a sweep runs on, quietly, and stops what it started.

An embedded Ray (the default) starts only what a local sweep needs: no dashboard, and pooled workers only when
the sweep has FL stages to train. Pooled workers (one per CPU, importing the trial code as they start:
WORKER_PRELOAD) serve Ray tasks, i.e. the stage preparation, and nothing else: Tune gives every trial actor a
runtime environment of its own (the environment variables it propagates), so Ray starts the trials' workers
afresh whatever the pool holds. In a sweep without stage tasks the pool would only take CPU from the trials'
workers while they import torch (on 2 loaded CPUs the quickstart's first trial came about 1.5x later with it).
This module imports nothing but Ray: a driver can start Ray before it imports Tune and the rest of the runner.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import ray

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
# function trainable take seconds to import; the pooled workers then run the stage tasks warm.
WORKER_PRELOAD = ("orchestrator.running.trainable",)


def _project_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def embedded_cpus(max_concurrent: int | None, cpu_per_trial: float, cores: int | None = None) -> int | None:
    """The CPUs an embedded Ray needs to run `max_concurrent` trials of `cpu_per_trial` CPUs each at once:
    ceil(N x cpu), at most this machine's `cores` (default os.cpu_count()), at least 1; None without a limit
    (start_ray then takes every core).

    Nothing else needs more while the trials run: the FL stage tasks run before them, each with one trial's
    CPUs, so they run at most N at once too (each trains with the same threads, so the stages are the same),
    and a pack of cells runs as one trial with one trial's CPUs. Fewer CPUs also mean fewer idle workers
    importing the trial code as Ray starts (one per CPU)."""
    if max_concurrent is None:
        return None
    cores = cores or os.cpu_count() or 1
    return max(1, min(cores, math.ceil(max_concurrent * cpu_per_trial - 1e-9)))


def start_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    temp_dir: str | None = None,
    worker_pool: bool = True,
) -> bool:
    """Start (or connect to) Ray quietly; returns True when this call started it (then shut it down).

    Embedded by default: `num_cpus` (default all cores; a sweep with a concurrency limit asks for
    `embedded_cpus`), no dashboard, and with `worker_pool` one pooled worker per CPU that imports the trial code
    as it starts (WORKER_PRELOAD; ray.init does not wait for them): pass False when no Ray task will run (see
    stages.needs_stage_tasks). With `address` (or RAY_ADDRESS set, as
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
        # Embedded workers inherit this environment: let them import the project from a plain checkout, and
        # a user's own modules (victims by import path) from the folder the command runs in, as the driver
        # does under `python -m`.
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        missing = [p for p in (_project_root(), os.getcwd()) if p not in paths]
        os.environ["PYTHONPATH"] = os.pathsep.join([*missing, *paths])
        ray.init(
            num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, _temp_dir=temp_dir,
            _system_config={
                "preload_python_modules": list(WORKER_PRELOAD), "prestart_worker_first_driver": worker_pool,
            },
            **common,
        )
    return True


def stop_ray(started: bool) -> None:
    """Shut Ray down when `started` (start_ray's answer) says this process started it."""
    if started and ray.is_initialized():
        ray.shutdown()
