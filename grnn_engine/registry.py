"""One small registry used by every plugin family (datasets, victims, attacks, defenses, identifiers).

A family is a `Registry`; plugins join it with `@FAMILY.register("name")` on import of the package, and
are built with `FAMILY.create("name", **params)`. Tests parametrise over `FAMILY.names()`, so a plugin is
covered by the contract tests the moment it is registered.

A family made with `import_paths=True` (the victims) also takes a user's own factory by import path,
"package.module:callable", resolved with importlib when first asked for; it is checked, listed in
errors and built like a registered one, so every place that takes a registered name takes a path too.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from grnn_engine.errors import ConfigError

T = TypeVar("T")


def did_you_mean(value: str, choices: list[str]) -> str:
    """' (did you mean 'x'?)' when a choice is close to `value`, else ''."""
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def is_import_path(name: object) -> bool:
    """True for names of the form 'package.module:attribute' (a user's own plugin)."""
    return isinstance(name, str) and ":" in name


def import_object(path: str, family: str) -> Any:
    """The object at 'package.module:attribute[.attribute]'; every failure is one ConfigError sentence."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute or ":" in attribute:
        raise ConfigError(
            f"{family} '{path}' is not a valid import path; allowed: 'package.module:callable'"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"{family} '{path}': module '{module_name}' cannot be imported ({exc}); allowed: a module on "
            "PYTHONPATH or installed, e.g. run from the folder that holds it"
        ) from None
    except Exception as exc:  # the user's module raised while importing: their bug, reported in one line
        raise ConfigError(
            f"{family} '{path}': importing module '{module_name}' raised {type(exc).__name__}: {exc}"
        ) from None
    for i, part in enumerate(attribute.split(".")):
        if not hasattr(obj, part):
            owner = ".".join([module_name, *attribute.split(".")[:i]])
            public = [n for n in dir(obj) if not n.startswith("_")]
            raise ConfigError(
                f"{family} '{path}': '{owner}' has no attribute '{part}'{did_you_mean(part, public)}; "
                f"allowed: {', '.join(sorted(public)[:12]) or 'none'}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(
            f"{family} '{path}' is a {type(obj).__name__}, not a callable; allowed: a function or class"
        )
    return obj


class Registry(Generic[T]):
    """Maps names to factories (classes or functions) of one plugin family."""

    def __init__(self, family: str, *, import_paths: bool = False) -> None:
        self.family = family
        self.import_paths = import_paths  # whether 'package.module:callable' names are taken too
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorate(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise RuntimeError(f"{self.family} '{name}' is registered twice")
            self._factories[name] = factory
            return factory

        return decorate

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        """Registered, or an import path in a family that takes them (whether it imports is `check`'s to say)."""
        return name in self._factories or (self.import_paths and is_import_path(name))

    def check(self, name: str) -> None:
        """Raise ConfigError naming the known names (and the closest) when `name` is unknown, or when an import
        path does not lead to a callable."""
        if self.import_paths and is_import_path(name):
            import_object(name, self.family)
            return
        if name not in self._factories:
            known = ", ".join(self.names())
            raise ConfigError(
                f"unknown {self.family} '{name}'{did_you_mean(name, self.names())}; known: {known}"
                + ("; or an import path 'package.module:callable'" if self.import_paths else "")
            )

    def get(self, name: str) -> Callable[..., T]:
        if self.import_paths and is_import_path(name):
            return import_object(name, self.family)
        self.check(name)
        return self._factories[name]

    def parameters(self, name: str) -> dict[str, Any]:
        """The keyword parameters the factory takes, with their defaults (inspect.Parameter.empty if none)."""
        sig = inspect.signature(self.get(name))
        return {
            p.name: p.default
            for p in sig.parameters.values()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"
        }

    def takes_any(self, name: str) -> bool:
        """Whether the factory takes **kwargs (any parameter name)."""
        return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(self.get(name)).parameters.values())

    def create(self, name: str, **params: Any) -> T:
        """Build plugin `name`; an unknown parameter is a ConfigError naming the allowed ones."""
        factory = self.get(name)
        allowed = self.parameters(name)
        unknown = sorted(set(params) - set(allowed))
        if unknown and not self.takes_any(name):
            bad = unknown[0]
            raise ConfigError(
                f"unknown parameter '{bad}' for {self.family} '{name}'"
                f"{did_you_mean(bad, list(allowed))}; allowed: {', '.join(sorted(allowed)) or 'none'}"
            )
        return factory(**params)
