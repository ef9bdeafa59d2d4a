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
"""

from __future__ import annotations

import copy
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
from grnn_engine.trial_spec import TrialSpec

__all__ = [
    "AttackEntry",
    "DataSpec",
    "FedAvg",
    "FedSgd",
    "GridSearch",
    "GridSpec",
    "PluginEntry",
    "Resources",
    "SearchSpec",
    "SpecError",
    "SweepSpec",
    "UpdateSpec",
    "load_spec",
    "parse_spec",
]

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
    split: Literal["train", "test", "all"] = "test"  # "all": att_faces only (it has no split on disk)
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
    seed: list[NonNegInt] = Field(default_factory=lambda: [0], min_length=1)

    @field_validator("victim", "fl_round", "batch_size", "defense", "attack", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return _one_or_many(value)

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_count(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise PydanticCustomError(
                    "seed_count",
                    "an integer N means seeds 0..N-1, so it must be >= 1",
                    {"allowed": "an integer N >= 1, or a list of seeds >= 0"},
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


class GridSearch(_Model):
    """Every cell of the grid, once."""

    method: Literal["grid"] = "grid"


# A discriminated union of one for now, so that `method: optuna` can join without changing the field.
SearchSpec = Annotated[Union[GridSearch], Field(discriminator="method")]  # noqa: UP007


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
    fl: dict[str, Any] = Field(default_factory=dict)  # FedAvg settings of the training stage (TrialSpec.fl)
    update: UpdateSpec = Field(default_factory=FedSgd)
    eval_every: int = Field(50, ge=1)
    success_psnr: float = Field(20.0, allow_inf_nan=False)
    resources: Resources = Field(default_factory=Resources)
    max_concurrent: Annotated[int, Field(ge=1)] | None = None  # None: as many as resources allow
    trial_timeout_s: float = Field(3600.0, gt=0, allow_inf_nan=False)
    max_failures: int = Field(1, ge=0)  # Ray-level retries of a trial lost to a node failure
    max_cells: int = Field(5000, ge=1)  # the sweep command line asks for --yes beyond this
    search: SearchSpec = Field(default_factory=GridSearch)

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
                fl_round=fl_round, fl=copy.deepcopy(self.fl),
                update=self.update.kind, update_params=dict(update_params),
                defense=defense[0], defense_params=copy.deepcopy(defense[1]),
                seed=seed, success_psnr=self.success_psnr,
            )  # fmt: skip
            cells.setdefault(cell.key(), cell)
        return list(cells.values())

    def spec_hash(self) -> str:
        """Stable 16-hex-digit hash of the canonical spec (sorted JSON, machine-specific paths left out)."""
        dumped = self.model_dump()
        for section, keys in _NOT_IN_HASH.items():
            if keys is None:
                dumped.pop(section, None)
            else:
                for key in keys:
                    dumped[section].pop(key, None)
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

    return {
        "dataset": grnn_engine.DATASETS,
        "victim": grnn_engine.VICTIMS,
        "defense": grnn_engine.DEFENSES,
        "attack": grnn_engine.ATTACKS,
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
        path += f".{part}" if path else str(part)
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
