"""The report's privacy vs utility figure: per defense setting, the strongest attack's PSNR against the
accuracy the model keeps, with the Pareto front of the settings no other setting beats on both."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from orchestrator.report.section import NotApplicable, Section, figure_section
from orchestrator.report.selection import (
    context_columns,
    defense_settings,
    metric_values,
    select,
    with_settings,
)

__all__ = ["pareto_front", "privacy_utility_figure", "privacy_utility_section", "privacy_utility_values"]

_UTILITY_COLUMNS = ("utility_acc",)


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
    d = select(with_settings(df), where, single=context_columns(df), what="the privacy-utility figure")
    d = d.assign(_psnr=metric_values(d, "psnr"), _utility=pd.to_numeric(d[utility], errors="coerce"))
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


def privacy_utility_section(d: pd.DataFrame, folder: Path, written: list[Path]) -> Section:
    """The "Privacy vs utility" section of `d` (rows with settings): the figure, or why there is none."""
    return figure_section(
        "Privacy vs utility",
        "Per defense setting, the strongest attack's PSNR against the accuracy "
        "the model keeps; outlined points are on the Pareto front.",
        lambda: privacy_utility_figure(d),
        folder,
        "privacy_utility",
        written,
    )
