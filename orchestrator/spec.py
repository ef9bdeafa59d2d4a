"""The sweep spec: a YAML file -> a typed, validated `SweepSpec` -> the `TrialSpec` cells it expands to.

A spec names a results folder, the data, a grid of axes and how trials run (see sweeps/quickstart.yaml):

    name: quickstart
    data: {dataset: digits, image_size: 32, split: test}
    grid:
      victim: [lenet]                                  # names or {name, params} entries
      fl_round: [0]                                    # one value or a list
      batch_size: [1, 4]
      defense: [{name: none}, {name: gaussian, params: {sigma: [0.01, 0.1]}}]
      attack: [{name: grnn, params: {iterations: 300}, eval_every: 60}]   # eval_every: optional override
      seed: 3                                          # an int N means seeds 0..N-1; or a list
    eval_every: 50
    resources: {cpu: 1, gpu: 0}

Expansion is the cartesian product victim x fl_round x batch_size x defense x attack x seed, where each
plugin entry first expands into its params' own product: a param given as a list is an axis, and to give
one list-valued param write a list of lists (`steps: [[a, b]]`). Cells with equal `TrialSpec.key()` are
kept once. `load_spec` also builds every distinct victim, defense and attack once, so that a bad param
value is caught before Ray starts; `parse_spec` checks names and param names only. Everything a user can get wrong is reported as a `SpecError`: one sentence naming the file,
the dotted field path, the bad value and what is allowed; pydantic's ValidationError never escapes.

Federated training (`fl`, typed as FLSpec): the FedAvg settings of the stages that trials at fl_round > 0
attack. A sweep whose rounds are all 0 (and without utility) trains nothing, and its cells carry `fl: {}`.
`utility: true` also applies each cell's defense to every client update during that training (TrialSpec
.fl["defense"]), so each defense setting gets its own chain, and each row carries `utility_acc`, the test
accuracy of the defended model at `utility_round` (default: the grid's largest fl_round).

Search (`search: {method: optuna, ...}`, see OptunaSearch): `params` maps dotted names (SEARCH_TARGETS, e.g.
`defense.params.sigma`) to ranges; the other axes stay a grid, with one study per grid cell (`studies()`).
A searched parameter applies to the cells whose plugin takes it, so one search can hold gaussian's sigma
and prune's ratio; a cell that none applies to runs once, as in a grid. The objective is either
`objectives` (metrics with directions; two or more = a Pareto front, NSGA-II by default) or
`breaking_point` (minimize |metric - threshold|, so samples gather where the attack starts to fail).
`scheduler: asha` stops trials whose intermediate psnr (or grad_loss) is hopeless (see Asha).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import itertools
import json
import math
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from grnn_engine.data import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from grnn_engine.errors import ConfigError
from grnn_engine.registry import Registry, did_you_mean
from grnn_engine.trial_spec import SEED_MAX, TrialSpec

__all__ = [
    "SEARCH_TARGETS",
    "Asha",
    "AttackEntry",
    "BreakingPoint",
    "DataSpec",
    "FLSpec",
    "FedAvg",
    "FedSgd",
    "GridSearch",
    "GridSpec",
    "Objective",
    "OptunaSearch",
    "PluginEntry",
    "Resources",
    "SearchParam",
    "SearchSpec",
    "SpecError",
    "Study",
    "SweepSpec",
    "UpdateSpec",
    "apply_sample",
    "load_spec",
    "parse_spec",
    "search_applies",
]

# An integer seed count N expands to N seeds: bounded so that a typo cannot allocate gigabytes.
MAX_SEED_COUNT = 10**6
Seed = Annotated[int, Field(ge=0, le=SEED_MAX, strict=True)]
RESULTS_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
_NAME_RULE = "letters, digits, '.', '_' and '-' ([A-Za-z0-9._-]+, at most 100), not '.' or '..'"
# Victim parameters the sweep sets itself (from data.image_size, the dataset and the trial seed).
_VICTIM_SET_BY_SWEEP = {"num_classes": "the dataset", "image_size": "data.image_size", "seed": "grid.seed"}
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


class SpecError(ConfigError):
    """A sweep spec is invalid: one sentence naming the file, the dotted field path and the bad value."""

    def __init__(self, message: str, *, source: str = "<spec>", path: str = "") -> None:
        super().__init__(message)
        self.source = source
        self.path = path


# ---------------------------------------------------------------------------------------------- models


class _Model(BaseModel):
    # strict: a quoted "4" or a 1.0 where an integer belongs is a mistake to report, not to coerce.
    model_config = ConfigDict(extra="forbid", strict=True)


class DataSpec(_Model):
    """Which images the private batches come from (see grnn_engine.data)."""

    dataset: str
    root: str | None = None  # None: $GRNN_DATA_ROOT, else ~/.cache/grnn/data, resolved on the worker
    download: bool = False
    image_size: int = Field(32, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)
    split: Literal["train", "test", "all"] = "test"  # "all": att_faces, identities (split per person)
    distinct_labels: bool = False


class PluginEntry(_Model):
    """One victim, defense or attack with its params; a list-valued param is a sweep axis."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    def axes(self) -> dict[str, list[Any]]:
        """Each param's values, in sorted param order (a scalar is a one-value axis)."""
        return {k: (v if isinstance(v, list) else [v]) for k, v in sorted(self.params.items())}

    def variants(self) -> list[dict[str, Any]]:
        """Every combination of the param axes, as independent dicts."""
        axes = self.axes()
        return [
            copy.deepcopy(dict(zip(axes, combo, strict=True))) for combo in itertools.product(*axes.values())
        ]


