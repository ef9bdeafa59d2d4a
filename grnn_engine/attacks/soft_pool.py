"""A smooth stand-in for a victim's max-pooling, annealed back to the exact model (continuation).

Through a max-pool the victim's gradient is a discontinuous function of the input: which element of a
window is the maximum decides which input patches the weight gradient sums, and a tiny change of the
input that moves an argmax makes that gradient jump. The gradient-matching loss is then a patchwork of
smooth pieces, and first-order optimisers stall at a loss far above the truth's (measured on the
sigmoid LeNet at B=1: pixel descent started at the true image plus 20 dB noise ends at 22-25 dB).

`SoftenedVictim` keeps a copy of the model whose `nn.MaxPool2d` modules are replaced by a softmax-
weighted pool, sum(softmax(x / T) * x) over each window, which is smooth and tends to the max as T -> 0.
An optimisation phase of `steps` iterations runs its first `fraction` on the copy with T decaying
geometrically from `start` to `end`, and the rest on the exact model; only the exact model's losses
are comparable with each other and with the shared gradient, so only they may select an iterate.
From that same noisy start the annealed descent ends at 27-28 dB, its exact gradient loss 25-60x lower.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grnn_engine.attacks.base import trainable_parameters


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class SoftMaxPool2d(nn.Module):
    """max_pool2d's windows (kernel, stride, padding) pooled by softmax(x / T) weights instead of a max."""

    def __init__(self, pool: nn.MaxPool2d) -> None:
        super().__init__()
        self.kernel = _pair(pool.kernel_size)
        self.stride = _pair(pool.stride or pool.kernel_size)
        self.padding = _pair(pool.padding)
        self.temperature = 1.0

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        planes = x.reshape(n * c, 1, h, w)
        if any(self.padding):
            # max_pool2d pads with -inf; the most negative finite value keeps softmax and 0 * value finite.
            pad_h, pad_w = self.padding
            planes = F.pad(planes, (pad_w, pad_w, pad_h, pad_h), value=torch.finfo(x.dtype).min)
        windows = F.unfold(planes, self.kernel, stride=self.stride)  # (n*c, kh*kw, out_h*out_w)
        pooled = (torch.softmax(windows / self.temperature, dim=1) * windows).sum(dim=1)
        out_h = (h + 2 * self.padding[0] - self.kernel[0]) // self.stride[0] + 1
        return pooled.reshape(n, c, out_h, -1)


def _softenable(pool: nn.Module) -> bool:
    # Dilated, ceil-mode and index-returning pools keep their exact form (none of the victims has one).
    return (isinstance(pool, nn.MaxPool2d) and pool.dilation in (1, (1, 1)) and not pool.ceil_mode
            and not pool.return_indices)


class SoftenedVictim:
    """The exact victim and its softened copy, and which of the two an iteration of a phase uses.

    A model without a softenable max-pool, or `start` 0, has no copy: every iteration is exact.
    """

    def __init__(self, model: nn.Module, params: Sequence[Tensor], *, start: float, end: float,
                 fraction: float) -> None:
        self.model, self.params = model, list(params)
        self.start, self.end, self.fraction = start, end, fraction
        self.soft_model: nn.Module | None = None
        self.soft_params: list[Tensor] = []
        self.pools: list[SoftMaxPool2d] = []
        if start > 0 and any(_softenable(m) for m in model.modules()):
            soft = copy.deepcopy(model)
            for parent in list(soft.modules()):
                for name, child in list(parent.named_children()):
                    if _softenable(child):
                        pool = SoftMaxPool2d(child)  # type: ignore[arg-type]
                        setattr(parent, name, pool)
                        self.pools.append(pool)
            self.soft_model = soft
            self.soft_params = trainable_parameters(soft)

    def temperature(self, iteration: int, steps: int) -> float | None:
        """T at `iteration` (1-based) of a phase of `steps`, or None where the phase runs the exact model."""
        soft_steps = int(steps * self.fraction)
        if self.soft_model is None or iteration > soft_steps:
            return None
        progress = (iteration - 1) / max(soft_steps - 1, 1)
        return self.start * (self.end / self.start) ** progress

    def at(self, iteration: int, steps: int) -> tuple[nn.Module, list[Tensor], float | None]:
        """(model, its trainable parameters, T or None) for this iteration of a phase."""
        temperature = self.temperature(iteration, steps)
        if temperature is None:
            return self.model, self.params, None
        for pool in self.pools:
            pool.temperature = temperature
        return self.soft_model, self.soft_params, temperature  # type: ignore[return-value]
