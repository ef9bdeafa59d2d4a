"""Honest scoring of a reconstruction against the private batch.

A batch reconstruction comes in arbitrary order, so each reconstructed image is first matched to one true
image (Hungarian assignment on MSE) and every metric is computed on the matched pairs. PSNR uses data range 1
(images in [0, 1]) and is computed per image, then averaged.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# An exact copy has infinite PSNR; report it as this instead so means and Parquet columns stay finite.
PSNR_CAP_DB = 100.0


def pairwise_mse(recon: Tensor, truth: Tensor) -> Tensor:
    """(B_truth, B_recon) matrix of per-pair mean squared errors."""
    t = truth.flatten(1).double()
    r = recon.flatten(1).double()
    return torch.cdist(t, r).pow(2) / t.shape[1]


def match(recon: Tensor, truth: Tensor) -> list[int]:
    """matching[i] = index of the reconstruction assigned to true image i (minimum total MSE)."""
    # Imported here: scipy.optimize takes about half a second to import, which every sweep worker would pay
    # at start-up, before its first trial (the engine's import is on that path).
    from scipy.optimize import linear_sum_assignment

    cost = pairwise_mse(recon.detach().cpu(), truth.detach().cpu()).numpy()
    rows, cols = linear_sum_assignment(cost)
    matching = np.empty(len(rows), dtype=np.int64)
    matching[rows] = cols
    return matching.tolist()


def mse_per_image(recon: Tensor, truth: Tensor) -> Tensor:
    return (recon.double() - truth.double()).pow(2).flatten(1).mean(dim=1)


def psnr_per_image(recon: Tensor, truth: Tensor) -> Tensor:
    mse = mse_per_image(recon, truth)
    psnr = 10.0 * torch.log10(1.0 / mse.clamp(min=1e-300))
    return psnr.clamp(max=PSNR_CAP_DB)


def _gaussian_window(size: int, sigma: float, channels: int) -> Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    window = torch.outer(g, g)
    return window.expand(channels, 1, size, size).contiguous()


def ssim_per_image(recon: Tensor, truth: Tensor, window_size: int = 11, sigma: float = 1.5) -> Tensor:
    """Structural similarity (Wang et al. 2004): Gaussian window, data range 1, mean over pixels and channels.

    The window shrinks to the image when the image is smaller than 11 pixels.
    """
    x = recon.double()
    y = truth.double()
    channels = x.shape[1]
    size = min(window_size, x.shape[-1], x.shape[-2])
    w = _gaussian_window(size, sigma, channels).to(x.device)
    c1, c2 = 0.01**2, 0.03**2

    def blur(t: Tensor) -> Tensor:
        return torch.nn.functional.conv2d(t, w, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return ssim_map.flatten(1).mean(dim=1)


def label_set_accuracy(recovered: list[int], true: list[int]) -> float:
    """Fraction of the batch's labels recovered as a multiset (order-free): what label inference got right."""
    overlap = Counter(recovered) & Counter(true)
    return sum(overlap.values()) / len(true)


@dataclass(frozen=True)
class Score:
    """Metrics of one reconstruction, on matched pairs; per-image lists are in the truth's order."""

    psnr: float
    ssim: float
    mse: float
    label_acc: float
    label_set_acc: float
    success: bool
    psnr_per_image: list[float]
    ssim_per_image: list[float]
    mse_per_image: list[float]
    labels_true: list[int]
    labels_recovered: list[int]
    matching: list[int]


def score(
    recon: Tensor, recon_labels: Tensor, truth: Tensor, truth_labels: Tensor, *, success_psnr: float = 20.0
) -> Score:
    """Match the reconstruction to the truth, then score the matched pairs.

    `labels_recovered[i]` is the label of the reconstruction matched to true image i; `label_acc` is the
    fraction of pairs whose labels agree, `label_set_acc` the order-free multiset overlap.
    `success` = mean matched PSNR >= success_psnr.
    """
    recon = recon.detach().cpu()
    truth = truth.detach().cpu()
    matching = match(recon, truth)
    matched = recon[matching]
    psnr = psnr_per_image(matched, truth)
    ssim = ssim_per_image(matched, truth)
    mse = mse_per_image(matched, truth)
    true_labels = [int(v) for v in truth_labels.cpu().tolist()]
    all_recovered = [int(v) for v in recon_labels.cpu().tolist()]
    recovered = [all_recovered[j] for j in matching]
    mean_psnr = float(psnr.mean())
    return Score(
        psnr=mean_psnr,
        ssim=float(ssim.mean()),
        mse=float(mse.mean()),
        label_acc=float(np.mean([r == t for r, t in zip(recovered, true_labels, strict=True)])),
        label_set_acc=label_set_accuracy(all_recovered, true_labels),
        success=bool(mean_psnr >= success_psnr),
        psnr_per_image=[float(v) for v in psnr],
        ssim_per_image=[float(v) for v in ssim],
        mse_per_image=[float(v) for v in mse],
        labels_true=true_labels,
        labels_recovered=recovered,
        matching=matching,
    )


def matched_psnr(recon: Tensor, truth: Tensor) -> float:
    """Mean PSNR after matching: the evaluate callback an attack may log with (never steer by)."""
    recon = recon.detach().cpu()
    truth = truth.detach().cpu()
    return float(psnr_per_image(recon[match(recon, truth)], truth).mean())