class AttackEntry(PluginEntry):
    """An attack entry; `eval_every` overrides the spec's, since attacks count iterations on different scales
    (one DLG L-BFGS step is ~20 GRNN steps), and each should report a similar number of times."""

    eval_every: Annotated[int, Field(ge=1)] | None = None


def _one_or_many(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]


class GridSpec(_Model):
    """The axes of the sweep; every axis takes one value or a list."""

    victim: list[PluginEntry] = Field(min_length=1)
    fl_round: list[NonNegInt] = Field(default_factory=lambda: [0], min_length=1)
    batch_size: list[PosInt] = Field(default_factory=lambda: [1], min_length=1)
    defense: list[PluginEntry] = Field(default_factory=lambda: [PluginEntry(name="none")], min_length=1)
    attack: list[AttackEntry] = Field(min_length=1)
    seed: list[Seed] = Field(default_factory=lambda: [0], min_length=1)

    @field_validator("victim", "fl_round", "batch_size", "defense", "attack", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return _one_or_many(value)

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_count(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            if not 1 <= value <= MAX_SEED_COUNT:
                raise PydanticCustomError(
                    "seed_count",
                    f"an integer N means seeds 0..N-1, so it must be in 1..{MAX_SEED_COUNT}",
                    {"allowed": f"an integer N in 1..{MAX_SEED_COUNT}, or a list of seeds in 0..{SEED_MAX}"},
                )
            return list(range(value))
        return value


class FedSgd(_Model):
    """The client shares the gradient of its batch loss (the GRNN paper's setting)."""

    kind: Literal["fedsgd"] = "fedsgd"


class FedAvg(_Model):
    """The client shares its model delta after `local_steps` SGD steps at `local_lr`."""

    kind: Literal["fedavg"]
    local_steps: int = Field(5, ge=1)
    local_lr: float = Field(0.01, gt=0, allow_inf_nan=False)


UpdateSpec = Annotated[FedSgd | FedAvg, Field(discriminator="kind")]


class FLSpec(_Model):
    """FedAvg settings of the training stages a sweep attacks (grnn_engine.fl.FLSettings, minus the defense,
    which `utility: true` sets per cell). Used for every fl_round > 0, and for round 0's model accuracy.

    The defaults are chosen to learn within the rounds the sweeps use. Measured with GRNN's LeNet (seed 0,
    10 IID clients, all sampled each round), test accuracy at rounds 1/2/5/10 on CIFAR-10 (20k train images):
    two local epochs at local_lr 0.3 (these defaults) 0.15/0.23/0.33/0.40; the engine's own defaults (one
    epoch at 0.1) 0.13/0.13/0.20/0.29; one epoch at 0.5 0.11/0.13/0.23/0.33. On digits these defaults give
    0.10 (untrained), 0.57 at round 5 and 0.94 at round 20.
    """

    clients: int = Field(default=10, ge=1)  # K: clients the train split is dealt to
    # C: clients trained per round; an integer is a count (<= clients), a number in (0, 1] a fraction of K
    clients_per_round: int | float = 1.0
    local_epochs: int = Field(default=2, ge=1)  # E: passes over its shard a sampled client makes per round
    local_batch_size: int = Field(default=32, ge=1)
    local_lr: float = Field(default=0.3, gt=0, allow_inf_nan=False)  # plain SGD, no momentum
    iid: bool = True  # False: each class is dealt by a Dirichlet(dirichlet_alpha) draw (smaller = more skewed)
    dirichlet_alpha: float = Field(default=0.5, gt=0, allow_inf_nan=False)

    @field_validator("clients_per_round")
    @classmethod
    def _at_most_clients(cls, value: int | float, info: Any) -> int | float:
        clients = info.data.get("clients")
        count = f"an integer in 1..{clients} (fl.clients)" if isinstance(clients, int) else "an integer >= 1"
        if isinstance(value, int):
            ok = value >= 1 and (not isinstance(clients, int) or value <= clients)
        else:
            ok = math.isfinite(value) and 0 < value <= 1
        if not ok:
            raise PydanticCustomError(
                "clients_per_round", "out of range", {"allowed": f"{count} or a fraction in (0, 1]"}
            )
        return value


class GridSearch(_Model):
    """Every cell of the grid, once."""

    method: Literal["grid"] = "grid"


# Where a searched parameter goes in a cell: `<family>.params.<name>`, `fl.<name>`, or a grid axis.
SEARCH_TARGETS = (
    "defense.params.<name>", "attack.params.<name>", "victim.params.<name>", "fl.<name>", "fl_round", "batch_size",
)
SEARCH_METRICS = ("psnr", "ssim", "mse", "label_acc", "model_acc", "utility_acc")


class SearchParam(_Model):
    """One searched parameter: `uniform`/`loguniform` floats in [low, high], `int` in [low, high] (log-spaced with
    `log: true`), or one of `values` (`categorical`)."""

    type: Literal["uniform", "loguniform", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False  # int only: sample log-uniformly
    values: list[Any] | None = None  # categorical only

    @model_validator(mode="after")
    def _range(self) -> SearchParam:
        def bad(problem: str, allowed: str) -> PydanticCustomError:
            return PydanticCustomError("search_range", problem, {"allowed": allowed})

        if self.type == "categorical":
            if self.low is not None or self.high is not None:
                raise bad("a categorical parameter takes values, not low/high", "type: categorical, values: [...]")
            if not self.values:
                raise bad("empty categorical choice", "a non-empty list of values")
            if any(not isinstance(v, bool | int | float | str) and v is not None for v in self.values):
                raise bad("categorical values must be plain scalars", "numbers, strings, booleans or null")
            return self
        if self.values is not None:
            raise bad(f"a {self.type} parameter takes low and high, not values", "low and high numbers")
        if self.low is None or self.high is None:
            raise bad(f"a {self.type} parameter needs both low and high", "low < high, both numbers")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise bad("low and high must be finite", "finite numbers with low < high")
        if self.low >= self.high:
            raise bad(f"empty range: low={self.low:g} is not below high={self.high:g}", "low < high")
        if self.log and self.type != "int":
            raise bad("log applies to int parameters only (use type: loguniform)", "log: true with type: int")
        if (self.type == "loguniform" or self.log) and self.low <= 0:
            raise bad(f"a log range needs low > 0 (got low={self.low:g})", "0 < low < high")
        if self.type == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise bad("an int range needs whole-number bounds", "integers low < high")
        return self

    def ends(self) -> list[Any]:
        """The values that bound the range (every value for categorical), to check against a plugin's rules."""
        if self.type == "categorical":
            return list(self.values or [])
        if self.type == "int":
            return [int(self.low or 0), int(self.high or 0)]
        return [float(self.low or 0.0), float(self.high or 0.0)]


class Objective(_Model):
    """One objective of the search: a row's metric and whether to minimize or maximize it."""

    metric: Literal["psnr", "ssim", "mse", "label_acc", "model_acc", "utility_acc"]
    direction: Literal["minimize", "maximize"]


class BreakingPoint(_Model):
    """Search for where the attack breaks: minimize |metric - threshold|, so samples gather at the strength
    where the metric crosses the threshold (psnr: the spec's success_psnr unless given)."""

    metric: Literal["psnr", "ssim"] = "psnr"
    threshold: float | None = Field(None, allow_inf_nan=False)


class OptunaSearch(_Model):
    """Optuna (through Ray Tune's OptunaSearch) over `params`, one study per grid cell of the other axes."""

    method: Literal["optuna"]
    params: dict[str, SearchParam] = Field(min_length=1)  # dotted names, see SEARCH_TARGETS
    objectives: list[Objective] | None = Field(None, min_length=1)
    breaking_point: BreakingPoint | None = None
    num_samples: int = Field(10, ge=1)  # trials per study
    sampler: Literal["tpe", "nsga2", "random"] | None = None  # None: tpe for one objective, nsga2 for several
    max_concurrent: int = Field(2, ge=1)  # trials of one study at once (fewer = each sample better informed)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _one_objective_kind(self) -> OptunaSearch:
        if (self.objectives is None) == (self.breaking_point is None):
            raise PydanticCustomError(
                "search_objective",
                "give exactly one of objectives and breaking_point",
                {"allowed": "objectives: [{metric, direction}, ...] or breaking_point: {metric, threshold}"},
            )
        return self

    def directions(self) -> list[str]:
        """'min'/'max' per objective, in order (a breaking point is one objective to minimize)."""
        if self.objectives is None:
            return ["min"]
        return ["min" if o.direction == "minimize" else "max" for o in self.objectives]

    def sampler_name(self) -> str:
        return self.sampler or ("nsga2" if self.objectives and len(self.objectives) > 1 else "tpe")


SearchSpec = Annotated[GridSearch | OptunaSearch, Field(discriminator="method")]


class Asha(_Model):
    """Ray Tune's ASHA on the attack's intermediate reports: a trial whose `metric` at a rung (grace_period,
    grace_period * reduction_factor, ... attack iterations) is in the worst 1 - 1/reduction_factor of its group
    is stopped. Groups: one per study in a search; trials of the same attack setting, victim, data, batch size
    and round in a grid."""

    name: Literal["asha"] = "asha"
    metric: Literal["psnr", "grad_loss"] = "psnr"  # psnr is maximized, grad_loss minimized
    grace_period: Annotated[int, Field(ge=1)] | None = None  # attack iterations; None: 2 x the trial's eval_every
    reduction_factor: float = Field(3.0, gt=1, allow_inf_nan=False)
    brackets: int = Field(1, ge=1)

    @property
    def mode(self) -> str:
        return "max" if self.metric == "psnr" else "min"


def _ray_quantity(value: float) -> float:
    # Ray refuses fractional resource quantities above 1 (0.25 GPU is fine, 1.5 is not).
    if value > 1 and not float(value).is_integer():
        raise PydanticCustomError(
            "ray_quantity",
            "a share above 1 must be a whole number",
            {"allowed": "a fraction up to 1 (0.25 = four trials to one) or a whole number"},
        )
    return value


class Resources(_Model):
    """What one trial reserves from Ray."""

    cpu: Annotated[float, Field(gt=0, allow_inf_nan=False), AfterValidator(_ray_quantity)] = 1.0
    gpu: Annotated[float, Field(ge=0, allow_inf_nan=False), AfterValidator(_ray_quantity)] = 0.0


class SweepSpec(_Model):
    """A validated sweep. `cells()` is the list of trials; see the module docstring for the format."""

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
        # each plugin axis item is (name, params), attacks (name, params, eval_every)
        for victim, fl_round, batch_size, defense, attack, seed in itertools.product(*self._axes()):
            cell = TrialSpec(
                attack=attack[0], attack_params=copy.deepcopy(attack[1]), eval_every=attack[2],
                victim=victim[0], victim_params=copy.deepcopy(victim[1]),
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
            label = (
                f"{cell.attack}-{cell.victim}-{cell.dataset}-b{cell.batch_size}-r{cell.fl_round}-"
                f"{cell.defense}-s{cell.seed}"
            )
            out.append(
                Study(
                    id=f"{label}-{cell.key()[:8]}", cell=cell, space=space,
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


# ---------------------------------------------------------------------------------------------- entry points


def load_spec(path: str | Path) -> SweepSpec:
    """Read, validate and check a sweep file; every plugin param set is built once, so bad values fail here."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(
            f"{source}: no such file (got {source!r}; allowed: the path of a sweep YAML file, "
            f"e.g. sweeps/quickstart.yaml)",
            source=source,
        ) from None
    except IsADirectoryError:
        raise SpecError(
            f"{source}: is a folder (got {source!r}; allowed: a sweep YAML file)", source=source
        ) from None
    except UnicodeDecodeError as exc:
        raise SpecError(
            f"{source}: not UTF-8 text (got byte {exc.object[exc.start]:#04x} at offset {exc.start}; "
            f"allowed: a UTF-8 YAML file)",
            source=source,
        ) from None
    except OSError as exc:
        raise SpecError(
            f"{source}: cannot be read ({exc.strerror}) (got {source!r})", source=source
        ) from None
    try:
        data = yaml.load(text, Loader=_SpecLoader)  # noqa: S506  (_SpecLoader is a SafeLoader)
    except yaml.MarkedYAMLError as exc:
        raise SpecError(_yaml_message(source, text, exc), source=source) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: invalid YAML: {exc}", source=source) from None
    if data is None:
        raise SpecError(
            f"{source}: the file is empty (got no settings; allowed: a mapping with at least "
            f"name, data and grid)",
            source=source,
        )
    spec = parse_spec(data, source)
    _build_plugins(spec, source)
    _build_search(spec, source)
    return spec


def parse_spec(data: dict[str, Any], source: str = "<spec>") -> SweepSpec:
    """Validate a spec given as plain data: types, ranges, plugin names and param names (not param values)."""
    if not isinstance(data, dict):
        raise SpecError(
            f"{source}: (top level): must be a mapping of settings (got {_kind(data)} {_show(data)}; "
            f"allowed: a mapping with keys {', '.join(SweepSpec.model_fields)})",
            source=source,
        )
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        path, message = _pydantic_message(errors[0], data)
        more = len(errors) - 1
        if more:
            message += f"; {more} more problem{'s' if more > 1 else ''} in this spec"
        raise SpecError(f"{source}: {message}", source=source, path=path) from None
    _check_plugins(spec, source)
    _check_search(spec, source)
    _check_pack(spec, source)
    return spec


# ---------------------------------------------------------------------------------------------- YAML


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 as a float (YAML 1.1 insists on a dot) and refuses duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r}",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_message(source: str, text: str, exc: yaml.MarkedYAMLError) -> str:
    lines = text.splitlines()

    def line_at(mark: Any) -> str:
        return lines[mark.line].strip() if mark is not None and mark.line < len(lines) else ""

    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or exc.context or "cannot be parsed"
    if not line_at(mark) and exc.context_mark is not None:
        # an unclosed bracket or quote is found at the end of the file: point at where it was opened
        mark, problem = exc.context_mark, f"{exc.context}, {problem}"
    if mark is None:
        return f"{source}: invalid YAML: {problem}"
    if exc.context and exc.context_mark is not None and exc.context_mark.line != mark.line:
        problem += f" ({exc.context} that starts on line {exc.context_mark.line + 1})"
    line_text = line_at(mark)
    return (
        f"{source}: line {mark.line + 1}, column {mark.column + 1}: invalid YAML, {problem} "
        f"(got {line_text!r}; allowed: YAML mappings and lists as in sweeps/quickstart.yaml)"
    )


# ---------------------------------------------------------------------------------------------- plugins


def _registries() -> dict[str, Registry[Any]]:
    import grnn_engine  # importing the package registers every plugin
    from grnn_engine.reid import IDENTIFIERS

    return {
        "dataset": grnn_engine.DATASETS,
        "victim": grnn_engine.VICTIMS,
        "defense": grnn_engine.DEFENSES,
        "attack": grnn_engine.ATTACKS,
        "identifier": IDENTIFIERS,
    }


def _takes_any(registry: Registry[Any], name: str) -> bool:
    params = inspect.signature(registry.get(name)).parameters.values()
    return any(p.kind == p.VAR_KEYWORD for p in params)


def _fail(source: str, path: str, problem: str, value: Any, allowed: str) -> SpecError:
    return SpecError(
        f"{source}: {path}: {problem} (got {_show(value)}; allowed: {allowed})", source=source, path=path
    )


def _check_plugins(spec: SweepSpec, source: str) -> None:
    """Plugin names, param names and param axes, against the registries; values are left to _build_plugins."""
    registries = _registries()
    datasets = registries["dataset"]
    if spec.data.dataset not in datasets:
        raise _fail(
            source,
            "data.dataset",
            f"unknown dataset{did_you_mean(spec.data.dataset, datasets.names())}",
            spec.data.dataset,
            ", ".join(datasets.names()),
        )
    for family in ("victim", "defense", "attack"):
        registry = registries[family]
        for i, entry in enumerate(getattr(spec.grid, family)):
            where = f"grid.{family}[{i}]"
            if entry.name not in registry:
                raise _fail(
                    source,
                    f"{where}.name",
                    f"unknown {family}{did_you_mean(entry.name, registry.names())}",
                    entry.name,
                    ", ".join(registry.names()),
                )
            allowed = [
                p
                for p in registry.parameters(entry.name)
                if family != "victim" or p not in _VICTIM_SET_BY_SWEEP
            ]
            open_ended = _takes_any(registry, entry.name)
            for param, value in entry.params.items():
                path = f"{where}.params.{param}"
                if family == "victim" and param in _VICTIM_SET_BY_SWEEP:
                    raise _fail(
                        source,
                        path,
                        f"{param} is set by {_VICTIM_SET_BY_SWEEP[param]}, not per victim",
                        param,
                        ", ".join(allowed) or "none",
                    )
                if param not in allowed and not open_ended:
                    raise _fail(
                        source,
                        path,
                        f"unknown parameter of {family} '{entry.name}'{did_you_mean(param, allowed)}",
                        param,
                        ", ".join(sorted(allowed)) or "none",
                    )
                if value == []:
                    raise _fail(
                        source, path, "empty sweep axis", value, "one value or a non-empty list of values"
                    )
                bad = _first_non_plain(value)
                if bad is not None:
                    raise _fail(
                        source,
                        path,
                        f"holds a {type(bad).__name__}, which a trial cannot carry",
                        bad,
                        "numbers, strings, booleans, null, and lists or mappings of them",
                    )
    if spec.reid is not None:
        _check_identifier(spec.reid, registries["identifier"], source)


def _check_identifier(entry: PluginEntry, identifiers: Registry[Any], source: str) -> None:
    """The reid identifier's name and param names; its params are settings, never axes."""
    if entry.name not in identifiers:
        raise _fail(
            source,
            "reid.name",
            f"unknown identifier{did_you_mean(entry.name, identifiers.names())}",
            entry.name,
            ", ".join(identifiers.names()),
        )
    allowed = list(identifiers.parameters(entry.name))
    for param, value in entry.params.items():
        path = f"reid.params.{param}"
        if param not in allowed:
            raise _fail(
                source,
                path,
                f"unknown parameter of identifier '{entry.name}'{did_you_mean(param, allowed)}",
                param,
                ", ".join(sorted(allowed)) or "none",
            )
        bad = _first_non_plain(value)
        if bad is not None:
            raise _fail(
                source,
                path,
                f"holds a {type(bad).__name__}, which a trial cannot carry",
                bad,
                "numbers, strings, booleans, null, and lists or mappings of them",
            )


def _build_plugins(spec: SweepSpec, source: str) -> None:
    """Build every distinct victim, defense and attack once, so that a bad param value fails before Ray starts."""
    import grnn_engine

    image_size = spec.data.image_size

    def build_victim(name: str, params: dict[str, Any]) -> object:
        # 10 classes stands in for the dataset's: the class count only sizes the last layer, and the
        # driver may not hold the data (it lives on the workers of a cluster).
        return grnn_engine.create_victim(name, num_classes=10, image_size=image_size, seed=0, **params)

    builders = {
        "victim": build_victim,
        "defense": lambda name, params: grnn_engine.DEFENSES.create(name, **params),
        "attack": lambda name, params: grnn_engine.ATTACKS.create(name, **params),
    }
    for family, build in builders.items():
        done: set[str] = set()
        for i, entry in enumerate(getattr(spec.grid, family)):
            for params in entry.variants():
                signature = json.dumps([entry.name, params], sort_keys=True, default=repr)
                if signature in done:
                    continue
                done.add(signature)
                try:
                    build(entry.name, params)
                except (ConfigError, TypeError, ValueError) as exc:
                    raise _built_message(
                        source, f"grid.{family}[{i}]", entry.name, params, image_size, exc
                    ) from None
    if spec.reid is not None:
        from grnn_engine.reid import IDENTIFIERS

        # Built here too: a bad value, or the dlib identifier without the faces extra, fails before Ray.
        try:
            IDENTIFIERS.create(spec.reid.name, **spec.reid.params)
        except (ConfigError, TypeError, ValueError) as exc:
            raise _built_message(source, "reid", spec.reid.name, spec.reid.params, image_size, exc) from None


def _built_message(
    source: str, where: str, name: str, params: dict[str, Any], image_size: int, exc: Exception
) -> SpecError:
    """A plugin's own complaint, pointed at the param it names (or at all its params)."""
    message = str(exc).rstrip(".")
    if not isinstance(exc, ConfigError):
        message = f"{name} rejected its params: {type(exc).__name__}: {message}"
    named = [p for p in params if re.search(rf"\b{re.escape(p)}\b", message)]
    if len(named) == 1 or (len(params) == 1 and not re.search(r"\bimage_size\b", message)):
        param = named[0] if named else next(iter(params))
        path, value = f"{where}.params.{param}", params[param]
    elif not named and re.search(r"\bimage_size\b", message):
        path, value = "data.image_size", image_size
    elif not params:
        path, value = f"{where}.name", name
    else:
        path, value = f"{where}.params", params
    if _show(value) not in message and str(value) not in message:
        message += f" (got {_show(value)})"
    return SpecError(f"{source}: {path}: {message}", source=source, path=path)


def _first_non_plain(value: Any) -> Any:
    """The first value that is not JSON-like plain data, or None."""
    if value is None or isinstance(value, bool | int | float | str):
        return None
    if isinstance(value, list):
        return next((bad for v in value if (bad := _first_non_plain(v)) is not None), None)
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return k
            if (bad := _first_non_plain(v)) is not None:
                return bad
        return None
    return value


# ---------------------------------------------------------------------------------------------- search


@dataclasses.dataclass(frozen=True)
class Study:
    """One Optuna study of a search: the grid cell it starts from (searched parameters at their defaults) and
    the searched parameters that apply to that cell. A cell that no searched parameter applies to (defense
    `none` while searching `defense.params.sigma`) has an empty space: its one trial is the cell itself."""

    id: str
    cell: TrialSpec
    space: dict[str, SearchParam]
    num_samples: int

    def trial(self, sampled: dict[str, Any]) -> TrialSpec:
        """The cell with the sampled values set."""
        return apply_sample(self.cell, sampled)


def _split_target(name: str) -> tuple[str, str]:
    """('defense', 'sigma') for 'defense.params.sigma', ('fl', 'clients') for 'fl.clients', (name, '') for an
    axis; ('', '') when the name fits none of SEARCH_TARGETS."""
    if name in ("fl_round", "batch_size"):
        return name, ""
    parts = name.split(".")
    if len(parts) == 2 and parts[0] == "fl" and parts[1]:
        return "fl", parts[1]
    if len(parts) == 3 and parts[0] in ("defense", "attack", "victim") and parts[1] == "params" and parts[2]:
        return parts[0], parts[2]
    return "", ""


def search_applies(name: str, cell: TrialSpec) -> bool:
    """Whether searched parameter `name` is one of `cell`'s (a defense parameter applies to defenses taking it)."""
    family, param = _split_target(name)
    if family in ("defense", "attack", "victim"):
        registry = _registries()[family]
        plugin = getattr(cell, family)
        return param in registry.parameters(plugin) or _takes_any(registry, plugin)
    return bool(family)


def apply_sample(cell: TrialSpec, sampled: dict[str, Any]) -> TrialSpec:
    """`cell` with each sampled value at its dotted place; a defense trained under utility follows along."""
    fields: dict[str, Any] = {
        "attack_params": dict(cell.attack_params), "defense_params": dict(cell.defense_params),
        "victim_params": dict(cell.victim_params), "fl": copy.deepcopy(cell.fl),
    }  # fmt: skip
    for name, value in sampled.items():
        family, param = _split_target(name)
        if family in ("fl_round", "batch_size"):
            fields[family] = value
        elif family == "fl":
            fields["fl"][param] = value
        elif family:
            fields[f"{family}_params"][param] = value
        else:
            raise ValueError(f"not a searchable parameter: {name!r}")
    if "defense" in fields["fl"]:  # utility: the stage trains under the trial's own defense
        fields["fl"]["defense_params"] = dict(fields["defense_params"])
    return dataclasses.replace(cell, **fields)


def _check_search(spec: SweepSpec, source: str) -> None:
    """Names, conflicts with the grid, and objectives of `search`; utility settings. Values: _build_search."""
    if spec.utility and spec.utility_at == 0:
        raise _fail(
            source, "utility", "utility needs a trained model, but every fl_round is 0", spec.utility,
            "utility_round >= 1, or an fl_round > 0 in the grid",
        )  # fmt: skip
    if spec.utility_round is not None and not spec.utility:
        raise _fail(source, "utility_round", "is set but utility is false", spec.utility_round, "utility: true")
    search = spec.search
    if not isinstance(search, OptunaSearch):
        return
    registries = _registries()
    for name, param in search.params.items():
        path = f"search.params.{name}"
        family, pname = _split_target(name)
        if not family:
            raise _fail(source, path, "unknown parameter", name, ", ".join(SEARCH_TARGETS))
        if family in ("fl_round", "batch_size"):
            if param.type not in ("int", "categorical"):
                raise _fail(source, f"{path}.type", f"{name} takes integers", param.type, "int, categorical")
            if name in spec.grid.model_fields_set:
                raise _fail(
                    source, path, f"is both searched and set in grid.{name}", name,
                    f"search it or list it in grid.{name}, not both",
                )  # fmt: skip
        elif family == "fl":
            allowed = list(FLSpec.model_fields)
            if pname not in allowed:
                raise _fail(
                    source, path, f"unknown FL setting{did_you_mean(pname, allowed)}", name,
                    ", ".join(f"fl.{a}" for a in allowed),
                )  # fmt: skip
            if pname in spec.fl.model_fields_set:
                raise _fail(source, path, f"is both searched and set in fl.{pname}", name, "one of the two")
        else:
            registry = registries[family]
            entries = getattr(spec.grid, family)
            takers = [
                (i, e) for i, e in enumerate(entries)
                if pname in registry.parameters(e.name) or _takes_any(registry, e.name)
            ]  # fmt: skip
            if family == "victim" and pname in _VICTIM_SET_BY_SWEEP:
                takers = []
            if not takers:
                known = sorted(
                    {f"{family}.params.{p}" for e in entries for p in registry.parameters(e.name)}
                    - {f"victim.params.{p}" for p in _VICTIM_SET_BY_SWEEP}
                )
                names = ", ".join(e.name for e in entries)
                raise _fail(
                    source, path,
                    f"unknown parameter: no {family} of the grid ({names}) takes {pname!r}"
                    f"{did_you_mean(name, known)}",
                    name, ", ".join(known) or "none",
                )  # fmt: skip
            for i, entry in takers:
                if pname in entry.params:
                    raise _fail(
                        source, path, f"is both searched and set in grid.{family}[{i}].params.{pname}", name,
                        "search it or give it in the grid, not both",
                    )  # fmt: skip
            if family == "defense":
                from grnn_engine.defenses import param_specs

                for _, entry in takers:
                    kind = param_specs(entry.name).get(pname)
                    if kind is not None and kind.kind is int and param.type not in ("int", "categorical"):
                        raise _fail(
                            source, f"{path}.type", f"defense '{entry.name}' {pname} is an integer",
                            param.type, "int, categorical",
                        )  # fmt: skip
    for i, objective in enumerate(search.objectives or []):
        if objective.metric == "utility_acc" and not spec.utility:
            raise _fail(
                source, f"search.objectives[{i}].metric", "utility_acc is only measured with utility: true",
                objective.metric, "utility: true in the spec, or another metric",
            )  # fmt: skip
    bp = search.breaking_point
    if bp is not None and bp.metric != "psnr" and bp.threshold is None:
        raise _fail(
            source, "search.breaking_point.threshold", f"a {bp.metric} breaking point needs a threshold", None,
            "a number (psnr defaults to success_psnr)",
        )  # fmt: skip


def _check_pack(spec: SweepSpec, source: str) -> None:
    """pack > 1 runs cells together as one trial: nothing may stop or sample them one at a time."""
    if spec.pack == 1:
        return
    if spec.scheduler is not None:
        used, other = "scheduler: asha", "no scheduler"
    elif isinstance(spec.search, OptunaSearch):
        used, other = "search: {method: optuna}", "search: {method: grid}"
    else:
        return
    raise _fail(
        source, "pack", f"packed trials cannot be stopped or sampled one by one, so pack > 1 does not go with {used}",
        spec.pack, f"pack: 1, or {other}",
    )  # fmt: skip


def _build_search(spec: SweepSpec, source: str) -> None:
    """Build each plugin (or FL settings) a searched parameter applies to at both ends of its range."""
    import grnn_engine
    from grnn_engine.fl import FLSettings

    search = spec.search
    if not isinstance(search, OptunaSearch):
        return
    builders = {
        "victim": lambda n, p: grnn_engine.create_victim(n, num_classes=10, image_size=spec.data.image_size, seed=0, **p),
        "defense": lambda n, p: grnn_engine.DEFENSES.create(n, **p),
        "attack": lambda n, p: grnn_engine.ATTACKS.create(n, **p),
    }
    for name, param in search.params.items():
        path = f"search.params.{name}"
        family, pname = _split_target(name)
        for value in param.ends():
            try:
                if family == "fl":
                    FLSettings.from_dict({**spec.fl.model_dump(), pname: value})
                elif family in builders:
                    for entry in getattr(spec.grid, family):
                        if search_applies(name, TrialSpec(**{family: entry.name})):
                            for params in entry.variants():
                                builders[family](entry.name, {**params, pname: value})
                elif family in ("fl_round", "batch_size") and (not isinstance(value, int) or value < (family == "batch_size")):
                    raise ConfigError(f"{name} must be an integer >= {int(family == 'batch_size')}")
            except (ConfigError, TypeError, ValueError) as exc:
                message = str(exc).rstrip(".")
                raise SpecError(
                    f"{source}: {path}: {message} (got {_show(value)} at an end of the searched range)",
                    source=source, path=path,
                ) from None


# ---------------------------------------------------------------------------------------------- messages

_MISSING = object()
_TYPE_WORDS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
}
_RANGE = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _unwrap(tp: Any) -> Any:
    """Strip Annotated and Optional, keeping real unions (the discriminated ones)."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
            continue
        if origin in (Union, types.UnionType):
            members = [a for a in get_args(tp) if a is not type(None)]
            if len(members) == 1:
                tp = members[0]
                continue
        return tp


def _models(tp: Any) -> list[type[BaseModel]]:
    tp = _unwrap(tp)
    candidates = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    return [m for m in candidates if isinstance(m, type) and issubclass(m, BaseModel)]


def _tag_of(model: type[BaseModel]) -> tuple[str, str] | None:
    """(discriminator field, tag) of a union member: its one Literal field with a default or a single value."""
    for fname, info in model.model_fields.items():
        if get_origin(info.annotation) is Literal and len(get_args(info.annotation)) == 1:
            return fname, get_args(info.annotation)[0]
    return None


def _locate(loc: tuple[Any, ...], data: Any) -> tuple[str, Any, Any]:
    """(dotted path as the user wrote it, type at loc, type of its parent) for a pydantic error location."""
    path, cur = "", data
    tp: Any = SweepSpec
    parent: Any = None
    for part in loc:
        parent = tp = _unwrap(tp)
        members = _models(tp)
        is_key = isinstance(cur, dict) and part in cur
        if members and not is_key and (len(members) > 1 or part not in members[0].model_fields):
            # a discriminated-union tag, not a key of the input: pick the member, keep the path
            match = [m for m in members if (_tag_of(m) or ("", None))[1] == part]
            if match:
                tp = match[0]
                continue
        if isinstance(part, int):
            if isinstance(cur, list):
                path += f"[{part}]"
                cur = cur[part] if 0 <= part < len(cur) else _MISSING
            # else: a single value stood for a one-item list; the path points at that value
            tp = get_args(tp)[0] if get_origin(tp) is list else Any
            continue
        if isinstance(part, str) and "[" in part and not (isinstance(cur, dict) and part in cur):
            continue  # a validator or union-member label pydantic puts in the location
        # A key a user typed with control characters (a newline) is shown quoted: the message stays one line.
        shown = str(part) if str(part).isprintable() else f"[{part!r}]"
        path += shown if shown.startswith("[") else (f".{shown}" if path else shown)
        cur = cur.get(part, _MISSING) if isinstance(cur, dict) else _MISSING
        if members and part in members[0].model_fields:
            tp = members[0].model_fields[part].annotation
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        else:
            tp = None
    return path or "(top level)", tp, parent


def _type_words(tp: Any) -> str:
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, PluginEntry):
        return "a name or a mapping with keys " + ", ".join(tp.model_fields)
    models = _models(tp)
    if len(models) > 1:
        return "a mapping with " + " or ".join(f"{t[0]}: {t[1]}" for m in models if (t := _tag_of(m)))
    if models:
        return "a mapping with keys " + ", ".join(models[0].model_fields)
    if get_origin(tp) is list:
        inner = _type_words(get_args(tp)[0])
        return f"{inner}{'; or' if ' or ' in inner else ' or'} a list of them"
    if get_origin(tp) is Literal:
        return ", ".join(repr(a) for a in get_args(tp))
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        dict: "a mapping",
    }.get(get_origin(tp) or tp, "a value")


def _pydantic_message(err: Any, data: dict[str, Any]) -> tuple[str, str]:
    """(path, '<path>: <problem> (got <value>; allowed: <allowed>)') for one pydantic error."""
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    path, tp, parent = _locate(tuple(err["loc"]), data)
    if kind == "missing":
        problem, shown, allowed = "required key is missing", "nothing", _type_words(tp)
    elif kind == "extra_forbidden":
        key = err["loc"][-1]
        fields = list(m[0].model_fields) if len(m := _models(parent)) == 1 else []
        problem, shown, allowed = (
            f"unknown key{did_you_mean(str(key), fields)}",
            _show(key),
            ", ".join(fields),
        )
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        field = str(ctx.get("discriminator", "kind")).strip("'")
        path = f"{path}.{field}"
        tags = [t[1] for m in _models(tp) if (t := _tag_of(m))]
        allowed = ", ".join(tags)
        if kind == "union_tag_invalid":
            problem, shown = (
                f"unknown {field}{did_you_mean(str(ctx.get('tag')), tags)}",
                _show(ctx.get("tag")),
            )
        else:
            problem, shown = "required key is missing", "nothing"
    elif kind in _RANGE:
        bound = next(iter(ctx.values()))
        number = "an integer" if _unwrap(tp) is int else "a number"
        problem, shown, allowed = "out of range", _show(value), f"{number} {_RANGE[kind]} {bound}"
    elif kind in _TYPE_WORDS:
        problem, shown, allowed = f"must be {_TYPE_WORDS[kind]}", _show(value), _type_words(tp)
    elif kind in ("model_type", "model_attributes_type"):
        problem, shown, allowed = "must be a mapping", _show(value), _type_words(tp)
    elif kind == "too_short":
        problem, shown, allowed = "must not be empty", _show(value), _type_words(tp)
    elif kind == "literal_error":
        problem, shown, allowed = "not an allowed value", _show(value), str(ctx.get("expected"))
    elif "allowed" in ctx:
        problem, shown, allowed = err["msg"], _show(value), str(ctx["allowed"])
    else:
        problem, shown, allowed = err["msg"][:1].lower() + err["msg"][1:], _show(value), _type_words(tp)
    return path, f"{path}: {problem} (got {shown}; allowed: {allowed})"


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "an integer", float: "a number", bool: "a boolean"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
