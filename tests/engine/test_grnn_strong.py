"""GRNN presets: `strong` is selectable and overridable, and picks between restarts by gradient loss only."""

from __future__ import annotations

import math

import pytest
import torch

from grnn_engine import ATTACKS
from grnn_engine.attacks.base import (
    SharedUpdate,
    squared_gradient_distance,
    trainable_parameters,
    victim_gradient,
)
from grnn_engine.attacks.grnn import PRESETS, colour_total_variation
from grnn_engine.data import load_dataset, select_batch
from grnn_engine.errors import ConfigError
from grnn_engine.victims import create_victim

KNOBS = {  # preset key -> attribute of the attack that holds it
    "iterations": "steps_per_restart", "restarts": "restarts", "optimizer": "optimizer", "lr": "lr",
    "momentum": "momentum", "schedule": "schedule", "noise_dim": "noise_dim", "distance": "distance",
    "cosine_weight": "cosine_weight", "tv_weight": "tv_weight", "width": "width", "labels": "labels",
    "select": "select", "generator_norm": "generator_norm", "chroma_weight": "chroma_weight",
    "combine": "combine", "refine_iterations": "refine_iterations", "refine_lr": "refine_lr",
    "refine_tv_weight": "refine_tv_weight", "soft_pool": "soft_pool", "soft_pool_end": "soft_pool_end",
    "soft_pool_fraction": "soft_pool_fraction", "prior": "prior", "prior_weight": "prior_weight",
    "refine_prior_weight": "refine_prior_weight", "prior_floor": "prior_floor", "prior_images": "prior_images",
    "prior_seed": "prior_seed", "layer_refine": "layer_refine", "layer_refine_lr": "layer_refine_lr",
    "feature_decode": "feature_decode",
}


def _knobs(attack: object) -> dict[str, object]:
    return {key: getattr(attack, attr) for key, attr in KNOBS.items()}


def _digit_update(batch_size: int, seed: int = 0) -> tuple[torch.nn.Module, SharedUpdate, torch.Tensor]:
    data = load_dataset("digits", split="test", image_size=32)
    images, labels, _ = select_batch(data, batch_size, seed)
    model = create_victim("lenet", num_classes=data.num_classes, image_size=32, seed=seed)
    grads = victim_gradient(model, trainable_parameters(model), images, labels, create_graph=False)
    return model, SharedUpdate(tensors=tuple(g.detach() for g in grads)), images


def test_every_knob_is_in_both_presets() -> None:
    assert set(PRESETS["paper"]) == set(PRESETS["strong"]) == set(KNOBS)


def test_paper_is_the_default_and_strong_is_selectable() -> None:
    assert _knobs(ATTACKS.create("grnn")) == PRESETS["paper"]
    strong = ATTACKS.create("grnn", preset="strong")
    assert _knobs(strong) == PRESETS["strong"]
    assert PRESETS["strong"] != PRESETS["paper"]


