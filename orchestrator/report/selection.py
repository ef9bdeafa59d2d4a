"""The results table as every section reads it: setting labels, context columns, slices, metric values.

Two derived columns name settings the way the figures show them: `defense_setting` ("none",
"gaussian sigma=0.01"; every parameter the row has) and `attack_setting` ("grnn", or "grnn
iterations=500" when the table holds that attack with several parameter values). A figure never pools
rows of different settings silently: `select` raises ConfigError naming the column that still varies,
and the report draws one panel per value instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from grnn_engine.errors import ConfigError
from orchestrator.report.labels import norm, show, sort_text, values_text

__all__ = [
    "COMPLETE",
    "FAILED_STATUSES",
    "METRICS",
    "check_metric",
    "context_columns",
    "defense_rank",
    "defense_settings",
    "index_sort_key",
    "metric_values",
    "select",
    "varying",
    "with_settings",
]

COMPLETE = "COMPLETE"
FAILED_STATUSES = ("FAILED", "TIMEOUT")
# Metrics a heatmap can show: (label with unit, cell format, fixed colour range or None for the data's).
METRICS: dict[str, tuple[str, str, tuple[float, float] | None]] = {
    "psnr": ("matched PSNR (dB)", "{:.1f}", None),
    "ssim": ("matched SSIM (0-1)", "{:.2f}", (0.0, 1.0)),
    "label_acc": ("label accuracy (0-1)", "{:.2f}", (0.0, 1.0)),
    "success": ("success rate (share of seeds)", "{:.2f}", (0.0, 1.0)),
    "label_set_acc": ("label-set accuracy (0-1)", "{:.2f}", (0.0, 1.0)),
    "reid_top1": ("re-identification top-1 (0-1)", "{:.2f}", (0.0, 1.0)),
}
# A larger value of these defense parameters protects less (fewer bits, a looser clipping bound); every
# other numeric parameter (sigma, scale, ratio, ...) protects more as it grows.
_WEAKER_WHEN_LARGER = {"bits", "max_norm", "clip"}
# Config columns that can tell two slices of a table apart, besides the attack, defense, batch and seed.
_CONTEXT_BASE = ("dataset", "split", "image_size", "victim", "fl_round", "update")
_CONTEXT_PREFIXES = ("victim.", "fl.", "update.")
# Under `utility: true` every client trains with the cell's own defense (TrialSpec.fl["defense"]): these columns
# repeat the row's defense setting, which every figure already keeps apart, so they never tell slices apart.
_TRAINING_DEFENSE = ("fl.defense", "fl.defense_params")


# ---------------------------------------------------------------------------------------------- settings


def _params_of(row: pd.Series, prefix: str) -> dict[str, Any]:
    return {
        name[len(prefix) :]: value
        for name, value in row.items()
        if isinstance(name, str) and name.startswith(prefix) and norm(value) != ""
    }


def _defense_label(row: pd.Series) -> str:
    params = _params_of(row, "defense.")
    text = ", ".join(f"{k}={show(v)}" for k, v in sorted(params.items()))
    return f"{row['defense']} {text}".strip()


def _strength_key(label_params: tuple[str, dict[str, Any]]) -> tuple[Any, ...]:
    """Sort key of a defense setting: none first, then by name, then weakest to strongest."""
    name, params = label_params
    keys: list[tuple[int, Any]] = []
    for param, value in sorted(params.items()):
        try:
            number = float(value)
        except (TypeError, ValueError):
            keys.append((1, str(value)))
            continue
        keys.append((0, -number if param in _WEAKER_WHEN_LARGER else number))
    return (name != "none", name, tuple(keys))


def defense_settings(df: pd.DataFrame) -> list[str]:
    """The table's defense settings in report order: none first, then each defense weakest to strongest."""
    d = with_settings(df)
    if d.empty:
        return []
    firsts = d.drop_duplicates("defense_setting")
    order = sorted(
        (
            (label, (row["defense"], _params_of(row, "defense.")))
            for label, (_, row) in zip(firsts["defense_setting"], firsts.iterrows(), strict=True)
        ),
        key=lambda item: _strength_key(item[1]),
    )
    return [label for label, _ in order]


