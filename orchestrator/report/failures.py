"""The report's failures: every FAILED or TIMEOUT trial with its error, so a hole in a figure has its reason."""

from __future__ import annotations

import pandas as pd

from orchestrator.report.section import Section
from orchestrator.report.selection import FAILED_STATUSES, with_settings

__all__ = ["failures_section", "failures_table"]

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
_ERROR_CHARS = 300  # of each error message in the report; failures_table keeps it whole


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


def failures_section(d: pd.DataFrame) -> Section:
    """The "Failures" section of `d`: how many trials failed, and the table of them when any did."""
    failures = failures_table(d)
    section = Section(
        "Failures", f"{len(failures)} FAILED or TIMEOUT trial{'s' if len(failures) != 1 else ''}."
    )
    if len(failures):
        section.table = failures.assign(error=failures["error"].astype(str).str.slice(0, _ERROR_CHARS))
    return section
