"""The report's convergence figure: leakage against the federated round the attack happens in.

A line per attack setting (mean ± std over seeds), the global model's accuracy on a second axis, one panel
per value of whatever else varies (batch size, victim, dataset, defense).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from orchestrator.report.labels import norm, title_context
from orchestrator.report.section import NotApplicable, Section, figure_section
from orchestrator.report.selection import (
    METRICS,
    check_metric,
    context_columns,
    metric_values,
    varying,
    with_settings,
)

__all__ = ["convergence_figure", "convergence_section"]

_MAX_PANELS = 12


def _panels(d: pd.DataFrame, columns: Sequence[str]) -> list[tuple[str, pd.DataFrame]]:
    """(title, rows) per combination of the `columns` that vary; one panel when none does."""
    changing = varying(d, columns)
    if not changing:
        return [("", d)]
    panels = []
    for values, rows in d.groupby([d[c].map(norm) for c in changing], sort=True):
        values = values if isinstance(values, tuple) else (values,)
        title = ", ".join(
            f"{'batch' if c == 'batch_size' else c} {v or 'unset'}"
            if c not in ("victim", "dataset", "defense_setting")
            else (v or "unset")
            for c, v in zip(changing, values, strict=True)
        )
        panels.append((title, rows))
    return panels


def convergence_figure(df: pd.DataFrame, metric: str = "psnr") -> Figure:
    """`metric` (mean ± std over seeds) against fl_round, a line per attack, model accuracy on a second axis.

    One panel per value of whatever else varies (batch size, victim, dataset, defense). Raises
    NotApplicable when the table has fewer than two fl_round values.
    """
    check_metric(df, metric)
    d = with_settings(df)
    rounds = sorted(int(r) for r in d["fl_round"].dropna().unique()) if "fl_round" in d.columns else []
    if len(rounds) < 2:
        raise NotApplicable(
            f"the table has {len(rounds)} fl_round value{'s' if len(rounds) != 1 else ''} "
            f"({', '.join(map(str, rounds)) or 'none'}), so there is no convergence axis; "
            f"allowed: two or more fl_round values"
        )
    other = [c for c in context_columns(d) if c != "fl_round"] + ["batch_size", "defense_setting"]
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
        values = rows.assign(_value=metric_values(rows, metric))
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
        ax.set_title(title or title_context(rows, skip=("fl_round",)), fontsize=10)
    suffix = f" (first {_MAX_PANELS} of {len(panels)} panels)" if len(panels) > _MAX_PANELS else ""
    fig.suptitle(f"Leakage as federated training proceeds{suffix}", fontsize=12)
    return fig


def convergence_section(d: pd.DataFrame, folder: Path, written: list[Path]) -> Section:
    """The "Convergence" section of `d` (rows with settings): the figure, or why there is none."""
    return figure_section(
        "Convergence",
        "PSNR against the federated round the attack happens in, with the global model's "
        "accuracy (dashed, right axis).",
        lambda: convergence_figure(d),
        folder,
        "convergence",
        written,
    )