def defense_rank(df: pd.DataFrame) -> dict[str, int]:
    """defense_setting -> its place in `defense_settings` (0 for none), to sort rows by strength."""
    return {label: i for i, label in enumerate(defense_settings(df))}


def index_sort_key(columns: Sequence[str], values: Sequence[Any], rank: Mapping[str, int]) -> tuple[Any, ...]:
    """Sort key of a table row indexed by `columns`: the defense setting by strength (`rank`, from
    `defense_rank`), every other level by number, else by text."""
    return tuple(
        (0, rank.get(value, 0)) if column == "defense_setting" else sort_text(norm(value))
        for column, value in zip(columns, values, strict=True)
    )


def with_settings(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of `df` with `defense_setting` and `attack_setting` label columns (see the module docstring)."""
    d = df.copy()
    if "defense_setting" not in d.columns:
        if d.empty:
            d["defense_setting"] = pd.Series(dtype=object)
        else:
            d["defense_setting"] = d.apply(_defense_label, axis=1) if "defense" in d.columns else "none"
    if "attack_setting" not in d.columns:
        d["attack_setting"] = d["attack"].astype(object) if "attack" in d.columns else ""
        params = [c for c in d.columns if c.startswith("attack.")]
        for attack, rows in d.groupby("attack", sort=False) if "attack" in d.columns and len(d) else []:
            changing = [c for c in params if rows[c].map(norm).nunique() > 1]
            if changing:
                d.loc[rows.index, "attack_setting"] = [
                    f"{attack} "
                    + ", ".join(
                        f"{c[len('attack.') :]}={show(v)}" for c, v in zip(changing, vals, strict=True)
                    )
                    for vals in rows[changing].itertuples(index=False, name=None)
                ]
    return d


# ---------------------------------------------------------------------------------------------- slices


def context_columns(df: pd.DataFrame) -> list[str]:
    """The config columns of `df` that can tell two slices apart (dataset, victim, fl_round, victim.*, ...)."""
    prefixed = sorted(
        c for c in df.columns
        if isinstance(c, str) and c.startswith(_CONTEXT_PREFIXES) and not c.startswith(_TRAINING_DEFENSE)
    )  # fmt: skip
    return [c for c in _CONTEXT_BASE if c in df.columns] + prefixed


def varying(df: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """Those of `columns` that `df` has with more than one value."""
    return [c for c in columns if c in df.columns and df[c].map(norm).nunique() > 1]


def select(
    df: pd.DataFrame, where: Mapping[str, Any] | None, *, single: Sequence[str], what: str
) -> pd.DataFrame:
    """Rows of `df` matching `where` (column -> value); ConfigError when a column in `single` still varies
    (`what` names the figure in that message)."""
    d = df
    for column, value in (where or {}).items():
        if column not in d.columns:
            raise ConfigError(
                f"where names column '{column}', which the table does not have; allowed: "
                f"{', '.join(context_columns(d) + ['attack_setting', 'defense_setting', 'batch_size'])}"
            )
        match = d[column].map(norm) == norm(value)
        if not match.any():
            raise ConfigError(f"no rows have {column}={show(value)}; allowed: {values_text(d[column])}")
        d = d[match]
    for column in varying(d, single):
        raise ConfigError(
            f"{what} would pool rows of different {column} ({values_text(d[column])}); "
            f"pass where={{'{column}': ...}} with one of them"
        )
    return d


# ---------------------------------------------------------------------------------------------- metrics


def check_metric(df: pd.DataFrame, metric: str) -> None:
    """ConfigError unless `metric` is one of METRICS and a column of `df`."""
    if metric not in METRICS or metric not in df.columns:
        allowed = [m for m in METRICS if m in df.columns]
        raise ConfigError(f"metric '{metric}' is not in the table; allowed: {', '.join(allowed)}")


def metric_values(rows: pd.DataFrame, metric: str) -> pd.Series:
    """The metric of complete rows as floats (success as 0/1), NaN where a value is missing or not finite."""
    values = pd.to_numeric(rows[metric].astype("Float64"), errors="coerce").astype(float)
    values = values.where(np.isfinite(values))
    return values.where(rows["status"] == COMPLETE)
