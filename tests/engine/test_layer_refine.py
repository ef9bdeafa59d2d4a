"""Layer refinement (attacks/layer_refine.py): R-GAP's recursion through max-pools, from GRNN's answer, at B = 1."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import grnn_engine.attacks.grnn as grnn_module
from grnn_engine import ATTACKS, TrialResult, TrialSpec, run_trial
from grnn_engine.attacks.base import trainable_parameters, victim_gradient
from grnn_engine.attacks.image_prior import PriorSettings, PublicData, load_or_fit_prior
from grnn_engine.attacks.layer_refine import chain_of, refine_image
from grnn_engine.data import load_dataset, select_batch
from grnn_engine.errors import ConfigError
from grnn_engine.metrics import matched_psnr
from grnn_engine.victims import create_victim

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_chain_is_read_off_the_lenets_and_no_other_model() -> None:
    lenet = create_victim("lenet", num_classes=10, image_size=32, seed=0)
    chain = chain_of(lenet, (3, 32, 32))
    assert chain is not None
    assert [s.pool for s in chain.stages] == [2, 2] and chain.first_linear is lenet.classifier[0]
    assert list(chain.head) == list(lenet.classifier)
    zhu = chain_of(create_victim("lenet_zhu", num_classes=10, image_size=32, seed=0), (3, 32, 32))
    assert zhu is not None and [s.pool for s in zhu.stages] == [1, 1, 1]
    assert chain_of(create_victim("resnet20", num_classes=10, image_size=32, seed=0), (3, 32, 32)) is None
    relu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 10))
    assert chain_of(relu, (3, 32, 32)) is None
    # Layers that look like the chain but whose forward computes something else are not the chain.
    class Doubled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.act, self.fc = nn.Conv2d(3, 2, 3), nn.Sigmoid(), nn.Linear(2 * 14 * 14, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(2 * self.act(self.conv(x)).flatten(1))

    assert chain_of(Doubled(), (3, 16, 16)) is None


def _second_pool_winners(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    features = model.features  # type: ignore[union-attr]
    _, winners = nn.functional.max_pool2d(features[:5](images), 2, return_indices=True)
    return winners


def test_a_start_with_the_right_deeper_positions_comes_back_to_the_private_image(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the private digit plus noise (about 30 dB) whose second max-pool picks the same winners as the
    private image's, the refinement uses only the shared gradient and the public prior and recovers the image
    (>= 50 dB): the first pool's positions, which the noise got wrong, it finds itself. The private image
    itself is a fixed point."""
    monkeypatch.setenv("GRNN_CACHE_DIR", str(tmp_path))
    data = load_dataset("digits", split="test", image_size=16)
    images, labels, _ = select_batch(data, 1, 2)
    model = create_victim("lenet", num_classes=10, image_size=16, seed=0)
    params = trainable_parameters(model)
    target = [g.detach() for g in victim_gradient(model, params, images, labels, create_graph=False)]
    prior = load_or_fit_prior(PublicData("digits", "train", 16), PriorSettings())
    chain = chain_of(model, (3, 16, 16))
    assert chain is not None

    def refine(start: torch.Tensor) -> torch.Tensor:
        refined = refine_image(chain.stages, chain.first_linear, params, target, start, steps=1500, lr=3e-3,
                               prior_penalty=lambda x: prior.penalty(x.float(), floor=1e-4))
        assert refined is not None and refined.shape == images.shape and refined.dtype == images.dtype
        return refined

    assert matched_psnr(refine(images), images) >= 50
    start = (images + 0.03 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    with torch.no_grad():
        assert torch.equal(_second_pool_winners(model, start), _second_pool_winners(model, images))
        first = [nn.functional.max_pool2d(model.features[:2](x), 2, return_indices=True)[1] for x in (start, images)]
    assert not torch.equal(*first)
    before, after = matched_psnr(start, images), matched_psnr(refine(start), images)
    assert after >= 50 > before + 15, (before, after)


def _prior_trial(layer_refine: int, *, iterations: int = 300, batch_size: int = 1, **fields: Any) -> TrialResult:
    """GRNN's prior preset with `layer_refine` steps on digits at 16x16 (lenet, seed 1)."""
    params = {"preset": "prior", "iterations": iterations, "layer_refine": layer_refine}
    spec = TrialSpec(attack="grnn", attack_params=params, dataset="digits", image_size=16, victim="lenet",
                     batch_size=batch_size, seed=1, eval_every=10**6, device="cpu", **fields)
    result = run_trial(spec)
    assert result.status == "COMPLETE", result.error
    return result


def test_the_prior_preset_refines_one_image_and_leaves_a_batch_as_it_was(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRNN_CACHE_DIR", str(tmp_path))

    assert ATTACKS.create("grnn", preset="prior").layer_refine == 1500
    assert ATTACKS.create("grnn", preset="strong").layer_refine == 0
    refined, kept = _prior_trial(1500), _prior_trial(0)
    assert refined.iterations == 300  # the refinement's steps are no attack iterations
    assert refined.metrics["psnr"] > kept.metrics["psnr"] + 5
    # The history ends with the refined image, so that the convergence curve ends at the trial's score.
    last = refined.history[-1]
    assert last["layer_refine"] == 1 and last["iteration"] == 300
    assert last["psnr"] == pytest.approx(refined.metrics["psnr"], abs=1e-3)
    assert 0 < last["grad_loss"] < float("inf")
    assert refined.history[:-1] == kept.history and all("layer_refine" not in e for e in kept.history)
    assert _prior_trial(1500, batch_size=2).metrics["psnr"] == _prior_trial(0, batch_size=2).metrics["psnr"]


def test_a_refined_image_that_fits_the_gradient_far_worse_is_dropped(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the refinement goes astray (under a little noise it can end 10-18 dB below its start), its image fits
    the shared gradient tens of times worse than the answer: GRNN then keeps the answer (MAX_LOSS_INCREASE)."""
    monkeypatch.setenv("GRNN_CACHE_DIR", str(tmp_path))

    def astray(stages: object, first_linear: object, params: object, target: object, start: torch.Tensor,
               **settings: object) -> torch.Tensor:
        return 1 - start.double()  # the answer's negative: far from every equation the gradient gives

    kept = _prior_trial(0)
    monkeypatch.setattr(grnn_module, "refine_image", astray)
    dropped = _prior_trial(1500)
    assert dropped.metrics["psnr"] == kept.metrics["psnr"]
    assert dropped.history == kept.history


@pytest.mark.parametrize(("defense", "params"), [("gaussian", {"sigma": 1e-3}), ("prune", {"ratio": 0.5}), ("sign", {})])
def test_a_gradient_a_defense_altered_is_not_refined(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch, defense: str, params: dict[str, object]
) -> None:
    """The refinement's algebra needs one image's exact gradient: when the first Linear layer's gradient is no
    longer one outer product (noise, pruning) or gives an input outside (0, 1) (signs), GRNN keeps its answer."""
    monkeypatch.setenv("GRNN_CACHE_DIR", str(tmp_path))

    def psnr(layer_refine: int) -> float:
        return _prior_trial(layer_refine, iterations=30, defense=defense, defense_params=params).metrics["psnr"]

    assert psnr(1500) == psnr(0)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"layer_refine": -1}, "grnn layer_refine must be an integer >= 0"),
        ({"layer_refine": 2.5}, "grnn layer_refine must be an integer >= 0"),
        ({"layer_refine_lr": 0}, "grnn layer_refine_lr must be a finite number > 0"),
    ],
)
def test_bad_layer_refine_settings_are_one_line_config_errors(params: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        ATTACKS.create("grnn", preset="prior", **params)
    assert "\n" not in str(info.value)
