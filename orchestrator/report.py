"""The analysis report of a sweep: figures and tables from its results table, as HTML (and Markdown).

    python -m orchestrator.report results/<sweep> [--format html|md] [--out DIR]

writes `results/<sweep>/report/` (or DIR): one PNG per figure and `index.html` that shows them with the
tables inline; it opens from disk and fetches nothing. `--format md` also writes `report.md`. Everything
comes from the results table (`orchestrator.results.load`) and images/; nothing is recomputed from logs.

Each figure is a function that takes the DataFrame and returns a matplotlib Figure, for notebooks:
`robustness_heatmap`, `convergence_figure`, `privacy_utility_figure`, `gallery_figure`; the tables are
`success_table`, `failures_table`, `run_facts`; `heatmap_values` holds the numbers a heatmap shows. The
breaking-point section comes from `orchestrator.breakpoints`, the re-identification table and gallery from
`orchestrator.faces_report`.
A figure the data has no axis for (one fl_round, no utility column) raises `NotApplicable`, which the
report turns into a note.

Two derived columns name settings the way the figures show them: `defense_setting` ("none",
"gaussian sigma=0.01"; every parameter the row has) and `attack_setting` ("grnn", or "grnn
iterations=500" when the table holds that attack with several parameter values). A figure never pools
rows of different settings silently: a figure function asked for a slice in which another setting
varies (two victims, two fl_rounds) raises ConfigError naming it; the report draws one panel per value.
"""

from __future__ import annotations

import html
import math
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from grnn_engine.cli_values import OneLineParser, user_error
from grnn_engine.errors import ConfigError, DataError, GrnnError
from orchestrator import breakpoints
from orchestrator.report_section import Section, save_figure
from orchestrator.results import IMAGES_DIR, Ledger, load

__all__ = [
    "METRICS",
    "NotApplicable",
    "Report",
    "convergence_figure",
    "defense_settings",
    "failures_table",
    "gallery_figure",
    "heatmap_values",
    "main",
    "pareto_front",
    "privacy_utility_figure",
    "robustness_heatmap",
    "run_facts",
    "success_table",
    "with_settings",
    "write_report",
]

COMPLETE = "COMPLETE"
FAILED_STATUSES = ("FAILED", "TIMEOUT")
REPORT_DIR = "report"
# Metrics a heatmap can show: (label with unit, cell format, fixed colour range or None for the data's).
METRICS: dict[str, tuple[str, str, tuple[float, float] | None]] = {
    "psnr": ("matched PSNR (dB)", "{:.1f}", None),
    "ssim": ("matched SSIM (0-1)", "{:.2f}", (0.0, 1.0)),
    "label_acc": ("label accuracy (0-1)", "{:.2f}", (0.0, 1.0)),
    "success": ("success rate (share of seeds)", "{:.2f}", (0.0, 1.0)),
    "label_set_acc": ("label-set accuracy (0-1)", "{:.2f}", (0.0, 1.0)),
    "reid_top1": ("re-identification top-1 (0-1)", "{:.2f}", (0.0, 1.0)),
}
# The report's heatmap sheets; reid_top1 joins when a sweep has it.
REPORT_METRICS = ("psnr", "ssim", "label_acc", "success", "reid_top1")
# A larger value of these defense parameters protects less (fewer bits, a looser clipping bound); every
# other numeric parameter (sigma, scale, ratio, ...) protects more as it grows.
_WEAKER_WHEN_LARGER = {"bits", "max_norm", "clip"}
# Config columns that can tell two slices of a table apart, besides the attack, defense, batch and seed.
_CONTEXT_BASE = ("dataset", "split", "image_size", "victim", "fl_round", "update")
_CONTEXT_PREFIXES = ("victim.", "fl.", "update.")
_UTILITY_COLUMNS = ("utility_acc",)
_MISSING_COLOUR, _FAILED_COLOUR = "#e8e8e8", "#f6d5d5"
_GALLERY_MAX_IMAGES = 8
_MAX_PANELS = 12


class NotApplicable(ConfigError):
    """The table has no axis for this figure (one fl_round, no utility column, no images)."""


# ---------------------------------------------------------------------------------------------- settings


def _norm(value: Any) -> str:
    """A value as a comparable text key: NA -> '', 1.0 -> '1', so Int64 and float columns agree."""
    if value is None or (not isinstance(value, list | tuple | dict) and pd.isna(value)):
        return ""
    if isinstance(value, float | np.floating):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


def _show(value: Any) -> str:
    """A parameter value as a label shows it: 0.01, 1e-05, 8."""
    if isinstance(value, float | np.floating):
        return f"{float(value):g}"
    return _norm(value)


def _params_of(row: pd.Series, prefix: str) -> dict[str, Any]:
    return {
        name[len(prefix) :]: value
        for name, value in row.items()
        if isinstance(name, str) and name.startswith(prefix) and _norm(value) != ""
    }


def _defense_label(row: pd.Series) -> str:
    params = _params_of(row, "defense.")
    text = ", ".join(f"{k}={_show(v)}" for k, v in sorted(params.items()))
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
            varying = [c for c in params if rows[c].map(_norm).nunique() > 1]
            if varying:
                d.loc[rows.index, "attack_setting"] = [
                    f"{attack} "
                    + ", ".join(
                        f"{c[len('attack.') :]}={_show(v)}" for c, v in zip(varying, vals, strict=True)
                    )
                    for vals in rows[varying].itertuples(index=False, name=None)
                ]
    return d


