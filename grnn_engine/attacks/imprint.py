"""Imprint ("Robbing the Fed", Fowl, Geiping, Czaja, Goldblum and Goldstein, ICLR 2022): the analytic attack.

Threat model: a malicious server. It sent the clients victim `imprint` (grnn_engine.imprint_victim), an
ordinary classifier behind an imprint block whose K neurons fire for images brighter than thresholds
q_0 < q_1 < ... < q_{K-1}; it receives an honest fedsgd gradient (or a fedavg delta, read as the mean
gradient it implies, which is exact only for one local step). It needs nothing else: no labels, no
optimisation, no prior.

Recovery, as in the paper: neuron i's weight gradient is (1/B) sum over the images brighter than q_i of
c_n x_n, its bias gradient (1/B) sum of c_n, with c_n the same for every neuron (see the victim). Bin i
(between q_i and q_{i+1}; the last one open above) is neuron i minus neuron i+1; a bin with one image
gives it exactly as weight difference / bias difference. A bin with several images gives their
c_n-weighted mean (a blend, which scores as a miss); empty bins give nothing (bias difference zero, or
below `tolerance` times the largest, which is float32 rounding of the cumulative sums).

The answer holds every non-empty bin's image (at most B; the B with the largest bias differences if
rounding made more), clamped to [0, 1], and mid-grey (0.5) images in the slots no bin filled: those
count as misses when the scorer matches them to the unrecovered images. Labels are the batch's label
counts read off the classifier's gradient (`labels_from_gradient`), in class order: the bins do not say
which label belongs to which image, so the per-image label accuracy is incidental; the label-set accuracy
is the meaningful one.

Parameters: tolerance (relative size below which a bin's bias difference counts as empty; 1e-6).
`iterations` is 1: one analytic pass.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from grnn_engine.attacks.base import (
    ATTACKS,
    Attack,
    AttackInputs,
    Reconstruction,
    labels_from_gradient,
    shared_layer_gradient,
)
from grnn_engine.errors import ConfigError
from grnn_engine.imprint_victim import ImprintBlock, find_imprint_block

# What an unfilled slot holds: a neutral image, so an unrecovered image is scored as a miss, not a fluke.
_MISSING_VALUE = 0.5


def bin_differences(weight_grad: Tensor, bias_grad: Tensor) -> tuple[Tensor, Tensor]:
    """Per-bin (weight, bias) gradients of an imprint block: each neuron minus the next; the last as is."""
    weight, bias = weight_grad.double(), bias_grad.double()
    bin_weight, bin_bias = weight.clone(), bias.clone()
    bin_weight[:-1] -= weight[1:]
    bin_bias[:-1] -= bias[1:]
    return bin_weight, bin_bias


def recover_from_bins(bin_weight: Tensor, bin_bias: Tensor, *, limit: int, tolerance: float) -> Tensor:
    """The images (n, D) of the non-empty bins (at most `limit`, largest |bias difference| first), unclamped."""
    size = bin_bias.abs()
    largest = float(size.max()) if size.numel() else 0.0
    if not largest > 0 or not math.isfinite(largest):
        return bin_weight.new_zeros((0, bin_weight.shape[1]))
    filled = torch.nonzero(size > tolerance * largest).flatten()
    filled = filled[size[filled].argsort(descending=True)][:limit]
    return bin_weight[filled] / bin_bias[filled, None]


@ATTACKS.register("imprint")
class Imprint(Attack):
    """Fowl et al.'s imprint attack (analytic; victim `imprint` only). Parameter: tolerance (1e-6)."""

    name = "imprint"
    requires_victims = ("imprint",)
    analytic = True

    def __init__(self, *, tolerance: float = 1e-6) -> None:
        if not (isinstance(tolerance, int | float) and math.isfinite(tolerance) and 0 <= tolerance < 1):
            raise ConfigError(f"imprint tolerance must be a number in [0, 1) (got {tolerance!r})")
        self.tolerance = float(tolerance)
        self.iterations = 1

    def _run(self, model: nn.Module, inputs: AttackInputs) -> Reconstruction:
        block = find_imprint_block(model)
        if block is None:
            raise ConfigError(
                f"attack 'imprint' needs the model the malicious server sent, victim 'imprint'; "
                f"{type(model).__name__} has no imprint block"
            )
        weight_grad, bias_grad = _block_gradients(block, inputs)
        bin_weight, bin_bias = bin_differences(weight_grad, bias_grad)
        found = recover_from_bins(bin_weight, bin_bias, limit=inputs.batch_size, tolerance=self.tolerance)
        shape = (inputs.batch_size, *inputs.image_shape)
        if found.shape[1] != math.prod(inputs.image_shape):
            raise ConfigError(
                f"attack 'imprint': the imprint block reads {found.shape[1]} values but images of shape "
                f"{inputs.image_shape} have {math.prod(inputs.image_shape)}"
            )
        images = torch.full(shape, _MISSING_VALUE, dtype=inputs.params[0].dtype, device=inputs.params[0].device)
        images[: found.shape[0]] = found.view(-1, *inputs.image_shape).to(images.dtype)
        labels = labels_from_gradient(model, inputs.target, batch_size=inputs.batch_size,
                                      image_shape=inputs.image_shape, generator=inputs.generator)  # fmt: skip
        return Reconstruction(images=images.clamp(0, 1), labels=labels.long(), history=[])


def _block_gradients(block: ImprintBlock, inputs: AttackInputs) -> tuple[Tensor, Tensor]:
    """The shared gradient of the block's measuring layer (weight, bias)."""
    shared = shared_layer_gradient(block.measure, inputs.params, inputs.target)
    if shared is None:
        raise ConfigError("attack 'imprint' needs the imprint block's measuring layer to be trainable (shared)")
    return shared
