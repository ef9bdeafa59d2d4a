"""The victim models: the federated global model whose shared update the attacks invert.

Build one with `create_victim(name, num_classes=..., image_size=..., seed=..., **params)`; the models
take images (B, 3, S, S) in [0, 1] and return logits (B, num_classes). Every factory takes
`num_classes`, `image_size` and `init`, plus its own parameters (`activation`, `norm` for the ResNets).

Initialisation (`init`):
- "uniform" (the default): every parameter, BatchNorm's affine weight and bias included, is drawn from
  U(-0.5, 0.5), as the DLG, iDLG and GRNN authors' code does (their `weights_init` touches every module
  with a weight or bias). Large weights give large, informative gradients, which is the setting those
  papers report. BatchNorm running statistics are buffers, not parameters, and stay at mean 0, var 1.
- "default": PyTorch's own per-layer initialisation, left as constructed.
Construction is seeded from `seed` inside a forked CPU RNG, so the same seed gives the same weights and
the caller's global RNG state is left exactly as it was.

BatchNorm decision: models are returned in eval() mode, and the shared gradient is computed in eval()
mode. BatchNorm then normalises with the global model's running statistics (mean 0, var 1 while
untrained), so each example's gradient depends on that example alone; this is what a client does when
it evaluates its update on the server's statistics, and it makes batch size 1 well-defined. The FL
training stage switches to train() while it trains and back to eval() before the update is shared.
Attacks use the model as given. The ResNets' `bn_mode="train"` (GradInversion's setting, Yin et al. 2021)
instead makes every BatchNorm normalise each forward pass with the statistics of the batch it sees, as a
client's training step in train() mode does, in eval() too; the running statistics are still updated only
in train() (FL training) and never read, so the global model's statistics stay what the server sent.

`imprint` (grnn_engine.imprint_victim) is the malicious-server wrapper of Fowl et al. 2022.

ResNet-20 uses He et al.'s option-A shortcuts (stride-2 subsampling plus zero-padded channels, no
parameters), as in the paper's CIFAR experiments; ResNet-18 uses 1x1-conv + norm projection shortcuts,
as the common CIFAR ResNet-18. ResNet convolutions have no bias (BatchNorm supplies the shift); with
`norm="none"` they stay bias-free so both settings share one parameter layout apart from the norms.

All models support double backward (`create_graph=True`): no in-place activations.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grnn_engine.errors import ConfigError
from grnn_engine.registry import Registry, is_import_path
from grnn_engine.user_victims import build_user_victim, model_fingerprint

__all__ = ["VICTIMS", "create_victim", "victim_fingerprint"]

# Besides the models below, a user's own model by import path: see grnn_engine.user_victims.
VICTIMS: Registry[nn.Module] = Registry("victim", import_paths=True)

INITS = ("default", "uniform")
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}
NORMS = ("batch", "none")
BN_MODES = ("eval", "train")


def create_victim(
    name: str, *, num_classes: int, image_size: int = 32, seed: int = 0, **params: object
) -> nn.Module:
    """Build victim `name` (registered, or a user's 'package.module:callable') deterministically from `seed`,
    float32, in eval() mode."""
    return _seeded_victim(name, num_classes, image_size, seed, params, check_output=True)


def victim_fingerprint(name: str, params: Mapping[str, Any], image_size: int) -> str | None:
    """For a user's victim by import path, the hash of its architecture and initial weights (seed 0, 10
    classes) that content-addresses its trials and stages; None for a registered victim (its name and params
    already say what it is)."""
    if not is_import_path(name):
        return None
    return _fingerprint_of(name, json.dumps(dict(params), sort_keys=True, default=repr), image_size)


@functools.lru_cache(maxsize=64)
def _fingerprint_of(name: str, params_json: str, image_size: int) -> str:
    # Cached: stage keys ask for it once per round, and building a user's model may be slow.
    params = json.loads(params_json)
    return model_fingerprint(_seeded_victim(name, 10, image_size, 0, params, check_output=False))


def _seeded_victim(
    name: str, num_classes: int, image_size: int, seed: int, params: Mapping[str, Any], *, check_output: bool
) -> nn.Module:
    VICTIMS.check(name)
    if not _is_int(seed):
        raise ConfigError(f"seed={seed!r} is invalid for victim '{name}'; allowed: an integer.")
    # fork_rng restores the caller's CPU RNG afterwards; models are built on the CPU, so only it is used.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if is_import_path(name):
            return build_user_victim(
                VICTIMS, name, num_classes=num_classes, image_size=image_size, params=dict(params),
                check_output=check_output,
            )  # fmt: skip
        return VICTIMS.create(name, num_classes=num_classes, image_size=image_size, **params)


# --- validation and finishing, shared by every factory ------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_common(name: str, num_classes: int, image_size: int, min_size: int, init: str) -> None:
    if not _is_int(num_classes) or num_classes < 2:
        raise ConfigError(
            f"num_classes={num_classes!r} is invalid for victim '{name}'; allowed: an integer >= 2."
        )
    if not _is_int(image_size) or image_size < min_size:
        raise ConfigError(
            f"image_size={image_size!r} is too small for victim '{name}'; allowed: an integer >= {min_size}."
        )
    if init not in INITS:
        raise ConfigError(f"unknown init '{init}' for victim '{name}'; allowed: {', '.join(INITS)}.")


def _activation(name: str, activation: str) -> Callable[[], nn.Module]:
    if activation not in ACTIVATIONS:
        raise ConfigError(
            f"unknown activation '{activation}' for victim '{name}'; allowed: {', '.join(ACTIVATIONS)}."
        )
    return ACTIVATIONS[activation]


class BatchStatisticsNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalises with the current batch's statistics (a client's train-mode step).

    In train() it is plain BatchNorm (running statistics updated, as FL training needs); in eval() it still
    uses the batch's mean and biased variance but leaves the running statistics untouched.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return super().forward(x)
        return F.batch_norm(x, None, None, self.weight, self.bias, training=True, momentum=0.0, eps=self.eps)


def _norm(name: str, norm: str, bn_mode: str = "eval") -> Callable[[int], nn.Module]:
    if norm not in NORMS:
        raise ConfigError(f"unknown norm '{norm}' for victim '{name}'; allowed: {', '.join(NORMS)}.")
    if bn_mode not in BN_MODES:
        raise ConfigError(f"unknown bn_mode '{bn_mode}' for victim '{name}'; allowed: {', '.join(BN_MODES)}.")
    if norm == "batch":
        return BatchStatisticsNorm2d if bn_mode == "train" else nn.BatchNorm2d
    return lambda channels: nn.Identity()


def _finish(model: nn.Module, init: str) -> nn.Module:
    if init == "uniform":
        with torch.no_grad():
            for p in model.parameters():
                p.uniform_(-0.5, 0.5)
    return model.to(torch.float32).eval()


def _conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


# --- LeNets ------------------------------------------------------------------------------------------


class LeNet(nn.Module):
    """The GRNN paper's LeNet: two conv-sigmoid-maxpool stages, then FC 120-84-C."""

    def __init__(self, num_classes: int, image_size: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5), nn.Sigmoid(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.Sigmoid(), nn.MaxPool2d(2),
        )  # fmt: skip
        side = _conv_out(_conv_out(image_size, 5) // 2, 5) // 2
        self.classifier = nn.Sequential(
            nn.Linear(16 * side * side, 120), nn.Sigmoid(),
            nn.Linear(120, 84), nn.Sigmoid(),
            nn.Linear(84, num_classes),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class LeNetZhu(nn.Module):
    """DLG's LeNet (Zhu et al. 2019): three 5x5 conv-sigmoid layers (two stride 2), then one FC."""

    def __init__(self, num_classes: int, image_size: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 12, 5, stride=2, padding=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, stride=2, padding=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, stride=1, padding=2), nn.Sigmoid(),
        )  # fmt: skip
        side = _conv_out(_conv_out(_conv_out(image_size, 5, 2, 2), 5, 2, 2), 5, 1, 2)
        self.fc = nn.Linear(12 * side * side, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


@VICTIMS.register("lenet")
def lenet(*, num_classes: int, image_size: int = 32, init: str = "uniform") -> nn.Module:
    """GRNN's LeNet; 62,006 parameters at 32x32 and 10 classes. Needs image_size >= 16."""
    _check_common("lenet", num_classes, image_size, 16, init)
    return _finish(LeNet(num_classes, image_size), init)


@VICTIMS.register("lenet_zhu")
def lenet_zhu(*, num_classes: int, image_size: int = 32, init: str = "uniform") -> nn.Module:
    """DLG's LeNet (flatten 768 at 32x32). Needs image_size >= 4."""
    _check_common("lenet_zhu", num_classes, image_size, 4, init)
    return _finish(LeNetZhu(num_classes, image_size), init)


# --- ResNets -----------------------------------------------------------------------------------------


class _PadShortcut(nn.Module):
    """He et al.'s option A: subsample by 2 and zero-pad the new channels; no parameters."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        extra = out_channels - in_channels
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: Tensor) -> Tensor:
        # x[..., ::2, ::2] has the size of a 3x3/stride-2/pad-1 conv output, odd sizes included.
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, *self.pad))


class BasicBlock(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        act: Callable[[], nn.Module],
        norm: Callable[[int], nn.Module],
        shortcut: str,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(out_channels)
        self.act1 = act()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm(out_channels)
        self.act2 = act()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            if shortcut == "pad":
                self.shortcut = _PadShortcut(in_channels, out_channels)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), norm(out_channels)
                )

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem at stride 1 (no max-pool), stages of BasicBlocks, avg-pool, FC."""

    def __init__(
        self,
        num_classes: int,
        widths: tuple[int, ...],
        blocks: tuple[int, ...],
        act: Callable[[], nn.Module],
        norm: Callable[[int], nn.Module],
        shortcut: str,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False), norm(widths[0]), act())
        stages: list[nn.Module] = []
        in_channels = widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            layers = []
            for j in range(count):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(BasicBlock(in_channels, width, stride, act, norm, shortcut))
                in_channels = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


@VICTIMS.register("resnet18")
def resnet18(
    *,
    num_classes: int,
    image_size: int = 32,
    init: str = "uniform",
    activation: str = "sigmoid",
    norm: str = "batch",
    bn_mode: str = "eval",
) -> nn.Module:
    """CIFAR ResNet-18 (64-512 channels, [2, 2, 2, 2] blocks). Needs image_size >= 8 (3 halvings)."""
    _check_common("resnet18", num_classes, image_size, 8, init)
    act, norm_layer = _activation("resnet18", activation), _norm("resnet18", norm, bn_mode)
    model = ResNet(num_classes, (64, 128, 256, 512), (2, 2, 2, 2), act, norm_layer, shortcut="conv")
    return _finish(model, init)


@VICTIMS.register("resnet20")
def resnet20(
    *,
    num_classes: int,
    image_size: int = 32,
    init: str = "uniform",
    activation: str = "sigmoid",
    norm: str = "batch",
    bn_mode: str = "eval",
) -> nn.Module:
    """He et al.'s CIFAR ResNet-20 (16/32/64 channels, 3x3 blocks, option-A shortcuts). Needs image_size >= 4."""
    _check_common("resnet20", num_classes, image_size, 4, init)
    act, norm_layer = _activation("resnet20", activation), _norm("resnet20", norm, bn_mode)
    model = ResNet(num_classes, (16, 32, 64), (3, 3, 3), act, norm_layer, shortcut="pad")
    return _finish(model, init)
