"""The `imprint` victim: a malicious server's model with an imprint module in front (Fowl et al., ICLR 2022).

Threat model ("Robbing the Fed"): the server is malicious and may change the model it sends. It puts an
imprint block in front of an ordinary classifier (`base`); honest clients compute their update on it as
usual, and the attack `imprint` (grnn_engine.attacks.imprint) reads many images of a large batch back,
exactly, from the block's weight and bias gradients.

The block (`ImprintBlock`), on the flattened image x of D = 3*S*S values:
- `measure`: a linear layer with `bins` neurons. Every row of its weight is 1/D, so each neuron measures
  the image's mean brightness h(x); neuron i's bias is -q_i, so it fires (ReLU) exactly for the images
  with h(x) > q_i. The thresholds q_1 < ... < q_{K-1} are the quantiles i/K of the server's model of the
  brightness distribution, a Gaussian N(brightness_mean, brightness_std^2) (the paper's Gaussian
  assumption), and q_0 = -1 lies below every image; so each of the K bins between consecutive thresholds
  holds about B/K images of a batch of B.
- `ReLU`, then `expand`: a linear layer back to D values whose weight is 1/K everywhere (zero bias). Every
  bin neuron feeds every output identically, so the gradient reaching neuron i from image n is the same
  number c_n for every i: that is what makes the recovery exact. The result, reshaped to (3, S, S), is the
  base classifier's input.
Then the gradient of neuron i's weight is sum over the images above q_i of c_n x_n / B and its bias's the
same sum of c_n / B: the difference of consecutive neurons isolates the images of one bin, and a bin
holding one image gives that image exactly as (weight difference) / (bias difference).

What the server knows: only public statistics of the data. The defaults, brightness_mean 0.475 and
brightness_std 0.125, are the mean and standard deviation of the per-image mean pixel over 5,000 random
images of the CIFAR-10 *train* split as this project stores it (measured 2026-12-05); the attacked
batches come from the test split. For other data set them (MNIST train: 0.131 / 0.044; scikit-learn
digits at 32x32: 0.306 / 0.034, same measurement). Nothing is estimated from the attacked batch.

bins: 64 by default, as the "Robbing the Fed" configuration of breaching (Geiping et al.'s library, by
the paper's authors) uses. With K equal-mass bins and B images, an image is alone in its bin with
probability (1 - 1/K)^(B-1): about 37% for K = B = 64, 2% for B = 256; the server that expects larger
batches sends more bins (the README reports both).

The base classifier is built with its own `init`, as victim `base` would be; the block's weights are set
after it, never drawn. The block's parameters are trainable and shared like any others.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch
from torch import Tensor, nn

from grnn_engine.errors import ConfigError
from grnn_engine.victims import VICTIMS

# Below the brightness of any image in [0, 1]: the first neuron fires for every image.
_FIRST_THRESHOLD = -1.0


def brightness_thresholds(bins: int, mean: float, std: float) -> list[float]:
    """q_0 = -1, then the i/bins quantiles (i = 1..bins-1) of N(mean, std^2): equal-mass bins."""
    gaussian = NormalDist(mu=mean, sigma=std)
    return [_FIRST_THRESHOLD] + [gaussian.inv_cdf(i / bins) for i in range(1, bins)]


class ImprintBlock(nn.Module):
    """Fowl et al.'s imprint block on images (B, C, S, S): measure -> ReLU -> expand, same shape out."""

    def __init__(self, image_shape: tuple[int, int, int], thresholds: list[float]) -> None:
        super().__init__()
        self.image_shape = image_shape
        size = math.prod(image_shape)
        bins = len(thresholds)
        self.thresholds = list(thresholds)
        self.measure = nn.Linear(size, bins)
        self.relu = nn.ReLU()
        self.expand = nn.Linear(bins, size)
        with torch.no_grad():
            self.measure.weight.fill_(1.0 / size)
            self.measure.bias.copy_(-torch.tensor(thresholds, dtype=torch.float32))
            self.expand.weight.fill_(1.0 / bins)
            self.expand.bias.zero_()

    @property
    def bins(self) -> int:
        return len(self.thresholds)

    def forward(self, x: Tensor) -> Tensor:
        out = self.expand(self.relu(self.measure(torch.flatten(x, 1))))
        return out.view(x.shape[0], *self.image_shape)


class ImprintedModel(nn.Module):
    """The model the malicious server sends: `imprint` block, then the `base` classifier."""

    def __init__(self, imprint: ImprintBlock, base: nn.Module) -> None:
        super().__init__()
        self.imprint = imprint
        self.base = base

    def forward(self, x: Tensor) -> Tensor:
        return self.base(self.imprint(x))


def find_imprint_block(model: nn.Module) -> ImprintBlock | None:
    """The model's first ImprintBlock, or None."""
    return next((m for m in model.modules() if isinstance(m, ImprintBlock)), None)


@VICTIMS.register("imprint")
def imprint(
    *,
    num_classes: int,
    image_size: int = 32,
    init: str = "uniform",
    base: str = "lenet",
    bins: int = 64,
    brightness_mean: float = 0.475,
    brightness_std: float = 0.125,
) -> nn.Module:
    """Victim `base` (default lenet, built with `init`) behind an imprint block of `bins` neurons whose
    thresholds are the Gaussian N(brightness_mean, brightness_std^2) quantiles (defaults: CIFAR-10 train)."""
    if base == "imprint" or base not in VICTIMS:
        allowed = ", ".join(n for n in VICTIMS.names() if n != "imprint")
        raise ConfigError(f"unknown base '{base}' for victim 'imprint'; allowed: {allowed}.")
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 2:
        raise ConfigError(f"bins={bins!r} is invalid for victim 'imprint'; allowed: an integer >= 2.")
    for label, value, low in (("brightness_mean", brightness_mean, -math.inf), ("brightness_std", brightness_std, 0)):
        if not (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > low):
            rule = "a finite number" if low == -math.inf else "a finite number > 0"
            raise ConfigError(f"{label}={value!r} is invalid for victim 'imprint'; allowed: {rule}.")
    classifier = VICTIMS.create(base, num_classes=num_classes, image_size=image_size, init=init)
    block = ImprintBlock((3, image_size, image_size), brightness_thresholds(bins, brightness_mean, brightness_std))
    return ImprintedModel(block, classifier).to(torch.float32).eval()
