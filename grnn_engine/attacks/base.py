"""The Attack interface: what every gradient-inversion attack receives, and what it returns.

An attacker sees exactly what a federated-learning server sees: the global model (architecture and
weights) and the update one client shared. It never sees the client's images or labels; the only
window onto the truth is an optional `evaluate` callback owned by the scorer, which an attack may call
every `eval_every` iterations to log PSNR in its history (never to steer the optimisation).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from grnn_engine.errors import ConfigError
from grnn_engine.registry import Registry, is_import_path

if TYPE_CHECKING:
    from grnn_engine.attacks.image_prior import PublicData

ProgressFn = Callable[[dict[str, Any]], None]
EvaluateFn = Callable[[Tensor], float]


@dataclass(frozen=True)
class SharedUpdate:
    """What one client transmits, as the attacker receives it (after any defense).

    `tensors` holds one tensor per trainable parameter of the model, in `model.parameters()` order.
    For `fedsgd` they are the gradient of the client's mean cross-entropy loss on its batch. For
    `fedavg` they are the model delta (new - old) after `local_steps` SGD steps at `local_lr`; the
    attacks match `as_gradient()`, the mean gradient that delta implies (-delta / (steps * lr)).
    """

    tensors: tuple[Tensor, ...]
    kind: str = "fedsgd"
    local_steps: int = 1
    local_lr: float = 1.0

    def as_gradient(self) -> tuple[Tensor, ...]:
        if self.kind == "fedsgd":
            return self.tensors
        scale = -1.0 / (self.local_steps * self.local_lr)
        return tuple(t * scale for t in self.tensors)


@dataclass
class Reconstruction:
    """An attack's answer: images in [0, 1] (B, C, H, W), hard labels (B,), and a short history.

    `history` is a list of dicts, one per logged iteration, each with at least `iteration` and
    `grad_loss`, and `psnr` when the scorer's evaluate callback was given.
    """

    images: Tensor
    labels: Tensor
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class AttackInputs:
    """What an attack's `_run` works from: the model's trainable parameters, the shared gradient as detached
    tensors on their device and dtype (`attack_inputs`), and the request `reconstruct` was given."""

    params: list[Tensor]
    target: list[Tensor]
    num_classes: int
    batch_size: int
    image_shape: tuple[int, int, int]
    generator: torch.Generator
    progress: ProgressFn | None
    evaluate: EvaluateFn | None
    eval_every: int


class Attack(ABC):
    """Base of every attack. Subclasses take their settings as keyword arguments in `__init__`, name
    themselves in `name`, and implement `_run`.

    `reconstruct` must be deterministic given `generator` (CPU), use only `model` and `shared_update`,
    and return images clamped to [0, 1]. `iterations` is the number of optimisation steps it will run.
    """

    name: ClassVar[str]
    iterations: int
    # The registered victims whose threat model the attack needs (e.g. the malicious server's `imprint` model);
    # None: any. A user's victim by import path is refused by name unless `user_models` lets it in.
    requires_victims: ClassVar[tuple[str, ...] | None] = None
    # What a user's model (a victim by import path) must be for an attack with `requires_victims`, in words
    # ("a model of your own with BatchNorm layers"), when `check_model` tells it from the built model; None:
    # users' models are refused by name.
    user_models: ClassVar[str | None] = None
    # True: the attack reads BatchNorm running statistics, so the victim's built model must have BatchNorm
    # layers that keep them (`check_model`; before a sweep the orchestrator checks each registered victim's
    # param sets for them).
    requires_batchnorm: ClassVar[bool] = False
    # True for closed-form attacks: the answer does not depend on the generator.
    analytic: ClassVar[bool] = False

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
        """Recover the client's batch from `shared_update` on `model`."""
        params, target = attack_inputs(self.name, model, shared_update, batch_size=batch_size, eval_every=eval_every)
        inputs = AttackInputs(params, target, num_classes, batch_size, image_shape, generator, progress, evaluate,
                              eval_every)  # fmt: skip
        return self._run(model, inputs)

    @classmethod
    def check_model(cls, model: nn.Module, victim: str) -> None:
        """ConfigError (one sentence) when the built `model` of victim `victim` is not one the attack can run
        on; run_trial calls it before any training."""
        if cls.requires_batchnorm:
            check_batchnorm(model, cls.name, victim)

    @classmethod
    def revision(cls, params: Mapping[str, Any]) -> int:
        """How many times what the attack computes with `params` has been changed on purpose since it was
        first released (a preset re-tuned); 0 until then. A non-zero revision enters the trial key
        (TrialSpec.canonical), so that a sweep resumed after such an upgrade recomputes the cells it changed
        instead of keeping their old rows."""
        return 0

    def bind_public_data(self, public: PublicData | None) -> None:
        """Where public images of the victim's domain are (a split disjoint from the attacked one; None when the
        batch comes from a dataset's `all`), for attacks with a learned prior; run_trial calls it before
        `reconstruct`, the others ignore it."""
        del public

    @abstractmethod
    def _run(self, model: nn.Module, inputs: AttackInputs) -> Reconstruction:
        """The attack itself, on checked inputs."""


