"""A user's own victim model by import path: built, checked, attacked and content-addressed like a
registered one, with one-sentence errors for every way the path or the model can be wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grnn_engine import VICTIMS, ConfigError, TrialSpec, create_victim, run_trial
from grnn_engine.user_victims import to_victim_channels
from grnn_engine.victims import victim_fingerprint

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


@pytest.fixture(autouse=True)
def user_models_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(HERE))


def test_factory_gets_sizes_and_seed_fixes_the_weights() -> None:
    a = create_victim("user_models:GreyNet", num_classes=7, image_size=12, seed=3, width=2)
    b = create_victim("user_models:GreyNet", num_classes=7, image_size=12, seed=3, width=2)
    c = create_victim("user_models:GreyNet", num_classes=7, image_size=12, seed=4, width=2)
    assert a.head.out_features == 7 and a.conv.out_channels == 2 and not a.training
    assert torch.equal(a.conv.weight, b.conv.weight)
    assert not torch.equal(a.conv.weight, c.conv.weight)


def test_registry_lists_the_factory_params() -> None:
    assert "user_models:GreyNet" in VICTIMS
    assert set(VICTIMS.parameters("user_models:GreyNet")) == {"num_classes", "image_size", "width"}


@pytest.mark.parametrize(
    ("name", "params", "num_classes", "words"),
    [
        ("no_such_module_xyz:net", {}, 10, "module 'no_such_module_xyz' cannot be imported"),
        ("user_models:GreyNett", {}, 10, "has no attribute 'GreyNett' (did you mean 'GreyNet'?)"),
        ("user_models:NOT_CALLABLE", {}, 10, "is a int, not a callable"),
        ("user_models:broken", {}, 10, "raised ValueError when called with num_classes=10: cannot build"),
        ("user_models:not_a_model", {}, 10, "returned a str; allowed: a torch.nn.Module"),
        ("user_models:fixed_ten_classes", {}, 40, "returns (1, 10) for a batch of shape (1, 3, 16, 16), but the data has 40"),
        ("user_models:fixed_ten_classes", {}, 10, "cannot take 20x20 images"),
        ("user_models:GreyNet", {"depth": 2}, 10, "unknown parameter 'depth'"),
        ("user_models:", {}, 10, "is not a valid import path"),
    ],
)
def test_bad_models_are_one_sentence(name: str, params: dict, num_classes: int, words: str) -> None:
    size = 20 if words.startswith("cannot take") else 16  # fixed_ten_classes is built for 16x16 only
    with pytest.raises(ConfigError) as err:
        create_victim(name, num_classes=num_classes, image_size=size, seed=0, **params)
    message = str(err.value)
    assert words in message, message
    assert "\n" not in message


def test_sizes_are_not_victim_params() -> None:
    with pytest.raises(ConfigError, match="'num_classes' is set from the dataset and the sweep"):
        victim_fingerprint("user_models:GreyNet", {"num_classes": 3}, 16)


def test_grey_model_is_attacked_on_one_channel(one_torch_thread: None) -> None:
    spec = TrialSpec(attack="grnn", attack_params={"iterations": 30}, victim="user_models:GreyNet",
                     victim_params={"width": 2}, dataset="digits", image_size=16, batch_size=2, eval_every=10,
                     victim_fingerprint=victim_fingerprint("user_models:GreyNet", {"width": 2}, 16))  # fmt: skip
    result = run_trial(spec)
    assert result.status == "COMPLETE", result.error
    row = result.to_row()
    assert row["victim"] == "user_models:GreyNet" and row["victim.width"] == 2
    assert row["victim_fingerprint"] == spec.victim_fingerprint
    assert len(row["psnr_per_image"]) == 2 and row["label_acc"] == 1.0


def test_colour_data_is_refused_for_a_grey_model() -> None:
    colour = torch.rand(2, 3, 8, 8)
    with pytest.raises(ConfigError, match="takes 1-channel images but the data is in colour"):
        to_victim_channels(colour, 1, "user_models:GreyNet")
    grey = colour[:, :1].expand(-1, 3, -1, -1)
    assert to_victim_channels(grey, 1, "v").shape == (2, 1, 8, 8)
    assert to_victim_channels(colour, 3, "v") is colour


def test_fingerprint_addresses_the_model_not_the_name() -> None:
    narrow = victim_fingerprint("user_models:GreyNet", {"width": 2}, 16)
    assert narrow == victim_fingerprint("user_models:GreyNet", {"width": 2}, 16)
    assert narrow != victim_fingerprint("user_models:GreyNet", {"width": 3}, 16)
    assert victim_fingerprint("lenet", {}, 32) is None
    base = TrialSpec(victim="user_models:GreyNet")
    assert base.key() != TrialSpec(victim="user_models:GreyNet", victim_fingerprint=narrow).key()
    # Registered victims: the field is left out of the canonical form, so their keys are as before.
    assert "victim_fingerprint" not in TrialSpec().canonical()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "grnn_engine", *args, "--no-progress"], capture_output=True,
                          text=True, env=env, timeout=600)  # fmt: skip


def test_one_trial_command_takes_an_import_path() -> None:
    done = _cli("--victim", "user_models:colour_net", "--dataset", "digits", "--image-size", "12",
                "--iterations", "5", "--eval-every", "5")  # fmt: skip
    assert done.returncode == 0, done.stderr
    line = json.loads(done.stdout)
    assert line["victim"] == "user_models:colour_net" and len(line["victim_fingerprint"]) == 16
    bad = _cli("--victim", "user_models:GreyNett", "--iterations", "1")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "did you mean 'GreyNet'" in bad.stderr


def test_fl_stages_of_a_user_model_are_keyed_by_its_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    from grnn_engine.fl_settings import FLSettings
    from grnn_engine.stage_cache import stage_key

    settings = FLSettings.from_dict({})
    registered = stage_key("digits", 16, "lenet", {}, settings, 0, 1)
    narrow = stage_key("digits", 16, "user_models:GreyNet", {"width": 2}, settings, 0, 1)
    import user_models

    class Wider(user_models.GreyNet):  # the user edits their model file: same name, other weights
        def __init__(self, num_classes: int, image_size: int, width: int = 4) -> None:
            super().__init__(num_classes, image_size, width + 1)

    monkeypatch.setattr(user_models, "GreyNet", Wider)
    from grnn_engine.victims import _fingerprint_of

    _fingerprint_of.cache_clear()
    assert stage_key("digits", 16, "user_models:GreyNet", {"width": 2}, settings, 0, 1) != narrow
    assert stage_key("digits", 16, "lenet", {}, settings, 0, 1) == registered


def _spec(victim: dict) -> dict:
    return {"name": "mine", "data": {"dataset": "digits", "image_size": 12},
            "grid": {"victim": [victim], "batch_size": [1], "seed": 1,
                     "attack": [{"name": "grnn", "params": {"iterations": 5}, "eval_every": 5}]}}


def test_sweep_spec_takes_an_import_path(tmp_path: Path) -> None:
    import yaml

    from orchestrator.spec import SpecError, load_spec

    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(_spec({"name": "user_models:GreyNet", "params": {"width": [2, 3]}})))
    cells = load_spec(path).cells()
    assert [c.victim_params["width"] for c in cells] == [2, 3]
    assert cells[0].victim_fingerprint == victim_fingerprint("user_models:GreyNet", {"width": 2}, 12)
    assert cells[0].key() != cells[1].key()
    path.write_text(yaml.safe_dump(_spec({"name": "user_models:GreyNett"})))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert "grid.victim[0].name" in str(err.value) and "did you mean 'GreyNet'" in str(err.value)
    path.write_text(yaml.safe_dump(_spec({"name": "user_models:GreyNet", "params": {"depth": 2}})))
    with pytest.raises(SpecError, match=r"grid.victim\[0\].params.depth: unknown parameter"):
        load_spec(path)
