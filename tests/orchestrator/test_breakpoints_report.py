"""The report's breaking-point section: a real breaking-point search on digits (embedded Ray) gets a
"Breaking points" table whose values are the rows' own; a grid-only sweep gets none; the uncertainty of a
strength never broken, or broken everywhere, is spelled out; searched rows without a spec are a note."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from orchestrator import report, sweep
from orchestrator.report import report_part
from orchestrator.results import load

THRESHOLD = 8.0
SEARCH = {
    "method": "optuna",
    "params": {"defense.params.sigma": {"type": "loguniform", "low": 1.0e-4, "high": 1.0}},
    "breaking_point": {"threshold": THRESHOLD},
    "num_samples": 3,
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, ray_session: None, make_spec: Any) -> dict[str, Path]:
    """One tiny searched sweep (3 GRNN trials on real digits) and one tiny grid sweep (2 trials)."""
    tmp = tmp_path_factory.mktemp("bp_report")
    results = tmp / "results"
    searched = make_spec(
        tmp / "search.yaml", name="bp-search", search=SEARCH, grid={"defense": ["gaussian"], "seed": [0]}
    )
    sweep.run([str(searched), "--results", str(results)])
    grid = make_spec(
        tmp / "grid.yaml", name="bp-grid",
        grid={"defense": [{"name": "gaussian", "params": {"sigma": [1.0e-3, 1.0]}}], "seed": [0]},
    )  # fmt: skip
    sweep.run([str(grid), "--results", str(results)])
    return {"search": results / "bp-search", "grid": results / "bp-grid"}


def expected_break(rows: pd.DataFrame) -> tuple[float | None, float | None]:
    """(passed, broken) straight from one seed's rows: the weakest sigma from which every stronger one is
    below the threshold, and the sigma tested just before it."""
    ordered = rows.sort_values("defense.sigma")
    broken = list(ordered["psnr"] < THRESHOLD)
    sigmas = list(ordered["defense.sigma"])
    first = len(broken)
    while first > 0 and broken[first - 1]:
        first -= 1
    return (sigmas[first - 1] if first > 0 else None), (sigmas[first] if first < len(sigmas) else None)


def test_a_searched_sweep_gets_the_table_with_the_rows_values(folders: dict[str, Path]) -> None:
    df = load(folders["search"])
    assert len(df) == 3 and df["search_id"].notna().all() and (df["status"] == "COMPLETE").all()
    written = report.write_report(folders["search"], fmt="md")
    markdown = written.markdown.read_text(encoding="utf-8")  # type: ignore[union-attr]
    assert "## Breaking points" in markdown and f"below {THRESHOLD:g} dB" in markdown
    assert "Breaking points" in written.html.read_text(encoding="utf-8")
    # the section sits right after the success table
    assert (
        markdown.index("## Success table")
        < markdown.index("## Breaking points")
        < markdown.index("## Failures")
    )

    (part,) = report_part(folders["search"], df)
    assert part.table is not None
    (row,) = part.table.to_dict("records")
    passed, broken = expected_break(df)
    assert (row["attack"], row["batch size"], row["defense"]) == ("grnn", 1, "gaussian (sigma)")
    assert row["trials"] == 3 and row["seeds broken"] == f"{int(broken is not None)}/1"
    if broken is not None:
        at = df[df["defense.sigma"] == broken].iloc[0]
        assert row["breaking strength"] == f"{broken:.4g}"
        assert row["model accuracy there"] == f"{at['model_acc']:.4g}"
        assert row["metric there"] == f"{at['psnr']:.4g}"
        low = "not tested below" if passed is None else f"{passed:.4g}"
        assert row["bracket (passed, broken]"] == f"({low}, {broken:.4g}]"
    else:
        assert row["breaking strength"] == f"not broken (> {passed:.4g})"
    assert f"| {row['breaking strength']} |" in markdown


def test_a_grid_sweep_has_no_breaking_point_section(folders: dict[str, Path]) -> None:
    df = load(folders["grid"])
    assert len(df) == 2 and report_part(folders["grid"], df) == []
    written = report.write_report(folders["grid"], fmt="md")
    assert "Breaking points" not in written.markdown.read_text(encoding="utf-8")  # type: ignore[union-attr]
    assert "Breaking points" not in written.html.read_text(encoding="utf-8")


SPEC = """\
name: unit
data: {dataset: digits}
grid:
  victim: [lenet]
  defense: [gaussian]
  attack: [{name: grnn, params: {iterations: 5}}]
  seed: 2
search:
  method: optuna
  params: {defense.params.sigma: {type: loguniform, low: 1.0e-4, high: 1.0}}
  breaking_point: {threshold: 8.0}
  num_samples: 3
"""


def rows(psnr_by_seed: dict[int, list[float]]) -> pd.DataFrame:
    sigmas = [1e-3, 1e-2, 1e-1]
    return pd.DataFrame([
        {"status": "COMPLETE", "attack": "grnn", "batch_size": 1, "defense": "gaussian", "defense.sigma": s,
         "seed": seed, "psnr": p, "success_psnr": 20.0, "model_acc": 0.25, "search_id": f"study-{seed}"}
        for seed, values in psnr_by_seed.items() for s, p in zip(sigmas, values, strict=True)
    ])  # fmt: skip


def table_of(tmp_path: Path, df: pd.DataFrame) -> dict[str, Any]:
    (tmp_path / "spec.yaml").write_text(SPEC, encoding="utf-8")
    (part,) = report_part(tmp_path, df)
    assert part.table is not None and len(part.table) == 1
    return part.table.iloc[0].to_dict()


def test_two_seeds_break_at_the_stronger_one(tmp_path: Path) -> None:
    row = table_of(tmp_path, rows({0: [12.0, 5.0, 5.0], 1: [12.0, 12.0, 5.0]}))
    assert row["breaking strength"] == "0.1" and row["bracket (passed, broken]"] == "(0.01, 0.1]"
    assert row["per-seed breaking strengths"] == "0.01 to 0.1" and row["seeds broken"] == "2/2"
    assert row["model accuracy there"] == "0.25" and row["metric there"] == "5"


def test_never_broken_and_broken_everywhere_say_so(tmp_path: Path) -> None:
    never = table_of(tmp_path, rows({0: [12.0, 12.0, 12.0], 1: [12.0, 12.0, 12.0]}))
    assert never["breaking strength"] == "not broken (> 0.1)" and never["seeds broken"] == "0/2"
    assert never["per-seed breaking strengths"] == "—" and never["model accuracy there"] == "—"
    always = table_of(tmp_path, rows({0: [5.0, 5.0, 5.0], 1: [5.0, 5.0, 5.0]}))
    assert (
        always["breaking strength"] == "0.001"
        and always["bracket (passed, broken]"] == "(not tested below, 0.001]"
    )


def test_searched_rows_without_a_spec_are_a_note(tmp_path: Path) -> None:
    (part,) = report_part(tmp_path, rows({0: [12.0, 5.0, 5.0]}))
    assert part.table is None and len(part.notes) == 1
    assert "no spec.yaml" in part.notes[0] and "threshold" in part.notes[0]
