"""run_trial end to end on real digits, the client update, and the one-trial command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from grnn_engine import ATTACKS, TrialSpec, run_trial
from grnn_engine.__main__ import main
from grnn_engine.attacks import grnn
from grnn_engine.data import load_dataset, select_batch
from grnn_engine.errors import ConfigError
from grnn_engine.trial import client_update
from grnn_engine.victims import create_victim


def _exit_code(argv: list[str]) -> int | str | None:
    """main()'s exit status, whether it returns it or argparse raises SystemExit with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


SMALL = TrialSpec(attack="grnn", attack_params={"iterations": 20}, batch_size=2, eval_every=10)


def test_run_trial_returns_a_complete_scored_row() -> None:
    result = run_trial(SMALL)
    row = result.to_row()
    assert row["status"] == "COMPLETE" and row["error"] is None
    assert row["trial_key"] == SMALL.key()
    assert row["attack"] == "grnn" and row["attack.iterations"] == 20
    assert row["iterations"] == 20 and row["s_per_iter"] > 0 and row["wall_s"] >= row["s_per_iter"] * 20
    assert len(row["psnr_per_image"]) == 2 and sorted(row["matching"]) == [0, 1]
    assert row["psnr"] == pytest.approx(sum(row["psnr_per_image"]) / 2)
    assert json.loads(row["history_json"])[-1]["iteration"] == 20
    assert row["device"] == "cpu" and row["torch_version"] == torch.__version__
    png = Image.open(__import__("io").BytesIO(result.image_png))
    assert png.size == (2 * 34 + 2, 2 * 34 + 2)  # two rows (truth, reconstruction) of two 32px images


@pytest.mark.parametrize(("attack", "params", "best"), [
    ("grnn", {"iterations": 20}, False),  # the paper's GRNN returns its last iterate
    ("grnn", {"preset": "strong", "iterations": 10, "refine_iterations": 10}, True),
    ("idlg", {"iterations": 4}, True),
])
def test_convergence_curve_ends_at_the_trial_score(attack: str, params: dict, best: bool) -> None:
    """The history's last PSNR is the trial's: an attack returning its best iterate ends it with that answer."""
    row = run_trial(TrialSpec(attack=attack, attack_params=params, batch_size=2, eval_every=5)).to_row()
    *iterates, last = json.loads(row["history_json"])
    assert last["psnr"] == pytest.approx(row["psnr"], abs=1e-4)
    assert last.get("answer") == (1 if best else None) and not any("answer" in h for h in iterates)
    if best:  # one more entry, at the last iteration
        assert last["iteration"] == iterates[-1]["iteration"]


def test_run_trial_is_reproducible() -> None:
    a, b = run_trial(SMALL).to_row(), run_trial(SMALL).to_row()
    assert a["psnr_per_image"] == b["psnr_per_image"]
    assert a["labels_recovered"] == b["labels_recovered"]


def test_trial_key_ignores_where_it_runs_but_not_what_it_computes() -> None:
    assert TrialSpec(data_root="/a", device="cpu").key() == TrialSpec(data_root="/b", device="auto").key()
    assert TrialSpec(seed=1).key() != TrialSpec(seed=2).key()
    assert TrialSpec(attack_params={"lr": 1e-3}).key() != TrialSpec(attack_params={"lr": 2e-3}).key()


