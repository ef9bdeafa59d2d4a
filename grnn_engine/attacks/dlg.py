"""DLG: Deep Leakage from Gradients (Zhu, Liu and Han, NeurIPS 2019).

Dummy images and dummy label logits, both drawn from N(0, 1), are fitted with L-BFGS so that the victim's
gradient on (images, softmax(logits)) matches the shared gradient in squared L2 distance. Defaults follow
the authors' code: L-BFGS lr 1, 20 inner evaluations per step (PyTorch's `max_iter` default), 300 steps.
The L-BFGS loop lives here and is shared with iDLG, which differs only in fixing the labels.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from grnn_engine.attacks.base import (
    ATTACKS,
    Attack,
    AttackInputs,
    BestIterate,
    Reconstruction,
    log_answer,
    log_iteration,
    random_start,
    squared_gradient_distance,
    victim_gradient,
)
from grnn_engine.errors import ConfigError


def check_lbfgs_settings(name: str, iterations: int, max_iter: int, lr: float) -> None:
    """ConfigError (one sentence) for L-BFGS settings out of range."""
    if not isinstance(iterations, int) or iterations < 1:
        raise ConfigError(f"{name} iterations must be an integer >= 1 (got {iterations!r})")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ConfigError(f"{name} max_iter must be an integer >= 1 (got {max_iter!r})")
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"{name} lr must be a finite number > 0 (got {lr!r})")


def lbfgs_gradient_matching(
    model: nn.Module,
    inputs: AttackInputs,
    dummy: Tensor,
    *,
    logits: Tensor | None,
    labels: Tensor | None,
    iterations: int,
    max_iter: int,
    lr: float,
) -> tuple[list[Tensor], list[dict[str, float]]]:
    """Fit `dummy` (and `logits` when given, else fixed `labels`) by L-BFGS on the squared gradient distance.

    Returns the best iterate ([images] or [images, logits], lowest finite loss seen at any closure
    evaluation) and the history, which ends with that answer (`log_answer`). Stops at the first non-finite
    step loss: L-BFGS diverges on some real images, and the best finite iterate is then still a fair (poor)
    answer.
    """
    params, target = inputs.params, inputs.target
    eval_every, evaluate, progress = inputs.eval_every, inputs.evaluate, inputs.progress
    variables = [dummy] if logits is None else [dummy, logits]
    optimizer = torch.optim.LBFGS(variables, lr=lr, max_iter=max_iter)
    best = BestIterate(*variables)

    def closure() -> Tensor:
        targets = labels if logits is None else torch.softmax(logits, dim=1)
        assert targets is not None
        fake = victim_gradient(model, params, dummy, targets, create_graph=True)
        loss = squared_gradient_distance(fake, target)
        # autograd.grad, not backward(): the victim's own .grad buffers are never touched.
        for v, g in zip(variables, torch.autograd.grad(loss, variables), strict=True):
            v.grad = g
        best.offer(loss, *variables)
        return loss

    history: list[dict[str, float]] = []
    for it in range(1, iterations + 1):
        log_now = it % eval_every == 0 or it == iterations
        # The step's loss is measured at the iterate before the step, so that is the one to score.
        before = dummy.detach().clone() if log_now and evaluate is not None else dummy
        step_loss = optimizer.step(closure)
        # L-BFGS already read this loss on the host inside step(), so reading it again costs no extra sync.
        value = float(step_loss.detach())
        finite = math.isfinite(value)
        if log_now or not finite:
            log_iteration(history, iteration=it, iterations=iterations, grad_loss=value,
                          images=before, evaluate=evaluate, progress=progress)
        if not finite:
            break
    log_answer(history, iterations=iterations, grad_loss=best.loss, images=best.values[0], evaluate=evaluate,
               progress=progress)
    return best.values, history


class LbfgsAttack(Attack):
    """DLG's settings, shared by DLG and iDLG: iterations (L-BFGS steps), max_iter (evaluations per step), lr."""

    name: ClassVar[str]

    def __init__(self, *, iterations: int = 300, max_iter: int = 20, lr: float = 1.0) -> None:
        check_lbfgs_settings(self.name, iterations, max_iter, lr)
        self.iterations = iterations
        self.max_iter = max_iter
        self.lr = lr


@ATTACKS.register("dlg")
class DLG(LbfgsAttack):
    """DLG with the authors' defaults (see LbfgsAttack)."""

    name = "dlg"

    def _run(self, model: nn.Module, inputs: AttackInputs) -> Reconstruction:
        dummy = random_start((inputs.batch_size, *inputs.image_shape), inputs.generator, like=inputs.params[0])
        logits = random_start((inputs.batch_size, inputs.num_classes), inputs.generator, like=inputs.params[0])
        (images, best_logits), history = lbfgs_gradient_matching(
            model, inputs, dummy, logits=logits, labels=None, iterations=self.iterations, max_iter=self.max_iter,
            lr=self.lr,
        )
        return Reconstruction(
            images=images.clamp(0, 1), labels=best_logits.argmax(dim=1).long(), history=history
        )