def _context_columns(df: pd.DataFrame) -> list[str]:
    prefixed = sorted(c for c in df.columns if isinstance(c, str) and c.startswith(_CONTEXT_PREFIXES))
    return [c for c in _CONTEXT_BASE if c in df.columns] + prefixed


def _varying(df: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    return [c for c in columns if c in df.columns and df[c].map(_norm).nunique() > 1]


def _values_text(series: pd.Series, limit: int = 6) -> str:
    values = sorted(set(series.map(_norm)), key=lambda v: (len(v), v))
    shown = ", ".join(v or "unset" for v in values[:limit])
    return shown + (", ..." if len(values) > limit else "")


def _select(
    df: pd.DataFrame, where: Mapping[str, Any] | None, *, single: Sequence[str], what: str
) -> pd.DataFrame:
    """Rows of `df` matching `where` (column -> value); ConfigError when a column in `single` still varies."""
    d = df
    for column, value in (where or {}).items():
        if column not in d.columns:
            raise ConfigError(
                f"where names column '{column}', which the table does not have; allowed: "
                f"{', '.join(_context_columns(d) + ['attack_setting', 'defense_setting', 'batch_size'])}"
            )
        match = d[column].map(_norm) == _norm(value)
        if not match.any():
            raise ConfigError(f"no rows have {column}={_show(value)}; allowed: {_values_text(d[column])}")
        d = d[match]
    for column in _varying(d, single):
        raise ConfigError(
            f"{what} would pool rows of different {column} ({_values_text(d[column])}); "
            f"pass where={{'{column}': ...}} with one of them"
        )
    return d


def _check_metric(df: pd.DataFrame, metric: str) -> None:
    if metric not in METRICS or metric not in df.columns:
        allowed = [m for m in METRICS if m in df.columns]
        raise ConfigError(f"metric '{metric}' is not in the table; allowed: {', '.join(allowed)}")


def _metric_values(rows: pd.DataFrame, metric: str) -> pd.Series:
    """The metric of complete rows as floats (success as 0/1), NaN where a value is missing or not finite."""
    values = pd.to_numeric(rows[metric].astype("Float64"), errors="coerce").astype(float)
    values = values.where(np.isfinite(values))
    return values.where(rows["status"] == COMPLETE)


# ---------------------------------------------------------------------------------------------- heatmaps


def _heatmap_slice(
    df: pd.DataFrame, attack: str, victim: str | None, where: Mapping[str, Any] | None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows of this attack, rows of every attack in the same context: they fix the heatmap's axes)."""
    d = with_settings(df)
    if victim is not None:
        d = _select(d, {"victim": victim}, single=(), what="the heatmap")
    d = _select(d, where, single=(), what="the heatmap")
    if attack in set(d["attack_setting"]):
        mine = d[d["attack_setting"] == attack]
    elif attack in set(d["attack"]):
        mine = d[d["attack"] == attack]
    else:
        raise ConfigError(
            f"attack '{attack}' is not in the table; allowed: {_values_text(d['attack_setting'], limit=20)}"
        )
    context = _context_columns(d)
    mine = _select(mine, None, single=[*context, "attack_setting"], what=f"the heatmap of {attack}")
    same_context = d
    for column in context:
        same_context = same_context[same_context[column].map(_norm) == _norm(mine[column].iloc[0])]
    return mine, same_context


def _heatmap_grid(
    df: pd.DataFrame, attack: str, victim: str | None, metric: str, where: Mapping[str, Any] | None
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(means, trials per cell, complete trials per cell, the attack's rows)."""
    _check_metric(df, metric)
    mine, context = _heatmap_slice(df, attack, victim, where)
    rows = defense_settings(context)
    cols = sorted(int(b) for b in context["batch_size"].dropna().unique())
    values = mine.assign(_value=_metric_values(mine, metric))
    keys = ["defense_setting", "batch_size"]
    means = values.groupby(keys)["_value"].mean().unstack()
    total = values.groupby(keys).size().unstack()
    complete = values.groupby(keys)["_value"].count().unstack()

    def shaped(table: pd.DataFrame, fill: float) -> pd.DataFrame:
        table = table.reindex(index=rows, columns=cols).astype(float)
        table = table.fillna(fill) if not math.isnan(fill) else table
        table.index.name, table.columns.name = "defense", "batch_size"
        return table

    return shaped(means, math.nan), shaped(total, 0.0), shaped(complete, 0.0), mine


def heatmap_values(
    df: pd.DataFrame,
    attack: str,
    victim: str | None = None,
    metric: str = "psnr",
    where: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """The numbers of a robustness heatmap: mean `metric` over seeds of complete trials.

    Index: defense settings (none first, each defense weakest to strongest); columns: batch sizes.
    Both axes cover every setting in the attack's context, so a cell with no complete trial is NaN
    (the figure marks it). `attack` is an attack name or an `attack_setting`; `where` fixes other
    columns (e.g. {"fl_round": 0}) when the table varies them.
    """
    return _heatmap_grid(df, attack, victim, metric, where)[0]


def _title_context(rows: pd.DataFrame, skip: Sequence[str] = ()) -> str:
    """'lenet on digits, fl_round 0' from the first row (the slice is known not to vary)."""
    first = rows.iloc[0]
    parts = [f"{first.get('victim', '?')} on {first.get('dataset', '?')}"]
    for column in ("fl_round", "update", "image_size"):
        if column in rows.columns and column not in skip and _norm(first[column]) != "":
            if column == "fl_round":
                parts.append(f"FL round {_show(first[column])}")
            elif column == "update" and first[column] != "fedsgd":
                parts.append(str(first[column]))
    return ", ".join(parts)


def _text_colour(rgba: Sequence[float]) -> str:
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def robustness_heatmap(
    df: pd.DataFrame,
    attack: str,
    victim: str | None = None,
    metric: str = "psnr",
    *,
    where: Mapping[str, Any] | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Figure:
    """Defense setting x batch size, each cell the mean `metric` over seeds, the number printed in it.

    A cell with no trial is hatched grey and marked "—"; one whose every trial failed is hatched red and
    marked "fail"; a cell where only some seeds completed shows "k/n" under its mean. vmin/vmax fix the
    colour range (the report shares one range across attacks so colours compare).
    """
    means, total, complete, mine = _heatmap_grid(df, attack, victim, metric, where)
    label, fmt, fixed = METRICS[metric]
    data = means.to_numpy(dtype=float)
    finite = data[np.isfinite(data)]
    lo = vmin if vmin is not None else (fixed[0] if fixed else (float(finite.min()) if finite.size else 0.0))
    hi = vmax if vmax is not None else (fixed[1] if fixed else (float(finite.max()) if finite.size else 1.0))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    n_rows, n_cols = data.shape
    fig = Figure(
        figsize=(2.2 + 1.15 * max(n_cols, 2) + 1.2, 1.9 + 0.55 * max(n_rows, 2)), layout="constrained"
    )
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = "viridis"
    norm = Normalize(lo, hi)
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, norm=norm, aspect="auto")
    for i in range(n_rows):
        for j in range(n_cols):
            n, ok = int(total.iat[i, j]), int(complete.iat[i, j])
            if n == 0 or ok == 0:
                colour, hatch, text = (
                    (_MISSING_COLOUR, "///", "—") if n == 0 else (_FAILED_COLOUR, "xx", "fail")
                )
                ax.add_patch(
                    Rectangle(
                        (j - 0.5, i - 0.5),
                        1,
                        1,
                        facecolor=colour,
                        hatch=hatch,
                        edgecolor="#a0a0a0" if n == 0 else "#c44e52",
                        linewidth=0,
                    )
                )
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=11,
                    fontweight="bold",
                    color="#555555" if n == 0 else "#a02020",
                    bbox={"facecolor": colour, "edgecolor": "none", "pad": 1.5},
                )
                continue
            value = data[i, j]
            colour = _text_colour(image.cmap(norm(value)))
            cell = fmt.format(value)
            if ok < n:
                cell += f"\n{ok}/{n} ok"
            ax.text(j, i, cell, ha="center", va="center", fontsize=10 if ok == n else 9, color=colour)
    ax.set_xticks(range(n_cols), [str(c) for c in means.columns])
    ax.set_yticks(range(n_rows), list(means.index))
    ax.set_xlabel("client batch size (images per shared update)")
    ax.set_ylabel("defense setting (stronger further down)")
    ax.set_xticks(np.arange(-0.5, n_cols, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n_rows, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=2)
    ax.tick_params(which="minor", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    bar = fig.colorbar(image, ax=ax, shrink=0.9)
    bar.set_label(f"mean {label}")
    seeds = mine["seed"].nunique() if "seed" in mine.columns else 1
    name = mine["attack_setting"].iloc[0]
    ax.set_title(
        f"{name.upper() if ' ' not in name else name} vs {_title_context(mine)}\n"
        f"{label}, mean over {seeds} seed{'s' if seeds != 1 else ''}",
        fontsize=11,
    )
    if (total.to_numpy() == 0).any() or (complete.to_numpy() < total.to_numpy()).any():
        # supxlabel, not fig.text: constrained layout makes room for it below the axis label
        fig.supxlabel(
            "—: no result    fail: every seed failed    k/n ok: seeds that completed",
            fontsize=8,
            color="#444444",
        )
    return fig


# ---------------------------------------------------------------------------------------------- convergence


def _panels(d: pd.DataFrame, columns: Sequence[str]) -> list[tuple[str, pd.DataFrame]]:
    """(title, rows) per combination of the `columns` that vary; one panel when none does."""
    varying = _varying(d, columns)
    if not varying:
        return [("", d)]
    panels = []
    for values, rows in d.groupby([d[c].map(_norm) for c in varying], sort=True):
        values = values if isinstance(values, tuple) else (values,)
        title = ", ".join(
            f"{'batch' if c == 'batch_size' else c} {v or 'unset'}"
            if c not in ("victim", "dataset", "defense_setting")
            else (v or "unset")
            for c, v in zip(varying, values, strict=True)
        )
        panels.append((title, rows))
    return panels


def convergence_figure(df: pd.DataFrame, metric: str = "psnr") -> Figure:
    """`metric` (mean ± std over seeds) against fl_round, a line per attack, model accuracy on a second axis.

    One panel per value of whatever else varies (batch size, victim, dataset, defense). Raises
    NotApplicable when the table has fewer than two fl_round values.
    """
    _check_metric(df, metric)
    d = with_settings(df)
    rounds = sorted(int(r) for r in d["fl_round"].dropna().unique()) if "fl_round" in d.columns else []
    if len(rounds) < 2:
        raise NotApplicable(
            f"the table has {len(rounds)} fl_round value{'s' if len(rounds) != 1 else ''} "
            f"({', '.join(map(str, rounds)) or 'none'}), so there is no convergence axis; "
            f"allowed: two or more fl_round values"
        )
    other = [c for c in _context_columns(d) if c != "fl_round"] + ["batch_size", "defense_setting"]
    panels = _panels(d, other)
    shown = panels[:_MAX_PANELS]
    cols = min(len(shown), 3)
    n_rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(max(5.8 * cols, 7.5), 4.0 * n_rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    label = METRICS[metric][0]
    attacks = sorted(d["attack_setting"].unique())
    colours = {a: f"C{i % 10}" for i, a in enumerate(attacks)}
    symlog = rounds[-1] > 10
    for k, (title, rows) in enumerate(shown):
        ax = fig.add_subplot(n_rows, cols, k + 1)
        values = rows.assign(_value=_metric_values(rows, metric))
        for attack in attacks:
            mine = values[values["attack_setting"] == attack]
            stats = mine.groupby("fl_round")["_value"].agg(["mean", "std", "count"])
            stats = stats[stats["count"] > 0]
            if stats.empty:
                continue
            x = stats.index.to_numpy(dtype=float)
            mean, std = stats["mean"].to_numpy(), stats["std"].fillna(0.0).to_numpy()
            ax.plot(x, mean, marker="o", color=colours[attack], label=attack, linewidth=2)
            ax.fill_between(x, mean - std, mean + std, color=colours[attack], alpha=0.18, linewidth=0)
        ax.set_xlabel("FL round (FedAvg rounds before the attack)")
        ax.set_ylabel(f"{label}\nmean ± std over seeds")
        if symlog:
            ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(rounds, [str(r) for r in rounds])
        ax.grid(alpha=0.3)
        handles, names = ax.get_legend_handles_labels()
        acc = pd.to_numeric(rows.get("model_acc", pd.Series(dtype=float)), errors="coerce")
        if acc.notna().any():
            twin = ax.twinx()
            by_round = acc.groupby(rows["fl_round"]).mean().dropna()
            (line,) = twin.plot(
                by_round.index.to_numpy(dtype=float),
                by_round.to_numpy(),
                color="black",
                linestyle="--",
                marker="s",
                markersize=4,
                alpha=0.7,
                label="global model accuracy",
            )
            twin.set_ylim(0, 1)
            twin.set_ylabel("global model test accuracy (0-1)")
            handles, names = handles + [line], names + ["global model accuracy"]
        ax.legend(handles, names, fontsize=8, loc="best")
        ax.set_title(title or _title_context(rows, skip=("fl_round",)), fontsize=10)
    suffix = f" (first {_MAX_PANELS} of {len(panels)} panels)" if len(panels) > _MAX_PANELS else ""
    fig.suptitle(f"Leakage as federated training proceeds{suffix}", fontsize=12)
    return fig


# ---------------------------------------------------------------------------------------------- success table


def _row_columns(d: pd.DataFrame) -> list[str]:
    """Index columns of the success table: attack, victim, dataset, then whatever else varies."""
    base = ["attack_setting", "victim", "dataset"]
    extra = [c for c in _varying(d, [*_context_columns(d), "defense_setting"]) if c not in base]
    return base + extra


def success_table(df: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 3 shape: attack x victim x dataset rows (and any other varying setting), batch
    sizes as columns. A cell reads "✓ 23.4" when the mean matched PSNR over seeds (23.4 dB) reaches the
    sweep's success_psnr, "✗ 12.1" when not, "fail" when every trial failed and "—" when none ran.
    """
    d = with_settings(df)
    if d.empty:
        return pd.DataFrame()
    index = _row_columns(d)
    d = d.assign(
        _psnr=_metric_values(d, "psnr"),
        _key=[tuple(_norm(v) for v in t) for t in d[index].itertuples(index=False)],
    )
    cols = sorted(int(b) for b in d["batch_size"].dropna().unique())
    out: dict[tuple[Any, ...], dict[int, str]] = {}
    labels: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for (key, batch), cell in d.groupby(["_key", "batch_size"], sort=False):
        labels.setdefault(key, tuple(cell[index].iloc[0]))
        mean = cell["_psnr"].mean()
        if cell["_psnr"].count() == 0:
            text = "fail"
        else:
            threshold = float(cell["success_psnr"].iloc[0]) if "success_psnr" in cell.columns else 20.0
            text = f"{'✓' if mean >= threshold else '✗'} {mean:.1f}"
        out.setdefault(key, {})[int(batch)] = text
    # defense rows in strength order (none first), other levels by number or text
    rank = {label: i for i, label in enumerate(defense_settings(d))}
    position = index.index("defense_setting") if "defense_setting" in index else -1
    order = sorted(
        out,
        key=lambda k: tuple(
            (0, rank.get(labels[k][i], 0)) if i == position else _sort_text(v) for i, v in enumerate(k)
        ),
    )
    table = pd.DataFrame(
        [[out[k].get(b, "—") for b in cols] for k in order],
        index=pd.MultiIndex.from_tuples(
            [labels[k] for k in order],
            names=[
                "attack" if c == "attack_setting" else "defense" if c == "defense_setting" else c
                for c in index
            ],
        ),
        columns=pd.Index(cols, name="batch_size"),
    )
    return table


def _sort_text(value: str) -> tuple[int, Any]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


# ---------------------------------------------------------------------------------------------- privacy-utility


def pareto_front(privacy_psnr: Sequence[float], utility: Sequence[float]) -> list[bool]:
    """Which points no other point beats: lower attack PSNR is more private, higher utility is better."""
    xs, ys = list(map(float, privacy_psnr)), list(map(float, utility))
    front = []
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        dominated = any(
            (xo <= x and yo >= y) and (xo < x or yo > y)
            for j, (xo, yo) in enumerate(zip(xs, ys, strict=True))
            if j != i
        )
        front.append(not dominated)
    return front


def _utility_column(df: pd.DataFrame) -> str:
    for column in _UTILITY_COLUMNS:
        if column in df.columns and pd.to_numeric(df[column], errors="coerce").notna().any():
            return column
    raise NotApplicable(
        f"the table has no utility values, so there is no privacy-utility axis; allowed: a sweep whose "
        f"rows carry {' or '.join(_UTILITY_COLUMNS)}"
    )


def privacy_utility_values(df: pd.DataFrame, where: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Per defense setting: the strongest attack's mean PSNR, its name, mean utility, and Pareto membership."""
    utility = _utility_column(df)
    d = _select(with_settings(df), where, single=_context_columns(df), what="the privacy-utility figure")
    d = d.assign(_psnr=_metric_values(d, "psnr"), _utility=pd.to_numeric(d[utility], errors="coerce"))
    records = []
    for setting in defense_settings(d):
        rows = d[d["defense_setting"] == setting]
        per_attack = rows.groupby("attack_setting")["_psnr"].mean().dropna()
        if per_attack.empty or rows["_utility"].notna().sum() == 0:
            continue
        records.append(
            {
                "defense": setting,
                "defense_name": rows["defense"].iloc[0],
                "attack": per_attack.idxmax(),
                "psnr": float(per_attack.max()),
                "utility": float(rows["_utility"].mean()),
            }
        )
    table = pd.DataFrame.from_records(
        records, columns=["defense", "defense_name", "attack", "psnr", "utility"]
    )
    table["pareto"] = pareto_front(table["psnr"], table["utility"]) if len(table) else []
    return table.set_index("defense")


def privacy_utility_figure(df: pd.DataFrame, where: Mapping[str, Any] | None = None) -> Figure:
    """Model accuracy against the strongest attack's mean PSNR per defense setting, with the Pareto front.

    Raises NotApplicable when the table has no utility column (a sweep run without utility training).
    """
    values = privacy_utility_values(df, where)
    if values.empty:
        raise NotApplicable("no defense setting has both a complete attack and a utility value to plot")
    utility = _utility_column(df)
    fig = Figure(figsize=(7.5, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    names = list(dict.fromkeys(values["defense_name"]))
    for i, name in enumerate(names):
        rows = values[values["defense_name"] == name]
        ax.scatter(
            rows["psnr"],
            rows["utility"],
            s=60,
            color=f"C{i % 10}",
            label=name,
            zorder=3,
            edgecolor=["black" if p else "none" for p in rows["pareto"]],
            linewidth=1.2,
        )
        for setting, row in rows.iterrows():
            ax.annotate(
                setting[len(name) :].strip() or name,
                (row["psnr"], row["utility"]),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=7,
            )
    front = values[values["pareto"]].sort_values("psnr")
    ax.step(
        front["psnr"],
        front["utility"],
        where="post",
        color="black",
        linewidth=1.2,
        alpha=0.7,
        label="Pareto front",
        zorder=2,
    )
    ax.set_xlabel("mean matched PSNR of the strongest attack (dB); lower is more private")
    ax.set_ylabel(f"{utility.replace('_', ' ')}: global model test accuracy (0-1)")
    ax.set_title("Privacy vs utility per defense setting", fontsize=12)
    ax.margins(0.1)  # room for the labels of the outermost points
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


# ---------------------------------------------------------------------------------------------- gallery


def _gallery_picks(result_dir: Path, df: pd.DataFrame) -> list[tuple[str, pd.Series, Path]]:
    d = with_settings(df)
    d = d.assign(_psnr=_metric_values(d, "psnr"))
    d = d[d["_psnr"].notna()]
    d = d[[(result_dir / IMAGES_DIR / f"{k}.png").is_file() for k in d["trial_key"]]]
    if d.empty:
        return []
    picks: list[tuple[str, pd.Series]] = [
        ("best", d.loc[d["_psnr"].idxmax()]),
        ("worst", d.loc[d["_psnr"].idxmin()]),
    ]
    for attack, rows in sorted(d.groupby("attack_setting"), key=lambda item: str(item[0])):
        ordered = rows.sort_values(["_psnr", "trial_key"])
        picks.append((f"median {attack}", ordered.iloc[(len(ordered) - 1) // 2]))
    merged: dict[str, tuple[list[str], pd.Series]] = {}
    for label, row in picks:
        merged.setdefault(row["trial_key"], ([], row))[0].append(label)
    return [
        (", ".join(labels), row, result_dir / IMAGES_DIR / f"{key}.png")
        for key, (labels, row) in merged.items()
    ]


def gallery_figure(result_dir: str | Path, df: pd.DataFrame, max_images: int = _GALLERY_MAX_IMAGES) -> Figure:
    """Truth (top) vs matched reconstruction (bottom) from images/: the best and worst trials by PSNR and
    the median trial of each attack; batches wider than `max_images` show their first images.
    Raises NotApplicable when no complete trial has an image."""
    from PIL import Image

    picks = _gallery_picks(Path(result_dir), df)
    if not picks:
        raise NotApplicable(
            f"no complete trial in {result_dir} has an image under {IMAGES_DIR}/, so there is no gallery"
        )
    grids = []
    for label, row, path in picks:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
        batch = int(row["batch_size"])
        shown = min(batch, max_images)
        cell = (array.shape[1] - 2) / max(batch, 1)  # make_grid: padding 2 around and between images
        array = array[:, : int(round(2 + shown * cell))]
        grids.append((label, row, array, batch, shown))
    cols = 1 if len(grids) <= 2 else 2
    n_rows = math.ceil(len(grids) / cols)
    aspect = max(a.shape[1] / a.shape[0] for _, _, a, _, _ in grids)  # width / height of the widest grid
    fig = Figure(figsize=(cols * max(4.6, 1.0 + 2.2 * aspect), 2.9 * n_rows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    for k, (label, row, array, batch, shown) in enumerate(grids):
        ax = fig.add_subplot(n_rows, cols, k + 1)
        ax.imshow(array, interpolation="nearest")
        h = array.shape[0]
        ax.set_yticks([h / 4, 3 * h / 4], ["truth", "recon."], fontsize=8)
        ax.set_xticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        more = f" (first {shown})" if shown < batch else ""
        ax.set_title(
            f"{label}: {row['psnr']:.1f} dB\n{row['attack_setting']} vs {row['victim']} on {row['dataset']}\n"
            f"batch {batch}{more}, {row['defense_setting']}, seed {_show(row['seed'])}",
            fontsize=8.5,
        )
    fig.suptitle("Reconstructions: truth (top row) vs matched reconstruction (bottom row)", fontsize=11)
    return fig


# ---------------------------------------------------------------------------------------------- tables


_FAILURE_COLUMNS = [
    "trial_key",
    "status",
    "attack_setting",
    "victim",
    "dataset",
    "batch_size",
    "fl_round",
    "defense_setting",
    "seed",
    "error_type",
    "error",
    "wall_s",
]


def failures_table(df: pd.DataFrame) -> pd.DataFrame:
    """FAILED and TIMEOUT trials with their error type and message, one row each."""
    d = with_settings(df)
    columns = [c for c in _FAILURE_COLUMNS if c in d.columns]
    if d.empty or "status" not in d.columns:
        return pd.DataFrame(columns=columns)
    failed = d[d["status"].isin(FAILED_STATUSES)]
    sort = [c for c in ("status", "attack_setting", "batch_size", "defense_setting", "seed") if c in columns]
    table = failed[columns].sort_values(sort).reset_index(drop=True)
    return table.rename(columns={"attack_setting": "attack", "defense_setting": "defense"})


def _counts(series: pd.Series) -> str:
    counts = series.dropna().astype(str).value_counts()
    return ", ".join(f"{v} x {n}" for v, n in counts.items()) or "unknown"


def _unique(df: pd.DataFrame, column: str) -> str:
    if column not in df.columns:
        return "unknown"
    values = sorted({str(v) for v in df[column].dropna()})
    return ", ".join(values) or "unknown"


def run_facts(result_dir: str | Path, df: pd.DataFrame) -> dict[str, str]:
    """The run in facts, label -> text: the sweep, spec hash, trials, compute time, hardware, versions;
    key "spec" holds spec.yaml as run (without its hash line)."""
    folder = Path(result_dir)
    ledger = Ledger(folder)
    facts: dict[str, str] = {"sweep": folder.name}
    cells: int | None = None
    spec_text = ""
    if ledger.spec_path.is_file():
        spec_text = "".join(
            line
            for line in ledger.spec_path.read_text(encoding="utf-8").splitlines(keepends=True)
            if not line.startswith("# spec_hash:")
        )
        from orchestrator.spec import load_spec  # imports the engine's registries: only when there is a spec

        try:
            spec = load_spec(ledger.spec_path)
            facts["sweep"] = spec.name + (f": {spec.description}" if spec.description else "")
            cells = len(spec.cells())
        except GrnnError as err:
            facts["cells in spec"] = f"unknown (spec.yaml no longer loads: {err})"
    facts["results folder"] = str(folder)
    facts["spec hash"] = ledger.spec_hash() or "unknown (no spec.yaml)"
    if cells is not None:
        facts["cells in spec"] = str(cells)
    status = df["status"] if "status" in df.columns else pd.Series(dtype=object)
    n = len(df)
    counted = ", ".join(f"{int((status == s).sum())} {s.lower()}" for s in (COMPLETE, *FAILED_STATUSES))
    pending = f", {cells - n} not run" if cells is not None and cells > n else ""
    facts["trials"] = f"{n} ({counted}{pending})"
    wall = pd.to_numeric(df.get("wall_s", pd.Series(dtype=float)), errors="coerce").dropna()
    if len(wall):
        facts["compute time"] = (
            f"{wall.sum() / 3600:.2f} h summed over trials ({wall.mean():.1f} s per trial, longest {wall.max():.1f} s)"
        )
    if "finished_at" in df.columns and df["finished_at"].notna().any():
        first, last = df["finished_at"].min(), df["finished_at"].max()
        facts["finished"] = f"{first:%Y-%m-%d %H:%M} to {last:%Y-%m-%d %H:%M} UTC"
    hosts = df["hostname"].nunique() if "hostname" in df.columns else 0
    facts["hardware"] = (
        f"devices: {_counts(df.get('device', pd.Series(dtype=object)))}; {hosts} host{'s' if hosts != 1 else ''}"
    )
    facts["versions"] = (
        f"project {_unique(df, 'project_version')} (git {_unique(df, 'git_sha')}), torch {_unique(df, 'torch_version')}"
        + (f", ray {_unique(df, 'ray_version')}" if "ray_version" in df.columns else "")
    )
    facts["spec"] = spec_text
    return facts


# ---------------------------------------------------------------------------------------------- the report


@dataclass
class Report:
    """What write_report wrote: the folder, the HTML (and Markdown) file, the figures, and skip notes."""

    folder: Path
    html: Path
    markdown: Path | None = None
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _slug(*parts: Any) -> str:
    text = "_".join(_norm(p) for p in parts if _norm(p) != "")
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")[:120] or "figure"


def _heatmap_section(d: pd.DataFrame, folder: Path, written: list[Path]) -> Section:
    section = Section(
        "Robustness heatmaps",
        "Each cell: the mean over seeds of complete trials, for one defense setting (rows, weakest at the "
        "top) and client batch size (columns). Hatched cells have no result (—) or only failed trials (fail).",
    )
    if len(defense_settings(d)) < 2:
        section.notes.append(
            "Skipped: the sweep has a single defense setting, so there is no robustness axis "
            "(the success table shows the batch sizes)."
        )
        return section
    panel_columns = ["attack_setting", *_context_columns(d)]
    varying = _varying(d, panel_columns[1:])
    groups = list(d.groupby([d[c].map(_norm) for c in ["attack_setting", *varying]], sort=True))
    for metric in REPORT_METRICS:
        if metric not in d.columns or _metric_values(d, metric).notna().sum() == 0:
            continue
        fixed = METRICS[metric][2]
        all_values = _metric_values(d, metric).dropna()
        vmin, vmax = fixed if fixed else (float(all_values.min()), float(all_values.max()))
        for _, rows in groups:
            first = rows.iloc[0]
            where = {c: first[c] for c in varying}
            attack = first["attack_setting"]
            fig = robustness_heatmap(d, attack, metric=metric, where=where, vmin=vmin, vmax=vmax)
            name = save_figure(
                fig,
                folder,
                _slug(
                    "heatmap", metric, attack, first["victim"], *(first[c] for c in varying if c != "victim")
                ),
                written,
            )
            section.figures.append((name, f"{METRICS[metric][0]}: {attack} vs {_title_context(rows)}"))
    if not section.figures:
        section.notes.append("Skipped: no trial completed, so there is nothing to colour.")
    return section


def _figure_section(
    title: str, intro: str, build: Any, folder: Path, name: str, written: list[Path]
) -> Section:
    section = Section(title, intro)
    try:
        fig = build()
    except NotApplicable as err:
        section.notes.append(f"Skipped: {err}.")
        return section
    section.figures.append((save_figure(fig, folder, name, written), title))
    return section


def _sections(folder_in: Path, df: pd.DataFrame, out: Path, written: list[Path]) -> list[Section]:
    d = with_settings(df)
    sections = [
        Section(
            "Success table",
            "The shape of the GRNN paper's Table 3: ✓ when the mean matched PSNR over seeds reaches the "
            f"sweep's success threshold ({_unique(d, 'success_psnr')} dB), ✗ when not; the number is that "
            "mean PSNR in dB. fail: every trial of the cell failed; —: no trial ran.",
            table=success_table(d).rename(columns=lambda b: f"batch {b}"),
        ),
        _heatmap_section(d, out, written),
        _figure_section(
            "Convergence",
            "PSNR against the federated round the attack happens in, with the global model's "
            "accuracy (dashed, right axis).",
            lambda: convergence_figure(d),
            out,
            "convergence",
            written,
        ),
        _figure_section(
            "Privacy vs utility",
            "Per defense setting, the strongest attack's PSNR against the accuracy "
            "the model keeps; outlined points are on the Pareto front.",
            lambda: privacy_utility_figure(d),
            out,
            "privacy_utility",
            written,
        ),
        _figure_section(
            "Reconstructions",
            "Truth above reconstruction, from images/.",
            lambda: gallery_figure(folder_in, d),
            out,
            "gallery",
            written,
        ),
    ]
    # A breaking-point search's table, right after the success table (none for other sweeps).
    sections[1:1] = breakpoints.report_part(folder_in, d)
    # Face re-identification: table and galleries (none for sweeps run without `reid`). Imported here
    # because orchestrator.faces_report builds on this module's helpers.
    from orchestrator.faces_report import faces_sections

    sections += faces_sections(folder_in, d, out, written)
    failures = failures_table(d)
    failed = Section(
        "Failures", f"{len(failures)} FAILED or TIMEOUT trial{'s' if len(failures) != 1 else ''}."
    )
    if len(failures):
        failed.table = failures.assign(error=failures["error"].astype(str).str.slice(0, 300))
    sections.append(failed)
    return sections


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: center; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
.note { color: #7a5a00; background: #fff8e0; padding: 0.4em 0.8em; border-left: 3px solid #e0b000; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def _html_table(table: pd.DataFrame) -> str:
    text = table.to_html(escape=True, na_rep="", border=0)
    return text.replace("✓ ", "✓<br>").replace("✗ ", "✗<br>")


def _html(title: str, facts: dict[str, str], sections: list[Section]) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        "<h2>Run facts</h2><table>",
    ]
    parts += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts.items() if k != "spec"]
    parts.append("</table>")
    if facts.get("spec"):
        parts.append(f"<details><summary>spec.yaml as run</summary><pre>{e(facts['spec'])}</pre></details>")
    for s in sections:
        parts.append(f"<h2>{e(s.title)}</h2>")
        if s.intro:
            parts.append(f"<p>{e(s.intro)}</p>")
        parts += [f'<p class="note">{e(n)}</p>' for n in s.notes]
        if s.table is not None and len(s.table):
            parts.append(_html_table(s.table))
        if s.figures:
            parts.append('<div class="figures">')
            parts += [
                f'<figure><img src="{e(name)}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>'
                for name, caption in s.figures
            ]
            parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _md_cell(value: Any) -> str:
    return _norm(value).replace("|", "\\|").replace("\n", " ")


def _md_table(table: pd.DataFrame) -> str:
    flat = table.reset_index() if not isinstance(table.index, pd.RangeIndex) else table
    header = [_md_cell(c) for c in flat.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in flat.itertuples(index=False)]
    return "\n".join(lines)


def _markdown(title: str, facts: dict[str, str], sections: list[Section]) -> str:
    parts = [f"# {title}", "", "## Run facts", "", "| fact | value |", "|---|---|"]
    parts += [f"| {_md_cell(k)} | {_md_cell(v)} |" for k, v in facts.items() if k != "spec"]
    if facts.get("spec"):
        parts += [
            "",
            "<details><summary>spec.yaml as run</summary>",
            "",
            "```yaml",
            facts["spec"].rstrip(),
            "```",
            "",
            "</details>",
        ]
    for s in sections:
        parts += ["", f"## {s.title}", ""]
        if s.intro:
            parts += [s.intro, ""]
        parts += [f"> {n}" for n in s.notes]
        if s.table is not None and len(s.table):
            parts += [_md_table(s.table), ""]
        parts += [f"![{caption}]({name})" for name, caption in s.figures]
    return "\n".join(parts) + "\n"


_OWN_PNG = re.compile(r"^(heatmap_.*|convergence|privacy_utility|gallery|faces_gallery_.*)\.png$")


def write_report(result_dir: str | Path, out: str | Path | None = None, fmt: str = "html") -> Report:
    """Write the report of the sweep in `result_dir` to `out` (default `<result_dir>/report/`).

    fmt "html" writes index.html and the PNGs; "md" also report.md. Raises DataError when `result_dir`
    is not a results folder or holds no trials, ConfigError for an unknown fmt.
    """
    if fmt not in ("html", "md"):
        raise ConfigError(f"report format '{fmt}' is not known; allowed: html, md")
    folder = Path(result_dir)
    if not folder.is_dir() or not Ledger(folder).exists():
        raise DataError(
            f"{folder} is not a sweep results folder (it has no spec.yaml, parts/ or trials.parquet); "
            f"give results/<sweep name>"
        )
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = load(folder)
    notes += [f"{w.message}" for w in caught if "results file" in str(w.message)]
    if df.empty:
        raise DataError(
            f"{folder} holds no trial results yet (its table is empty); run or resume the sweep first"
        )
    target = Path(out) if out is not None else folder / REPORT_DIR
    target.mkdir(parents=True, exist_ok=True)
    for old in target.iterdir():  # figures of an earlier report that this one may not redraw
        if _OWN_PNG.match(old.name) and old.is_file():
            old.unlink()
    written: list[Path] = []
    sections = _sections(folder, df, target, written)
    for s in sections:
        notes += [f"{s.title}: {n}" for n in s.notes]
    facts = run_facts(folder, df)
    title = f"Sweep report: {folder.name}"
    index = target / "index.html"
    index.write_text(_html(title, facts, sections), encoding="utf-8")
    report = Report(folder=target, html=index, figures=written, notes=notes)
    if fmt == "md":
        report.markdown = target / "report.md"
        report.markdown.write_text(_markdown(title, facts, sections), encoding="utf-8")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m orchestrator.report",
        description="Figures and tables of a sweep's results: <folder>/report/index.html (and report.md).",
    )
    parser.add_argument("folder", help="the sweep's results folder, e.g. results/quickstart")
    parser.add_argument(
        "--format",
        choices=("html", "md"),
        default="html",
        help="html: index.html and PNGs; md: also report.md (default: html)",
    )
    parser.add_argument("--out", default=None, help="write here instead of <folder>/report/")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.folder, args.out, args.format)
    except GrnnError as err:
        return user_error(err)
    print(f"wrote {report.html} ({len(report.figures)} figures)")
    if report.markdown is not None:
        print(f"wrote {report.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
