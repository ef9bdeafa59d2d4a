"""GRNN's generator (Ren, Deng and Xie 2022; github Rand2AI/GRNN): fixed noise -> images and soft labels.

The architecture of the authors' code: a transposed convolution to 4x4 and a gated linear unit, then
blocks that double the side (nearest upsampling, 3x3 convolution, BatchNorm, GLU) up to the image size,
and a sigmoid; a second, linear branch gives the soft labels. The fitting is grnn.py's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class _GLU(nn.Module):
    """Gated linear unit over channels: first half * sigmoid(second half)."""

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        return a * torch.sigmoid(b)


def _up_block(in_ch: int, out_ch: int, norm: str = "batch") -> nn.Sequential:
    # Without BatchNorm the convolution needs its own bias to shift its output.
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(in_ch, out_ch * 2, kernel_size=3, padding=1, bias=norm == "none"),
        nn.BatchNorm2d(out_ch * 2) if norm == "batch" else nn.Identity(),
        _GLU(),
    )


class GrnnGenerator(nn.Module):
    """The two GRNN branches: noise (B, noise_dim) -> images (B, C, S, S) in [0, 1] and soft labels (B, K).

    The image branch generates at the next power of two >= S (the architecture doubles from 4x4) and is
    resized to S when S is not a power of two. `norm` is "batch" (the authors') or "none".
    """

    def __init__(
        self,
        *,
        noise_dim: int,
        num_classes: int,
        image_shape: tuple[int, int, int],
        width: int = 32,
        norm: str = "batch",
    ):
        super().__init__()
        channels, height, _ = image_shape
        self.out_size = height
        native = max(8, 2 ** math.ceil(math.log2(height)))
        self.native_size = native
        blocks = int(math.log2(native)) - 3
        self.label_branch = nn.Linear(noise_dim, num_classes)
        layers: list[nn.Module] = [
            nn.Unflatten(1, (noise_dim, 1, 1)),
            nn.ConvTranspose2d(noise_dim, width * 2**blocks * 2, kernel_size=4, stride=1, padding=0),
            _GLU(),
        ]
        for b in reversed(range(blocks)):
            layers.append(_up_block(width * 2 ** (b + 1), width * 2**b, norm))
        layers.append(_up_block(width, channels, norm))
        self.image_branch = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        images = torch.sigmoid(self.image_branch(z))
        if self.native_size != self.out_size:
            images = nn.functional.interpolate(
                images, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False
            )
        return images, torch.softmax(self.label_branch(z), dim=1)
