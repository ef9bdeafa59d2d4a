"""What every command line shares: parsing KEY=VALUE settings into typed values, printing a user's value in an
error, and how a command ends (`run_command`: its status, or quietly when the reader of its output left)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import yaml

from grnn_engine.errors import ConfigError


def one_line(text: str) -> str:
    """`text` on one printable line: control characters a user typed into a value (a newline, a carriage
    return, a lone surrogate from undecodable bytes) are shown escaped, as repr() would. Every command line
    prints its error through this, so an error is always one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def user_error(error: BaseException) -> int:
    """Print a user's mistake as `error: <one line>` on stderr and return the exit status for it, 2: how every
    command line ends on a bad value, a missing file or bad data, without a traceback."""
    print(f"error: {one_line(str(error))}", file=sys.stderr)
    return 2


def run_command(main: Callable[[], int]) -> NoReturn:
    """Run a command line's `main` and exit with its status. When the reader of stdout closes it early
    (`python -m orchestrator.sweep spec.yaml --dry-run | head -1`), the command ends quietly with status 1, no
    traceback: the Python documentation's recipe for SIGPIPE (stdout pointed at devnull, so that the flush at
    exit cannot fail again). Every `python -m` entry point of the project ends through this."""
    try:
        status = main()
        sys.stdout.flush()  # inside the try: a pipe closed after the last print fails here
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        status = 1
    sys.exit(status)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (exit 2), without the usage block; every command line
    of the project uses it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {one_line(message)} (see --help)\n")


def parse_value(text: str) -> Any:
    """'3' -> 3, '1e-3' -> 0.001, 'true' -> True, 'null' -> None, '[1, 2]' -> [1, 2], else the string."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if isinstance(value, dict) and not text.strip().startswith("{") else value


def parse_assignments(items: list[str] | None, option: str) -> dict[str, Any]:
    """['a=1', 'b=x'] -> {'a': 1, 'b': 'x'}; a malformed item is a ConfigError naming it."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} expects KEY=VALUE (got '{item}')")
        out[key.strip()] = parse_value(value.strip())
    return out
