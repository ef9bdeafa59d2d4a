"""run_trial: the one function that wires data -> victim/stage -> client update -> defense -> attack -> score.

The steps around the attack loop are public (`prepare_trial`, `finish_trial`) so that every executor
(run_trial here, the batched executor in grnn_engine.batched) prepares and scores a trial the same way.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from grnn_engine.attacks.base import (
    ATTACKS,
    Attack,
    Reconstruction,
    SharedUpdate,
    check_attack_victim,
    soft_cross_entropy,
    trainable_parameters,
)
from grnn_engine.attacks.image_prior import PublicData
from grnn_engine.data import ImageSet, load_dataset, select_batch
from grnn_engine.defenses import DEFENSES, ClientBatch
from grnn_engine.devices import resolve_device
from grnn_engine.errors import ConfigError
from grnn_engine.image_grid import grid_png
from grnn_engine.metrics import matched_psnr, score
from grnn_engine.result import COMPLETE, FAILED, TrialResult
from grnn_engine.trial_spec import TrialSpec
from grnn_engine.user_victims import to_victim_channels, victim_channels
from grnn_engine.victims import create_victim

ProgressFn = Callable[[dict[str, Any]], None]
UPDATE_KINDS = ("fedsgd", "fedavg")
_DEFENSE_STREAM = 1_000_003


def client_update(
    model: nn.Module, images: Tensor, labels: Tensor, kind: str, params: dict[str, Any]
) -> SharedUpdate:
    """What an honest client computes on its batch with the current global model.

    fedsgd: the gradient of the mean cross-entropy (the paper's setting). fedavg: the model delta after
    `local_steps` full-batch SGD steps at `local_lr`. Both with the model in eval mode (BatchNorm uses
    the global running statistics; see grnn_engine.victims).
    """
    if kind == "fedsgd":
        unknown = sorted(params)
        if unknown:
            raise ConfigError(f"update 'fedsgd' takes no parameters (got '{unknown[0]}')")
        grads = torch.autograd.grad(soft_cross_entropy(model(images), labels), trainable_parameters(model))
        return SharedUpdate(tensors=tuple(g.detach() for g in grads), kind="fedsgd")
    if kind != "fedavg":
        raise ConfigError(f"unknown update '{kind}'; allowed: {', '.join(UPDATE_KINDS)}")
    allowed = {"local_steps", "local_lr"}
    extra = sorted(set(params) - allowed)
    if extra:
        raise ConfigError(f"unknown fedavg parameter '{extra[0]}'; allowed: local_lr, local_steps")
    steps = int(params.get("local_steps", 5))
    lr = float(params.get("local_lr", 0.01))
    if steps < 1 or not lr > 0:
        raise ConfigError(f"fedavg needs local_steps >= 1 and local_lr > 0 (got {steps}, {lr})")
    local = copy.deepcopy(model)
    local_params = trainable_parameters(local)
    optimizer = torch.optim.SGD(local_params, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        soft_cross_entropy(local(images), labels).backward()
        optimizer.step()
    delta = tuple((new - old).detach() for new, old in zip(local_params, trainable_parameters(model), strict=True))
    return SharedUpdate(tensors=delta, kind="fedavg", local_steps=steps, local_lr=lr)


# What a trial's row says about the global model it attacked, read from its stage (None when unknown): its test
# accuracy and loss, and the (epsilon, delta) its DP-SGD training had spent by then (a dp_sgd chain under utility).
# Each fact's key in the stage dict.
_STAGE_KEYS = {"model_acc": "model_acc", "model_loss": "model_loss", "model_dp_epsilon": "dp_epsilon",
               "model_dp_delta": "dp_delta"}
MODEL_FACTS = tuple(_STAGE_KEYS)


def model_facts(stage_state: dict[str, Any] | None) -> dict[str, Any]:
    """MODEL_FACTS of a stage dict (grnn_engine.fl's), each None when the stage does not have it."""
    stage = stage_state or {}
    return {name: (None if stage.get(key) is None else float(stage[key])) for name, key in _STAGE_KEYS.items()}


def global_model(
    spec: TrialSpec, images: ImageSet, device: torch.device, stage_state: dict[str, Any] | None
) -> tuple[nn.Module, dict[str, Any]]:
    """The global model being attacked, with its MODEL_FACTS (test accuracy, loss, DP budget) when known.

    fl_round 0 is the untrained model; later rounds come from `stage_state` (handed over by the
    orchestrator) or are trained here through grnn_engine.fl. A model the trial's attack cannot run on (e.g. a
    user's model without BatchNorm for gradinversion) is a ConfigError before any training.
    """
    model = create_victim(
        spec.victim, num_classes=images.num_classes, image_size=spec.image_size, seed=spec.seed,
        **spec.victim_params,
    )
    check_attack_victim(spec.attack, spec.victim, model)
    if spec.fl_round > 0 or stage_state is not None:
        if stage_state is None:
            from grnn_engine.fl import stage_for_trial  # only trials on trained stages need FL

            stage_state = stage_for_trial(spec)
        model.load_state_dict(stage_state["state_dict"])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model.to(device), model_facts(stage_state)


@dataclass
class PreparedTrial:
    """One trial up to its attack: what every executor (run_trial, grnn_engine.batched) hands the attack loop.

    Everything here is computed per trial with the same functions and random streams, whichever executor
    runs the attack, so that a trial's result does not depend on how it was run.
    """

    spec: TrialSpec
    start: float  # perf_counter() when preparation began: the trial's wall time counts from here
    device: torch.device
    attack: Attack
    images_set: ImageSet
    images: Tensor  # the private batch, on `device`
    labels: Tensor
    indices: list[int]
    identifier: Any  # the face identifier of a reid trial, else None
    model: nn.Module  # the global model being attacked, eval mode, on `device`
    model_facts: dict[str, Any]  # MODEL_FACTS of that model (float or None), TrialResult's fields of that name
    generator: torch.Generator  # the attack's random stream
    shared: SharedUpdate  # what the client sent, after the defense

    @property
    def num_classes(self) -> int:
        return self.images_set.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        channels, height, width = self.images.shape[1:]
        return int(channels), int(height), int(width)

    def evaluate(self, candidate: Tensor) -> float:
        """PSNR of an iterate against the truth, matched (the attack's `evaluate` callback)."""
        # A diverged iterate cannot be matched (the assignment needs finite costs); its PSNR is NaN.
        if not torch.isfinite(candidate).all():
            return float("nan")
        return matched_psnr(candidate, self.images)


def prepare_trial(spec: TrialSpec, stage_state: dict[str, Any] | None = None) -> PreparedTrial:
    """The steps before the attack: data, identifier, victim/stage, client update, defense.

    Raises ConfigError/DataError for bad settings or missing data, in this order: device, attack, defense,
    data, identifier, victim.
    """
    start = time.perf_counter()
    device = resolve_device(spec.device)
    attack = ATTACKS.create(spec.attack, **spec.attack_params)
    check_attack_victim(spec.attack, spec.victim)
    defense = DEFENSES.create(spec.defense, **spec.defense_params)
    images_set = load_dataset(
        spec.dataset, root=spec.data_root, split=spec.split, image_size=spec.image_size, download=spec.download
    )
    images, labels, indices = select_batch(
        images_set, spec.batch_size, spec.seed, indices=spec.indices, distinct_labels=spec.distinct_labels
    )
    # A learned prior may only see the other split: never the images the private batch comes from (a batch from
    # `all` leaves none: an attack with a prior then refuses to run, the others never ask).
    attack.bind_public_data(PublicData.disjoint_from(spec.dataset, spec.split, spec.image_size,
                                                     root=spec.data_root, download=spec.download))
    identifier = None
    if spec.reid is not None:
        from grnn_engine.reid import fit_identifier  # only face trials need it

        # Before the attack: an identifier no better than chance fails the trial at once, not after it.
        identifier = fit_identifier(
            spec.reid, spec.reid_params, dataset=spec.dataset, image_size=spec.image_size, split=spec.split,
            indices=indices, attacked=images, seed=spec.seed, root=spec.data_root,
        )  # fmt: skip
    images, labels = images.to(device), labels.to(device)
    model, facts = global_model(spec, images_set, device, stage_state)
    # A user's grey model sees (and the attacks rebuild) 1-channel images.
    channels = victim_channels(model, spec.victim, num_classes=images_set.num_classes, image_size=spec.image_size)
    images = to_victim_channels(images, channels, spec.victim)

    # Separate streams, so that the attack starts from the same point whatever the defense draws.
    generator = torch.Generator().manual_seed(spec.seed)
    defense_generator = torch.Generator().manual_seed(spec.seed + _DEFENSE_STREAM)
    update = client_update(model, images, labels, spec.update, spec.update_params)
    shared = defense.apply(update, client=ClientBatch(model, images, labels), generator=defense_generator)
    return PreparedTrial(
        spec=spec, start=start, device=device, attack=attack, images_set=images_set, images=images,
        labels=labels, indices=list(indices), identifier=identifier, model=model, model_facts=facts,
        generator=generator, shared=shared,
    )  # fmt: skip


def finish_trial(prepared: PreparedTrial, recon: Reconstruction, attack_s: float) -> TrialResult:
    """The steps after the attack: score, image grid, reid, non-finite checks; wall_s counts from preparation.

    A reconstruction that is or scores NaN/inf gives status FAILED (error_type NonFinite).
    """
    spec = prepared.spec
    iterations = int(recon.history[-1]["iteration"]) if recon.history else prepared.attack.iterations
    result = TrialResult(
        spec=spec, status=COMPLETE, **prepared.model_facts, attack_s=attack_s, iterations=iterations,
        device=str(prepared.device), history=recon.history,
    )  # fmt: skip
    if not torch.isfinite(recon.images).all():
        result.status, result.error_type = FAILED, "NonFinite"
        result.error = f"{spec.attack} produced non-finite images"
    else:
        s = score(recon.images, recon.labels, prepared.images, prepared.labels, success_psnr=spec.success_psnr)
        result.metrics = {**s.__dict__, "indices": list(prepared.indices)}
        matched = recon.images[s.matching]
        result.image_png = grid_png(prepared.images, matched)  # truth above its reconstruction
        if prepared.identifier is not None:
            from grnn_engine.reid import reid_metrics

            # The identifier reads colour-shaped faces: a grey model's 1-channel batch is replicated back.
            recon_rgb, truth_rgb = matched.expand(-1, 3, -1, -1), prepared.images.expand(-1, 3, -1, -1)
            result.metrics.update(
                reid_metrics(prepared.identifier, recon_rgb, truth_rgb, prepared.labels, seed=spec.seed)
            )
        if not result.is_finite():
            result.status, result.error_type = FAILED, "NonFinite"
            result.error = f"{spec.attack} scored non-finite metrics"
    result.wall_s = time.perf_counter() - prepared.start
    return result


def run_trial(
    spec: TrialSpec, stage_state: dict[str, Any] | None = None, progress: ProgressFn | None = None
) -> TrialResult:
    """Run one attack trial and score it. Raises ConfigError/DataError for bad settings or missing data.

    A trial whose reconstruction scores NaN/inf is returned with status FAILED (error_type NonFinite).
    """
    prepared = prepare_trial(spec, stage_state)
    attack_start = time.perf_counter()
    recon = prepared.attack.reconstruct(
        prepared.model, prepared.shared, num_classes=prepared.num_classes, batch_size=spec.batch_size,
        image_shape=prepared.image_shape, generator=prepared.generator, progress=progress,
        evaluate=prepared.evaluate, eval_every=spec.eval_every,
    )  # fmt: skip
    return finish_trial(prepared, recon, attack_s=time.perf_counter() - attack_start)
