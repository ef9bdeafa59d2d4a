"""The malicious-server imprint victim and the analytic imprint attack (Fowl et al. 2022), on real images."""

from __future__ import annotations

import os
from pathlib import Path
from statistics import NormalDist

import pytest
import torch

from grnn_engine import ATTACKS, TrialSpec, run_trial
from grnn_engine.attacks.base import SharedUpdate, victim_gradient
from grnn_engine.data import load_dataset, select_batch
from grnn_engine.errors import ConfigError
from grnn_engine.imprint_victim import ImprintBlock, brightness_thresholds, find_imprint_block
from grnn_engine.metrics import score
from grnn_engine.victims import create_victim

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def bin_of_each_image(block: ImprintBlock, images: torch.Tensor) -> torch.Tensor:
    """Which bin each image falls in, read off the block's own neurons (how many fire, minus one)."""
    with torch.no_grad():
        return (block.measure(images.flatten(1)) > 0).sum(dim=1) - 1


def attack_batch(images: torch.Tensor, labels: torch.Tensor, victim_params: dict) -> tuple[torch.nn.Module, torch.Tensor]:
    model = create_victim("imprint", num_classes=10, image_size=images.shape[-1], seed=0, **victim_params)
    grads = victim_gradient(model, list(model.parameters()), images, labels, create_graph=False)
    recon = ATTACKS.create("imprint").reconstruct(
        model, SharedUpdate(tuple(g.detach() for g in grads)), num_classes=10, batch_size=images.shape[0],
        image_shape=tuple(images.shape[1:]), generator=torch.Generator().manual_seed(0),
    )
    return model, recon.images


def test_thresholds_are_equal_mass_quantiles_of_the_servers_gaussian() -> None:
    thresholds = brightness_thresholds(4, 0.5, 0.1)
    assert thresholds[0] == -1.0
    gaussian = NormalDist(0.5, 0.1)
    assert thresholds[1:] == pytest.approx([gaussian.inv_cdf(q) for q in (0.25, 0.5, 0.75)])
    assert thresholds[2] == pytest.approx(0.5)


def test_the_block_measures_brightness_and_fires_above_each_threshold() -> None:
    model = create_victim("imprint", num_classes=10, image_size=16, seed=0, bins=8)
    block = find_imprint_block(model)
    assert block is not None and block.bins == 8
    images = torch.stack([torch.full((3, 16, 16), v) for v in (0.05, 0.3, 0.475, 0.9)])
    bins = bin_of_each_image(block, images)
    expected = torch.tensor([sum(t < v for t in block.thresholds) - 1 for v in (0.05, 0.3, 0.475, 0.9)])
    assert bins.tolist() == expected.tolist()
    assert model(images).shape == (4, 10)


def test_images_alone_in_their_bin_come_back_exactly_and_only_they() -> None:
    """Real digits, 24 of them in 32 bins (thresholds from the digits' public brightness): every image alone in
    its bin is recovered to within float rounding (>= 60 dB), every image sharing a bin is not (< 30 dB)."""
    data = load_dataset("digits", split="test", image_size=32)
    images, labels, _ = select_batch(data, 24, 0)
    model, recon = attack_batch(images, labels, {"bins": 32, "brightness_mean": 0.306, "brightness_std": 0.034})
    bins = bin_of_each_image(find_imprint_block(model), images)
    alone = torch.tensor([(bins == b).sum() == 1 for b in bins])
    assert 4 <= int(alone.sum()) < 24  # the batch exercises both cases
    psnr = torch.tensor(score(recon, labels, images, labels).psnr_per_image)
    assert (psnr[alone] >= 60).all()
    assert (psnr[~alone] < 30).all()


def test_attack_needs_the_imprint_block() -> None:
    model = create_victim("lenet", num_classes=10, image_size=32, seed=0)
    update = SharedUpdate(tuple(torch.zeros_like(p) for p in model.parameters()))
    with pytest.raises(ConfigError, match="needs the model the malicious server sent, victim 'imprint'"):
        ATTACKS.create("imprint").reconstruct(model, update, num_classes=10, batch_size=2, image_shape=(3, 32, 32),
                                              generator=torch.Generator())


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"bins": 1}, "bins=1 is invalid for victim 'imprint'; allowed: an integer >= 2"),
        ({"base": "imprint"}, "unknown base 'imprint' for victim 'imprint'; allowed: lenet"),
        ({"base": "vgg"}, "unknown base 'vgg'"),
        ({"brightness_std": 0.0}, "brightness_std=0.0 is invalid"),
    ],
)
def test_bad_victim_settings_are_config_errors(params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_victim("imprint", num_classes=10, image_size=32, seed=0, **params)


def test_bad_tolerance_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="imprint tolerance must be a number in"):
        ATTACKS.create("imprint", tolerance=1.5)


def test_base_classifier_follows_the_seed_and_the_block_does_not() -> None:
    a, b = (create_victim("imprint", num_classes=10, seed=s, base="resnet20") for s in (0, 1))
    assert torch.equal(a.imprint.measure.bias, b.imprint.measure.bias)
    assert not torch.equal(a.base.fc.weight, b.base.fc.weight)


def _cifar_root() -> Path | None:
    root = os.environ.get("GRNN_DATA_ROOT")
    return Path(root) if root and (Path(root) / "cifar10" / "test").is_dir() else None


@pytest.mark.skipif(_cifar_root() is None, reason="real CIFAR-10 images need GRNN_DATA_ROOT (../shared/data)")
def test_one_trial_recovers_a_share_of_a_real_cifar10_batch_of_64() -> None:
    """Defaults (64 bins, CIFAR-10-train brightness) on a CIFAR-10 test batch of 64: measured 25 of 64 at
    >= 30 dB for seed 0 (README); exactly the images alone in their bins."""
    spec = TrialSpec(attack="imprint", victim="imprint", dataset="cifar10", data_root=str(_cifar_root()),
                     batch_size=64, seed=0)
    result = run_trial(spec)
    assert result.status == "COMPLETE"
    psnr = result.metrics["psnr_per_image"]
    assert len(psnr) == 64
    assert 16 <= sum(p >= 30 for p in psnr) <= 40
    assert result.metrics["label_set_acc"] >= 0.9
