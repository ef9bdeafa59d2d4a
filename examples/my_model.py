"""An example of a user's own victim model, attacked by import path `examples.my_model:make_net`.

Any callable that returns a `torch.nn.Module` classifier of images will do. It is called with the
sweep's victim params, plus `num_classes` and `image_size` when its signature takes them, under the
trial's seed (so the same seed gives the same initial weights). This one is a small ReLU CNN for grey
digits, taking 1-channel images: the engine hands it the first channel of grey data, and the attacks
rebuild 1-channel images.
"""

from __future__ import annotations

import torch
from torch import nn


class SmallNet(nn.Module):
    def __init__(self, num_classes: int, image_size: int, width: int, channels: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        )
        self.head = nn.Linear(2 * width * (image_size // 4) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def make_net(num_classes: int, image_size: int, width: int = 8, grey: bool = True) -> nn.Module:
    """A 2-stage CNN; `grey` picks 1-channel input (MNIST-like data) over colour."""
    return SmallNet(num_classes, image_size, width, 1 if grey else 3)
