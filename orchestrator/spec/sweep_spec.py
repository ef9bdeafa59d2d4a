"""SweepSpec: the top level of a sweep spec, and what it expands to: its cells (`TrialSpec`s, each key once),
its Optuna studies, and `spec_hash`, the identity of the results folder it writes.

Expansion is the cartesian product victim x fl_round x batch_size x defense x attack x seed (seed varies
fastest), where each plugin entry first expands into its params' own product (PluginEntry.variants).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
from typing import Annotated, Any

import yaml
from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from grnn_engine.trial_spec import TrialSpec
from orchestrator.spec.models import (
    Asha,
    DataSpec,
    FedSgd,
    FLSpec,
    GridSpec,
    PluginEntry,
    Resources,
    StrictModel,
    UpdateSpec,
)
from orchestrator.spec.search import GridSearch, OptunaSearch, SearchSpec, Study, search_applies, study_id

__all__ = ["RESULTS_NAME", "SweepSpec"]

RESULTS_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
_NAME_RULE = "letters, digits, '.', '_' and '-' ([A-Za-z0-9._-]+, at most 100), not '.' or '..'"
# Spec fields that say where a sweep runs, not what it computes: left out of spec_hash, as TrialSpec
# leaves them out of its key, so the same sweep has the same hash on a laptop and on a cluster.
# Run settings (how many at once, time limits, resources) are left out too: changing them does not change
# what any cell computes, so a results folder stays resumable under new run settings.
_NOT_IN_HASH: dict[str, set[str] | None] = {
    "data": {"root", "download"},
    "description": None,
    "resources": None,
    "max_concurrent": None,
    "trial_timeout_s": None,
    "max_failures": None,
    "max_cells": None,
    "pack": None,
}


class SweepSpec(StrictModel):
    """A validated sweep. `cells()` is the list of trials; see the package docstring for the format."""

    name: str
    description: str | None = None
    data: DataSpec
    grid: GridSpec
    fl: FLSpec = Field(default_factory=FLSpec)  # FedAvg settings of the training stages (TrialSpec.fl)
    # true: every client also applies the cell's defense during the stage's FedAvg training, and each row
    # carries utility_acc, the test accuracy of that defended training at utility_round (what it costs)
    utility: bool = False
    utility_round: Annotated[int, Field(ge=1)] | None = None  # None: the grid's largest fl_round
    update: UpdateSpec = Field(default_factory=FedSgd)
    eval_every: int = Field(50, ge=1)
    success_psnr: float = Field(20.0, allow_inf_nan=False)
    resources: Resources = Field(default_factory=Resources)
    max_concurrent: Annotated[int, Field(ge=1)] | None = None  # None: as many as resources allow
    trial_timeout_s: float = Field(3600.0, gt=0, allow_inf_nan=False)
    max_failures: int = Field(1, ge=0)  # Ray-level retries of a trial lost to a node failure
    max_cells: int = Field(5000, ge=1)  # the sweep command line asks for --yes beyond this
    # Up to this many compatible cells run as one Ray trial through grnn_engine.batched (one vectorised
    # attack; results equal one by one); 1 = one cell per trial. A run setting: not in spec_hash.
    pack: int = Field(1, ge=1)
    search: SearchSpec = Field(default_factory=GridSearch)
    scheduler: Asha | None = None  # `asha` (or {name: asha, ...}): stop hopeless trials early
    # Face re-identification of every reconstruction (grnn_engine.reid): an identifier name or
    # {name, params}; its params are settings, not sweep axes. None: rows carry no reid columns.
    reid: PluginEntry | None = None

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _results_name(cls, value: str) -> str:
        # The name becomes a folder under the results root: no separators, no climbing out of it.
        if not RESULTS_NAME.fullmatch(value) or set(value) == {"."} or ".." in value:
            raise PydanticCustomError(
                "results_name", "not a usable results folder name", {"allowed": _NAME_RULE}
            )
        return value

    def _axes(self) -> list[list[Any]]:
        g = self.grid

        def plugins(entries: list[PluginEntry]) -> list[tuple[str, dict[str, Any]]]:
            return [(e.name, params) for e in entries for params in e.variants()]

        attacks = [
            (e.name, params, e.eval_every or self.eval_every) for e in g.attack for params in e.variants()
        ]
        return [plugins(g.victim), g.fl_round, g.batch_size, plugins(g.defense), attacks, g.seed]

    def cell_count(self) -> int:
        """The product of the axis lengths: the number of cells before duplicates are dropped."""
        return math.prod(len(axis) for axis in self._axes())

    def cells(self) -> list[TrialSpec]:
        """The trials of the grid in a fixed order (seed varies fastest), each key once."""
        d = self.data
        update_params = self.update.model_dump(exclude={"kind"})
        cells: dict[str, TrialSpec] = {}
        from grnn_engine.victims import victim_fingerprint  # here: the engine is imported on first use
        # each plugin axis item is (name, params), attacks (name, params, eval_every)
        for victim, fl_round, batch_size, defense, attack, seed in itertools.product(*self._axes()):
            cell = TrialSpec(
                attack=attack[0], attack_params=copy.deepcopy(attack[1]), eval_every=attack[2],
                victim=victim[0], victim_params=copy.deepcopy(victim[1]),
                victim_fingerprint=victim_fingerprint(victim[0], victim[1], d.image_size),
                dataset=d.dataset, data_root=d.root, download=d.download, split=d.split,
                image_size=d.image_size, batch_size=batch_size, distinct_labels=d.distinct_labels,
                fl_round=fl_round, fl=self._fl_of(defense[0], defense[1]),
                update=self.update.kind, update_params=dict(update_params),
                defense=defense[0], defense_params=copy.deepcopy(defense[1]),
                seed=seed, success_psnr=self.success_psnr,
                reid=self.reid.name if self.reid else None,
                reid_params=copy.deepcopy(self.reid.params) if self.reid else {},
            )  # fmt: skip
            cells.setdefault(cell.key(), cell)
        return list(cells.values())

    @property
    def fl_used(self) -> bool:
        """Whether any trial trains: a round above 0, utility, or a searched FL setting or round."""
        searched = self.search.params if isinstance(self.search, OptunaSearch) else {}
        return (
            self.utility
            or any(r > 0 for r in self.grid.fl_round)
            or any(n == "fl_round" or n.startswith("fl.") for n in searched)
        )

    @property
    def utility_at(self) -> int | None:
        """The FL round whose test accuracy is each row's utility_acc (None without utility)."""
        if not self.utility:
            return None
        return self.utility_round or max(self.grid.fl_round)

    def _fl_of(self, defense: str, defense_params: dict[str, Any]) -> dict[str, Any]:
        # A sweep that trains nothing leaves fl empty: its cells then compute the same thing under any FL
        # settings, and keep the keys they had before fl was typed.
        if not self.fl_used:
            return {}
        fl = self.fl.model_dump()
        if self.utility:
            fl["defense"], fl["defense_params"] = defense, copy.deepcopy(defense_params)
        return fl

    def studies(self) -> list[Study]:
        """The Optuna studies of a search: one per grid cell (searched parameters left at their defaults)."""
        if not isinstance(self.search, OptunaSearch):
            raise ValueError("studies() needs search.method optuna")
        out = []
        for cell in self.cells():
            space = {n: p for n, p in self.search.params.items() if search_applies(n, cell)}
            out.append(
                Study(
                    id=study_id(cell, cell.key()), cell=cell, space=space,
                    num_samples=self.search.num_samples if space else 1,
                )  # fmt: skip
            )
        return out

    def trial_count(self) -> int:
        """Trials the sweep runs in all: its cells, or in a search the samples of every study."""
        if isinstance(self.search, OptunaSearch):
            return sum(s.num_samples for s in self.studies())
        return len(self.cells())

    def spec_hash(self) -> str:
        """Stable 16-hex-digit hash of the canonical spec (sorted JSON, machine-specific paths left out)."""
        dumped = self.model_dump()
        # Sections left at their defaults drop out, so specs written before they existed keep their hash.
        if not self.fl_used:
            dumped["fl"] = {}  # unused, as the untyped section's default was
        for section, default in (("utility", False), ("utility_round", None), ("scheduler", None)):
            if dumped.get(section) == default:
                dumped.pop(section, None)
        for section, keys in _NOT_IN_HASH.items():
            if keys is None:
                dumped.pop(section, None)
            else:
                for key in keys:
                    dumped[section].pop(key, None)
        if dumped.get("reid") is None:
            dumped.pop("reid", None)  # so specs written before reid existed keep their hash
        text = json.dumps(dumped, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        """The spec as YAML, defaults filled in; `parse_spec(yaml.safe_load(s.to_yaml())) == s`."""
        return yaml.safe_dump(self.model_dump(), sort_keys=False, default_flow_style=None, width=110)
