"""The report's success table, in the shape of the GRNN paper's Table 3: did each attack succeed, per batch size."""

from __future__ import annotations

from typing import Any

import pandas as pd

from orchestrator.report.labels import norm, unique_text
from orchestrator.report.section import Section
from orchestrator.report.selection import (
    context_columns,
    defense_rank,
    index_sort_key,
    metric_values,
    varying,
    with_settings,
)

__all__ = ["success_section", "success_table"]


def _row_columns(d: pd.DataFrame) -> list[str]:
    """Index columns of the success table: attack, victim, dataset, then whatever else varies."""
    base = ["attack_setting", "victim", "dataset"]
    extra = [c for c in varying(d, [*context_columns(d), "defense_setting"]) if c not in base]
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
        _psnr=metric_values(d, "psnr"),
        _key=[tuple(norm(v) for v in t) for t in d[index].itertuples(index=False)],
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
    rank = defense_rank(d)
    order = sorted(out, key=lambda k: index_sort_key(index, labels[k], rank))
    return pd.DataFrame(
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


def success_section(d: pd.DataFrame) -> Section:
    """The "Success table" section of `d` (rows with settings)."""
    return Section(
        "Success table",
        "The shape of the GRNN paper's Table 3: ✓ when the mean matched PSNR over seeds reaches the "
        f"sweep's success threshold ({unique_text(d, 'success_psnr')} dB), ✗ when not; the number is that "
        "mean PSNR in dB. fail: every trial of the cell failed; —: no trial ran.",
        table=success_table(d).rename(columns=lambda b: f"batch {b}"),
    )
