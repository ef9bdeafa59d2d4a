"""Batched executor: N compatible trials run as one vectorised computation, each scored as run_trial would.

Small victims (LeNet at 32x32, B = 1) leave most of a GPU idle: one trial's iteration is a few hundred
tiny kernels. Here the attack loops of N trials become one: the trials' generator weights (GRNN) or dummy
images (IG) and their victims' weights are stacked along a new leading dimension, and one iteration of
every trial is computed by `torch.func.vmap` over `functional_call`, with the victim gradient
(create_graph in the one-trial code) taken by a nested `torch.func.grad` and the gradient of the summed
(independent) trial losses by autograd. On a CPU at one thread the work is compute-bound and packing
gives about 1x (measured in benchmarks/sweep.py); the gain is on GPUs.

Why the results equal `run_trial(spec)` one by one (within float tolerance, tested):
- everything outside the attack loop (data, victim, client update, defense, scoring) runs per trial
  through the same functions as run_trial (grnn_engine.trial.prepare_trial and finish_trial);
- vmap gives each trial its own slice of every operator; nothing mixes trials. GRNN's generator runs
  BatchNorm in train mode: its statistics are taken over the trial's own batch inside vmap, exactly as
  in the one-trial loop (its running averages are never read in train mode, so they are dropped);
- the optimisers (RMSprop for GRNN, Adam for IG) are elementwise, so the stock torch.optim optimiser
  applied to the stacked leaves performs, element for element, the same update as N separate ones;
- each trial keeps its own history and stops being logged (its answer frozen) at the iteration the
  one-trial loop would have stopped at (a non-finite gradient loss at a logging iteration).

Which settings run batched: GRNN with its `paper` loop (RMSprop, constant lr, one restart, learned labels,
last iterate, l2 distance, no cosine term, no pixel refinement; iterations, lr, momentum, noise_dim,
width, generator_norm and tv_weight may differ from the paper's values) and IG with any settings. Others
raise ConfigError; `compatible_groups` keeps such cells alone, for run_trial.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

from grnn_engine.attacks.base import (
    ATTACKS,
    BestIterate,
    Reconstruction,
    attack_inputs,
    labels_from_gradient,
    log_answer,
    log_iteration,
    soft_cross_entropy,
    squared_gradient_distance,
    total_variation,
    trainable_parameters,
)
from grnn_engine.attacks.grnn import GRNN, GrnnGenerator
from grnn_engine.attacks.grnn import PRESETS as GRNN_PRESETS
from grnn_engine.attacks.ig import CosineDistance, InvertingGradients
from grnn_engine.errors import ConfigError
from grnn_engine.result import TrialResult
from grnn_engine.trial import PreparedTrial, finish_trial, prepare_trial
from grnn_engine.trial_spec import TrialSpec

__all__ = ["BATCHED_ATTACKS", "batch_refusal", "compatible_groups", "run_trials_batched"]

ProgressFn = Callable[[dict[str, Any]], None]
BATCHED_ATTACKS = ("grnn", "ig")

# Fields that must be equal for trials to share one vectorised loop: the attack and its settings (same
# iterations, same logging cadence), the victim architecture, the data's shape, where it runs. Seeds,
# private batches, training stages (victim weights), updates and defenses may all differ.
_SHARED_FIELDS = (
    "attack", "attack_params", "victim", "victim_params", "dataset", "data_root", "download", "split",
    "image_size", "batch_size", "eval_every", "device",
)
# The GRNN knobs the batched loop implements at any value; every other knob must have the `paper`
# preset's value (read from GRNN's PRESETS, so a knob added later is refused until checked here).
_GRNN_FREE = {"iterations", "lr", "momentum", "noise_dim", "width", "generator_norm", "tv_weight"}


_MISSING = object()


def batch_refusal(spec: TrialSpec) -> str | None:
    """Why `spec` cannot run in the batched executor (one sentence), or None when it can."""
    if spec.attack not in BATCHED_ATTACKS:
        return f"attack '{spec.attack}' has no batched loop; batched attacks: {', '.join(BATCHED_ATTACKS)}"
    if spec.attack != "grnn":
        return None
    attack = ATTACKS.create(spec.attack, **spec.attack_params)
    for knob, value in GRNN_PRESETS["paper"].items():
        if knob in _GRNN_FREE:
            continue
        got = getattr(attack, knob, _MISSING)
        if got is _MISSING or got != value:
            shown = "unknown" if got is _MISSING else repr(got)
            return (f"batched grnn runs only the paper loop, which needs {knob}={value!r} (got {shown}); "
                    f"run this cell with run_trial")
    return None


def _shared_key(spec: TrialSpec) -> str:
    return json.dumps({name: getattr(spec, name) for name in _SHARED_FIELDS}, sort_keys=True, default=str)


def compatible_groups(specs: Sequence[TrialSpec], pack: int) -> list[list[TrialSpec]]:
    """Split `specs` into groups of at most `pack` cells that `run_trials_batched` accepts together.

    Cells are grouped by everything that must be shared (see _SHARED_FIELDS) in the order they first
    appear; a cell the batched executor cannot run (see `batch_refusal`) is a group of its own, as is
    every cell when pack == 1. Every spec lands in exactly one group.
    """
    if not isinstance(pack, int) or isinstance(pack, bool) or pack < 1:
        raise ConfigError(f"pack must be an integer >= 1 (got {pack!r})")
    buckets: dict[str, list[TrialSpec]] = {}
    groups: list[list[TrialSpec]] = []
    for spec in specs:
        if pack == 1 or batch_refusal(spec) is not None:
            groups.append([spec])
            continue
        bucket = buckets.setdefault(_shared_key(spec), [])
        if not bucket:
            groups.append(bucket)
        bucket.append(spec)
        if len(bucket) == pack:
            del buckets[_shared_key(spec)]  # full: the next compatible cell opens a new group
    return groups


# --- stacking models for functional_call -------------------------------------------------------------


def _stack(tensors: Sequence[Tensor]) -> Tensor:
    return torch.stack([t.detach() for t in tensors])


class _StackedVictims:
    """The trials' victims as one template module plus stacked (N, ...) weights and buffers.

    `trainable` are the parameters a client shares (model.parameters() order, as the shared update);
    `fixed` holds the other parameters and the buffers (BatchNorm running statistics, read in eval mode).
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        self.template = models[0]
        first = trainable_parameters(models[0])
        trainable_ids = {id(p) for p in first}
        self.names = [n for n, p in models[0].named_parameters() if id(p) in trainable_ids]
        fixed_names = [n for n, p in models[0].named_parameters() if id(p) not in trainable_ids]
        fixed_names += [n for n, _ in models[0].named_buffers()]
        per_model = [{**dict(m.named_parameters()), **dict(m.named_buffers())} for m in models]
        self.trainable = {n: _stack([d[n] for d in per_model]) for n in self.names}
        self.fixed = {n: _stack([d[n] for d in per_model]) for n in fixed_names}

    def gradient(self, trainable: dict[str, Tensor], fixed: dict[str, Tensor], images: Tensor,
                 targets: Tensor) -> list[Tensor]:
        """One trial's victim gradient on (images, targets), differentiable (inside vmap)."""

        def loss(weights: dict[str, Tensor]) -> Tensor:
            return soft_cross_entropy(functional_call(self.template, (weights, fixed), (images,)), targets)

        fake = grad(loss)(trainable)
        return [fake[n] for n in self.names]


