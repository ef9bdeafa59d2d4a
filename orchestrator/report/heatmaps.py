"""The report's robustness heatmaps: defense setting x batch size, each cell a metric's mean over seeds.

`heatmap_values` holds the numbers, `robustness_heatmap` draws them, `heatmaps_section` draws one per
metric x attack setting x context (victim, FL round, ...) with one colour range per metric, so colours
compare across attacks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from grnn_engine.errors import ConfigError
from orchestrator.report.labels import norm, slug, title_context, values_text
from orchestrator.report.section import Section, save_figure
from orchestrator.report.selection import (
    METRICS,
    check_metric,
    context_columns,
    defense_settings,
    metric_values,
    select,
    varying,
    with_settings,
)

__all__ = ["REPORT_METRICS", "heatmap_values", "heatmaps_section", "robustness_heatmap"]

# The report's heatmap sheets; reid_top1 joins when a sweep has it.
REPORT_METRICS = ("psnr", "ssim", "label_acc", "success", "reid_top1")
_MISSING_COLOUR, _FAILED_COLOUR = "#e8e8e8", "#f6d5d5"


def _heatmap_slice(
    df: pd.DataFrame, attack: str, victim: str | None, where: Mapping[str, Any] | None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows of this attack, rows of every attack in the same context: they fix the heatmap's axes)."""
    d = with_settings(df)
    if victim is not None:
        d = select(d, {"victim": victim}, single=(), what="the heatmap")
    d = select(d, where, single=(), what="the heatmap")
    if attack in set(d["attack_setting"]):
        mine = d[d["attack_setting"] == attack]
    elif attack in set(d["attack"]):
        mine = d[d["attack"] == attack]
    else:
        raise ConfigError(
            f"attack '{attack}' is not in the table; allowed: {values_text(d['attack_setting'], limit=20)}"
        )
    context = context_columns(d)
    mine = select(mine, None, single=[*context, "attack_setting"], what=f"the heatmap of {attack}")
    same_context = d
    for column in context:
        same_context = same_context[same_context[column].map(norm) == norm(mine[column].iloc[0])]
    return mine, same_context


def _heatmap_grid(
    df: pd.DataFrame, attack: str, victim: str | None, metric: str, where: Mapping[str, Any] | None
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(means, trials per cell, complete trials per cell, the attack's rows)."""
    check_metric(df, metric)
    mine, context = _heatmap_slice(df, attack, victim, where)
    rows = defense_settings(context)
    cols = sorted(int(b) for b in context["batch_size"].dropna().unique())
    values = mine.assign(_value=metric_values(mine, metric))
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
    scale = Normalize(lo, hi)
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, norm=scale, aspect="auto")
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
            colour = _text_colour(image.cmap(scale(value)))
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
        f"{name.upper() if ' ' not in name else name} vs {title_context(mine)}\n"
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


def heatmaps_section(d: pd.DataFrame, folder: Path, written: list[Path]) -> Section:
    """The "Robustness heatmaps" section of `d` (rows with settings), its figures saved in `folder`."""
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
    panel_columns = varying(d, context_columns(d))
    groups = list(d.groupby([d[c].map(norm) for c in ["attack_setting", *panel_columns]], sort=True))
    for metric in REPORT_METRICS:
        if metric not in d.columns or metric_values(d, metric).notna().sum() == 0:
            continue
        fixed = METRICS[metric][2]
        all_values = metric_values(d, metric).dropna()
        vmin, vmax = fixed if fixed else (float(all_values.min()), float(all_values.max()))
        for _, rows in groups:
            first = rows.iloc[0]
            where = {c: first[c] for c in panel_columns}
            attack = first["attack_setting"]
            fig = robustness_heatmap(d, attack, metric=metric, where=where, vmin=vmin, vmax=vmax)
            name = save_figure(
                fig,
                folder,
                slug(
                    "heatmap",
                    metric,
                    attack,
                    first["victim"],
                    *(first[c] for c in panel_columns if c != "victim"),
                ),
                written,
            )
            section.figures.append((name, f"{METRICS[metric][0]}: {attack} vs {title_context(rows)}"))
    if not section.figures:
        section.notes.append("Skipped: no trial completed, so there is nothing to colour.")
    return section
