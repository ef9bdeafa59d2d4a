"""From a file or plain data to a checked SweepSpec: `load_spec` reads the YAML (1e-4 is a float, a
duplicate key is an error) and does everything `parse_spec` does, then builds every plugin param set and
both ends of every searched range; `parse_spec` validates types and ranges, plugin names and param names,
and the checks across sections. Every mistake is one SpecError; pydantic's ValidationError never escapes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from orchestrator.spec.cross_checks import (
    build_attack_victims,
    build_search,
    check_attack_victims,
    check_pack,
    check_search,
    check_utility,
)
from orchestrator.spec.messages import SpecError, show
from orchestrator.spec.plugins import build_plugins, check_plugins
from orchestrator.spec.pydantic_errors import validation_message
from orchestrator.spec.sweep_spec import SweepSpec

__all__ = ["load_spec", "parse_spec"]


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
    build_plugins(spec, source)
    build_attack_victims(spec, source)
    build_search(spec, source)
    return spec


def parse_spec(data: dict[str, Any], source: str = "<spec>") -> SweepSpec:
    """Validate a spec given as plain data: types, ranges, plugin names and param names (not param values),
    and which attacks may run on which victims by name."""
    if not isinstance(data, dict):
        raise SpecError(
            f"{source}: (top level): must be a mapping of settings (got {_kind(data)} {show(data)}; "
            f"allowed: a mapping with keys {', '.join(SweepSpec.model_fields)})",
            source=source,
        )
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        path, message = validation_message(exc, data, SweepSpec)
        raise SpecError(f"{source}: {message}", source=source, path=path) from None
    check_plugins(spec, source)
    check_attack_victims(spec, source)
    check_utility(spec, source)
    check_search(spec, source)
    check_pack(spec, source)
    return spec


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "an integer", float: "a number", bool: "a boolean"}.get(
        type(value), f"a {type(value).__name__}"
    )


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
