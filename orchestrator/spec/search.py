"""The `search` section (a grid, or Optuna over dotted parameter ranges) and what a search does to a cell:
which searched parameters apply to it (`search_applies`), and the cell with sampled values set
(`apply_sample`); `Study` is one Optuna study, started from one grid cell.

Where a searched parameter goes in a cell: `<family>.params.<name>` (defense, attack, victim), `fl.<name>`,
or the grid axes `fl_round` and `batch_size` (SEARCH_TARGETS). A parameter applies to the cells whose plugin
takes it, so one search can hold gaussian's sigma and prune's ratio.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Annotated, Any, Literal, get_args

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from grnn_engine.trial_spec import TrialSpec
from orchestrator.spec.models import StrictModel
from orchestrator.spec.registries import plugin_registries

__all__ = [
    "SEARCH_METRICS",
    "SEARCH_TARGETS",
    "BreakingPoint",
    "GridSearch",
    "Objective",
    "OptunaSearch",
    "SearchMetric",
    "SearchParam",
    "SearchSpec",
    "Study",
    "apply_sample",
    "search_applies",
    "split_target",
]

# Where a searched parameter goes in a cell: `<family>.params.<name>`, `fl.<name>`, or a grid axis.
SEARCH_TARGETS = (
    "defense.params.<name>", "attack.params.<name>", "victim.params.<name>", "fl.<name>", "fl_round", "batch_size",
)
# A row's numbers a search may optimise (a trial's final report carries each). The DP-SGD epsilons are measured
# only where cross_checks.check_search allows them: utility: true and dp_sgd (model_dp_epsilon: fl_round > 0).
SearchMetric = Literal[
    "psnr", "ssim", "mse", "label_acc", "model_acc", "utility_acc", "utility_dp_epsilon", "model_dp_epsilon",
]
SEARCH_METRICS: tuple[str, ...] = get_args(SearchMetric)


class GridSearch(StrictModel):
    """Every cell of the grid, once."""

    method: Literal["grid"] = "grid"


class SearchParam(StrictModel):
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


class Objective(StrictModel):
    """One objective of the search: a row's metric and whether to minimize or maximize it."""

    metric: SearchMetric
    direction: Literal["minimize", "maximize"]


class BreakingPoint(StrictModel):
    """Search for where the attack breaks: minimize |metric - threshold|, so samples gather at the strength
    where the metric crosses the threshold (psnr: the spec's success_psnr unless given)."""

    metric: Literal["psnr", "ssim"] = "psnr"
    threshold: float | None = Field(None, allow_inf_nan=False)


class OptunaSearch(StrictModel):
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


def study_id(cell: TrialSpec, key: str) -> str:
    """A study's id: its grid cell in words, then the first 8 hex digits of `key`, the cell's key (or its key under
    an earlier revision of its attack, the id the study had then)."""
    return (f"{cell.attack}-{cell.victim}-{cell.dataset}-b{cell.batch_size}-r{cell.fl_round}-{cell.defense}-"
            f"s{cell.seed}-{key[:8]}")


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

    def earlier_ids(self) -> list[str]:
        """The ids this study had under its attack's earlier revisions (`TrialSpec.earlier_keys`)."""
        return [study_id(self.cell, key) for key in self.cell.earlier_keys()]


def split_target(name: str) -> tuple[str, str]:
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
    family, param = split_target(name)
    if family in ("defense", "attack", "victim"):
        registry = plugin_registries()[family]
        plugin = getattr(cell, family)
        return param in registry.parameters(plugin) or registry.takes_any(plugin)
    return bool(family)


def apply_sample(cell: TrialSpec, sampled: dict[str, Any]) -> TrialSpec:
    """`cell` with each sampled value at its dotted place; a defense trained under utility follows along."""
    fields: dict[str, Any] = {
        "attack_params": dict(cell.attack_params), "defense_params": dict(cell.defense_params),
        "victim_params": dict(cell.victim_params), "fl": copy.deepcopy(cell.fl),
    }  # fmt: skip
    for name, value in sampled.items():
        family, param = split_target(name)
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
    from grnn_engine.victims import victim_fingerprint

    # a user's model with sampled params is another model: its fingerprint follows them
    fields["victim_fingerprint"] = victim_fingerprint(cell.victim, fields["victim_params"], cell.image_size)
    return dataclasses.replace(cell, **fields)