def _check_group(specs: Sequence[TrialSpec]) -> None:
    if not specs:
        raise ConfigError("run_trials_batched needs at least one TrialSpec (got an empty list)")
    for spec in specs:
        reason = batch_refusal(spec)
        if reason is not None:
            raise ConfigError(reason)
    first = _shared_key(specs[0])
    for spec in specs[1:]:
        if _shared_key(spec) != first:
            differing = [n for n in _SHARED_FIELDS if getattr(spec, n) != getattr(specs[0], n)]
            raise ConfigError(
                f"trials in one batch must share {', '.join(_SHARED_FIELDS)}; trial {spec.key()} differs "
                f"from {specs[0].key()} in '{differing[0]}'"
            )


History = list[dict[str, float]]


def _log(trials: Sequence[PreparedTrial], histories: list[History], active: list[bool], iteration: int,
         iterations: int, losses: Tensor, images: Tensor, progress: ProgressFn | None) -> None:
    """History entries (`log_iteration`, as the one-trial loops) at a logging iteration for every trial still
    running; stops those that diverged."""
    values = losses.detach().cpu().tolist()  # one host sync for all trials
    for i, trial in enumerate(trials):
        if not active[i]:
            continue
        value = log_iteration(histories[i], iteration=iteration, iterations=iterations, grad_loss=float(values[i]),
                              images=images[i], evaluate=trial.evaluate, progress=_packed_progress(progress, i, trial))
        if not math.isfinite(value):
            active[i] = False


