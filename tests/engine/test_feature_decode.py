"""Feature decoding (attacks/feature_decode.py): each image's features solved from the classifier's gradient at
B > 1, decoded by a linear map fitted on public images, and GRNN's prior preset averaging that with its answer."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from grnn_engine import ATTACKS, TrialResult, TrialSpec, run_trial
from grnn_engine.attacks.base import SharedUpdate, trainable_parameters, victim_gradient
from grnn_engine.attacks.feature_decode import FeatureDecoder, blend_by_features, solve_features
from grnn_engine.attacks.image_prior import PriorSettings, PublicData, public_image_chunks
from grnn_engine.attacks.layer_refine import chain_of
from grnn_engine.data import load_dataset, select_batch
from grnn_engine.errors import ConfigError
from grnn_engine.metrics import matched_psnr
from grnn_engine.victims import create_victim

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _shared(victim: str, batch_size: int) -> tuple[Any, list[torch.Tensor], list[torch.Tensor], torch.Tensor,
                                                    torch.Tensor]:
    """(chain, params, shared gradient, private images, labels) of a digits batch (seed 0) at 32x32 on `victim`."""
    images, labels, _ = select_batch(load_dataset("digits", split="test", image_size=32), batch_size, 0)
    model = create_victim(victim, num_classes=10, image_size=32, seed=0)
    params = trainable_parameters(model)
    target = [g.detach() for g in victim_gradient(model, params, images, labels, create_graph=False)]
    chain = chain_of(model, (3, 32, 32))
    assert chain is not None
    return chain, params, target, images, labels


def test_a_batchs_features_are_solved_from_the_classifiers_gradient() -> None:
    """From features 5% off, every image's features come back to 1e-5 from the shared gradient alone; a gradient
    with noise on it, or a batch as large as the first Linear layer's width, gives none."""
    chain, params, target, images, labels = _shared("lenet", 4)
    true = chain.features(images).detach()
    noise = torch.randn(true.shape, generator=torch.Generator().manual_seed(0))
    start = true + 0.05 * true.norm(dim=1, keepdim=True) / true.shape[1] ** 0.5 * noise
    assert float((start - true).norm() / true.norm()) > 0.04
    solved = solve_features(chain, params, target, start, labels)
    assert solved is not None and solved.shape == true.shape
    assert float((solved.float() - true).norm() / true.norm()) < 1e-5
    noisy = [t + 1e-3 * torch.randn(t.shape, generator=torch.Generator().manual_seed(1)) for t in target]
    assert solve_features(chain, params, noisy, start, labels) is None
    # DLG's LeNet has one Linear layer of 10 outputs: 10 images' features span all it has.
    chain, params, target, images, labels = _shared("lenet_zhu", 10)
    assert solve_features(chain, params, target, chain.features(images).detach(), labels) is None


def test_the_decoder_fitted_on_public_images_decodes_private_features() -> None:
    """The linear decoding of test digits' features, fitted on the train split, is far closer to them than the
    public mean image is (about 35 against 13 dB)."""
    chain, _, _, images, _ = _shared("lenet", 4)
    _, chunks = public_image_chunks(PublicData("digits", "train", 32), PriorSettings())
    decoder = FeatureDecoder(chain, chunks, torch.device("cpu"))
    decoded = decoder(chain.features(images).detach(), (3, 32, 32)).float()
    mean = decoder.mean_x.float().reshape(1, 3, 32, 32).expand_as(images)
    assert matched_psnr(decoded, images) > matched_psnr(mean, images) + 15


def _prior_trial(feature_decode: str, *, batch_size: int = 4, **fields: Any) -> TrialResult:
    """GRNN's prior preset, 300 iterations, with `feature_decode` on digits at 32x32 (lenet, seed 1)."""
    params = {"preset": "prior", "iterations": 300, "feature_decode": feature_decode}
    spec = TrialSpec(attack="grnn", attack_params=params, dataset="digits", image_size=32, victim="lenet",
                     batch_size=batch_size, seed=1, eval_every=10**6, device="cpu", **fields)
    result = run_trial(spec)
    assert result.status == "COMPLETE", result.error
    return result


def test_the_prior_preset_averages_a_batchs_answer_with_its_decoded_features(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRNN_CACHE_DIR", str(tmp_path))
    assert ATTACKS.create("grnn", preset="prior").feature_decode == "blend"
    assert ATTACKS.create("grnn", preset="strong").feature_decode == "none"
    decoded, kept = _prior_trial("blend"), _prior_trial("none")
    assert decoded.iterations == kept.iterations == 300
    assert decoded.metrics["psnr"] > kept.metrics["psnr"] + 1, (decoded.metrics["psnr"], kept.metrics["psnr"])
    # The history ends with the average, so that the convergence curve ends at the trial's score.
    last = decoded.history[-1]
    assert last["feature_decode"] == 1 and last["iteration"] == 300
    assert last["psnr"] == pytest.approx(decoded.metrics["psnr"], abs=1e-3)
    assert 0 < last["grad_loss"] < float("inf")
    assert decoded.history[:-1] == kept.history and all("feature_decode" not in e for e in kept.history)
    # At B = 1 the layer refinement, not the decoding, applies.
    assert _prior_trial("blend", batch_size=1).history == _prior_trial("none", batch_size=1).history


def test_each_image_takes_the_average_whose_features_match_the_solved_ones() -> None:
    """An answer that is right keeps every image as it is; one whose images are swapped for the batch's mean image
    takes the decoding (weight 1) for them: only the features decide, never the truth."""
    chain, _, _, images, _ = _shared("lenet", 4)
    features = chain.features(images).detach()
    decoded = images.mean(dim=0, keepdim=True).expand_as(images).clone()
    assert torch.equal(blend_by_features(chain, images, decoded, features), images)
    wrong = images.clone()
    wrong[:2] = images.mean(dim=0, keepdim=True)
    mixed = blend_by_features(chain, wrong, images, features)
    assert torch.allclose(mixed, images, atol=1e-6)


@pytest.mark.parametrize(("defense", "params"), [("gaussian", {"sigma": 1e-3}), ("prune", {"ratio": 0.5})])
def test_a_gradient_a_defense_altered_is_not_decoded(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch, defense: str, params: dict[str, object]
) -> None:
    monkeypatch.setenv("GRNN_CACHE_DIR", str(tmp_path))
    with_decoding = _prior_trial("blend", defense=defense, defense_params=params)
    without = _prior_trial("none", defense=defense, defense_params=params)
    assert with_decoding.history == without.history and with_decoding.metrics["psnr"] == without.metrics["psnr"]


@pytest.mark.parametrize("value", [0.5, "mean", True])
def test_bad_feature_decode_values_are_one_line_config_errors(value: object) -> None:
    with pytest.raises(ConfigError, match="grnn feature_decode must be one of none, blend") as info:
        ATTACKS.create("grnn", preset="prior", feature_decode=value)
    assert "\n" not in str(info.value)


def test_feature_decoding_without_public_images_is_a_config_error_before_the_fit() -> None:
    target = _shared("lenet", 2)[2]
    model = create_victim("lenet", num_classes=10, image_size=32, seed=0)
    attack = ATTACKS.create("grnn", feature_decode="blend", iterations=10**6)  # never bound to public data
    with pytest.raises(ConfigError, match="grnn feature_decode needs public images of the victim's domain"):
        attack.reconstruct(model, SharedUpdate(tensors=target), num_classes=10, batch_size=2, image_shape=(3, 32, 32),
                           generator=torch.Generator().manual_seed(0))
