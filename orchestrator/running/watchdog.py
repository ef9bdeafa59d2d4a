"""The per-trial time limit: a watchdog thread that stops a trial running past `trial_timeout_s`."""

from __future__ import annotations

import ctypes
import importlib._bootstrap
import os
import threading
import time


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

