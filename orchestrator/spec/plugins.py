"""The plugin entries of a spec against the engine's registries, in two passes over the same entries:
`check_plugins` (names, param names, plain values, non-empty axes: what parse_spec checks without building
anything) and `build_plugins` (every distinct param set built once, so that a bad value fails before Ray
starts: what load_spec adds). The entries are the grid's victims, defenses and attacks, whose params are
sweep axes, and the reid identifier, whose params are settings (`plugin_entries`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from grnn_engine.errors import ConfigError
from grnn_engine.registry import Registry, did_you_mean, is_import_path
from orchestrator.spec.messages import SpecError, show, spec_error
from orchestrator.spec.models import PluginEntry
from orchestrator.spec.registries import VICTIM_SET_BY_SWEEP, plugin_registries
from orchestrator.spec.sweep_spec import SweepSpec

__all__ = ["PlacedEntry", "build_plugins", "check_plugins", "plugin_builders", "plugin_entries"]

Builder = Callable[[str, dict[str, Any]], object]


@dataclass(frozen=True)
class PlacedEntry:
    """A plugin entry where the spec holds it."""

    family: str  # victim, defense, attack or identifier: its registry, and the word the messages use
    where: str  # dotted path of the entry: grid.attack[1], reid
    entry: PluginEntry
    params_are_axes: bool  # grid entries: a list-valued param is a sweep axis; reid: a setting

    def param_sets(self) -> list[dict[str, Any]]:
        """The param sets this entry builds its plugin with: one per combination of axes, or its params."""
        return self.entry.variants() if self.params_are_axes else [dict(self.entry.params)]


def plugin_entries(spec: SweepSpec) -> list[PlacedEntry]:
    """Every plugin entry of the spec, in the order of the spec: grid victims, defenses, attacks, then reid."""
    out = [
        PlacedEntry(family, f"grid.{family}[{i}]", entry, params_are_axes=True)
        for family in ("victim", "defense", "attack")
        for i, entry in enumerate(getattr(spec.grid, family))
    ]
    if spec.reid is not None:
        out.append(PlacedEntry("identifier", "reid", spec.reid, params_are_axes=False))
    return out


def check_plugins(spec: SweepSpec, source: str) -> None:
    """Dataset and plugin names, param names and param values' types, against the registries; the values
    themselves are left to build_plugins."""
    registries = plugin_registries()
    datasets = registries["dataset"]
    if spec.data.dataset not in datasets:
        raise spec_error(
            source, "data.dataset", f"unknown dataset{did_you_mean(spec.data.dataset, datasets.names())}",
            spec.data.dataset, ", ".join(datasets.names()),
        )  # fmt: skip
    for placed in plugin_entries(spec):
        _check_entry(placed, registries[placed.family], source)
    if spec.reid is not None:
        from grnn_engine.reid import IDENTITY_DATASETS

        if spec.data.dataset not in IDENTITY_DATASETS:
            raise spec_error(
                source, "reid", "re-identification needs a dataset of people split per person, and "
                f"data.dataset '{spec.data.dataset}' has classes, not identities", spec.data.dataset,
                f"data.dataset {' or '.join(IDENTITY_DATASETS)}, or no reid",
            )  # fmt: skip


def _check_entry(placed: PlacedEntry, registry: Registry[Any], source: str) -> None:
    family, entry = placed.family, placed.entry
    if entry.name not in registry:
        raise spec_error(
            source, f"{placed.where}.name", f"unknown {family}{did_you_mean(entry.name, registry.names())}",
            entry.name, ", ".join(registry.names()),
        )  # fmt: skip
    if is_import_path(entry.name):
        try:  # a user's own plugin: the module imports and the name is a callable
            registry.check(entry.name)
        except ConfigError as exc:
            problem = str(exc).split("; allowed:")[0]
            raise spec_error(
                source, f"{placed.where}.name", problem, entry.name,
                f"a registered {family} ({', '.join(registry.names())}) or an importable 'package.module:callable'",
            ) from None  # fmt: skip
    set_by_sweep = VICTIM_SET_BY_SWEEP if family == "victim" else {}
    allowed = [p for p in registry.parameters(entry.name) if p not in set_by_sweep]
    open_ended = registry.takes_any(entry.name)
    for param, value in entry.params.items():
        path = f"{placed.where}.params.{param}"
        if param in set_by_sweep:
            raise spec_error(
                source, path, f"{param} is set by {set_by_sweep[param]}, not per {family}", param,
                ", ".join(allowed) or "none",
            )  # fmt: skip
        if param not in allowed and not open_ended:
            raise spec_error(
                source, path, f"unknown parameter of {family} '{entry.name}'{did_you_mean(param, allowed)}",
                param, ", ".join(sorted(allowed)) or "none",
            )  # fmt: skip
        if placed.params_are_axes and value == []:
            raise spec_error(source, path, "empty sweep axis", value, "one value or a non-empty list of values")
        bad = _first_non_plain(value)
        if bad is not None:
            raise spec_error(
                source, path, f"holds a {type(bad).__name__}, which a trial cannot carry", bad,
                "numbers, strings, booleans, null, and lists or mappings of them",
            )  # fmt: skip


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


def plugin_builders(image_size: int) -> dict[str, Builder]:
    """How each family's plugin is built from (name, params), as a trial builds it."""
    import grnn_engine
    from grnn_engine.reid import IDENTIFIERS
    from grnn_engine.victims import victim_fingerprint

    def build_victim(name: str, params: dict[str, Any]) -> object:
        # 10 classes stands in for the dataset's: the class count only sizes the last layer, and the
        # driver may not hold the data (it lives on the workers of a cluster). A user's model may have a
        # fixed class count, so its logits are checked by the trial that knows the data; here it is built
        # (fingerprinted) to catch a factory that raises or returns no Module.
        if is_import_path(name):
            return victim_fingerprint(name, params, image_size)
        return grnn_engine.create_victim(name, num_classes=10, image_size=image_size, seed=0, **params)

    return {
        "victim": build_victim,
        "defense": lambda name, params: grnn_engine.DEFENSES.create(name, **params),
        "attack": lambda name, params: grnn_engine.ATTACKS.create(name, **params),
        # a bad value, or the dlib identifier without the faces extra, fails before Ray too
        "identifier": lambda name, params: IDENTIFIERS.create(name, **params),
    }


def build_plugins(spec: SweepSpec, source: str) -> None:
    """Build every distinct plugin param set once, so that a bad param value fails before Ray starts."""
    image_size = spec.data.image_size
    builders = plugin_builders(image_size)
    done: set[str] = set()
    for placed in plugin_entries(spec):
        name = placed.entry.name
        for params in placed.param_sets():
            signature = json.dumps([placed.family, name, params], sort_keys=True, default=repr)
            if signature in done:
                continue
            done.add(signature)
            try:
                builders[placed.family](name, params)
            except (ConfigError, TypeError, ValueError) as exc:
                raise _built_message(source, placed.where, name, params, image_size, exc) from None


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
    if show(value) not in message and str(value) not in message:
        message += f" (got {show(value)})"
    return SpecError(f"{source}: {path}: {message}", source=source, path=path)
