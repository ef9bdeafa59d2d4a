"""Inverting Gradients (Geiping, Bauermeister, Droege and Moeller, NeurIPS 2020).

Labels are inferred as in iDLG; the images, parametrised directly in [0, 1] (our images are not
normalised) and initialised from N(0, 1) as in the authors' code, minimise a cosine gradient distance plus
`tv_weight` * total variation. As in that code: Adam on the *sign* of the image gradient, the image boxed
to [0, 1] after each step, the learning rate cut x0.1 at 3/8, 5/8 and 7/8 of the iterations, and of several
restarts the one with the lowest gradient loss wins.

tv_weight defaults to 1e-2, not the paper's 1e-4: our `total_variation` is a mean *squared* neighbour
difference (Geiping's is a mean absolute one), so the same weight regularises far less. Measured with
4800 steps, B = 1, untrained lenet, mean PSNR of 2 images: CIFAR-10 13.7 / 17.6 / 16.8 dB and digits
12.6 / 17.1 / 16.3 dB for tv_weight 1e-4 / 1e-2 / 1e-1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from grnn_engine.attacks.base import (
    ATTACKS,
    Attack,
    AttackInputs,
    BestIterate,
    EvaluateFn,
    ProgressFn,
    Reconstruction,
    labels_from_gradient,
    log_answer,
    log_iteration,
    random_start,
    total_variation,
    victim_gradient,
)
from grnn_engine.errors import ConfigError

DISTANCES = ("layer_cosine", "cosine")
# Keeps a cosine finite when a gradient (or a pruned target layer) is exactly zero.
_TINY = 1e-30


class CosineDistance:
    """1 - cosine similarity to a fixed target gradient, whose norms are computed once.

    `layer_cosine`: mean over layers of 1 - cos(g_l, t_l). `cosine`: 1 - cos over all layers at once, as
    in Geiping et al.'s code. Per-layer dot products are summed without flattening or concatenating.
    """

    def __init__(self, target: Sequence[Tensor], kind: str) -> None:
        self.target = list(target)
        self.kind = kind
        squares = torch.stack([t.pow(2).sum() for t in self.target])
        self.target_norm = (squares if kind == "layer_cosine" else squares.sum()).clamp(min=_TINY).sqrt()

    def __call__(self, fake: Sequence[Tensor]) -> Tensor:
        dots = torch.stack([(f * t).sum() for f, t in zip(fake, self.target, strict=True)])
        squares = torch.stack([f.pow(2).sum() for f in fake])
        if self.kind == "layer_cosine":
            return (1 - dots / (squares.clamp(min=_TINY).sqrt() * self.target_norm)).mean()
        return 1 - dots.sum() / (squares.sum().clamp(min=_TINY).sqrt() * self.target_norm)


@ATTACKS.register("ig")
class InvertingGradients(Attack):
    """Inverting Gradients with the authors' defaults.

    Parameters: iterations (Adam steps per restart), restarts (each from a new random start; total steps
    = iterations * restarts, which is what `self.iterations` holds), lr (Adam), tv_weight (total-variation
    weight), distance ("layer_cosine" or "cosine").
    """

    name = "ig"

    def __init__(
        self,
        *,
        iterations: int = 4800,
        restarts: int = 1,
        lr: float = 0.1,
        tv_weight: float = 1e-2,
        distance: str = "layer_cosine",
    ) -> None:
        if not isinstance(iterations, int) or iterations < 1:
            raise ConfigError(f"ig iterations must be an integer >= 1 (got {iterations!r})")
        if not isinstance(restarts, int) or restarts < 1:
            raise ConfigError(f"ig restarts must be an integer >= 1 (got {restarts!r})")
        if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
            raise ConfigError(f"ig lr must be a finite number > 0 (got {lr!r})")
        if not (isinstance(tv_weight, int | float) and math.isfinite(tv_weight) and tv_weight >= 0):
            raise ConfigError(f"ig tv_weight must be a finite number >= 0 (got {tv_weight!r})")
        if distance not in DISTANCES:
            raise ConfigError(f"ig distance must be one of {', '.join(DISTANCES)} (got {distance!r})")
        self.steps_per_restart = iterations
        self.restarts = restarts
        self.iterations = iterations * restarts
        self.lr = lr
        self.tv_weight = tv_weight
        self.distance = distance

    def _run(self, model: nn.Module, inputs: AttackInputs) -> Reconstruction:
        params, target, generator = inputs.params, inputs.target, inputs.generator
        batch_size, image_shape = inputs.batch_size, inputs.image_shape
        progress, evaluate, eval_every = inputs.progress, inputs.evaluate, inputs.eval_every
        labels = labels_from_gradient(
            model, target, batch_size=batch_size, image_shape=image_shape, generator=generator
        )
        distance = CosineDistance(target, self.distance)

        history: list[dict[str, float]] = []
        best_images: Tensor | None = None
        best_loss = math.inf
        for restart in range(self.restarts):
            images, loss = self._one_restart(
                model, params, distance, labels, restart, batch_size, image_shape, generator,
                history, eval_every, evaluate, progress,
            )
            # One host sync per restart; a restart that never had a finite loss only wins if none did.
            if best_images is None or loss < best_loss:
                best_images, best_loss = images, loss
        assert best_images is not None
        log_answer(history, iterations=self.iterations, grad_loss=best_loss, images=best_images, evaluate=evaluate,
                   progress=progress)
        return Reconstruction(images=best_images.clamp(0, 1), labels=labels.long(), history=history)

    def _one_restart(
        self,
        model: nn.Module,
        params: Sequence[Tensor],
        distance: CosineDistance,
        labels: Tensor,
        restart: int,
        batch_size: int,
        image_shape: tuple[int, int, int],
        generator: torch.Generator,
        history: list[dict[str, float]],
        eval_every: int,
        evaluate: EvaluateFn | None,
        progress: ProgressFn | None,
    ) -> tuple[Tensor, float]:
        """One optimisation from a fresh random start: (best images, their gradient loss)."""
        steps = self.steps_per_restart
        x = random_start((batch_size, *image_shape), generator, like=params[0])
        optimizer = torch.optim.Adam([x], lr=self.lr)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=[steps * 3 // 8, steps * 5 // 8, steps * 7 // 8], gamma=0.1
        )
        best = BestIterate(x)
        offset = restart * steps
        for it in range(1, steps + 1):
            fake = victim_gradient(model, params, x, labels, create_graph=True)
            grad_loss = distance(fake)
            loss = grad_loss + self.tv_weight * total_variation(x) if self.tv_weight else grad_loss
            (image_grad,) = torch.autograd.grad(loss, [x])
            best.offer(grad_loss, x)
            log_now = it % eval_every == 0 or it == steps
            # Score the iterate the loss was measured at, before the step moves it.
            before = x.detach().clone() if log_now and evaluate is not None else x
            x.grad = image_grad.sign()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                x.clamp_(0, 1)
            if log_now:
                value = log_iteration(history, iteration=offset + it, iterations=self.iterations,
                                      grad_loss=grad_loss, images=before, evaluate=evaluate, progress=progress)
                if not math.isfinite(value):
                    break
        return best.values[0], float(best.loss)
