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