ATTACKS: Registry[Attack] = Registry("attack")


def allowed_victims(attack: str) -> str | None:
    """The victims attack `attack` runs on, in words for an error's "allowed" part; None: any victim."""
    cls = ATTACKS.get(attack)
    needed = getattr(cls, "requires_victims", None)
    if needed is None:
        return None
    names = " or ".join(repr(v) for v in needed)
    users = getattr(cls, "user_models", None)
    return f"victim {names} or {users}" if users else f"victim {names}"


def runs_on_victim(attack: str, victim: str) -> bool:
    """Whether victim `victim`'s name lets attack `attack` run on it (`requires_victims`); a user's model by
    import path passes for an attack with `user_models` until its built model says otherwise (`check_model`)."""
    cls = ATTACKS.get(attack)
    needed = getattr(cls, "requires_victims", None)
    if needed is None or victim in needed:
        return True
    return getattr(cls, "user_models", None) is not None and is_import_path(victim)


def check_attack_victim(attack: str, victim: str, model: nn.Module | None = None) -> None:
    """ConfigError (one sentence) when attack `attack` cannot run on victim `victim`: by its name
    (`runs_on_victim`) and, given the built `model`, by what the attack asks of it (`Attack.check_model`)."""
    if not runs_on_victim(attack, victim):
        raise ConfigError(f"attack '{attack}' needs {allowed_victims(attack)} (got victim '{victim}')")
    check_model = getattr(ATTACKS.get(attack), "check_model", None)  # registered factories may be plain callables
    if model is not None and check_model is not None:
        check_model(model, victim)


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The model's BatchNorm layers (any torch.nn.modules.batchnorm._BatchNorm: BatchNorm1d/2d/3d, SyncBatchNorm
    and their subclasses) that keep running statistics, in `model.modules()` order."""
    return [
        m for m in model.modules()
        if isinstance(m, _BatchNorm) and m.running_mean is not None and m.running_var is not None
    ]  # fmt: skip


def check_batchnorm(model: nn.Module, attack: str, victim: str | None = None) -> None:
    """ConfigError (one sentence) when `model` (victim `victim`, when known) has no BatchNorm layer that keeps
    running statistics."""
    if batchnorm_layers(model):
        return
    who = f"victim '{victim}' ({type(model).__name__})" if victim else f"the victim ({type(model).__name__})"
    if any(isinstance(m, _BatchNorm) for m in model.modules()):
        what = "has BatchNorm layers that keep no running statistics (track_running_stats=False)"
    else:
        what = "has none"
    raise ConfigError(
        f"attack '{attack}' needs a victim with BatchNorm layers that keep running statistics, and {who} {what}; "
        f"allowed: {allowed_victims(attack) or 'a model with BatchNorm layers'}"
    )


def trainable_parameters(model: nn.Module) -> list[Tensor]:
    """The parameters whose gradients a client shares, in `model.parameters()` order."""
    return [p for p in model.parameters() if p.requires_grad]


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy for hard (B,) or soft (B, C) targets: the client's loss, as an attacker models it."""
    if targets.dim() == 1:
        return nn.functional.cross_entropy(logits, targets)
    return -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


def victim_gradient(
    model: nn.Module, params: Sequence[Tensor], images: Tensor, targets: Tensor, *, create_graph: bool
) -> tuple[Tensor, ...]:
    """Gradient of the mean cross-entropy of `model` on (images, targets) w.r.t. `params`."""
    loss = soft_cross_entropy(model(images), targets)
    return torch.autograd.grad(loss, params, create_graph=create_graph)


def squared_gradient_distance(fake: Sequence[Tensor], true: Sequence[Tensor]) -> Tensor:
    """Sum over all entries of (fake - true)^2: DLG's matching loss."""
    return torch.stack([(f - t).pow(2).sum() for f, t in zip(fake, true, strict=True)]).sum()


