"""pydantic's ValidationError as the one sentence a SpecError holds: the dotted path as the user wrote it
(discriminated-union tags and validator labels that pydantic puts in its locations are left out), the
problem in plain words, the value given and what is allowed, and how many more problems the spec has.

Of several problems, the first in pydantic's order is reported, except that an unknown key next to a
missing required key it resembles comes first: `namex: quickstart` is a misspelt `name`, and saying
"name: required key is missing" would send the user looking for a line that is there.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from grnn_engine.registry import did_you_mean
from orchestrator.spec.messages import closest, show
from orchestrator.spec.models import PluginEntry

__all__ = ["validation_message"]

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


def validation_message(exc: ValidationError, data: Any, root: type[BaseModel]) -> tuple[str, str]:
    """(dotted path, '<path>: <problem> (got <value>; allowed: <allowed>)[; N more problems in this spec]')
    for the validation of `data` as `root`."""
    errors = exc.errors()
    lead, meant = _lead_error(errors)
    path, message = _message(lead, data, root, meant)
    more = len(errors) - 1 - (meant is not None)  # a misspelt key and the key it stands for: one problem
    if more:
        message += f"; {more} more problem{'s' if more > 1 else ''} in this spec"
    return path, message


def _lead_error(errors: Sequence[ErrorDetails]) -> tuple[ErrorDetails, str | None]:
    """The error to report, and for an unknown key the missing required key beside it that it resembles."""
    missing: dict[tuple[Any, ...], list[str]] = {}
    for err in errors:
        if err["type"] == "missing" and err["loc"] and isinstance(err["loc"][-1], str):
            missing.setdefault(tuple(err["loc"][:-1]), []).append(err["loc"][-1])
    for err in errors:
        if err["type"] == "extra_forbidden":
            meant = closest(str(err["loc"][-1]), missing.get(tuple(err["loc"][:-1]), []))
            if meant is not None:
                return err, meant
    return errors[0], None


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


def _locate(loc: tuple[Any, ...], data: Any, root: type[BaseModel]) -> tuple[str, Any, Any]:
    """(dotted path as the user wrote it, type at loc, type of its parent) for a pydantic error location."""
    path, cur = "", data
    tp: Any = root
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


def _message(err: ErrorDetails, data: Any, root: type[BaseModel], meant: str | None) -> tuple[str, str]:
    """(path, '<path>: <problem> (got <value>; allowed: <allowed>)') for one pydantic error; `meant`: the
    missing required key that an unknown key stands for."""
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    path, tp, parent = _locate(tuple(err["loc"]), data, root)
    if kind == "missing":
        problem, shown, allowed = "required key is missing", "nothing", _type_words(tp)
    elif kind == "extra_forbidden":
        key = str(err["loc"][-1])
        fields = list(m[0].model_fields) if len(m := _models(parent)) == 1 else []
        if meant is not None:
            suggestion = f" — did you mean '{meant}', a required key that is missing?"
        elif (close := closest(key, fields)) is not None:
            suggestion = f" — did you mean '{close}'?"
        else:
            suggestion = ""
        problem, shown, allowed = f"unknown key {show(key)}{suggestion}", show(key), ", ".join(fields)
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        field = str(ctx.get("discriminator", "kind")).strip("'")
        path = f"{path}.{field}"
        tags = [t[1] for m in _models(tp) if (t := _tag_of(m))]
        allowed = ", ".join(tags)
        if kind == "union_tag_invalid":
            problem, shown = f"unknown {field}{did_you_mean(str(ctx.get('tag')), tags)}", show(ctx.get("tag"))
        else:
            problem, shown = "required key is missing", "nothing"
    elif kind in _RANGE:
        bound = next(iter(ctx.values()))
        number = "an integer" if _unwrap(tp) is int else "a number"
        problem, shown, allowed = "out of range", show(value), f"{number} {_RANGE[kind]} {bound}"
    elif kind in _TYPE_WORDS:
        problem, shown, allowed = f"must be {_TYPE_WORDS[kind]}", show(value), _type_words(tp)
    elif kind in ("model_type", "model_attributes_type"):
        problem, shown, allowed = "must be a mapping", show(value), _type_words(tp)
    elif kind == "too_short":
        problem, shown, allowed = "must not be empty", show(value), _type_words(tp)
    elif kind == "literal_error":
        problem, shown, allowed = "not an allowed value", show(value), str(ctx.get("expected"))
    elif "allowed" in ctx:
        problem, shown, allowed = err["msg"], show(value), str(ctx["allowed"])
    else:
        problem, shown, allowed = err["msg"][:1].lower() + err["msg"][1:], show(value), _type_words(tp)
    return path, f"{path}: {problem} (got {shown}; allowed: {allowed})"
