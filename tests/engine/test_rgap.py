"""R-GAP (Zhu and Blaschko 2021), the analytic single-image attack, on real images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from grnn_engine import ATTACKS, TrialSpec, fl, run_trial
from grnn_engine.attacks.base import SharedUpdate, victim_gradient
from grnn_engine.data import load_dataset, select_batch
from grnn_engine.errors import ConfigError
from grnn_engine.metrics import matched_psnr
from grnn_engine.victims import create_victim, victim_fingerprint

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HERE = Path(__file__).resolve().parent  # user_models.py: victims as a user writes them


def reconstruct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    grads = victim_gradient(model, list(model.parameters()), images, labels, create_graph=False)
    recon = ATTACKS.create("rgap").reconstruct(
        model, SharedUpdate(tuple(g.detach() for g in grads)), num_classes=10, batch_size=images.shape[0],
        image_shape=tuple(images.shape[1:]), generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    return recon.images


@pytest.mark.parametrize("seed", [0, 1])
def test_one_real_digit_comes_back_exactly_with_its_label(seed: int) -> None:
    """One image's gradient on DLG's LeNet determines the image: R-GAP solves for it (>= 40 dB, where
    the optimising attacks reach 15-30) and reads its label off the classifier."""
    result = run_trial(TrialSpec(attack="rgap", victim="lenet_zhu", dataset="digits", image_size=16, seed=seed))
    assert result.status == "COMPLETE"
    assert result.metrics["psnr"] >= 40.0
    assert result.metrics["label_acc"] == 1.0
    assert result.iterations == 1


def test_a_batch_is_read_as_one_image_and_scores_as_a_blend() -> None:
    """B = 4 breaks the premise: one estimate in every slot, far from each private image (< 20 dB)."""
    data = load_dataset("digits", split="test", image_size=16)
    images, labels, _ = select_batch(data, 4, 0)
    model = create_victim("lenet_zhu", num_classes=10, image_size=16, seed=0)
    recon = reconstruct(model, images, labels)
    assert recon.shape == images.shape
    assert torch.equal(recon[0], recon[3])
    assert matched_psnr(recon, images) < 20.0


def test_noise_on_the_gradient_costs_rgap_its_exactness() -> None:
    """The attack is exact for an exact gradient; Gaussian noise of 1e-3 on it (a defense) lowers the PSNR."""
    clean = run_trial(TrialSpec(attack="rgap", victim="lenet_zhu", dataset="digits", image_size=16))
    noisy = run_trial(TrialSpec(attack="rgap", victim="lenet_zhu", dataset="digits", image_size=16,
                                defense="gaussian", defense_params={"sigma": 1e-3}))
    assert noisy.metrics["psnr"] < clean.metrics["psnr"] - 10


class _ReluNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).flatten(1))


class _Reordered(nn.Module):
    """Defines its layers in one order and applies them in another."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 16 * 16, 10)
        self.act = nn.Sigmoid()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).flatten(1))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (_ReluNet(), "attack 'rgap' inverts Conv2d, Linear and Sigmoid layers only; _ReluNet has a ReLU"),
        (_Reordered(), "attack 'rgap' needs layers that alternate weight layer and Sigmoid and end in a Linear"),
    ],
)
def test_a_model_rgap_cannot_invert_is_a_one_line_config_error(model: nn.Module, message: str) -> None:
    images = torch.rand(1, 3, 16, 16)
    with pytest.raises(ConfigError, match=message) as err:
        reconstruct(model, images, torch.tensor([3]))
    assert "\n" not in str(err.value)


def test_an_input_too_large_to_solve_is_refused_before_any_matrix_is_built() -> None:
    """lenet_zhu on 3x96x96 images: its first layer's input has 27648 values, whose normal equations would need
    18 GB; the attack says so in one line instead of exhausting the worker."""
    model = create_victim("lenet_zhu", num_classes=10, image_size=96, seed=0)
    images = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match=r"n = 27648 inputs at image shape \(3, 96, 96\); allowed: at most 12288"):
        reconstruct(model, images, torch.tensor([3]))


def _user_trial(victim: str, **extra: object) -> TrialSpec:
    return TrialSpec(attack="rgap", victim=victim, dataset="digits", image_size=16, batch_size=1, seed=2,
                     victim_fingerprint=victim_fingerprint(victim, {}, 16), **extra)  # type: ignore[arg-type]


def test_a_users_sigmoid_model_by_import_path_is_inverted_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """R-GAP is not refused by name for a user's model: user_models.colour_net (Linear, Sigmoid, Linear, all
    with biases) is of its form, and its one-image gradient gives the digit back exactly."""
    monkeypatch.syspath_prepend(str(HERE))
    result = run_trial(_user_trial("user_models:colour_net"))
    assert result.status == "COMPLETE", result.error
    assert result.metrics["psnr"] > 40 and result.metrics["label_acc"] == 1.0


def test_a_users_model_rgap_cannot_invert_is_refused_before_any_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """user_models.GreyNet (conv, ReLU, pool, linear) is refused in one sentence, naming the model and what R-GAP
    inverts, when the trial builds it: at fl_round 3, before any FL round is trained."""
    monkeypatch.syspath_prepend(str(HERE))

    def no_training(spec: TrialSpec) -> None:
        raise AssertionError("the FL stage was trained before the model was checked")

    monkeypatch.setattr(fl, "stage_for_trial", no_training)
    with pytest.raises(ConfigError, match="needs layers that alternate weight layer and Sigmoid and end in a Linear "
                                          "classifier; GreyNet does not") as err:
        run_trial(_user_trial("user_models:GreyNet", fl_round=3))
    assert "\n" not in str(err.value)
