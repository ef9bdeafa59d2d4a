"""The report's face re-identification section on a real, small faces sweep (GRNN on LeNet, AT&T faces,
identifier trained on the gallery), written with the project's ledger as a sweep would: the table's rates
are the photo-weighted means of the rows, the gallery shows every attacked photo with its matched
identity, and a sweep without reid gets no such section. Needs att_faces ($GRNN_DATA_ROOT, else
../shared/data); skips without it."""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest
import torch
from PIL import Image

from grnn_engine import run_trial
from orchestrator import report
from orchestrator.results import Ledger, load
from orchestrator.spec import parse_spec

_SHARED = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"
DATA_ROOT = os.environ.get("GRNN_DATA_ROOT") or (str(_SHARED) if _SHARED.is_dir() else None)
HAS_FACES = DATA_ROOT is not None and (pathlib.Path(DATA_ROOT) / "att_faces").is_dir()
pytestmark = pytest.mark.skipif(not HAS_FACES, reason="att_faces needs GRNN_DATA_ROOT (../shared/data)")

DEFENSES_FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "data" / "report_defenses"
SPEC: dict[str, Any] = {
    "name": "faces_mini",
    "data": {"dataset": "att_faces", "image_size": 32, "split": "test"},  # root: $GRNN_DATA_ROOT
    "grid": {
        "victim": ["lenet"],
        "fl_round": [0],
        "batch_size": [1, 2],
        "defense": [{"name": "none"}, {"name": "gaussian", "params": {"sigma": 0.01}}],
        "attack": [{"name": "grnn", "params": {"iterations": 30}, "eval_every": 10}],
        "seed": 2,
    },
    "reid": {"name": "trained", "params": {"epochs": 12}},
}


@pytest.fixture(scope="module")
def faces_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The data where the sweep and the report look for it; identifiers cached in a temporary folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRNN_DATA_ROOT", str(DATA_ROOT))
        patch.setenv("GRNN_CACHE_DIR", str(tmp_path_factory.mktemp("grnn_cache")))
        yield


@pytest.fixture(scope="module")
def faces_results(tmp_path_factory: pytest.TempPathFactory, faces_env: None) -> pathlib.Path:
    """A results folder as `python -m orchestrator.sweep` leaves it: every cell run by run_trial and
    written through the ledger (8 trials; the identifier is trained once and cached)."""
    torch.set_num_threads(1)
    spec = parse_spec(SPEC, "faces_mini")
    folder = tmp_path_factory.mktemp("results") / spec.name
    ledger = Ledger(folder)
    ledger.write_spec(spec.to_yaml(), spec.spec_hash())
    for cell in spec.cells():
        result = run_trial(cell)
        assert result.status == "COMPLETE", result.error
        ledger.write_part(result.to_row(), result.image_png)
    ledger.compact()
    return folder


@pytest.fixture(scope="module")
def written(faces_results: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> report.Report:
    return report.write_report(faces_results, tmp_path_factory.mktemp("report"), "md")


def test_report_of_a_faces_sweep_has_the_reid_section_and_gallery(written: report.Report) -> None:
    gallery = written.folder / "faces_gallery_grnn.png"
    assert gallery in written.figures
    with Image.open(gallery) as img:
        img.load()
        assert img.width > 300 and img.height > 150
    html = written.html.read_text(encoding="utf-8")
    assert "<h2>Face re-identification</h2>" in html
    assert 'src="faces_gallery_grnn.png"' in html and "top-1 clean (ceiling)" in html
    md = written.markdown.read_text(encoding="utf-8") if written.markdown else ""
    assert "## Face re-identification" in md and "](faces_gallery_grnn.png)" in md
    assert not any(n.startswith("Face re-identification") for n in written.notes)


def test_reid_table_rates_are_photo_weighted_means_of_the_rows(faces_results: pathlib.Path) -> None:
    raw = pd.read_parquet(faces_results / "trials.parquet")
    raw["label"] = [
        "none" if d == "none" else f"gaussian sigma={s:g}"
        for d, s in zip(raw["defense"], raw["defense.sigma"], strict=True)
    ]
    table = report.reid_table(load(faces_results))
    assert table.index.names == ["attack", "victim", "batch", "defense"]
    assert [(b, d) for _, _, b, d in table.index] == [
        (1, "none"),
        (1, "gaussian sigma=0.01"),
        (2, "none"),
        (2, "gaussian sigma=0.01"),
    ]
    for (_, _, batch, defense), shown in table.iterrows():
        rows = raw[(raw["batch_size"] == batch) & (raw["label"] == defense)]
        assert shown["photos"] == 2 * batch  # two seeds
        for name, column in (("top-1 attack", "reid_top1"), ("top-5 clean (ceiling)", "reid_clean_top5"),
                             ("top-1 noise (floor)", "reid_random_top1")):  # fmt: skip
            assert shown[name] == f"{rows[column].mean():.2f}"  # same batch size: equal weights
        per_image = [r for ranks in rows["reid_rank_per_image"] for r in ranks]
        assert shown["mean rank attack"] == f"{sum(per_image) / len(per_image):.1f}"


def test_gallery_shows_every_attacked_photo_at_the_smallest_batch(faces_results: pathlib.Path) -> None:
    df = load(faces_results)
    fig = report.reid_gallery_figure(faces_results, df)
    # 2 defenses x 2 seeds at batch 1, each tile three images: photo, reconstruction, matched identity.
    assert len(fig.axes) == 4 * 3
    single = df[df["batch_size"] == 1]
    hits = int(round(float(single["reid_top1"].sum())))
    suptitle = fig.get_suptitle()
    assert f"top-1 hit for {hits} of 4 photos" in suptitle and "batch 1" in suptitle
    verdicts = [ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()]
    assert len(verdicts) == 4 and sum(": hit" in v for v in verdicts) == hits
    assert all(re.search(r"^s\d+ seed \d: (hit|miss: s\d+, true rank \d+)", v) for v in verdicts)


def test_gallery_without_its_data_is_a_note_not_a_crash(
    faces_results: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRNN_DATA_ROOT", str(tmp_path / "nothing"))
    done = report.write_report(faces_results, tmp_path / "report")
    assert not any(p.name.startswith("faces_gallery") for p in done.figures)
    assert any("Gallery of grnn skipped: att_faces not found" in n for n in done.notes)
    assert "top-1 attack" in done.html.read_text(encoding="utf-8")  # the table needs no data


def test_report_without_reid_columns_has_no_faces_section(tmp_path: pathlib.Path) -> None:
    df = load(DEFENSES_FIXTURE)
    assert not report.has_reid(df)
    done = report.write_report(DEFENSES_FIXTURE, tmp_path, "md")
    assert not any(p.name.startswith("faces_gallery") for p in done.figures)
    assert "Face re-identification" not in done.html.read_text(encoding="utf-8")
    assert "Face re-identification" not in (
        done.markdown.read_text(encoding="utf-8") if done.markdown else ""
    )
    with pytest.raises(report.NotApplicable, match="without `reid`"):
        report.reid_table(df)
