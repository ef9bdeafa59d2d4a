"""GradInversion (Yin, Mallya, Vahdat, Alvarez, Kautz and Molchanov, CVPR 2021): gradient matching with a
BatchNorm statistics prior.

Threat model: an honest-but-curious server that knows the model, BatchNorm running statistics included
(they travel with the global model), and receives the gradient of a fedsgd step the client took with
BatchNorm in train mode (victims resnet18/resnet20 with `bn_mode: train`; `update: fedsgd`). A user's own
victim by import path is attacked too when its model has BatchNorm layers that keep running statistics (any
torch.nn BatchNorm, 1d to 3d; checked on the built model); a model without them is refused. The running
statistics are the global model's, i.e. those of the data it was trained on, not of the client's batch:
the prior says "the batch's features look like the training data's", which is the paper's assumption.
On an untrained model (fl_round 0) the running statistics are PyTorch's 0 / 1 and carry no information.

The attacker fits images x in [0, 1] (B, C, H, W) to minimise
    grad_weight * sum ||g(x, y) - g_shared||^2             (euclidean gradient matching)
  + bn_weight   * sum over BatchNorm layers l of ||mu_l(x) - running_mean_l||_2 + ||var_l(x) - running_var_l||_2
  + tv_weight   * mean absolute neighbour difference (anisotropic TV, the paper's)
  + l2_weight   * ||x||_2^2 / B
where mu_l, var_l are the per-channel mean and biased variance of layer l's input over the batch (DeepInversion's
feature-distribution regulariser). Labels are inferred from the classifier's gradient (iDLG / batch label
counts, `labels_from_gradient`), standing in for the paper's label restoration, which reads the same gradient.

Defaults are the paper's settings as the authors' group encodes them in breaching ("see-through-gradients"):
Adam, lr 0.1 with 50 warm-up steps then cosine decay, 20,000 iterations, images boxed to [0, 1] after each
step, Langevin noise 0.01 * lr per step (the paper's 0.2 is, in breaching's experience, too large),
grad_weight 1e-4, bn_weight 0.1, tv_weight 1e-4, l2_weight 1e-6. Not implemented: the paper's group
consistency term, which needs several parallel optimisations and registration between them.
The answer is the iterate with the lowest total loss seen (the last one when the optimisation converged).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from grnn_engine.attacks.base import (
    ATTACKS,
    Attack,
    AttackInputs,
    BestIterate,
    Reconstruction,
    batchnorm_layers,
    check_batchnorm,
    labels_from_gradient,
    log_answer,
    log_iteration,
    random_start,
    squared_gradient_distance,
    victim_gradient,
)
from grnn_engine.errors import ConfigError

WARMUP_STEPS = 50


def absolute_total_variation(images: Tensor) -> Tensor:
    """Mean absolute difference between horizontal and vertical neighbours (the paper's TV), summed."""
    dh = (images[:, :, 1:, :] - images[:, :, :-1, :]).abs().mean()
    dw = (images[:, :, :, 1:] - images[:, :, :, :-1]).abs().mean()
    return dh + dw


class BatchNormPrior:
    """Collects, during a forward pass, each BatchNorm layer's distance between the batch's input statistics
    and the layer's running statistics (DeepInversion's R_feature). Use as a context manager.

    Every BatchNorm that keeps running statistics counts (`batchnorm_layers`: 1d, 2d, 3d and subclasses); the
    statistics are per channel (dim 1), over the batch and every position (all the other dims)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = batchnorm_layers(model)
        self.terms: list[Tensor] = []
        self._handles: list[Any] = []

    def __enter__(self) -> BatchNormPrior:
        self._handles = [m.register_forward_hook(self._record) for m in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x = inputs[0]
        dims = (0, *range(2, x.dim()))
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False)
        assert module.running_mean is not None and module.running_var is not None
        assert isinstance(module.running_mean, Tensor) and isinstance(module.running_var, Tensor)
        self.terms.append(
            torch.linalg.vector_norm(mean - module.running_mean) + torch.linalg.vector_norm(var - module.running_var)
        )

    def take(self) -> Tensor:
        """The summed distance of the last forward pass, and a fresh start for the next."""
        total = torch.stack(self.terms).sum()
        self.terms = []
        return total


def _check_weight(name: str, value: object) -> float:
    if not (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0):
        raise ConfigError(f"gradinversion {name} must be a finite number >= 0 (got {value!r})")
    return float(value)


@ATTACKS.register("gradinversion")
class GradInversion(Attack):
    """GradInversion with the paper's settings (see the module docstring). Needs a BatchNorm victim: resnet18,
    resnet20, or a user's model by import path with BatchNorm layers (`user_models`, `requires_batchnorm`).

    Parameters: iterations (Adam steps), lr, grad_weight, bn_weight, tv_weight, l2_weight, langevin (noise
    scale relative to the current lr; 0 turns it off).
    """

    name = "gradinversion"
    requires_victims = ("resnet20", "resnet18")
    user_models = "a model of your own with BatchNorm layers"
    requires_batchnorm = True

    def __init__(
        self,
        *,
        iterations: int = 20_000,
        lr: float = 0.1,
        grad_weight: float = 1e-4,
        bn_weight: float = 0.1,
        tv_weight: float = 1e-4,
        l2_weight: float = 1e-6,
        langevin: float = 0.01,
    ) -> None:
        if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
            raise ConfigError(f"gradinversion iterations must be an integer >= 1 (got {iterations!r})")
        if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
            raise ConfigError(f"gradinversion lr must be a finite number > 0 (got {lr!r})")
        self.iterations = iterations
        self.lr = float(lr)
        self.grad_weight = _check_weight("grad_weight", grad_weight)
        self.bn_weight = _check_weight("bn_weight", bn_weight)
        self.tv_weight = _check_weight("tv_weight", tv_weight)
        self.l2_weight = _check_weight("l2_weight", l2_weight)
        self.langevin = _check_weight("langevin", langevin)

    def _schedule(self, step: int) -> float:
        """Learning-rate factor after `step` steps: linear warm-up, then cosine decay to 0."""
        warmup = min(WARMUP_STEPS, self.iterations // 10)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, self.iterations - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))

    def _run(self, model: nn.Module, inputs: AttackInputs) -> Reconstruction:
        params, target, generator = inputs.params, inputs.target, inputs.generator
        prior = BatchNormPrior(model)
        if not prior.layers:
            check_batchnorm(model, self.name)
        labels = labels_from_gradient(model, target, batch_size=inputs.batch_size, image_shape=inputs.image_shape,
                                      generator=generator)  # fmt: skip
        x = random_start((inputs.batch_size, *inputs.image_shape), generator, like=params[0])
        optimizer = torch.optim.Adam([x], lr=self.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._schedule)
        # The answer is the iterate of lowest total loss; its two terms are kept with it for the history.
        best = BestIterate(x, torch.zeros((), device=x.device), torch.zeros((), device=x.device))
        history: list[dict[str, float]] = []
        with prior:
            for it in range(1, self.iterations + 1):
                fake = victim_gradient(model, params, x, labels, create_graph=True)
                grad_loss = squared_gradient_distance(fake, target)
                bn_loss = prior.take()
                loss = self.grad_weight * grad_loss + self.bn_weight * bn_loss
                if self.tv_weight:
                    loss = loss + self.tv_weight * absolute_total_variation(x)
                if self.l2_weight:
                    loss = loss + self.l2_weight * x.pow(2).sum() / inputs.batch_size
                (x.grad,) = torch.autograd.grad(loss, [x])
                best.offer(loss, x, grad_loss, bn_loss)
                log_now = it % inputs.eval_every == 0 or it == self.iterations
                before = x.detach().clone() if log_now and inputs.evaluate is not None else x
                current_lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                with torch.no_grad():
                    if self.langevin:
                        noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
                        x.add_(noise, alpha=self.langevin * current_lr)
                    x.clamp_(0, 1)
                if log_now:
                    value = log_iteration(history, iteration=it, iterations=self.iterations, grad_loss=grad_loss,
                                          images=before, evaluate=inputs.evaluate, progress=inputs.progress,
                                          extra={"bn_loss": float(bn_loss.detach())})  # fmt: skip
                    if not math.isfinite(value):
                        break
        answer, answer_grad_loss, answer_bn_loss = best.values
        log_answer(history, iterations=self.iterations, grad_loss=answer_grad_loss, images=answer,
                   evaluate=inputs.evaluate, progress=inputs.progress, extra={"bn_loss": float(answer_bn_loss)})
        return Reconstruction(images=answer.clamp(0, 1), labels=labels.long(), history=history)
