"""One small registry used by every plugin family (datasets, victims, attacks, defenses, identifiers).

A family is a `Registry`; plugins join it with `@FAMILY.register("name")` on import of the package, and
are built with `FAMILY.create("name", **params)`. Tests parametrise over `FAMILY.names()`, so a plugin is
covered by the contract tests the moment it is registered.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from grnn_engine.errors import ConfigError

T = TypeVar("T")


def did_you_mean(value: str, choices: list[str]) -> str:
    """' (did you mean 'x'?)' when a choice is close to `value`, else ''."""
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(Generic[T]):
    """Maps names to factories (classes or functions) of one plugin family."""

    def __init__(self, family: str) -> None:
        self.family = family
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
        return name in self._factories

    def check(self, name: str) -> None:
        """Raise ConfigError naming the known names (and the closest) when `name` is unknown."""
        if name not in self._factories:
            known = ", ".join(self.names())
            raise ConfigError(
                f"unknown {self.family} '{name}'{did_you_mean(name, self.names())}; known: {known}"
            )

    def get(self, name: str) -> Callable[..., T]:
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

    def create(self, name: str, **params: Any) -> T:
        """Build plugin `name`; an unknown parameter is a ConfigError naming the allowed ones."""
        factory = self.get(name)
        allowed = self.parameters(name)
        sig = inspect.signature(factory)
        takes_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
        unknown = sorted(set(params) - set(allowed))
        if unknown and not takes_any:
            bad = unknown[0]
            raise ConfigError(
                f"unknown parameter '{bad}' for {self.family} '{name}'"
                f"{did_you_mean(bad, list(allowed))}; allowed: {', '.join(sorted(allowed)) or 'none'}"
            )
        return factory(**params)
