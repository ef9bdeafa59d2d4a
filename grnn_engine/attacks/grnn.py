"""GRNN: Generative Regression Neural Network (Ren, Deng and Xie, ACM TIST 2022; arXiv 2105.00529).

A generator maps one fixed noise vector per image to an image (and, through a second branch, to a soft
label); its weights, not the pixels, are fitted so that the victim's gradient on the generated batch
matches the shared gradient. Defaults follow the authors' code (github Rand2AI/GRNN): RMSprop lr 1e-4,
momentum 0.99, 1000 iterations, noise dimension 128, loss = squared gradient difference + gradient distance
+ lambda_TV * TV. Two details of that code that we keep on purpose:
- its "Wasserstein" term is just the L2 norm of the gradient difference (`distance: l2`); `distance:
  wasserstein` is the exact 1-D Wasserstein-2 distance between the sorted entries of each layer's gradient.
- its generator `weight_init(0, 0.02)` visits only top-level containers and so changes nothing: the
  generator keeps PyTorch's default initialisation, as here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from grnn_engine.attacks.base import (
    ATTACKS,
    Attack,
    EvaluateFn,
    ProgressFn,
    Reconstruction,
    SharedUpdate,
    soft_cross_entropy,
    squared_gradient_distance,
    total_variation,
    trainable_parameters,
)
from grnn_engine.errors import ConfigError

# Models up to this many parameters get the authors' LeNet TV weight, larger ones their ResNet weight.
_SMALL_MODEL_PARAMS = 100_000


class _GLU(nn.Module):
    """Gated linear unit over channels: first half * sigmoid(second half)."""

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        return a * torch.sigmoid(b)


def _up_block(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(in_ch, out_ch * 2, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch * 2),
        _GLU(),
    )


class GrnnGenerator(nn.Module):
    """The two GRNN branches: noise (B, noise_dim) -> images (B, C, S, S) in [0, 1] and soft labels (B, K).

    The image branch generates at the next power of two >= S (the architecture doubles from 4x4) and is
    resized to S when S is not a power of two.
    """

    def __init__(self, *, noise_dim: int, num_classes: int, image_shape: tuple[int, int, int], width: int = 32):
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
            layers.append(_up_block(width * 2 ** (b + 1), width * 2**b))
        layers.append(_up_block(width, channels))
        self.image_branch = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        images = torch.sigmoid(self.image_branch(z))
        if self.native_size != self.out_size:
            images = nn.functional.interpolate(
                images, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False
            )
        return images, torch.softmax(self.label_branch(z), dim=1)


def wasserstein_layer_distance(fake: Sequence[Tensor], true_sorted: Sequence[Tensor]) -> Tensor:
    """Sum over layers of the exact 1-D Wasserstein-2 distance between the entries of the two gradients."""
    return torch.stack(
        [
            (torch.sort(f.flatten()).values - t).pow(2).mean().sqrt()
            for f, t in zip(fake, true_sorted, strict=True)
        ]
    ).sum()


@ATTACKS.register("grnn")
class GRNN(Attack):
    """GRNN with the authors' defaults; every setting is a parameter.

    Parameters: iterations; lr, momentum (RMSprop); noise_dim; distance ("l2" as the authors' code, or
    "wasserstein"); tv_weight (None = the authors' choice: 1e-3 for LeNet-sized models, 1e-6 for ResNets,
    told apart by parameter count); width (generator base channels, 32 in the authors' code).
    """

    def __init__(
        self,
        *,
        iterations: int = 1000,
        lr: float = 1e-4,
        momentum: float = 0.99,
        noise_dim: int = 128,
        distance: str = "l2",
        tv_weight: float | None = None,
        width: int = 32,
    ) -> None:
        if iterations < 1:
            raise ConfigError(f"grnn iterations must be >= 1 (got {iterations})")
        if not lr > 0:
            raise ConfigError(f"grnn lr must be > 0 (got {lr})")
        if not 0 <= momentum < 1:
            raise ConfigError(f"grnn momentum must be in [0, 1) (got {momentum})")
        if noise_dim < 1 or width < 1:
            raise ConfigError(f"grnn noise_dim and width must be >= 1 (got {noise_dim}, {width})")
        if distance not in ("l2", "wasserstein"):
            raise ConfigError(f"grnn distance must be 'l2' or 'wasserstein' (got '{distance}')")
        if tv_weight is not None and not tv_weight >= 0:
            raise ConfigError(f"grnn tv_weight must be >= 0 (got {tv_weight})")
        self.iterations = iterations
        self.lr = lr
        self.momentum = momentum
        self.noise_dim = noise_dim
        self.distance = distance
        self.tv_weight = tv_weight
        self.width = width

    def _tv_weight(self, params: Sequence[Tensor]) -> float:
        if self.tv_weight is not None:
            return self.tv_weight
        return 1e-3 if sum(p.numel() for p in params) <= _SMALL_MODEL_PARAMS else 1e-6

    def reconstruct(
        self,
        model: nn.Module,
        shared_update: SharedUpdate,
        *,
        num_classes: int,
        batch_size: int,
        image_shape: tuple[int, int, int],
        generator: torch.Generator,
        progress: ProgressFn | None = None,
        evaluate: EvaluateFn | None = None,
        eval_every: int = 50,
    ) -> Reconstruction:
        params = trainable_parameters(model)
        device = params[0].device
        target = [t.detach() for t in shared_update.as_gradient()]
        target_sorted = [torch.sort(t.flatten()).values for t in target] if self.distance == "wasserstein" else []
        tv_weight = self._tv_weight(params)

        init_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            net = GrnnGenerator(
                noise_dim=self.noise_dim, num_classes=num_classes, image_shape=image_shape, width=self.width
            )
        net = net.to(device)
        net.train()
        z = torch.randn((batch_size, self.noise_dim), generator=generator).to(device)
        weights = list(net.parameters())
        optimizer = torch.optim.RMSprop(weights, lr=self.lr, momentum=self.momentum)

        history: list[dict[str, float]] = []
        images = soft_labels = torch.empty(0)
        for it in range(1, self.iterations + 1):
            images, soft_labels = net(z)
            fake = torch.autograd.grad(
                soft_cross_entropy(model(images), soft_labels), params, create_graph=True
            )
            squared = squared_gradient_distance(fake, target)
            if self.distance == "l2":
                distance = squared.clamp(min=1e-30).sqrt()
            else:
                distance = wasserstein_layer_distance(fake, target_sorted)
            loss = squared + distance + tv_weight * total_variation(images)
            for w, g in zip(weights, torch.autograd.grad(loss, weights), strict=True):
                w.grad = g
            optimizer.step()

            if it % eval_every == 0 or it == self.iterations:
                grad_loss = float(squared.detach())
                entry: dict[str, float] = {"iteration": it, "grad_loss": grad_loss}
                if evaluate is not None:
                    entry["psnr"] = evaluate(images.detach())
                history.append(entry)
                if progress is not None:
                    progress({**entry, "iterations": self.iterations})
                if not math.isfinite(grad_loss):
                    break

        # The images that produced the last loss are the answer, as in the authors' code.
        return Reconstruction(
            images=images.detach().clamp(0, 1),
            labels=soft_labels.detach().argmax(dim=1),
            history=history,
        )