def test_a_presets_revision_changes_the_keys_of_its_cells_and_no_others(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(grnn.PRESET_REVISIONS, "prior", 0)
    prior, paper = TrialSpec(attack_params={"preset": "prior"}), TrialSpec(attack_params={"preset": "paper"})
    prior_key, paper_key = prior.key(), paper.key()
    assert "attack_revision" not in prior.canonical()  # revision 0: keys as they were before revisions existed
    monkeypatch.setitem(grnn.PRESET_REVISIONS, "prior", 2)
    assert prior.canonical()["attack_revision"] == 2 and prior.key() != prior_key
    assert paper.key() == paper_key and "attack_revision" not in TrialSpec(attack="dlg").canonical()
    assert "attack_revision" not in TrialSpec(attack_params={"preset": ["prior"]}).canonical()  # validation's to refuse


def test_a_cell_knows_the_keys_of_its_earlier_revisions(monkeypatch: pytest.MonkeyPatch) -> None:
    prior = TrialSpec(attack_params={"preset": "prior"})
    keys = []
    for revision in (0, 1, 2):
        monkeypatch.setitem(grnn.PRESET_REVISIONS, "prior", revision)
        keys.append(prior.key())
    assert len(set(keys)) == 3 and prior.earlier_keys() == keys[:2]  # at revision 2: those of 0 and 1
    assert TrialSpec(attack_params={"preset": "paper"}).earlier_keys() == []


def test_fedsgd_update_is_the_batch_gradient() -> None:
    data = load_dataset("digits", image_size=32)
    images, labels, _ = select_batch(data, 3, 0)
    model = create_victim("lenet", num_classes=10, seed=0)
    update = client_update(model, images, labels, "fedsgd", {})
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    expected = torch.autograd.grad(loss, list(model.parameters()))
    assert all(torch.allclose(u, e) for u, e in zip(update.tensors, expected, strict=True))
    assert update.as_gradient() is update.tensors


def test_fedavg_update_of_one_step_implies_the_gradient() -> None:
    data = load_dataset("digits", image_size=32)
    images, labels, _ = select_batch(data, 2, 0)
    model = create_victim("lenet", num_classes=10, seed=0)
    sgd = client_update(model, images, labels, "fedsgd", {})
    avg = client_update(model, images, labels, "fedavg", {"local_steps": 1, "local_lr": 0.05})
    assert avg.kind == "fedavg"
    assert all(torch.allclose(a, g, atol=1e-6) for a, g in zip(avg.as_gradient(), sgd.tensors, strict=True))
    with pytest.raises(ConfigError, match="local_stepz"):
        client_update(model, images, labels, "fedavg", {"local_stepz": 2})


def test_defense_noise_does_not_change_the_attack_start() -> None:
    # The attack's randomness is its own stream: with sigma 0 the gaussian defense changes nothing.
    base = run_trial(SMALL).to_row()
    zero = run_trial(TrialSpec(**{**SMALL.__dict__, "defense": "gaussian", "defense_params": {"sigma": 0.0}})).to_row()
    assert zero["psnr_per_image"] == base["psnr_per_image"]


def test_cli_prints_one_json_line_and_writes_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--attack", "grnn", "--iterations", "10", "--batch-size", "1", "--eval-every", "5",
                 "--out", str(tmp_path), "--attack-param", "lr=2e-4"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(out) == 1
    line = json.loads(out[0])
    for key in ("psnr", "ssim", "mse", "label_acc", "success", "psnr_per_image", "labels_true",
                "labels_recovered", "wall_s", "iterations", "s_per_iter", "device", "versions"):
        assert key in line
    assert line["attack.lr"] == 2e-4 and line["iterations"] == 10
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["psnr"] == line["psnr"] and len(saved["history"]) == 2
    assert Image.open(tmp_path / "reconstruction.png").size[1] == 2 * 34 + 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--attack", "grn"], "unknown attack 'grn' (did you mean 'grnn'?)"),
        (["--victim", "lenett"], "unknown victim 'lenett'"),
        (["--batch-size", "0"], "--batch-size must be >= 1 (got 0)"),
        (["--dataset", "cifar10", "--data-root", "/nonexistent/x"], "/nonexistent/x"),
        (["--victim", "lenet", "--image-size", "12"], "12"),
        (["--attack-param", "nonsense"], "KEY=VALUE"),
        (["--batch-size", "four"], "invalid int value: 'four'"),
        (["--defense", "gausian"], "did you mean 'gaussian'"),
    ],
)
def test_cli_bad_input_is_one_clear_line_exit_2(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _exit_code(["--iterations", "2", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert needle in lines[0]


def test_cli_bad_input_in_a_real_process_has_no_traceback() -> None:
    proc = subprocess.run([sys.executable, "-m", "grnn_engine", "--attack", "grn"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    known = ", ".join(ATTACKS.names())
    assert proc.stderr.strip() == f"error: unknown attack 'grn' (did you mean 'grnn'?); known: {known}"


def test_cli_help_documents_every_option() -> None:
    proc = subprocess.run([sys.executable, "-m", "grnn_engine", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for option in ("--attack", "--victim", "--dataset", "--data-root", "--split", "--batch-size", "--index",
                   "--iterations", "--attack-param", "--victim-param", "--seed", "--out", "--fl-round", "--update",
                   "--defense", "--defense-param"):
        assert option in proc.stdout