def total_variation(images: Tensor) -> Tensor:
    """Anisotropic squared TV as in the GRNN authors' code: mean squared neighbour difference, per image."""
    dh = (images[:, :, 1:, :] - images[:, :, :-1, :]).pow(2).mean(dim=(1, 2, 3))
    dw = (images[:, :, :, 1:] - images[:, :, :, :-1]).pow(2).mean(dim=(1, 2, 3))
    return 2.0 * (dh + dw).mean()


def infer_labels(
    last_weight_grad: Tensor,
    last_bias_grad: Tensor | None,
    batch_size: int,
    mean_probs: Tensor | None = None,
) -> Tensor:
    """Labels from the last linear layer's gradient (iDLG for B = 1; count-based extension for B > 1).

    With mean softmax cross-entropy, the bias gradient of class c is g_c = mean_i p_ic - n_c / B, where
    n_c is how many images of the batch have label c. For B = 1 the one negative entry is the label,
    exactly (Zhao et al. 2020); without a bias the weight-gradient row sums carry the same sign when the
    penultimate activations are non-negative (sigmoid, ReLU). For B > 1 we estimate
    n_c = B * (p_c - g_c), where p_c is the model's mean predicted probability of class c on the batch,
    which the attacker cannot see; `mean_probs` is its stand-in (the attacks pass the model's mean
    softmax on random images; uniform 1/C when omitted). The counts are rounded by largest remainder to
    sum to B. Assumption: the batch's mean prediction is close to that stand-in, which holds for
    untrained and weakly trained models; the rule degrades as the model grows confident.
    """
    if last_bias_grad is not None:
        score = last_bias_grad.detach().flatten().double()
    else:
        score = last_weight_grad.detach().sum(dim=1).double()
    if batch_size == 1:
        return score.argmin().view(1).to(last_weight_grad.device)
    num_classes = score.numel()
    probs = (
        mean_probs.detach().flatten().double().to(score.device)
        if mean_probs is not None
        else torch.full_like(score, 1.0 / num_classes)
    )
    expected = (batch_size * (probs - score)).clamp(min=0)
    if last_bias_grad is None or expected.sum() <= 0:
        expected = (-score).clamp(min=0) + 1e-12
    expected = expected / expected.sum() * batch_size
    counts = torch.floor(expected).long()
    remainder = batch_size - int(counts.sum())
    counts[(expected - counts).argsort(descending=True)[:remainder]] += 1
    labels = torch.repeat_interleave(torch.arange(num_classes, device=score.device), counts)
    return labels.to(last_weight_grad.device)


def random_input_mean_probs(model: nn.Module, image_shape: tuple[int, int, int], generator: torch.Generator,
                            device: torch.device, samples: int = 32) -> Tensor:
    """The model's mean softmax on uniform random images: the attacker's stand-in for the batch's."""
    noise = torch.rand((samples, *image_shape), generator=generator).to(device)
    with torch.no_grad():
        return torch.softmax(model(noise), dim=1).mean(dim=0)


def last_linear_positions(model: nn.Module, params: Sequence[Tensor]) -> tuple[int, int | None]:
    """Positions in `params` of the weight and bias of the model's final nn.Linear (bias None if absent).

    Label inference reads the classifier's gradient, so the attacks locate that layer by walking the
    modules (registration order, the order `parameters()` follows) rather than assuming it is last.
    """
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    if last is None:
        raise ConfigError(f"label inference needs a model with an nn.Linear classifier; {type(model).__name__} has none")
    weight_at, bias_at = layer_positions(last, params)
    if weight_at is None:
        raise ConfigError(f"label inference needs the classifier weight of {type(model).__name__} to be trainable")
    return weight_at, bias_at


def layer_positions(layer: nn.Module, params: Sequence[Tensor]) -> tuple[int | None, int | None]:
    """Positions in `params` of `layer`'s weight and bias, each None when it is not there (frozen, or no bias)."""
    position = {id(p): i for i, p in enumerate(params)}
    bias = getattr(layer, "bias", None)
    return position.get(id(layer.weight)), (position.get(id(bias)) if bias is not None else None)


def shared_layer_gradient(
    layer: nn.Module, params: Sequence[Tensor], target: Sequence[Tensor]
) -> tuple[Tensor, Tensor] | None:
    """The shared gradient of `layer`'s weight and bias: their entries of `target` (which follows `params`, the
    trainable parameters), or None when either is not among `params` (frozen, or a layer without a bias)."""
    weight_at, bias_at = layer_positions(layer, params)
    if weight_at is None or bias_at is None:
        return None
    return target[weight_at], target[bias_at]


