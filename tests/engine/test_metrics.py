"""Scoring against hand-computed values; matching is order-free."""

from __future__ import annotations

import math

import pytest
import torch

from grnn_engine.metrics import PSNR_CAP_DB, label_set_accuracy, match, psnr_per_image, score, ssim_per_image


def test_psnr_matches_hand_computation() -> None:
    truth = torch.zeros(1, 3, 4, 4)
    recon = torch.full((1, 3, 4, 4), 0.1)  # MSE = 0.01 -> PSNR = 10*log10(1/0.01) = 20 dB
    assert psnr_per_image(recon, truth).item() == pytest.approx(20.0)
    half = truth.clone()
    half[..., :2, :] = 0.5  # half the pixels off by 0.5: MSE = 0.125 -> 9.0309 dB
    assert psnr_per_image(half, truth).item() == pytest.approx(10 * math.log10(8))


def test_psnr_of_exact_copy_is_capped_not_infinite() -> None:
    x = torch.rand(2, 3, 8, 8)
    assert psnr_per_image(x, x).tolist() == [PSNR_CAP_DB, PSNR_CAP_DB]


def test_ssim_is_one_for_identical_images_and_low_for_noise() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    assert ssim_per_image(x, x).tolist() == pytest.approx([1.0, 1.0])
    noise = torch.rand(2, 3, 32, 32, generator=g)
    assert ssim_per_image(noise, x).max().item() < 0.1


def test_ssim_constant_shift_hand_value() -> None:
    # Two constant images a, b: variances are 0, so SSIM = (2ab + c1) / (a^2 + b^2 + c1).
    a, b, c1 = 0.2, 0.6, 0.01**2
    x = torch.full((1, 1, 16, 16), a)
    y = torch.full((1, 1, 16, 16), b)
    assert ssim_per_image(x, y).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))


def test_matching_is_invariant_to_permuting_the_reconstruction() -> None:
    g = torch.Generator().manual_seed(1)
    truth = torch.rand(6, 3, 8, 8, generator=g)
    recon = (truth + 0.05 * torch.randn(6, 3, 8, 8, generator=g)).clamp(0, 1)
    labels = torch.arange(6)
    base = score(recon, labels, truth, labels)
    perm = torch.randperm(6, generator=g)
    shuffled = score(recon[perm], labels[perm], truth, labels)
    assert shuffled.psnr == pytest.approx(base.psnr)
    assert shuffled.psnr_per_image == pytest.approx(base.psnr_per_image)
    assert shuffled.label_acc == base.label_acc == 1.0
    assert [perm[j].item() for j in shuffled.matching] == list(range(6))


def test_match_assigns_each_truth_its_own_copy() -> None:
    truth = torch.stack([torch.full((3, 4, 4), v) for v in (0.0, 0.5, 1.0)])
    recon = truth[[2, 0, 1]]
    assert match(recon, truth) == [1, 2, 0]


def test_score_fields_and_success_threshold() -> None:
    truth = torch.zeros(2, 3, 4, 4)
    recon = torch.full((2, 3, 4, 4), 0.1)  # 20 dB each
    s = score(recon, torch.tensor([3, 4]), truth, torch.tensor([3, 5]), success_psnr=19.9)
    assert s.psnr == pytest.approx(20.0)
    assert s.success is True
    assert s.label_acc == 0.5
    assert s.mse == pytest.approx(0.01)
    assert score(recon, torch.tensor([3, 4]), truth, torch.tensor([3, 5]), success_psnr=20.1).success is False


def test_label_set_accuracy_counts_multiset_overlap() -> None:
    assert label_set_accuracy([1, 1, 2, 3], [1, 2, 2, 3]) == 0.75
    assert label_set_accuracy([0], [0]) == 1.0
