"""The sections of a sweep spec as strict pydantic models: data, the grid of plugin entries and axes, the
client update, the FedAvg settings of the training stages, the resources of a trial and the ASHA scheduler.

The search section is in orchestrator.spec.search, the top level (SweepSpec) in orchestrator.spec.sweep_spec.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from grnn_engine.data import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from grnn_engine.trial_spec import SEED_MAX

__all__ = [
    "MAX_SEED_COUNT",
    "Asha",
    "AttackEntry",
    "DataSpec",
    "FLSpec",
    "FedAvg",
    "FedSgd",
    "GridSpec",
    "PluginEntry",
    "Resources",
    "StrictModel",
    "UpdateSpec",
]

# An integer seed count N expands to N seeds: bounded so that a typo cannot allocate gigabytes.
MAX_SEED_COUNT = 10**6
Seed = Annotated[int, Field(ge=0, le=SEED_MAX, strict=True)]
NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]


class StrictModel(BaseModel):
    """Base of every spec section: an unknown key is an error, and nothing is coerced."""

    # strict: a quoted "4" or a 1.0 where an integer belongs is a mistake to report, not to coerce.
    model_config = ConfigDict(extra="forbid", strict=True)


class DataSpec(StrictModel):
    """Which images the private batches come from (see grnn_engine.data)."""

    dataset: str
    root: str | None = None  # None: $GRNN_DATA_ROOT, else ~/.cache/grnn/data, resolved on the worker
    download: bool = False
    image_size: int = Field(32, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)
    split: Literal["train", "test", "all"] = "test"  # "all": att_faces, identities (split per person)
    distinct_labels: bool = False


class PluginEntry(StrictModel):
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


class GridSpec(StrictModel):
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
        return value if isinstance(value, list) else [value]

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


class FedSgd(StrictModel):
    """The client shares the gradient of its batch loss (the GRNN paper's setting)."""

    kind: Literal["fedsgd"] = "fedsgd"


class FedAvg(StrictModel):
    """The client shares its model delta after `local_steps` SGD steps at `local_lr`."""

    kind: Literal["fedavg"]
    local_steps: int = Field(5, ge=1)
    local_lr: float = Field(0.01, gt=0, allow_inf_nan=False)


UpdateSpec = Annotated[FedSgd | FedAvg, Field(discriminator="kind")]


class FLSpec(StrictModel):
    """FedAvg settings of the training stages a sweep attacks (grnn_engine.fl.FLSettings, minus the defense,
    which `utility: true` sets per cell). Used for every fl_round > 0, and for round 0's model accuracy.

    The defaults are chosen to learn within the rounds the sweeps use. Measured with GRNN's LeNet (seed 0,
    10 IID clients, all sampled each round), test accuracy at rounds 1/2/5/10 on CIFAR-10 (20k train images):
    two local epochs at local_lr 0.3 (these defaults) 0.15/0.23/0.33/0.40; one epoch at 0.1 (the engine's
    defaults before 2026-12-05) 0.13/0.13/0.20/0.29; one epoch at 0.5 0.11/0.13/0.23/0.33. On digits these
    defaults give 0.10 (untrained), 0.57 at round 5 and 0.94 at round 20.
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


def _ray_quantity(value: float) -> float:
    # Ray refuses fractional resource quantities above 1 (0.25 GPU is fine, 1.5 is not).
    if value > 1 and not float(value).is_integer():
        raise PydanticCustomError(
            "ray_quantity",
            "a share above 1 must be a whole number",
            {"allowed": "a fraction up to 1 (0.25 = four trials to one) or a whole number"},
        )
    return value


class Resources(StrictModel):
    """What one trial reserves from Ray."""

    cpu: Annotated[float, Field(gt=0, allow_inf_nan=False), AfterValidator(_ray_quantity)] = 1.0
    gpu: Annotated[float, Field(ge=0, allow_inf_nan=False), AfterValidator(_ray_quantity)] = 0.0


class Asha(StrictModel):
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
