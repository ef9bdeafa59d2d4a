"""What a trial reports last (its row and image, and the numbers a searcher scores) and how a search scores it."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
from typing import TYPE_CHECKING, Any

from grnn_engine import TrialResult
from orchestrator.spec.search import SEARCH_METRICS

if TYPE_CHECKING:
    from orchestrator.spec import OptunaSearch


def finite(value: Any) -> bool:
    """Whether the value is a finite number (a bool is not one)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def finite_float(value: Any) -> float | None:
    """The value as a float when it is a finite number, else None."""
    return float(value) if finite(value) else None


@dataclasses.dataclass(frozen=True)
class Scoring:
    """The numbers a search optimises, as Tune result keys, with 'min'/'max' for each.

    A breaking-point search optimises `breaking_distance` = |metric - threshold|, which every report that
    holds the metric carries (so a trial ASHA stops still tells its study how close it came).
    """

    metrics: tuple[str, ...]
    modes: tuple[str, ...]
    breaking_metric: str | None = None
    threshold: float | None = None

    @classmethod
    def of(cls, search: OptunaSearch, success_psnr: float) -> Scoring:
        bp = search.breaking_point
        if bp is not None:
            threshold = bp.threshold if bp.threshold is not None else success_psnr
            return cls(("breaking_distance",), ("min",), bp.metric, float(threshold))
        return cls(tuple(o.metric for o in search.objectives or ()), tuple(search.directions()))

    def extra(self, metrics: dict[str, Any]) -> dict[str, float]:
        """What a report adds for the searcher (the breaking distance, when its metric is there)."""
        if self.breaking_metric is None or self.threshold is None:
            return {}
        value = finite_float(metrics.get(self.breaking_metric))
        return {} if value is None else {"breaking_distance": abs(value - self.threshold)}

    def values(self, metrics: dict[str, Any]) -> dict[str, float] | None:
        """The objective values of a report or row, or None when one is missing (the trial failed)."""
        merged = {**metrics, **self.extra(metrics)}
        out = {m: finite_float(merged.get(m)) for m in self.metrics}
        return None if any(v is None for v in out.values()) else {m: v for m, v in out.items() if v is not None}


def final_metrics(result: TrialResult, scoring: Scoring | None = None) -> dict[str, Any]:
    """The last report of a trial: a few scalars for Tune (and its searcher), plus the row and image for the driver."""
    row = result.to_row()
    out: dict[str, Any] = {
        "final": True,
        "trial_key": row["trial_key"],
        "status": result.status,
        "wall_s": result.wall_s,
        # JSON text: Tune flattens nested dicts ("row/attack.lr"); a string travels untouched.
        "row_json": json.dumps(row),
        "png_b64": base64.b64encode(result.image_png).decode("ascii") if result.image_png else "",
    }
    for name in SEARCH_METRICS:  # each None when the row lacks it
        out[name] = finite_float(row.get(name))
    if scoring is not None:
        out.update(scoring.extra(out))
    return out

