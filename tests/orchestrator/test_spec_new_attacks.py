"""Sweep specs name the imprint and GradInversion attacks and their victims like any others, and a spec that
pairs one with a victim it cannot run on is refused when it is loaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from grnn_engine import run_trial
from orchestrator.spec import SpecError, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[2]

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


def _paired(attacks: list[dict], victims: list) -> dict:
    return {"name": "pairs", "data": {"dataset": "digits", "image_size": 16},
            "grid": {"victim": victims, "attack": attacks}}  # fmt: skip


GI = {"name": "gradinversion", "params": {"iterations": 2}}
RESNET = {"name": "resnet20", "params": {"bn_mode": "train"}}


@pytest.mark.parametrize(
    ("attacks", "victims", "path", "words"),
    [
        # gradinversion with lenet beside a BatchNorm victim: the grid would run it on lenet too
        ([{"name": "grnn"}, {"name": "dlg"}, GI], [RESNET, "lenet"], "grid.attack[2]",
         "attack 'gradinversion' cannot run on victim 'lenet' of grid.victim[1], and the grid runs every attack on "
         "every victim (got 'lenet'; allowed: victim 'resnet20' or 'resnet18' or a model of your own with "
         "BatchNorm layers)"),
        ([{"name": "imprint"}], ["resnet20"], "grid.attack[0]",
         "attack 'imprint' cannot run on victim 'resnet20' of grid.victim[0], and the grid runs every attack on "
         "every victim (got 'resnet20'; allowed: victim 'imprint')"),
        # a user's model is never the malicious server's imprint model: its name alone decides
        ([{"name": "imprint"}], ["user_models:GreyNet"], "grid.attack[0]",
         "attack 'imprint' cannot run on victim 'user_models:GreyNet' of grid.victim[0]"),
        # R-GAP inverts sigmoid convolutions without pooling: GRNN's LeNet (max-pools) is not one
        ([{"name": "grnn"}, {"name": "rgap"}], ["lenet_zhu", "lenet"], "grid.attack[1]",
         "attack 'rgap' cannot run on victim 'lenet' of grid.victim[1], and the grid runs every attack on "
         "every victim (got 'lenet'; allowed: victim 'lenet_zhu' or a model of your own of Conv2d and Linear "
         "layers with biases alternating with Sigmoid and ending in a Linear classifier)"),
    ],
)
def test_an_attack_on_a_victim_it_cannot_run_on_is_refused_by_name(
    attacks: list[dict], victims: list, path: str, words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(REPO / "tests" / "engine"))  # user_models.py
    with pytest.raises(SpecError) as err:
        parse_spec(_paired(attacks, victims), "pairs.yaml")
    message = str(err.value)
    assert err.value.path == path and message.startswith(f"pairs.yaml: {path}: ") and words in message, message
    assert "\n" not in message


def test_an_attack_that_checks_the_built_model_takes_a_users_model_by_import_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """R-GAP and GradInversion say what a user's model must be (`user_models`): its name passes at load, its
    trials check the built model."""
    monkeypatch.syspath_prepend(str(REPO / "tests" / "engine"))  # user_models.py
    spec = parse_spec(_paired([{"name": "rgap"}], ["lenet_zhu", "user_models:colour_net"]), "pairs.yaml")
    assert [v.name for v in spec.grid.victim] == ["lenet_zhu", "user_models:colour_net"]
    assert parse_spec(_paired([GI], ["user_models:BatchNormNet"]), "pairs.yaml").grid.attack[0].name == "gradinversion"


def test_a_batchnorm_attack_on_a_victim_built_without_batchnorm_is_refused_at_load(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(GRADINVERSION.replace("bn_mode: train", "bn_mode: train, norm: [batch, none]"))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert err.value.path == "grid.attack[0]"
    assert ("attack 'gradinversion' cannot run on victim 'resnet20' of grid.victim[0] with params {'activation': "
            "'relu', 'bn_mode': 'train', 'norm': 'none'}, which has no BatchNorm layers that keep running "
            "statistics") in str(err.value)


@pytest.mark.parametrize(("norms", "refused"), [(["batch", "none"], True), (["batch"], False)])
def test_a_searched_victim_param_that_removes_batchnorm_is_refused_at_load(
    tmp_path: Path, norms: list[str], refused: bool
) -> None:
    """A search over the victim's params may build it without BatchNorm: each value the search can give is
    checked at load, not left to fail trial by trial."""
    search = (f"search: {{method: optuna, params: {{victim.params.norm: {{type: categorical, values: "
              f"[{', '.join(norms)}]}}}}, objectives: [{{metric: psnr, direction: maximize}}], num_samples: 2}}\n")
    path = tmp_path / "spec.yaml"
    path.write_text(GRADINVERSION + search)
    if not refused:
        assert load_spec(path).search.params["victim.params.norm"].values == norms
        return
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert err.value.path == "grid.attack[0]"
    assert ("attack 'gradinversion' cannot run on victim 'resnet20' of grid.victim[0] with params {'activation': "
            "'relu', 'bn_mode': 'train', 'norm': 'none'} (searched: norm), which has no BatchNorm layers") in str(
        err.value
    )


def test_a_users_victim_passes_the_load_for_a_batchnorm_attack(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether a user's model has BatchNorm layers is known once it is built: its trials check it
    (tests/engine/test_gradinversion.py), the spec lets it through."""
    monkeypatch.syspath_prepend(str(REPO / "tests" / "engine"))
    spec = parse_spec(_paired([GI], [RESNET, "user_models:GreyNet", "user_models:BatchNormNet"]))
    assert [c.victim for c in spec.cells()] == ["resnet20", "user_models:GreyNet", "user_models:BatchNormNet"]


def test_the_sweep_command_refuses_the_pair_in_one_line_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "pairs.yaml"
    path.write_text(GRADINVERSION.replace("victim: [{name: resnet20,", "victim: [lenet, {name: resnet20,"))
    done = subprocess.run([sys.executable, "-m", "orchestrator.sweep", str(path), "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"error: {path}: grid.attack[0]: attack 'gradinversion' cannot run on victim 'lenet'")
