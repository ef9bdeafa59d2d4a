"""SpecError and the parts of its one sentence: `<file>: <dotted path>: <problem> (got <value>; allowed: <what is>)`.

Every module of the spec package reports a user's mistake through `spec_error`, so that every message has
this one shape, which the command lines print as it is and the tests read.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from grnn_engine.errors import ConfigError

__all__ = ["SpecError", "closest", "show", "spec_error"]


class SpecError(ConfigError):
    """A sweep spec is invalid: one sentence naming the file, the dotted field path and the bad value."""

    def __init__(self, message: str, *, source: str = "<spec>", path: str = "") -> None:
        super().__init__(message)
        self.source = source
        self.path = path


def show(value: Any, limit: int = 80) -> str:
    """A value as the message shows it: its repr (one line, quotes around strings), cut at `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def spec_error(source: str, path: str, problem: str, value: Any, allowed: str) -> SpecError:
    """The SpecError `<source>: <path>: <problem> (got <value>; allowed: <allowed>)`."""
    return SpecError(
        f"{source}: {path}: {problem} (got {show(value)}; allowed: {allowed})", source=source, path=path
    )


def closest(value: str, choices: Sequence[str]) -> str | None:
    """The choice a typo most likely meant (the rule of grnn_engine.registry.did_you_mean), or None."""
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
    return close[0] if close else None
