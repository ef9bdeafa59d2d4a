"""R-GAP: Recursive Gradient Attack on Privacy (Zhu and Blaschko, ICLR 2021), the analytic single-image attack.

Why this one: it is the analytic attack of the gradient-inversion literature that needs neither a
malicious server (imprint) nor an optimiser, and it runs on the victim DLG itself was shown on
(`lenet_zhu`: 5x5 convolutions with sigmoids, then one linear classifier): given one image's gradient it
solves for the image layer by layer, from the classifier down, with linear least squares.

Recursion, for B = 1 (the shared gradient of the loss at one image):
- the classifier's bias gradient is dL/dlogits, g; its weight gradient is g x^T, so its input x (the last
  hidden activation) is g^T dW / g^T g, and dL/dx is W^T g;
- a layer below: its output a = sigmoid(z) is known from the step above, so z = logit(a) and
  dL/dz = dL/da * a * (1 - a). Its input x satisfies two sets of linear equations: the forward pass
  W x = z - b, and the weight gradient dW = sum over positions of dL/dz times x's patches. Stacked (each
  block scaled to unit norm, so neither swamps the other) they are solved for x by least squares; then
  dL/dx = W^T dL/dz, and the recursion goes on until x is the image.
Every step is exact for an exact gradient; noise and rank deficiency (a strided convolution has fewer
outputs than inputs, which the gradient equations make up) are absorbed by the least squares.

Threat model: an honest-but-curious server with the model and one client's fedsgd gradient of one image;
no prior, no labels needed (they come from the classifier's gradient, as iDLG). Victims: models that apply,
in the order they define them, Conv2d (groups 1, no dilation) and Linear layers, each with a bias and, but
for the last (a Linear), followed by a Sigmoid (nn.Flatten allowed): `lenet_zhu`. Anything else is
refused in one line. No parameters; `iterations` is 1: one analytic pass.

A batch (B > 1) breaks R-GAP's premise (each weight gradient is then a sum of B rank-one terms): the
recursion reads the batch's gradient as one image's and its one estimate fills every slot, so a sweep over
batch sizes shows what R-GAP recovers there (scored like any attack: a blend, far below 20 dB).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.grad import conv2d_input

from grnn_engine.attacks.base import (
    ATTACKS,
    Attack,
    AttackInputs,
    Reconstruction,
    labels_from_gradient,
    shared_layer_gradient,
)
from grnn_engine.errors import ConfigError

# Basis images pushed through a layer at once when its equations are built: bounds their memory.
_BASIS_CHUNK = 256
# Activations are clamped into (_EDGE, 1 - _EDGE) before the logit: a noisy estimate may leave (0, 1).
_EDGE = 1e-6
# Tikhonov weight of the least squares, relative to the normal matrix's mean diagonal.
_RIDGE = 1e-12
# Each layer's input is solved from n x n float64 normal equations (three such matrices live at once): 12288
# values (a 3x64x64 image) take 3.6 GB, beyond which a trial would exhaust a worker's memory.
MAX_LAYER_INPUT = 12288


def leaf_layers(model: nn.Module) -> list[nn.Module]:
    """The model's layers (modules without children) in definition order, Flatten dropped."""
    return [m for m in model.modules() if not list(m.children()) and not isinstance(m, nn.Flatten)]


