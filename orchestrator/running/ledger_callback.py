"""Driver side: the Tune callback that writes each trial's final row to the ledger the moment Tune hands it over.

A killed driver so keeps everything that finished; the ledger, not Tune's experiment state, is what a rerun resumes
from (Tune's restore re-ran finished trials in our measurements). A trial whose worker died without its final
report gets a FAILED (or TIMEOUT) row here; a packed trial (orchestrator.running.packing) one per cell it still owes.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import ray
from ray import tune

from grnn_engine import TrialResult, TrialSpec
from grnn_engine.trial import MODEL_FACTS
from orchestrator.progress import Progress
from orchestrator.running.scoring import finite
from orchestrator.running.stages import UTILITY_FIELDS

if TYPE_CHECKING:
    from orchestrator.results import Ledger
    from orchestrator.running.asha import GroupedAsha


def failure_of_trial(trial: Any, elapsed: float, trial_timeout_s: float | None) -> tuple[str, str, str]:
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
        # Tune trial key of a packed trial -> its cells' keys (set by orchestrator.running.packing.packed_fit).
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
                entry = {k: float(result[k]) for k in ("iteration", "grad_loss", "psnr") if finite(result.get(k))}
                entry.update({k: result[k] for k in (*MODEL_FACTS, *UTILITY_FIELDS) if finite(result.get(k))})
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
        stage_figures: dict[str, Any] = {name: last.get(name) for name in (*MODEL_FACTS, *UTILITY_FIELDS)}
        result = TrialResult(
            spec=spec, status="COMPLETE",
            metrics={"psnr": psnr, "success": bool(psnr >= spec.success_psnr) if psnr is not None else None},
            **stage_figures,
            wall_s=elapsed, attack_s=elapsed, iterations=at,
            history=[{k: v for k, v in h.items() if k in ("iteration", "grad_loss", "psnr")} for h in history],
        )  # fmt: skip
        self.write_row(result.to_row(), None, trial, stopped_at=at)

    def _write_failure(self, trial: Any) -> None:
        key = trial.config["trial_key"]
        if key in self.packs:
            self._write_pack_failures(trial, self.packs[key])
            return
        spec = self._spec_of(trial)
        if key in self.written or spec is None:
            return
        elapsed = time.monotonic() - self.started_at.get(key, time.monotonic())
        if self.scheduler is not None and trial.trial_id in self.scheduler.stopped:
            self._write_stopped(trial, spec, elapsed)
            return
        status, error_type, error = failure_of_trial(trial, elapsed, self.trial_timeout_s)
        failed = TrialResult.failed(spec, status=status, error_type=error_type, error=error, wall_s=elapsed)
        self.write_row(failed.to_row(), None, trial)

    def _write_pack_failures(self, trial: Any, keys: Sequence[str]) -> None:
        """A packed trial ended without some of its rows (its worker died): a row for each of those."""
        missing = [key for key in keys if key not in self.written and key in self.cells]
        if not missing:
            return
        now = time.monotonic()
        elapsed = now - min(self.started_at.get(key, now) for key in keys)
        limit = self.trial_timeout_s * len(keys) if self.trial_timeout_s else None
        status, error_type, error = failure_of_trial(trial, elapsed, limit)
        if status == "TIMEOUT":
            error = f"packed trial of {len(keys)} cells ran past {len(keys)} x trial_timeout_s and its worker was ended"
        for key in missing:
            failed = TrialResult.failed(
                self.cells[key], status=status, error_type=error_type, error=error, wall_s=elapsed / len(keys)
            )
            self.write_row(failed.to_row(), None, trial)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._write_failure(trial)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._write_failure(trial)  # no-op when the final report was written