def test_explicit_knobs_override_the_preset() -> None:
    attack = ATTACKS.create("grnn", preset="strong", iterations=7, lr=0.5, labels="learned", restarts=2)
    knobs = _knobs(attack)
    assert (knobs["iterations"], knobs["lr"], knobs["labels"], knobs["restarts"]) == (7, 0.5, "learned", 2)
    untouched = {k: v for k, v in knobs.items() if k not in {"iterations", "lr", "labels", "restarts"}}
    assert untouched == {k: PRESETS["strong"][k] for k in untouched}
    # Total compute: steps per restart times restarts, plus the pixel refinement.
    assert attack.iterations == 7 * 2 + PRESETS["strong"]["refine_iterations"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"preset": "strongest"}, "grnn preset must be one of paper, strong, prior .got 'strongest'"),
        ({"optimizer": "sgd"}, "optimizer must be one of rmsprop, adam"),
        ({"restarts": 0}, "restarts must be an integer >= 1"),
        ({"combine": "max"}, "combine must be one of best, mean"),
        ({"labels": "oracle"}, "labels must be one of learned, inferred"),
        ({"refine_iterations": -1}, "refine_iterations must be an integer >= 0"),
        ({"chroma_weight": -1.0}, "chroma_weight must be a finite number >= 0"),
        ({"soft_pool": -0.1}, "soft_pool must be a finite number >= 0"),
        ({"soft_pool_end": 0}, "soft_pool_end must be a finite number > 0"),
        ({"soft_pool_fraction": 1.0}, r"soft_pool_fraction must be a number in \(0, 1\) \(got 1.0\)"),
    ],
)
def test_bad_settings_are_config_errors(params: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ATTACKS.create("grnn", **params)


def test_restarts_are_chosen_by_gradient_loss_alone() -> None:
    """The answer is the restart whose best iterate has the lowest gradient loss, re-measurable by anyone."""
    model, update, _ = _digit_update(1)
    attack = ATTACKS.create("grnn", preset="strong", iterations=12, restarts=3, combine="best",
                            select="best", labels="inferred", refine_iterations=0)
    recon = attack.reconstruct(model, update, num_classes=10, batch_size=1, image_shape=(3, 32, 32),
                               generator=torch.Generator().manual_seed(0), eval_every=4)
    # No `evaluate` callback was given: the history holds no PSNR, so nothing but the loss could steer.
    assert all("psnr" not in h for h in recon.history)
    # The last entry of each restart; while a restart fits the softened victim it has no best yet.
    per_restart = {int(h["restart"]): h["best_grad_loss"] for h in recon.history if "best_grad_loss" in h}
    assert all(math.isfinite(h.get("best_grad_loss", 0.0)) for h in recon.history)
    assert sorted(per_restart) == [0, 1, 2]
    assert len(set(per_restart.values())) == 3, "restarts should start from different points"
    params = trainable_parameters(model)
    fake = victim_gradient(model, params, recon.images, recon.labels, create_graph=False)
    answer = float(squared_gradient_distance(fake, update.tensors))
    assert answer == pytest.approx(min(per_restart.values()), rel=1e-4)


def test_strong_pipeline_with_mean_and_refinement_is_well_formed() -> None:
    """Averaged restarts and pixel refinement keep the contract: shape, range, labels from the gradient."""
    model, update, _ = _digit_update(3, seed=1)
    attack = ATTACKS.create("grnn", preset="strong", iterations=6, restarts=2, combine="mean", refine_iterations=5)
    recon = attack.reconstruct(model, update, num_classes=10, batch_size=3, image_shape=(3, 32, 32),
                               generator=torch.Generator().manual_seed(1), eval_every=2)
    assert recon.images.shape == (3, 3, 32, 32) and torch.isfinite(recon.images).all()
    assert recon.images.min() >= 0 and recon.images.max() <= 1
    assert recon.labels.dtype == torch.int64 and recon.labels.shape == (3,)
    assert recon.history[-1]["iteration"] == attack.iterations == 6 * 2 + 5


def test_colour_total_variation_penalises_chroma_more_than_brightness() -> None:
    grey = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)).expand(1, 3, 8, 8)
    colour = grey.clone()
    colour[:, 0] = colour[:, 0].flip(-1)  # same brightness edges per channel, now in colour
    assert colour_total_variation(grey, 3.0) < colour_total_variation(colour, 3.0)
    assert colour_total_variation(colour, 3.0) > colour_total_variation(colour, 1.0)


def test_softened_phases_are_logged_and_never_selected() -> None:
    """Each phase starts on the softened victim (logged with its temperature) and ends on the exact one;
    the answer's exact gradient loss is the lowest logged among the exact iterates."""
    model, update, _ = _digit_update(1, seed=2)
    attack = ATTACKS.create("grnn", preset="strong", iterations=10, refine_iterations=10)
    recon = attack.reconstruct(model, update, num_classes=10, batch_size=1, image_shape=(3, 32, 32),
                               generator=torch.Generator().manual_seed(2), eval_every=1)
    *iterates, last = recon.history
    temperatures = [h.get("pool_temperature") for h in iterates]
    assert len(temperatures) == 20
    for phase in (temperatures[:10], temperatures[10:]):
        assert all(t is not None for t in phase[:8]) and phase[8:] == [None, None]
        assert phase[0] == pytest.approx(PRESETS["strong"]["soft_pool"])
    params = trainable_parameters(model)
    fake = victim_gradient(model, params, recon.images, recon.labels, create_graph=False)
    answer = float(squared_gradient_distance(fake, update.tensors))
    exact_refine = [h["grad_loss"] for h in iterates[10:] if "pool_temperature" not in h]
    assert answer <= min(exact_refine) * (1 + 1e-4)
    # The history ends with that answer, at the last iteration.
    assert last["answer"] == 1 and last["iteration"] == 20 and "pool_temperature" not in last
    assert last["grad_loss"] == pytest.approx(answer, rel=1e-4)