def labels_from_gradient(
    model: nn.Module,
    gradient: Sequence[Tensor],
    *,
    batch_size: int,
    image_shape: tuple[int, int, int],
    generator: torch.Generator,
) -> Tensor:
    """iDLG-style labels (B,) from the shared gradient of the final linear layer (see `infer_labels`)."""
    params = trainable_parameters(model)
    weight_at, bias_at = last_linear_positions(model, params)
    # The stand-in for the batch's mean prediction only matters for B > 1; skipping it keeps B = 1 cheap.
    mean_probs = (
        random_input_mean_probs(model, image_shape, generator, params[0].device) if batch_size > 1 else None
    )
    bias_grad = gradient[bias_at] if bias_at is not None else None
    return infer_labels(gradient[weight_at], bias_grad, batch_size, mean_probs=mean_probs)


class BestIterate:
    """Keeps, on the device, the tensors offered with the lowest finite loss so far.

    Comparing with torch.where instead of in Python avoids a host sync per iteration; NaN never compares
    lower, so a diverged iterate can never replace a finite one.
    """

    def __init__(self, *tensors: Tensor) -> None:
        self.values = [t.detach().clone() for t in tensors]
        self.loss = torch.full((), math.inf, device=tensors[0].device)

    def offer(self, loss: Tensor, *tensors: Tensor) -> None:
        loss = loss.detach().to(self.loss.dtype)
        better = loss < self.loss
        self.loss = torch.where(better, loss, self.loss)
        self.values = [torch.where(better, t.detach(), v) for t, v in zip(tensors, self.values, strict=True)]


def log_iteration(
    history: list[dict[str, float]],
    *,
    iteration: int,
    iterations: int,
    grad_loss: Tensor | float,
    images: Tensor,
    evaluate: EvaluateFn | None,
    progress: ProgressFn | None,
    extra: dict[str, float] | None = None,
) -> float:
    """Append one history entry (iteration, grad_loss, the attack's `extra` keys, psnr if `evaluate`), report
    it, return grad_loss.

    This is the only place the attacks read a loss on the host, so it sets the cadence of device syncs.
    """
    value = float(grad_loss.detach() if isinstance(grad_loss, Tensor) else grad_loss)
    entry: dict[str, float] = {"iteration": iteration, "grad_loss": value, **(extra or {})}
    if evaluate is not None:
        entry["psnr"] = evaluate(images.detach().clamp(0, 1))
    history.append(entry)
    if progress is not None:
        progress({**entry, "iterations": iterations})
    return value


def log_answer(
    history: list[dict[str, float]],
    *,
    iterations: int,
    grad_loss: Tensor | float,
    images: Tensor,
    evaluate: EvaluateFn | None,
    progress: ProgressFn | None,
    extra: dict[str, float] | None = None,
) -> None:
    """End the history of an attack that returns its best iterate (or a combination), not its last, with
    that answer: one more entry at the last logged iteration, marked `answer` 1, so that a trial's
    convergence curve ends where its score does."""
    iteration = int(history[-1]["iteration"]) if history else iterations
    log_iteration(history, iteration=iteration, iterations=iterations, grad_loss=grad_loss, images=images,
                  evaluate=evaluate, progress=progress, extra={**(extra or {}), "answer": 1.0})


def attack_inputs(
    name: str, model: nn.Module, shared_update: SharedUpdate, *, batch_size: int, eval_every: int
) -> tuple[list[Tensor], list[Tensor]]:
    """What every attack starts from: the model's trainable parameters and the shared gradient as detached
    tensors on their device and dtype, after `check_reconstruct_args`."""
    params = trainable_parameters(model)
    shared = shared_update.as_gradient()
    check_reconstruct_args(name, shared, params, batch_size=batch_size, eval_every=eval_every)
    device, dtype = params[0].device, params[0].dtype
    return params, [t.detach().to(device=device, dtype=dtype) for t in shared]


def random_start(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    """N(0, 1) values drawn on the CPU generator (so a seed gives the same start on every device), moved to
    `like`'s device and dtype, as a leaf to optimise."""
    return torch.randn(shape, generator=generator).to(like.device, like.dtype).requires_grad_()


def check_reconstruct_args(name: str, shared: Sequence[Tensor], params: Sequence[Tensor], *,
                           batch_size: int, eval_every: int) -> None:
    """ConfigError (one sentence) for settings of `reconstruct` that no attack can work with."""
    if batch_size < 1:
        raise ConfigError(f"{name} batch_size must be >= 1 (got {batch_size})")
    if eval_every < 1:
        raise ConfigError(f"{name} eval_every must be >= 1 (got {eval_every})")
    if len(shared) != len(params):
        raise ConfigError(
            f"{name} got a shared update of {len(shared)} tensors for a model with {len(params)} trainable parameters"
        )
