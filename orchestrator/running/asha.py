"""Early stopping (`scheduler: asha`): one Ray Tune ASHAScheduler per group of comparable trials.

A trial it stops gets a COMPLETE row scored at the iteration it reached (psnr only, from its last evaluation) with
`stopped_early` and `stopped_at` (written by orchestrator.running.ledger_callback).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from grnn_engine import TrialSpec
from orchestrator.running.scoring import finite

if TYPE_CHECKING:
    from orchestrator.spec import Asha, SearchParam


def _attack_iterations(cell: TrialSpec, space: dict[str, SearchParam] | None = None) -> int:
    """The most iterations a trial of this cell (or study) runs: ASHA's max_t is one more."""
    from grnn_engine import ATTACKS

    iterations = int(getattr(ATTACKS.create(cell.attack, **cell.attack_params), "iterations", 0) or 0)
    searched = (space or {}).get("attack.params.iterations")
    if searched is not None:
        iterations = max([iterations, *(int(v) for v in searched.ends() if finite(v))])
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
        if finite(result.get("iterations")) and result.get("iteration", 0) >= result["iterations"]:
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

