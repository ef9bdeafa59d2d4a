"""orchestrator.report.breakpoints: the breaking-point table from grid or searched rows, and the one-grid-step agreement."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import pytest

from orchestrator.report import breaking_points, grid_position, within_one_step

STEPS = [1e-3, 1e-2, 1e-1, 1.0]


def rows(breaks_at: dict[int, float | None], strengths: list[float], **extra: Any) -> list[dict[str, Any]]:
    """One COMPLETE gaussian row per seed and strength: PSNR 30 (attack succeeds) below the seed's breaking
    strength, 10 at and above it."""
    out = []
    for seed, at in breaks_at.items():
        for s in strengths:
            broken = at is not None and s >= at
            out.append({
                "status": "COMPLETE", "attack": "grnn", "batch_size": 1, "defense": "gaussian", "defense.sigma": s,
                "seed": seed, "psnr": 10.0 if broken else 30.0, "success_psnr": 20.0, "model_acc": 0.1 + s,
                **extra,
            })  # fmt: skip
    return out


def test_median_over_seeds_with_its_bracket() -> None:
    table = breaking_points(pd.DataFrame(rows({0: 1e-2, 1: 1e-1, 2: None}, STEPS)))
    (row,) = table.to_dict("records")
    assert (row["attack"], row["batch_size"], row["defense"], row["param"]) == ("grnn", 1, "gaussian", "sigma")
    # success rate over seeds: 3/3 below 0.01, 2/3 at 0.01, 1/3 at 0.1 (< 0.5): breaks at 0.1
    assert row["breaking_strength"] == 0.1 and row["strength_low"] == 1e-2
    assert (row["seed_min"], row["seed_max"], row["seeds"], row["broken_seeds"]) == (1e-2, 0.1, 3, 2)
    assert row["model_acc"] == pytest.approx(0.2) and row["trials"] == 12


def test_the_dp_budget_at_the_breaking_strength_is_reported() -> None:
    """A DP-SGD chain's rows carry the epsilon its training spent (utility_dp_epsilon): the table gives its mean
    at the breaking strength; rows without it leave the column empty."""
    table = breaking_points(pd.DataFrame([{**r, "utility_dp_epsilon": 1.0 / r["defense.sigma"]}
                                          for r in rows({0: 1e-2, 1: 1e-1, 2: None}, STEPS)]))  # fmt: skip
    assert table["utility_dp_epsilon"].tolist() == [pytest.approx(10.0)]  # at sigma 0.1
    assert breaking_points(pd.DataFrame(rows({0: 1e-2}, STEPS)))["utility_dp_epsilon"].isna().all()


def test_rate_picks_the_order_statistic() -> None:
    df = pd.DataFrame(rows({0: 1e-2, 1: 1e-1, 2: 1.0}, STEPS))
    assert breaking_points(df, rate=0.9).loc[0, "breaking_strength"] == 1e-2  # first seed broken: 2/3 < 0.9
    assert breaking_points(df, rate=0.2).loc[0, "breaking_strength"] == 1.0  # only when all are broken


def test_unbroken_and_always_broken() -> None:
    never = breaking_points(pd.DataFrame(rows({0: None}, STEPS))).loc[0]
    assert never["breaking_strength"] is None and never["strength_low"] == 1.0 and never["broken_seeds"] == 0
    always = breaking_points(pd.DataFrame(rows({0: 1e-4}, STEPS))).loc[0]
    assert always["breaking_strength"] == 1e-3 and always["strength_low"] is None


def test_noise_below_the_break_does_not_move_it() -> None:
    data = rows({0: 1e-1}, STEPS)
    data[0]["psnr"] = 5.0  # one unlucky failure at the weakest strength: the break is where failures stay
    assert breaking_points(pd.DataFrame(data)).loc[0, "breaking_strength"] == 0.1


def test_searched_rows_with_scattered_strengths_and_failed_rows() -> None:
    data = rows({0: 0.05}, [0.003, 0.02, 0.04, 0.06, 0.5])
    data.append({**data[0], "status": "FAILED", "psnr": None, "defense.sigma": 0.001})
    row = breaking_points(pd.DataFrame(data)).loc[0]
    assert row["breaking_strength"] == 0.06 and row["strength_low"] == 0.04 and row["trials"] == 5


def test_weaker_is_larger_for_quantize_and_groups_split_by_batch_size() -> None:
    data = []
    for batch, breaks_below in [(1, 4), (4, 8)]:
        for bits in [2, 4, 6, 8]:
            data.append({
                "status": "COMPLETE", "attack": "dlg", "batch_size": batch, "defense": "quantize",
                "defense.bits": bits, "seed": 0, "psnr": 10.0 if bits <= breaks_below else 30.0, "success_psnr": 20.0,
            })  # fmt: skip
    table = breaking_points(pd.DataFrame(data)).set_index("batch_size")
    assert table.loc[1, "breaking_strength"] == 4 and table.loc[1, "strength_low"] == 6
    assert table.loc[4, "breaking_strength"] == 8 and math.isnan(table.loc[4, "strength_low"])


def test_defenses_without_a_strength_are_left_out() -> None:
    df = pd.DataFrame([{"status": "COMPLETE", "attack": "grnn", "batch_size": 1, "defense": "none", "seed": 0,
                        "psnr": 30.0, "success_psnr": 20.0}])  # fmt: skip
    assert breaking_points(df).empty


def test_one_grid_step() -> None:
    assert grid_position(0.05, STEPS) == 2 and grid_position(None, STEPS) == 4 and grid_position(1e-3, STEPS) == 0
    assert within_one_step(0.05, 0.1, STEPS) and within_one_step(1.0, 0.1, STEPS) and within_one_step(1e-2, 0.1, STEPS)
    assert not within_one_step(5e-3, 0.1, STEPS) and not within_one_step(None, 0.1, STEPS)
    assert within_one_step(None, None, STEPS) and within_one_step(1.0, None, STEPS) and not within_one_step(0.5, None, STEPS)
    assert within_one_step(4, 2, [2, 4, 6, 8], direction=-1) and not within_one_step(8, 2, [2, 4, 6, 8], direction=-1)