def plain_convolution(conv: nn.Conv2d) -> bool:
    """Groups 1, no dilation, zero padding given in pixels: a convolution whose equations LayerEquations builds."""
    return (conv.groups == 1 and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def applies_in_order(model: nn.Module, image_shape: tuple[int, int, int], forward: Callable[[Tensor], Tensor]) -> bool:
    """Whether `forward` (the model's layers applied one after another) computes what the model computes, on one
    random probe image: layers defined in one order can be applied in another, or beside other operations."""
    param = next(model.parameters())
    probe = torch.rand((1, *image_shape), generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
    with torch.no_grad():
        got, expected = forward(probe), model(probe)
    return got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


def _layers(model: nn.Module) -> list[nn.Module]:
    """The model's layers in definition order (Flatten dropped); ConfigError when R-GAP cannot invert them."""
    leaves = leaf_layers(model)
    for m in leaves:
        if not isinstance(m, nn.Conv2d | nn.Linear | nn.Sigmoid):
            raise ConfigError(f"attack 'rgap' inverts Conv2d, Linear and Sigmoid layers only; "
                              f"{type(model).__name__} has a {type(m).__name__}")
        if isinstance(m, nn.Conv2d | nn.Linear) and m.bias is None:
            raise ConfigError(f"attack 'rgap' needs every Conv2d and Linear layer to have a bias; "
                              f"{type(model).__name__} has one without")
        if isinstance(m, nn.Conv2d) and not plain_convolution(m):
            raise ConfigError("attack 'rgap' needs plain convolutions (groups 1, no dilation, zero padding given in "
                              "pixels)")
    kinds = ["weight" if isinstance(m, nn.Conv2d | nn.Linear) else "sigmoid" for m in leaves]
    expected = ["weight", "sigmoid"] * (len(kinds) // 2) + ["weight"]
    if kinds != expected or not isinstance(leaves[-1], nn.Linear):
        raise ConfigError(f"attack 'rgap' needs layers that alternate weight layer and Sigmoid and end in a "
                          f"Linear classifier; {type(model).__name__} does not")
    return leaves


def _check_chain(model: nn.Module, layers: list[nn.Module], image_shape: tuple[int, int, int]
                 ) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The layers, applied in definition order, must be the model: R-GAP inverts that chain. Returns the
    (input shape, output shape), without the batch dimension, of every Conv2d/Linear layer of it."""
    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def forward(x: Tensor) -> Tensor:
        for layer in layers:
            if isinstance(layer, nn.Linear):
                x = x.flatten(1)
            y = layer(x)
            if not isinstance(layer, nn.Sigmoid):
                shapes.append((tuple(x.shape[1:]), tuple(y.shape[1:])))
            x = y
        return x

    if not applies_in_order(model, image_shape, forward):
        raise ConfigError(f"attack 'rgap' needs a model that applies its layers in the order it defines them; "
                          f"{type(model).__name__} does not")
    return shapes


def _layer_gradients(layer: nn.Conv2d | nn.Linear, inputs: AttackInputs) -> tuple[Tensor, Tensor]:
    shared = shared_layer_gradient(layer, inputs.params, inputs.target)
    if shared is None:
        raise ConfigError("attack 'rgap' needs the gradient of every layer's weight and bias (all trainable)")
    return shared[0].double(), shared[1].double()


class LayerEquations:
    """The two linear maps of a weight layer's input x, given dL/dz `dz` (the output's shape, no batch
    dimension), and their adjoints, all batched over x: the forward pass x -> W x (no bias), and the weight
    gradient x -> dW. Built from convolution primitives, never as matrices. `rows` (0/1, the output's shape)
    keeps only the forward equations of the outputs it marks: behind a max-pool only each window's winner is
    known (attacks/layer_refine.py)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, in_shape: tuple[int, ...], dz: Tensor,
                 rows: Tensor | None = None) -> None:
        self.in_shape, self.dz, self.rows = in_shape, dz, rows
        self.weight = layer.weight.detach().double()
        self.bias = cast(Tensor, layer.bias).detach().double()  # `_layers` refuses a layer without one
        self.linear = isinstance(layer, nn.Linear)
        if isinstance(layer, nn.Conv2d):  # its geometry; padding is numbers (`_layers` refuses "same"/"valid")
            self.kernel, self.stride = layer.kernel_size, layer.stride
            self.padding = cast(tuple[int, ...], layer.padding)

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.weight.T if self.linear else F.conv2d(x, self.weight, stride=self.stride, padding=self.padding)
        return y if self.rows is None else y * self.rows

    def forward_adjoint(self, y: Tensor) -> Tensor:
        if self.rows is not None:
            y = y * self.rows
        if self.linear:
            return y @ self.weight
        return conv2d_input((y.shape[0], *self.in_shape), self.weight, y, stride=self.stride, padding=self.padding)

    def gradient(self, x: Tensor) -> Tensor:
        if self.linear:
            return torch.einsum("o,ni->noi", self.dz, x)
        patches = F.unfold(x, self.kernel, padding=self.padding, stride=self.stride)  # (n, C*k*k, L)
        return torch.einsum("ol,nql->noq", self.dz.flatten(1), patches).reshape(x.shape[0], *self.weight.shape)

    def gradient_adjoint(self, w: Tensor) -> Tensor:
        if self.linear:
            return torch.einsum("o,noi->ni", self.dz, w)
        patches = torch.einsum("ol,noq->nql", self.dz.flatten(1), w.flatten(2))
        return F.fold(patches, self.in_shape[1:], self.kernel, padding=self.padding, stride=self.stride)


def solve_layer_input(maps: LayerEquations, z: Tensor, weight_grad: Tensor) -> Tensor:
    """The layer's input from its pre-activation z and its weight gradient (dL/dz is in `maps`): the least
    squares of both sets of equations, each scaled to unit Frobenius norm, through its normal equations."""
    in_shape, dz = maps.in_shape, maps.dz
    n = math.prod(in_shape)
    forward_gram = torch.empty((n, n), dtype=torch.float64, device=dz.device)
    gradient_gram = torch.empty_like(forward_gram)
    for start in range(0, n, _BASIS_CHUNK):
        count = min(_BASIS_CHUNK, n - start)
        basis = torch.zeros((count, n), dtype=torch.float64, device=dz.device)
        basis[torch.arange(count), torch.arange(start, start + count)] = 1.0
        basis = basis.reshape(count, *in_shape)
        forward_gram[start : start + count] = maps.forward_adjoint(maps.forward(basis)).reshape(count, n)
        gradient_gram[start : start + count] = maps.gradient_adjoint(maps.gradient(basis)).reshape(count, n)
    shift = maps.bias.view(-1, *([1] * (z.dim() - 1)))
    rhs_forward = maps.forward_adjoint((z - shift).unsqueeze(0)).reshape(n)
    rhs_gradient = maps.gradient_adjoint(weight_grad.unsqueeze(0)).reshape(n)
    normal = torch.zeros_like(forward_gram)
    rhs = torch.zeros(n, dtype=torch.float64, device=dz.device)
    for gram, target in ((forward_gram, rhs_forward), (gradient_gram, rhs_gradient)):
        scale = float(gram.diagonal().sum())  # the squared Frobenius norm of the block's matrix
        if scale > 0:
            normal += gram / scale
            rhs += target / scale
    # A vanishing ridge keeps a rank-deficient system (too few equations for some input) solvable.
    normal.diagonal().add_(_RIDGE * float(normal.diagonal().mean()))
    solution = torch.cholesky_solve(rhs.unsqueeze(1), torch.linalg.cholesky(normal))
    return solution.reshape(in_shape)


@ATTACKS.register("rgap")
class RGap(Attack):
    """Zhu and Blaschko's R-GAP (analytic, one image; victim `lenet_zhu` or a model of that form). No parameters."""

    name = "rgap"
    requires_victims = ("lenet_zhu",)
    user_models = ("a model of your own of Conv2d and Linear layers with biases alternating with Sigmoid and "
                   "ending in a Linear classifier")
    analytic = True

    @classmethod
    def check_model(cls, model: nn.Module, victim: str) -> None:
        """The layer checks of `_layers` on the built model (their order is checked at run time, on an image)."""
        _layers(model)

    def __init__(self) -> None:
        self.iterations = 1

    def _run(self, model: nn.Module, inputs: AttackInputs) -> Reconstruction:
        layers = _layers(model)
        shapes = _check_chain(model, layers, inputs.image_shape)
        weights = [m for m in layers if isinstance(m, nn.Conv2d | nn.Linear)]
        largest = max(math.prod(in_shape) for in_shape, _ in shapes[:-1]) if len(shapes) > 1 else 0
        if largest > MAX_LAYER_INPUT:
            raise ConfigError(f"attack 'rgap' solves each layer's input by an n x n system; a layer of "
                              f"{type(model).__name__} has n = {largest} inputs at image shape {inputs.image_shape}; "
                              f"allowed: at most {MAX_LAYER_INPUT} (3x64x64 images)")
        classifier = weights[-1]
        weight_grad, bias_grad = _layer_gradients(classifier, inputs)
        # The classifier's input from its gradient: dW = g x^T with g = its bias gradient.
        g = bias_grad
        x = (g @ weight_grad) / g.dot(g).clamp(min=1e-300)
        dx = classifier.weight.detach().double().T @ g
        for layer, (in_shape, out_shape) in zip(reversed(weights[:-1]), reversed(shapes[:-1]), strict=True):
            a = x.reshape(out_shape).clamp(_EDGE, 1 - _EDGE)
            z = torch.logit(a)
            dz = dx.reshape(out_shape) * a * (1 - a)
            weight_grad, _ = _layer_gradients(layer, inputs)
            maps = LayerEquations(layer, in_shape, dz)
            x = solve_layer_input(maps, z, weight_grad)
            dx = maps.forward_adjoint(dz.unsqueeze(0))[0]  # W^T dL/dz
        param = inputs.params[0]
        # A batch's gradient is read as one image's: the one estimate fills every slot (see the module's note).
        images = x.reshape(1, *inputs.image_shape).expand(inputs.batch_size, -1, -1, -1)
        images = images.to(param.device, param.dtype).contiguous()
        labels = labels_from_gradient(model, inputs.target, batch_size=inputs.batch_size,
                                      image_shape=inputs.image_shape, generator=inputs.generator)
        return Reconstruction(images=images.clamp(0, 1), labels=labels.long(), history=[])
