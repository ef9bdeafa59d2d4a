"""Test-only plugin, loaded by this folder's sitecustomize: an attack that fails on demand, and an
execution counter.

- Attack `fault` (param `mode`): "ok" runs a real GRNN (param `iterations`); "raise" raises in the first
  step; "nan" returns NaN images; "hang" loops in Python forever; "sleep" blocks in one native call;
  "cuda_oom" raises torch.cuda.OutOfMemoryError as CUDA does; "memcap" caps the worker's address space
  (resource.setrlimit) and allocates past it, a real out-of-memory; "exit" ends the worker process;
  "slow_import" imports slowpkg slowly (a timeout lands inside the import); "import" imports slowpkg,
  uses it, then runs as "ok".
- Counter: with GRNN_FAULTS_TRIAL_LOG set, every run_trial appends "start <key> <pid>" and, when it
  returns, "end <key> <pid>" to that file (one O_APPEND write per line, so concurrent workers never
  interleave), which proves how many times each cell was computed.
"""

from __future__ import annotations

import functools
import os
import resource
import time
from typing import Any

import torch

import grnn_engine
from grnn_engine.attacks.base import ATTACKS, Attack, AttackInputs, Reconstruction
from grnn_engine.attacks.grnn import GRNN

MODES = ("ok", "raise", "nan", "hang", "sleep", "cuda_oom", "memcap", "exit", "slow_import", "import")
SLOW_IMPORT = False  # read by slowpkg.slow while it is imported


def _log(event: str, key: str) -> None:
    path = os.environ.get("GRNN_FAULTS_TRIAL_LOG")
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{event} {key} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def _counted(run_trial: Any) -> Any:
    @functools.wraps(run_trial)
    def wrapper(spec: Any, *args: Any, **kwargs: Any) -> Any:
        _log("start", spec.key())
        result = run_trial(spec, *args, **kwargs)
        _log("end", spec.key())
        return result

    return wrapper


# orchestrator.running.execute binds `from grnn_engine import run_trial` after this module ran.
grnn_engine.run_trial = _counted(grnn_engine.run_trial)


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


@ATTACKS.register("fault")
class FaultAttack(Attack):
    name = "fault"

    def __init__(self, mode: str = "ok", iterations: int = 5) -> None:
        if mode not in MODES:
            raise grnn_engine.ConfigError(f"fault mode '{mode}' is not known; allowed: {', '.join(MODES)}")
        self.mode = mode
        self.iterations = iterations

    def _run(self, model: Any, inputs: AttackInputs) -> Reconstruction:
        batch, shape = inputs.batch_size, inputs.image_shape
        if self.mode == "raise":
            raise ValueError("injected failure in step 1 (fault plugin)")
        if self.mode == "nan":
            return Reconstruction(torch.full((batch, *shape), float("nan")), torch.zeros(batch, dtype=torch.long))
        if self.mode == "hang":
            while True:  # stuck inside one step: no report, no return
                sum(range(1000))
        if self.mode == "sleep":
            time.sleep(10**6)  # stuck in one native call: only ending the process frees the slot
        if self.mode == "cuda_oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        if self.mode == "memcap":
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            resource.setrlimit(resource.RLIMIT_AS, (_address_space() + 256 * 2**20, hard))
            try:
                torch.empty(2**31, dtype=torch.float32)  # 8 GiB, far past the cap
            finally:
                resource.setrlimit(resource.RLIMIT_AS, (soft, hard))  # the actor is reused by the next trial
        if self.mode == "exit":
            os._exit(1)
        if self.mode in ("slow_import", "import"):
            global SLOW_IMPORT
            SLOW_IMPORT = self.mode == "slow_import"
            import slowpkg

            assert slowpkg.VALUE == 42
        return GRNN(iterations=self.iterations)._run(model, inputs)
