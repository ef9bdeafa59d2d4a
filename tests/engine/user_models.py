"""Victim models as a user writes them, for tests of victims given by import path ("user_models:<name>")."""

from __future__ import annotations

import torch
from torch import nn


class GreyNet(nn.Module):
    """A small ReLU CNN on 1-channel images, sized by the dataset and image size it is given."""

    def __init__(self, num_classes: int, image_size: int, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.head = nn.Linear(width * (image_size // 2) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(nn.functional.avg_pool2d(torch.relu(self.conv(x)), 2), 1))


class BatchNormNet(nn.Module):
    """A small CNN on 1-channel images with BatchNorm after its convolution (2d) and its hidden layer (1d): a
    user's model whose running statistics GradInversion's prior reads. `running_stats=False`: BatchNorm that
    keeps none (2d only, so that a batch of one image still passes)."""

    def __init__(self, num_classes: int, image_size: int, width: int = 4, running_stats: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.norm = nn.BatchNorm2d(width, track_running_stats=running_stats)
        features = width * (image_size // 2) ** 2
        self.hidden = nn.Linear(features, 16)
        self.hidden_norm: nn.Module = nn.BatchNorm1d(16) if running_stats else nn.Identity()
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.avg_pool2d(torch.relu(self.norm(self.conv(x))), 2)
        return self.head(torch.relu(self.hidden_norm(self.hidden(torch.flatten(x, 1)))))


def colour_net(num_classes: int, image_size: int) -> nn.Module:
    """A colour MLP built by a factory function that takes the sizes."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, 16), nn.Sigmoid(),
                         nn.Linear(16, num_classes))  # fmt: skip


def fixed_ten_classes() -> nn.Module:
    """A model that ignores the dataset: 10 outputs for 16x16 colour images, whatever is asked."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))


def broken(num_classes: int) -> nn.Module:
    raise ValueError(f"cannot build a model for {num_classes} classes\nsecond line")


def not_a_model() -> str:
    return "a string"


NOT_CALLABLE = 3
