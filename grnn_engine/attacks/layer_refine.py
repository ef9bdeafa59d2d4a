"""Layer refinement of a one-image reconstruction: R-GAP's recursion through max-pools, from a starting image.

At B = 1 a sigmoid CNN's gradient pins its hidden activations down layer by layer (R-GAP, attacks/rgap.py):
the first Linear layer's input is exact (its weight gradient is g u^T, g its bias gradient), and each
convolution stage's input then follows from two sets of linear equations, the stage's forward pass and its
weight gradient. A max-pool hides which entry of each window won; given those positions, everything down
to the first convolution's output is linear algebra. GRNN's answer knows the deeper positions (98-99% of
the second pool's on CIFAR-10 LeNet) but not the first pool's (65-80%), and that is where its error
lives: with the true positions the Gaussian prior's conditional mean of the image is 34-47 dB where the
generator gives 26-34 (docs/prior_experiments.md, "Where the local minimum comes from").

So `refine_image`:
1. reads the first Linear layer's input u and dL/du from the shared gradient (exact);
2. walks down the convolution stages above the first, solving each stage's input by least squares of its
   forward equations at the winning positions and its weight-gradient equations (rgap.solve_layer_input),
   the positions taken from the starting image;
3. fits the image to the first stage by gradient descent on the pixels: the stage's output after the
   sigmoid and a softened max-pool (softmax over each window, temperature annealed from 0.1 to 1e-3 on
   the pre-activations) must equal the solved pool output, and the first convolution's weight gradient
   (dL/dz placed on the softened winners) must equal the shared one, beside the learned image prior.
   Matching after the sigmoid, not the logits, keeps an estimated activation near 0 or 1 from dominating.
   The returned image is the iterate of the second half with the lowest data terms (the attacker's own
   objective, never the truth).

Nothing here evaluates the victim's gradient: step 2 is a linear solve on a 1176-value layer input (LeNet
at 32x32) and each step of 3 runs the first convolution forward and its weight gradient (float64), about half
of what one victim gradient evaluation costs on that LeNet: 1500 steps add about 10 s to a 41 s CIFAR-10 trial
on one CPU thread (README). A stage input above the first larger than rgap.MAX_LAYER_INPUT is not solved (the
image is left as it is).

Applies to models that apply, in the order they define them, one or more stages Conv2d -> Sigmoid ->
optional MaxPool2d (kernel = stride, no padding), then Linear layers with Sigmoids between them (the
GRNN paper's LeNet, DLG's LeNet); `chain_of` returns None for any other model and the caller keeps its
image. Batches (B > 1) break step 1 (a weight gradient is then a sum of B outer products).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.grad import conv2d_weight

from grnn_engine.attacks.base import shared_layer_gradient
from grnn_engine.attacks.rgap import (
    MAX_LAYER_INPUT,
    LayerEquations,
    applies_in_order,
    leaf_layers,
    plain_convolution,
    solve_layer_input,
)

# The softened max-pool's temperature (on conv pre-activations), annealed geometrically over the steps;
# measured on CIFAR-10 LeNet at B=1 (0.03 / 0.1 / 0.3 within 0.2 dB of each other).
START_TEMPERATURE = 0.1
END_TEMPERATURE = 1e-3
# Weight of the pool-output term (a mean of squared sigmoid differences) against the weight-gradient term
# (a relative squared error) and the prior's weight beside them: measured on CIFAR-10 LeNet at B=1.
POOL_OUTPUT_WEIGHT = 100.0
PRIOR_WEIGHT = 1e-3
# The refinement trusts the shared gradient's algebra: it is skipped when the first Linear layer's weight gradient
# departs from one outer product (bias gradient x input) by more than this (relative Frobenius norm), as a
# defense's noise, pruning or quantisation makes it. Measured on CIFAR-10 LeNet at B=1, batches 0-7 (README): up
# to a departure of 5.9e-3 (Gaussian noise 1e-5 and 3e-5, Laplace 1e-5, pruning 10%; undefended about 2.5e-8) it
# gained 1.1 to 7.4 dB on 28 of 32 batches and lost 1.0 on one; one batch failed under both Gaussian noises (caught
# by MAX_LOSS_INCREASE) and was left as it was under Laplace. From 7.3e-3 on (Gaussian 1e-4, 8-bit quantisation) it
# lost on 6 of 9 batches, up to 7.7 dB. On MNIST (the same four defenses; departures 2.1e-4 to 4.6e-3) it gained 3.5
# to 18.6 dB on 28 of 32 batches and lost on 3 (3.3 dB, kept; 8.4 and 10.2, caught by MAX_LOSS_INCREASE).
RANK_ONE_TOLERANCE = 5e-3
# The caller keeps its image when the refined one's squared gradient distance to the shared gradient is more than
# this many times its own: the refinement then went astray (31x and 137x where it lost 10.8 and 17.9 dB on CIFAR-10
# under Gaussian noise 1e-5 and 3e-5; 74.5x and 40.3x where it lost 8.4 and 10.2 dB on MNIST under Gaussian and
# Laplace noise 1e-5). Where it gained, the refined image's distance was up to 6.1x (CIFAR-10) and 9.5x (MNIST) the
# answer's under a defense, but for one MNIST batch at 41x (+7.6 dB, dropped), and, undefended (batches 0-7), 5.8x on
# CIFAR-10 and 8.9x on MNIST: the victim's full gradient weighs the classifier's layers, not the first stage the
# refinement fits. A loss of 3.3 dB on MNIST (Gaussian 3e-5) was at 9.2x: the two overlap at the margins.
MAX_LOSS_INCREASE = 20.0
# Estimated activations are clamped into (_EDGE, 1 - _EDGE) before a logit or a sigmoid derivative.
_EDGE = 1e-6


@dataclass(frozen=True)
class Stage:
    """One convolution stage of the chain: Conv2d, Sigmoid, and a max-pool of window `pool` (1 = none)."""

    conv: nn.Conv2d
    pool: int


def _pool_size(layer: nn.MaxPool2d) -> int | None:
    """The window of a max-pool that tiles its input (kernel = stride, square, no padding or dilation)."""
    kernel, stride = layer.kernel_size, layer.stride if layer.stride is not None else layer.kernel_size
    if not (isinstance(kernel, int) and kernel == stride and layer.padding == 0 and layer.dilation == 1
            and not layer.ceil_mode and not layer.return_indices):
        return None
    return kernel


@dataclass(frozen=True)
class Chain:
    """A sigmoid CNN read off a model: its convolution stages, then its classifier head (Linear layers with
    Sigmoids between them, `head[0]` the first Linear layer, whose input is the image's features)."""

    stages: tuple[Stage, ...]
    head: tuple[nn.Module, ...]

    @property
    def first_linear(self) -> nn.Linear:
        first = self.head[0]
        assert isinstance(first, nn.Linear)
        return first

    def features(self, images: Tensor) -> Tensor:
        """The first Linear layer's input (N, D) for `images` (N, C, H, W)."""
        for stage in self.stages:
            images = _pooled(torch.sigmoid(stage.conv(images)), stage.pool)
        return images.flatten(1)

    def logits(self, features: Tensor) -> Tensor:
        for layer in self.head:
            features = layer(features)
        return features

    def float64(self) -> Chain:
        """A float64 copy of every layer (the model itself is left as it is)."""
        return Chain(tuple(Stage(_double(s.conv), s.pool) for s in self.stages),
                     tuple(copy.deepcopy(layer).double() for layer in self.head))


def chain_of(model: nn.Module, image_shape: tuple[int, int, int]) -> Chain | None:
    """The model's convolution stages and classifier head when the model is such a chain (applied in the order
    its layers are defined: checked on an image), else None."""
    leaves = leaf_layers(model)
    stages: list[Stage] = []
    i = 0
    while i + 1 < len(leaves) and isinstance(leaves[i], nn.Conv2d) and isinstance(leaves[i + 1], nn.Sigmoid):
        conv = leaves[i]
        assert isinstance(conv, nn.Conv2d)
        if conv.bias is None or not plain_convolution(conv):
            return None
        pool = 1
        i += 2
        if i < len(leaves) and isinstance(leaves[i], nn.MaxPool2d):
            size = _pool_size(leaves[i])  # type: ignore[arg-type]
            if size is None:
                return None
            pool, i = size, i + 1
        stages.append(Stage(conv, pool))
    rest = leaves[i:]
    kinds = [type(m) for m in rest]
    if not stages or not rest or kinds != [nn.Linear, nn.Sigmoid] * (len(rest) // 2) + [nn.Linear]:
        return None
    chain = Chain(tuple(stages), tuple(rest))
    if chain.first_linear.bias is None:
        return None
    return chain if applies_in_order(model, image_shape, lambda x: chain.logits(chain.features(x))) else None


def _windows(a: Tensor, pool: int) -> Tensor:
    """(N, C, H, W) -> (N, C, H // pool, W // pool, pool * pool): each pool window's entries (rows and columns
    past the last whole window dropped, as max_pool2d drops them)."""
    n, c, h, w = a.shape
    h, w = h // pool, w // pool
    a = a[:, :, : h * pool, : w * pool].reshape(n, c, h, pool, w, pool)
    return a.permute(0, 1, 2, 4, 3, 5).reshape(n, c, h, w, pool * pool)


def _unwindows(v: Tensor, pool: int, shape: Sequence[int]) -> Tensor:
    """The inverse of `_windows` into a zero map of `shape` (N, C, H, W)."""
    n, c, h, w, _ = v.shape
    out = v.new_zeros(tuple(shape))
    out[:, :, : h * pool, : w * pool] = v.reshape(n, c, h, w, pool, pool).permute(0, 1, 2, 4, 3, 5).reshape(
        n, c, h * pool, w * pool)
    return out


def _pooled(a: Tensor, pool: int) -> Tensor:
    return a if pool == 1 else F.max_pool2d(a, pool)


def _winners(a: Tensor, pool: int) -> Tensor:
    """One-hot (N, C, H', W', pool^2) of each window's largest entry."""
    windows = _windows(a, pool)
    return F.one_hot(windows.argmax(dim=-1), pool * pool).to(a.dtype)


def _stage_inputs(stages: Sequence[Stage], image: Tensor) -> list[Tensor]:
    """Each stage's input when `image` goes through the chain (stage 0's is the image)."""
    inputs, x = [], image
    with torch.no_grad():
        for stage in stages:
            inputs.append(x)
            x = _pooled(torch.sigmoid(stage.conv(x)), stage.pool)
    return inputs


def refine_image(
    stages: Sequence[Stage],
    first_linear: nn.Linear,
    params: Sequence[Tensor],
    target: Sequence[Tensor],
    start: Tensor,
    *,
    steps: int,
    lr: float,
    prior_penalty: Callable[[Tensor], Tensor] | None,
) -> Tensor | None:
    """The image (1, C, H, W) refined from `start` as the module describes; None when the shared gradient
    lacks a layer's weight or bias gradient (frozen layers), the first Linear layer's gradient is not one image's
    (its bias gradient 0, its weight gradient further than RANK_ONE_TOLERANCE from one outer product, or the input
    it gives outside the sigmoid's (0, 1): a defense altered it), or a stage input to solve has more than
    MAX_LAYER_INPUT values."""
    linear = shared_layer_gradient(first_linear, params, target)
    conv_grads = [shared_layer_gradient(s.conv, params, target) for s in stages]
    if linear is None or any(g is None for g in conv_grads):
        return None
    weight_grad, bias_grad = (t.detach().double() for t in linear)
    norm = float(bias_grad.dot(bias_grad))
    if not math.isfinite(norm) or norm == 0:
        return None
    # 1. The first Linear layer's input and the loss's gradient at it.
    out = bias_grad @ weight_grad / norm
    departure = torch.linalg.norm(weight_grad - torch.outer(bias_grad, out)) / torch.linalg.norm(weight_grad)
    if not float(departure) <= RANK_ONE_TOLERANCE or not (0 < float(out.min()) and float(out.max()) < 1):
        return None
    d_out = first_linear.weight.detach().double().T @ bias_grad
    x0 = start.detach().double()
    doubled = [Stage(_double(s.conv), s.pool) for s in stages]
    stage_inputs = _stage_inputs(doubled, x0)
    if any(x[0].numel() > MAX_LAYER_INPUT for x in stage_inputs[1:]):
        return None
    # 2. Each stage above the first: its input from its output (the next stage's input) and its gradient.
    for index in range(len(stages) - 1, 0, -1):
        conv, pool = doubled[index].conv, doubled[index].pool
        pre = conv(stage_inputs[index])
        winners = _unwindows(_winners(pre, pool), pool, pre.shape)[0]
        a = out.reshape(_pooled(pre, pool).shape[1:]).clamp(_EDGE, 1 - _EDGE)
        d_pre = _upsample(d_out.reshape(a.shape) * a * (1 - a), pool, pre.shape[1:]) * winners
        z = _upsample(torch.logit(a), pool, pre.shape[1:]) * winners
        maps = LayerEquations(conv, tuple(stage_inputs[index].shape[1:]), d_pre, rows=winners)
        grad = conv_grads[index]
        assert grad is not None
        out = solve_layer_input(maps, z, grad[0].detach().double())
        d_out = maps.forward_adjoint(d_pre.unsqueeze(0))[0]
    # 3. The image from the first stage.
    conv, pool = doubled[0].conv, doubled[0].pool
    grad = conv_grads[0]
    assert grad is not None
    return _fit_first_stage(conv, pool, out, d_out, grad[0].detach().double(), x0, steps=steps, lr=lr,
                            prior_penalty=prior_penalty).to(start.dtype)


def _double(conv: nn.Conv2d) -> nn.Conv2d:
    """A float64 copy of a convolution, without gradients (the model itself is left as it is)."""
    return copy.deepcopy(conv).double().requires_grad_(False)


def _upsample(v: Tensor, pool: int, shape: Sequence[int]) -> Tensor:
    """(C, H', W') -> (C, H, W): each value copied over its pool window (zero past the last window)."""
    c, h, w = v.shape
    windows = v.reshape(1, c, h, w, 1).expand(1, c, h, w, pool * pool)
    return _unwindows(windows, pool, (1, *shape))[0]


def _fit_first_stage(conv: nn.Conv2d, pool: int, out: Tensor, d_out: Tensor, weight_grad: Tensor, start: Tensor, *,
                     steps: int, lr: float, prior_penalty: Callable[[Tensor], Tensor] | None) -> Tensor:
    """Gradient descent on the pixels (boxed to [0, 1]) for the first stage's equations (module note, step 3)."""
    bias = conv.bias.view(1, -1, 1, 1)  # type: ignore[union-attr]
    with torch.no_grad():
        shape = conv(start).shape
    h = out.reshape(1, shape[1], shape[2] // pool, shape[3] // pool)
    hc = h.clamp(_EDGE, 1 - _EDGE)
    d_win = (d_out.reshape(h.shape) * hc * (1 - hc)).unsqueeze(-1)  # dL/d(pre-activation) at each window's winner
    weight_norm = weight_grad.pow(2).sum().clamp(min=1e-300)
    x = start.clone().clamp(0, 1).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    best, best_loss = x.detach().clone(), math.inf
    for step in range(steps):
        temperature = START_TEMPERATURE * (END_TEMPERATURE / START_TEMPERATURE) ** (step / steps)
        pre = F.conv2d(x, conv.weight, stride=conv.stride, padding=conv.padding)
        windows = _windows(pre, pool)
        weights = torch.softmax(windows / temperature, dim=-1)
        pooled = (weights * windows).sum(dim=-1)
        pool_term = POOL_OUTPUT_WEIGHT * (torch.sigmoid(pooled + bias) - h).pow(2).mean()
        d_pre = _unwindows(weights * d_win, pool, pre.shape)
        own = conv2d_weight(x, conv.weight.shape, d_pre, stride=conv.stride, padding=conv.padding)
        data = pool_term + (own - weight_grad).pow(2).sum() / weight_norm
        if step >= steps // 2 and (value := float(data.detach())) < best_loss:
            best, best_loss = x.detach().clone(), value
        loss = data + (PRIOR_WEIGHT * prior_penalty(x) if prior_penalty is not None else 0.0)
        (x.grad,) = torch.autograd.grad(loss, [x])
        optimizer.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    return best
