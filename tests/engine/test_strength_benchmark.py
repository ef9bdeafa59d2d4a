"""benchmarks/strength.py: the attack settings it is given and the JSON it prints (a real, short run)."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
from types import ModuleType

import pytest

from grnn_engine.errors import ConfigError

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "strength.py"


@pytest.fixture(scope="module")
def strength() -> ModuleType:
    spec = importlib.util.spec_from_file_location("strength", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_setting_is_a_preset_plus_parameters_recorded_under_its_label(strength: ModuleType) -> None:
    assert strength.parse_attack("dlg") == ("dlg", "default", {})
    assert strength.parse_attack("grnn:strong") == ("grnn", "strong", {"preset": "strong"})
    assert strength.parse_attack("grnn:prior:prior=patch_gmm,prior_weight=0.03@gmm") == (
        "grnn", "gmm", {"preset": "prior", "prior": "patch_gmm", "prior_weight": 0.03})
    assert strength.parse_attack("dlg::iterations=5@short") == ("dlg", "short", {"iterations": 5})


@pytest.mark.parametrize(("texts", "names"), [
    (["grnn:prior:prior=patch_gmm"], "needs a label"),
    (["grnn:prior:prior=patch_gmm@patch_gmm"], "'patch_gmm'"),
    (["grnn:prior:prior"], "KEY=VALUE"),
    (["grnn:prior:bogus=1@x"], "'bogus'"),
    (["grnn:prior", "grnn:paper:iterations=5@prior"], "one label"),
])
def test_a_bad_setting_is_refused_before_any_trial(strength: ModuleType, texts: list[str], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        strength.attack_settings(texts)


def test_the_headline_gives_a_labelled_setting_its_own_evaluation_ratio(strength: ModuleType) -> None:
    figures = {"grnn_gmm_lenet_b1_psnr": 28.9, "grnn_paper_lenet_b1_psnr": 17.2, "grnn_gmm_lenet_b1_mnist_psnr": 38.0}
    params = {"gmm": {"preset": "prior", "prior": "patch_gmm"}, "paper": {"preset": "paper"}}
    assert strength.headline(figures, params) == {
        "gmm_b1_psnr": 28.9, "gmm_eval_ratio": 3.0, "paper_b1_psnr": 17.2, "paper_eval_ratio": 1.0}


def test_a_labelled_setting_runs_and_is_reported_under_its_label(
        strength: ModuleType, capsys: pytest.CaptureFixture[str], one_torch_thread: None) -> None:
    code = strength.main(["--datasets", "digits", "--victims", "lenet", "--batch-sizes", "1", "--fl-rounds", "0",
                          "--batches", "2", "--attacks", "grnn:paper:iterations=4@short", "grnn:paper:iterations=8@long"])
    assert code == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for label in ("short", "long"):
        assert 0 < figures[f"grnn_{label}_lenet_b1_digits_psnr"] < 100
        assert 0 <= figures[f"grnn_{label}_lenet_b1_digits_label_acc"] <= 1
    assert figures["grnn_short_lenet_b1_digits_psnr"] != figures["grnn_long_lenet_b1_digits_psnr"]
    # Two batches: the standard error of their mean PSNR is half the distance between them; it needs both.
    assert 0 < figures["grnn_short_lenet_b1_digits_psnr_se"] < 50


def test_the_psnr_standard_error_is_the_batches_spread_over_root_n(strength: ModuleType) -> None:
    assert strength.standard_error([20.0, 24.0, 26.0, 30.0]) == pytest.approx(4.1633320 / 2)  # stdev / sqrt(4)
    assert strength.standard_error([17.0, 19.0]) == pytest.approx(1.0)
    assert math.isnan(strength.standard_error([17.0]))


def test_a_bad_setting_exits_2_in_one_sentence(strength: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert strength.main(["--attacks", "grnn:prior:bogus=1@x"]) == 2
    assert "unknown parameter 'bogus'" in capsys.readouterr().err
