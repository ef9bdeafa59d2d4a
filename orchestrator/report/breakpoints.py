"""The breaking-point table: where each defense starts to stop each attack, from a sweep's rows.

For every attack x batch size x defense (and dataset, victim, round when a table holds several), the
breaking strength is the defense strength at which the attack's success rate over seeds falls below
`rate`, where a trial succeeds while its metric (PSNR by default) stays at or above the threshold (the
row's success_psnr by default). Grid rows and searched rows (sweeps with `search: breaking_point`) are
read the same way, so a dense grid and a search can be compared on one footing (benchmarks/breakpoints.py).

Per seed, the rows are ordered by strength (`STRENGTH` says which parameter is the strength and which way
it grows: fewer quantization bits or a smaller clipping norm is stronger). The seed's breaking strength is
the weakest strength from which every stronger tested strength is broken; the strength tested just before
it still let the attack through, so the seed's breaking point lies in (lower, breaking]. A seed never
broken within the tested range has no breaking strength (beyond the range); one broken everywhere breaks
at the weakest tested strength, with no lower bound. Across seeds the breaking strength is the weakest
per-seed value at which fewer than `rate` of the seeds still succeed (the median for rate 0.5), and the
uncertainty is the same order statistic of the per-seed lower bounds, plus the spread of the per-seed
values (seed_min, seed_max). model_acc, utility_acc and utility_dp_epsilon are the means over the rows at the
breaking strength.

`report_part(result_dir, df)` is that table as the report shows it, for a results folder whose spec searched a
breaking point (the report adds it as its "Breaking points" section; a grid or an objectives search gets none).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from grnn_engine.errors import GrnnError
from orchestrator.report.section import Section
from orchestrator.results import Ledger

__all__ = ["STRENGTH", "breaking_points", "grid_position", "report_part", "within_one_step"]

# defense -> (parameter that sets its strength, +1 if a larger value is stronger, -1 if a smaller one is)
STRENGTH: dict[str, tuple[str, int]] = {
    "gaussian": ("sigma", 1),
    "laplace": ("scale", 1),
    "dp_sgd": ("sigma", 1),
    "prune": ("ratio", 1),
    "soteria": ("ratio", 1),
    "quantize": ("bits", -1),
    "clip": ("max_norm", -1),
}
_CONTEXT = ("dataset", "victim", "fl_round")  # grouped by too, when a table holds more than one value
COLUMNS = [
    "attack", "batch_size", "defense", "param", "breaking_strength", "strength_low", "seed_min", "seed_max",
    "seeds", "broken_seeds", "trials", "metric_at", "model_acc", "utility_acc", "utility_dp_epsilon",
]  # fmt: skip


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _seed_bracket(points: list[tuple[float, bool]], direction: int) -> tuple[float | None, float | None]:
    """(lower, breaking) of one seed from (strength, broken) points: breaking None = not broken in range."""
    ordered = sorted(points, key=lambda p: direction * p[0])
    suffix = len(ordered)
    while suffix > 0 and ordered[suffix - 1][1]:
        suffix -= 1
    breaking = ordered[suffix][0] if suffix < len(ordered) else None
    lower = ordered[suffix - 1][0] if suffix > 0 else None
    return lower, breaking


def _order_statistic(
    values: list[float | None], k: int, direction: int, missing_is_strong: bool
) -> float | None:
    """The k-th weakest of `values` (None counts as beyond the strong end, or the weak end)."""
    inf = math.inf if missing_is_strong else -math.inf
    keyed = sorted(values, key=lambda v: inf if v is None else direction * v)
    return keyed[k]


def breaking_points(
    df: pd.DataFrame,
    *,
    metric: str = "psnr",
    threshold: float | None = None,
    rate: float = 0.5,
    strength: dict[str, tuple[str, int]] | None = None,
) -> pd.DataFrame:
    """The breaking-point table of `df` (rows as orchestrator.results.load gives them); see the module doc.

    Only COMPLETE rows with a finite metric count (a trial that ASHA stopped counts, scored where it stopped).
    `threshold` None: each row's success_psnr (metric psnr only). Defenses without a known strength
    parameter (`STRENGTH`, or `strength` to add some) or without that column are left out.
    """
    if not 0 < rate <= 1:
        raise ValueError(f"rate must be in (0, 1] (got {rate})")
    if threshold is None and metric != "psnr":
        raise ValueError(f"a threshold is needed for metric {metric!r} (only psnr defaults to success_psnr)")
    table = {**STRENGTH, **(strength or {})}
    if df.empty or metric not in df.columns:
        return pd.DataFrame(columns=COLUMNS)
    rows = df[df["status"] == "COMPLETE"] if "status" in df.columns else df
    context = [c for c in _CONTEXT if c in rows.columns and rows[c].nunique(dropna=False) > 1]
    keys = [*context, "attack", "batch_size", "defense"]
    out = []
    for group, part in rows.groupby(keys, dropna=False, sort=True):
        values = dict(zip(keys, group if isinstance(group, tuple) else (group,), strict=True))
        name = values["defense"]
        if name not in table:
            continue
        param, direction = table[name]
        column = f"defense.{param}"
        if column not in part.columns:
            continue
        part = part[[_finite(v) and _finite(m) for v, m in zip(part[column], part[metric], strict=True)]]
        if part.empty:
            continue
        limits = (
            pd.Series(threshold, index=part.index) if threshold is not None
            else pd.to_numeric(part["success_psnr"], errors="coerce")
        )  # fmt: skip
        broken = pd.to_numeric(part[metric], errors="coerce") < limits
        brackets = []
        for _, seed_rows in part.assign(_broken=broken).groupby(
            "seed" if "seed" in part.columns else lambda _: 0
        ):
            by_strength = seed_rows.groupby(column)["_broken"].mean()
            points = [(float(s), bool(b > 0.5)) for s, b in by_strength.items()]
            brackets.append(_seed_bracket(points, direction))
        n = len(brackets)
        k = _rank_for_rate(n, rate)
        breaking = _order_statistic([b for _, b in brackets], k, direction, missing_is_strong=True)
        lower = _order_statistic([lo for lo, _ in brackets], k, direction, missing_is_strong=False)
        found = [b for _, b in brackets if b is not None]
        at = part[[float(v) == breaking for v in part[column]]] if breaking is not None else part.iloc[0:0]
        out.append(
            {
                **values,
                "param": param,
                "breaking_strength": breaking,
                "strength_low": lower,
                "seed_min": min(found, key=lambda v: direction * v) if found else None,
                "seed_max": max(found, key=lambda v: direction * v) if found else None,
                "seeds": n,
                "broken_seeds": len(found),
                "trials": len(part),
                "metric_at": _mean(at, metric),
                "model_acc": _mean(at, "model_acc"),
                "utility_acc": _mean(at, "utility_acc"),
                "utility_dp_epsilon": _mean(at, "utility_dp_epsilon"),
            }
        )
    return pd.DataFrame(out, columns=[*context, *COLUMNS])


def _rank_for_rate(n: int, rate: float) -> int:
    """0-based rank k of the per-seed breaking strengths (weakest first) at which the success rate, the
    fraction of seeds whose own breaking strength is stronger, first drops below `rate`: (n-1-k)/n < rate."""
    for k in range(n):
        if (n - 1 - k) / n < rate:
            return k
    return n - 1


def _mean(rows: pd.DataFrame, column: str) -> float | None:
    if rows.empty or column not in rows.columns:
        return None
    values = pd.to_numeric(rows[column], errors="coerce").dropna()
    return float(values.mean()) if len(values) else None


def grid_position(value: float | None, steps: Sequence[float], direction: int = 1) -> int:
    """Index of the first grid step at least as strong as `value` (len(steps) for None: beyond the range)."""
    ordered = sorted(steps, key=lambda s: direction * s)
    if value is None:
        return len(ordered)
    tolerance = 1e-9 * max(1.0, abs(value))  # a searched value equal to a step, up to float noise
    for i, step in enumerate(ordered):
        if direction * step >= direction * value - tolerance:
            return i
    return len(ordered)


def within_one_step(
    found: float | None, reference: float | None, steps: Sequence[float], direction: int = 1
) -> bool:
    """Whether a breaking strength `found` (e.g. by search) lies within one grid step of `reference` (the dense
    grid's, one of `steps`): between the steps either side of it, inclusive. None means not broken within
    the range (beyond the strongest step)."""
    ordered = [direction * s for s in sorted(steps, key=lambda s: direction * s)]
    i = grid_position(reference, steps, direction)
    low = ordered[i - 1] if i >= 1 else -math.inf
    high = ordered[i + 1] if i + 1 < len(ordered) else math.inf
    value = math.inf if found is None else direction * found
    tolerance = 1e-9 * max(1.0, abs(value)) if math.isfinite(value) else 0.0
    return low - tolerance <= value <= high + tolerance


# ---------------------------------------------------------------------------------------------- report


def _short(value: Any) -> str:
    return "—" if not _finite(value) else f"{float(value):.4g}"


def _display(table: pd.DataFrame, has_utility: bool) -> pd.DataFrame:
    """The breaking-point table with the uncertainty spelled out, one row per attack x batch size x defense."""
    context = [c for c in _CONTEXT if c in table.columns]
    out = []
    for _, r in table.iterrows():
        at, low = r["breaking_strength"], r["strength_low"]
        if not _finite(at):  # never broken: the strongest strength tested still let the attack through
            strength, bracket = f"not broken (> {_short(low)})", f"({_short(low)}, beyond the range)"
        elif not _finite(low):  # broken at the weakest strength tested: the breaking point may be weaker still
            strength, bracket = _short(at), f"(not tested below, {_short(at)}]"
        else:
            strength, bracket = _short(at), f"({_short(low)}, {_short(at)}]"
        spread = _short(r["seed_min"]) if r["seed_min"] == r["seed_max"] else (
            f"{_short(r['seed_min'])} to {_short(r['seed_max'])}"
        )  # fmt: skip
        row = {
            **{c: r[c] for c in context},
            "attack": r["attack"],
            "batch size": int(r["batch_size"]),
            "defense": f"{r['defense']} ({r['param']})",
            "breaking strength": strength,
            "bracket (passed, broken]": bracket,
            "per-seed breaking strengths": spread if r["broken_seeds"] else "—",
            "seeds broken": f"{int(r['broken_seeds'])}/{int(r['seeds'])}",
            "trials": int(r["trials"]),
            "metric there": _short(r["metric_at"]),
            "model accuracy there": _short(r["model_acc"]),
        }
        if has_utility:
            row["accuracy with the defense in training"] = _short(r["utility_acc"])
        if _finite(r["utility_dp_epsilon"]):
            row["DP-SGD epsilon there"] = _short(r["utility_dp_epsilon"])
        out.append(row)
    return pd.DataFrame(out)


def report_part(result_dir: str | Path, df: pd.DataFrame) -> list[Section]:
    """The "Breaking points" section of the report of `result_dir`, whose rows are `df`: one Section when
    its spec.yaml searches a breaking point and `df` holds searched rows (`search_id`), else none."""
    if "search_id" not in df.columns or not df["search_id"].map(lambda v: isinstance(v, str)).any():
        return []
    from orchestrator.spec import OptunaSearch, load_spec  # the engine's registries: only for searched rows

    title = "Breaking points"
    spec_path = Ledger(Path(result_dir)).spec_path
    try:
        spec = load_spec(spec_path)
    except (OSError, GrnnError) as err:  # a report still opens; the note says why the table is missing
        reason = "it has no spec.yaml" if not spec_path.is_file() else f"its spec.yaml does not load ({err})"
        note = f"Skipped: the rows were searched, but {reason}, so the breaking-point threshold is unknown."
        return [Section(title, "", notes=[note])]
    search = spec.search
    if not isinstance(search, OptunaSearch) or search.breaking_point is None:
        return []  # an objectives search: its result is the privacy-utility front
    metric, threshold = search.breaking_point.metric, search.breaking_point.threshold
    if threshold is None:  # the spec allows that for psnr only: the sweep's success threshold
        threshold = spec.success_psnr
    table = breaking_points(df, metric=metric, threshold=threshold)
    limit = f"{threshold:g}" + (" dB" if metric == "psnr" else "")
    searched = df[df["search_id"].map(lambda v: isinstance(v, str))]
    intro = (
        f"Per attack, batch size and defense: the weakest defense strength at which the attack's {metric} falls "
        f"below {limit} on at least half of the seeds, from the Optuna breaking-point search "
        f"({len(searched)} trials in {searched['search_id'].nunique()} studies). The breaking point lies in the "
        "bracket: from the strongest strength tested below it that the attack still passed, to the breaking "
        f"strength. 'metric there' is the mean {metric} at the breaking strength; 'model accuracy there' the "
        "accuracy of the global model the attack saw (the defense changes only the shared update)."
    )
    has_utility = (
        "utility_acc" in df.columns and pd.to_numeric(df["utility_acc"], errors="coerce").notna().any()
    )
    if has_utility:
        intro += " 'accuracy with the defense in training': what FedAvg reaches with every client defended."
    if table.empty:
        note = "Skipped: no complete searched trial has a defense strength and a finite " + metric + "."
        return [Section(title, intro, notes=[note])]
    return [Section(title, intro, table=_display(table, has_utility))]
