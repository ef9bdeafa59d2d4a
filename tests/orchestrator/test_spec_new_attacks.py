"""Sweep specs name the imprint and GradInversion attacks and their victims like any others."""

from __future__ import annotations

from pathlib import Path

import pytest

from grnn_engine import run_trial
from orchestrator.spec import SpecError, load_spec

IMPRINT = """
name: imprint_unit
data: {dataset: digits, image_size: 32, split: test}
grid:
  victim: [{name: imprint, params: {bins: [16, 32], brightness_mean: 0.306, brightness_std: 0.034}}]
  batch_size: [8]
  defense: [{name: none}]
  attack: [{name: imprint}]
  seed: [0]
"""

GRADINVERSION = """
name: gradinversion_unit
data: {dataset: digits, image_size: 16, split: test}
grid:
  victim: [{name: resnet20, params: {activation: relu, bn_mode: train}}]
  batch_size: [1]
  defense: [{name: none}]
  attack: [{name: gradinversion, params: {iterations: 2, bn_weight: 0.1}}]
  seed: [0]
"""


def _load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return load_spec(path)


def test_imprint_spec_expands_and_its_cells_run(tmp_path: Path) -> None:
    cells = _load(tmp_path, IMPRINT).cells()
    assert sorted(c.victim_params["bins"] for c in cells) == [16, 32]
    result = run_trial(cells[0])
    assert result.status == "COMPLETE" and len(result.metrics["psnr_per_image"]) == 8


def test_gradinversion_spec_expands_and_its_cell_runs(tmp_path: Path) -> None:
    (cell,) = _load(tmp_path, GRADINVERSION).cells()
    assert cell.victim_params == {"activation": "relu", "bn_mode": "train"}
    assert run_trial(cell).status == "COMPLETE"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("bn_mode: train", "bn_mode: trian", "unknown bn_mode 'trian'"),
        ("bn_weight: 0.1", "bn_weight: -1", "bn_weight must be a finite number >= 0"),
    ],
)
def test_bad_values_are_spec_errors(tmp_path: Path, old: str, new: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        _load(tmp_path, GRADINVERSION.replace(old, new))


def test_imprint_bad_bins_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="bins=1 is invalid for victim 'imprint'"):
        _load(tmp_path, IMPRINT.replace("bins: [16, 32]", "bins: [1]"))
