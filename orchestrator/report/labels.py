"""How the report writes a value: as a comparable key, in a label or title, in a file name, in a sort key.

Every section goes through these, so that a setting reads the same in a table, a figure title and a PNG
name, and so that 1.0 from a float column and 1 from an Int64 column count as the same value.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["norm", "show", "slug", "sort_text", "title_context", "unique_text", "values_text"]


def norm(value: Any) -> str:
    """A value as a comparable text key: NA -> '', 1.0 -> '1', so Int64 and float columns agree."""
    if value is None or (not isinstance(value, list | tuple | dict) and pd.isna(value)):
        return ""
    if isinstance(value, float | np.floating):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


def show(value: Any) -> str:
    """A parameter value as a label shows it: 0.01, 1e-05, 8."""
    if isinstance(value, float | np.floating):
        return f"{float(value):g}"
    return norm(value)


def slug(*parts: Any) -> str:
    """A file name (without suffix) from the parts that are set: 'heatmap_psnr_grnn_lenet'."""
    text = "_".join(norm(p) for p in parts if norm(p) != "")
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")[:120] or "figure"


def sort_text(value: str) -> tuple[int, Any]:
    """Sort key of a text key: numbers by value before other text."""
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def values_text(series: pd.Series, limit: int = 6) -> str:
    """The distinct values of `series` for an error message: shortest first, at most `limit`."""
    values = sorted(set(series.map(norm)), key=lambda v: (len(v), v))
    shown = ", ".join(v or "unset" for v in values[:limit])
    return shown + (", ..." if len(values) > limit else "")


def unique_text(df: pd.DataFrame, column: str) -> str:
    """The distinct set values of a column, sorted, for a fact or an intro; 'unknown' when there are none."""
    if column not in df.columns:
        return "unknown"
    values = sorted({str(v) for v in df[column].dropna()})
    return ", ".join(values) or "unknown"


def title_context(rows: pd.DataFrame, skip: Sequence[str] = ()) -> str:
    """'lenet on digits, FL round 0' from the first row (the caller knows the slice does not vary)."""
    first = rows.iloc[0]
    parts = [f"{first.get('victim', '?')} on {first.get('dataset', '?')}"]
    for column in ("fl_round", "update"):
        if column in rows.columns and column not in skip and norm(first[column]) != "":
            if column == "fl_round":
                parts.append(f"FL round {show(first[column])}")
            elif column == "update" and first[column] != "fedsgd":
                parts.append(str(first[column]))
    return ", ".join(parts)