# --- GRNN ---------------------------------------------------------------------------------------------


def _grnn_batched(
    attack: GRNN, trials: Sequence[PreparedTrial], progress: ProgressFn | None
) -> list[Reconstruction]:
    """GRNN's paper loop (GRNN._one_restart with one restart) for every trial at once."""
    spec = trials[0].spec
    device = trials[0].device
    num_classes = trials[0].num_classes
    image_shape = trials[0].image_shape
    batch, steps, eval_every = spec.batch_size, attack.steps_per_restart, spec.eval_every
    nets, noises, targets = [], [], []
    for trial in trials:
        _, target = attack_inputs("grnn", trial.model, trial.shared, batch_size=batch, eval_every=eval_every)
        # The same draws from the trial's generator, in the same order, as GRNN._one_restart.
        init_seed = int(torch.randint(0, 2**62, (1,), generator=trial.generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            net = GrnnGenerator(
                noise_dim=attack.noise_dim, num_classes=num_classes, image_shape=image_shape,
                width=attack.width, norm=attack.generator_norm,
            )
        nets.append(net.to(device))
        noises.append(torch.randn((batch, attack.noise_dim), generator=trial.generator).to(device))
        targets.append(target)
    tv_weight = attack._tv_weight(trainable_parameters(trials[0].model))

    # Train-mode BatchNorm without running statistics: the same batch statistics, nothing to update in vmap.
    template = replace_all_batch_norm_modules_(copy.deepcopy(nets[0]))
    names = [n for n, _ in nets[0].named_parameters()]
    weights = {n: _stack([dict(net.named_parameters())[n] for net in nets]).requires_grad_(True) for n in names}
    victims = _StackedVictims([t.model for t in trials])
    z = torch.stack(noises)
    stacked_target = [torch.stack(layer) for layer in zip(*targets, strict=True)]
    optimizer = torch.optim.RMSprop(list(weights.values()), lr=attack.lr, momentum=attack.momentum)

    def one_trial(gen: dict[str, Tensor], vic: dict[str, Tensor], fixed: dict[str, Tensor], noise: Tensor,
                  target: list[Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        images, soft_labels = functional_call(template, gen, (noise,))
        fake = victims.gradient(vic, fixed, images, soft_labels)
        squared = squared_gradient_distance(fake, target)
        # GRNN's l2 loss: squared distance + distance (the authors' "Wasserstein" term).
        matching = squared + squared.clamp(min=1e-30).sqrt()
        loss = matching + tv_weight * total_variation(images)
        return loss, (squared, images, soft_labels)

    # The trials' losses are independent, so the gradient of their sum w.r.t. the stacked weights is
    # each trial's own gradient; plain autograd for this outer derivative measured ~10% faster on CPU
    # than a second torch.func.grad level.
    forward = vmap(one_trial)
    params = list(weights.values())
    n = len(trials)
    active = [True] * n
    histories: list[History] = [[] for _ in range(n)]
    final_images: list[Tensor | None] = [None] * n
    final_soft: list[Tensor | None] = [None] * n
    images = soft_labels = torch.empty(0)
    for it in range(1, steps + 1):
        loss, (squared, images, soft_labels) = forward(weights, victims.trainable, victims.fixed, z, stacked_target)
        for w, g in zip(params, torch.autograd.grad(loss.sum(), params), strict=True):
            w.grad = g
        optimizer.step()
        if it % eval_every == 0 or it == steps:
            was_active = list(active)
            _log(trials, histories, active, it, attack.iterations, squared, images, progress)
            for i in range(n):
                if was_active[i] and not active[i]:  # diverged: the one-trial loop stops here
                    final_images[i], final_soft[i] = images[i].detach(), soft_labels[i].detach()
            if not any(active):
                break
    out = []
    for i in range(n):
        img = final_images[i] if final_images[i] is not None else images[i].detach()
        soft = final_soft[i] if final_soft[i] is not None else soft_labels[i].detach()
        assert img is not None and soft is not None
        out.append(Reconstruction(img.clamp(0, 1), soft.argmax(dim=1), histories[i]))
    return out


# --- Inverting Gradients ------------------------------------------------------------------------------


def _ig_batched(
    attack: InvertingGradients, trials: Sequence[PreparedTrial], progress: ProgressFn | None
) -> list[Reconstruction]:
    """InvertingGradients.reconstruct (every restart) for every trial at once."""
    spec = trials[0].spec
    device = trials[0].device
    image_shape = trials[0].image_shape
    batch, steps, eval_every = spec.batch_size, attack.steps_per_restart, spec.eval_every
    victims = _StackedVictims([t.model for t in trials])
    dtype = victims.trainable[victims.names[0]].dtype
    labels, targets = [], []
    for trial in trials:
        _, target = attack_inputs("ig", trial.model, trial.shared, batch_size=batch, eval_every=eval_every)
        labels.append(labels_from_gradient(
            trial.model, target, batch_size=batch, image_shape=image_shape,
            generator=trial.generator,
        ))
        targets.append(target)
    stacked_labels = torch.stack(labels)
    stacked_target = [torch.stack(layer) for layer in zip(*targets, strict=True)]
    # The target norms, computed once per trial as CosineDistance does.
    target_norm = torch.stack([CosineDistance(t, attack.distance).target_norm for t in targets])
    layer_cosine = attack.distance == "layer_cosine"
    tiny = 1e-30

    def one_trial(x: Tensor, vic: dict[str, Tensor], fixed: dict[str, Tensor], y: Tensor,
                  target: list[Tensor], norm: Tensor) -> tuple[Tensor, Tensor]:
        fake = victims.gradient(vic, fixed, x, y)
        # CosineDistance.__call__ of attacks/ig.py, with this trial's target and norms.
        dots = torch.stack([(f * t).sum() for f, t in zip(fake, target, strict=True)])
        squares = torch.stack([f.pow(2).sum() for f in fake])
        if layer_cosine:
            distance = (1 - dots / (squares.clamp(min=tiny).sqrt() * norm)).mean()
        else:
            distance = 1 - dots.sum() / (squares.sum().clamp(min=tiny).sqrt() * norm)
        loss = distance + attack.tv_weight * total_variation(x) if attack.tv_weight else distance
        return loss, distance

    forward = vmap(one_trial)  # the outer gradient by autograd, as in _grnn_batched
    n = len(trials)
    best_images: list[Tensor | None] = [None] * n
    best_losses = [math.inf] * n
    histories: list[History] = [[] for _ in range(n)]  # one per trial, across its restarts
    for restart in range(attack.restarts):
        x = torch.stack([
            torch.randn((batch, *image_shape), generator=t.generator) for t in trials
        ]).to(device, dtype).requires_grad_()
        optimizer = torch.optim.Adam([x], lr=attack.lr)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=[steps * 3 // 8, steps * 5 // 8, steps * 7 // 8], gamma=0.1
        )
        # Per trial best iterate: BestIterate compares with torch.where, so a (N,) loss keeps N bests.
        best = BestIterate(x)
        best.loss = torch.full((n,), math.inf, device=device)
        active = [True] * n
        frozen: list[tuple[Tensor, float] | None] = [None] * n
        offset = restart * steps
        for it in range(1, steps + 1):
            loss, distance = forward(x, victims.trainable, victims.fixed, stacked_labels, stacked_target, target_norm)
            (image_grad,) = torch.autograd.grad(loss.sum(), [x])
            _offer(best, distance, x)
            log_now = it % eval_every == 0 or it == steps
            before = x.detach().clone() if log_now else x
            x.grad = image_grad.sign()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                x.clamp_(0, 1)
            if log_now:
                was_active = list(active)
                _log(trials, histories, active, offset + it, attack.iterations, distance, before, progress)
                for i in range(n):
                    if was_active[i] and not active[i]:
                        frozen[i] = (best.values[0][i].clone(), float(best.loss[i]))
                if not any(active):
                    break
        for i in range(n):
            kept = frozen[i]
            images_i, loss_i = kept if kept is not None else (best.values[0][i], float(best.loss[i]))
            # As InvertingGradients: a restart that never had a finite loss only wins if none did.
            if best_images[i] is None or loss_i < best_losses[i]:
                best_images[i], best_losses[i] = images_i, loss_i
    out = []
    for i, (trial, img, answer_loss, y, history) in enumerate(
        zip(trials, best_images, best_losses, labels, histories, strict=True)
    ):
        assert img is not None
        log_answer(history, iterations=attack.iterations, grad_loss=answer_loss, images=img,
                   evaluate=trial.evaluate, progress=_packed_progress(progress, i, trial))
        out.append(Reconstruction(img.clamp(0, 1), y.long(), history))
    return out


def _packed_progress(progress: ProgressFn | None, index: int, trial: PreparedTrial) -> ProgressFn | None:
    """`progress` for one trial of the pack: its entries with `pack_index` and `trial_key` added, as `_log`'s."""
    if progress is None:
        return None
    key = trial.spec.key()
    return lambda entry: progress({**entry, "pack_index": index, "trial_key": key})


def _offer(best: BestIterate, loss: Tensor, x: Tensor) -> None:
    """BestIterate.offer with one loss per trial: the (N,) comparison broadcast over each trial's images."""
    loss = loss.detach().to(best.loss.dtype)
    better = loss < best.loss
    best.loss = torch.where(better, loss, best.loss)
    mask = better.view(-1, *([1] * (x.dim() - 1)))
    best.values = [torch.where(mask, x.detach(), best.values[0])]


# --- the entry point ----------------------------------------------------------------------------------


def run_trials_batched(
    specs: Sequence[TrialSpec],
    progress: ProgressFn | None = None,
    stage_states: Sequence[dict[str, Any] | None] | None = None,
) -> list[TrialResult]:
    """Run compatible trials as one vectorised attack; results in the order of `specs`, as run_trial's.

    `stage_states[i]` is what `run_trial(specs[i], stage_state=...)` would get (the trial's FL stage,
    handed over by the orchestrator), None to load or train it here as run_trial does.

    Compatible: equal in every field of _SHARED_FIELDS (attack and settings, victim architecture, data,
    batch size, eval_every, device), and each accepted by `batch_refusal`; otherwise ConfigError. A
    trial's setup errors (ConfigError, DataError) are raised as run_trial raises them. `progress` gets
    each trial's history entries with `pack_index` and `trial_key` added. Each result's `attack_s` and
    `wall_s` are the shared attack loop's and the whole call's times divided by the number of trials, so
    that per-trial costs add up to the time the batch took.
    """
    specs = list(specs)
    _check_group(specs)
    states = list(stage_states) if stage_states is not None else [None] * len(specs)
    if len(states) != len(specs):
        raise ConfigError(f"run_trials_batched got {len(states)} stage_states for {len(specs)} specs; give one per spec")
    start = time.perf_counter()
    trials = [prepare_trial(spec, state) for spec, state in zip(specs, states, strict=True)]
    attack = trials[0].attack  # the same settings for every trial (_check_group)
    attack_start = time.perf_counter()
    with torch.enable_grad():
        if isinstance(attack, GRNN):
            answers = _grnn_batched(attack, trials, progress)
        elif isinstance(attack, InvertingGradients):
            answers = _ig_batched(attack, trials, progress)
        else:  # pragma: no cover  (batch_refusal lets only the attacks above through)
            raise ConfigError(f"attack '{specs[0].attack}' has no batched loop")
    attack_s = (time.perf_counter() - attack_start) / len(trials)
    results = [finish_trial(t, recon, attack_s) for t, recon in zip(trials, answers, strict=True)]
    wall_s = (time.perf_counter() - start) / len(trials)
    for result in results:
        result.wall_s = wall_s
    return results
