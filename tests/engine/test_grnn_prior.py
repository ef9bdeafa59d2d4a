"""GRNN's `prior` preset: a Gaussian image prior fitted on the public split only, cached by content."""

from __future__ import annotations

import pathlib

import pytest
import torch

from grnn_engine import ATTACKS, TrialSpec, run_trial
from grnn_engine.attacks import image_prior
from grnn_engine.attacks.base import SharedUpdate, trainable_parameters, victim_gradient
from grnn_engine.attacks.grnn import PRESETS
from grnn_engine.attacks.image_prior import (
    GaussianImagePrior,
    PriorSettings,
    PublicData,
    load_or_fit_prior,
    prior_key,
)
from grnn_engine.data import load_dataset, select_batch
from grnn_engine.errors import ConfigError
from grnn_engine.trial import prepare_trial
from grnn_engine.victims import create_victim

# A tiny real case: scikit-learn's digits (no files needed) at 16x16, a few iterations of every phase.
TINY = {"preset": "prior", "iterations": 6, "refine_iterations": 4}


def _spec(seed: int = 0, **overrides: object) -> TrialSpec:
    values: dict[str, object] = {"attack": "grnn", "attack_params": TINY, "dataset": "digits", "image_size": 16,
                                 "victim": "lenet", "batch_size": 2, "seed": seed, "eval_every": 2, "device": "cpu"}
    values.update(overrides)
    return TrialSpec(**values)  # type: ignore[arg-type]


@pytest.fixture
def cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    monkeypatch.setenv("GRNN_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_prior_preset_runs_from_a_clean_cache_then_from_the_warm_one(cache: pathlib.Path) -> None:
    fitted = image_prior.priors_fitted
    first = run_trial(_spec())
    assert first.status == "COMPLETE", first.error
    files = sorted(cache.glob("prior-*.pt"))
    assert len(files) == 1 and image_prior.priors_fitted == fitted + 1

    second = run_trial(_spec())
    assert second.status == "COMPLETE", second.error
    assert image_prior.priors_fitted == fitted + 1  # loaded, not fitted again
    assert sorted(cache.glob("prior-*.pt")) == files
    assert second.metrics["psnr"] == first.metrics["psnr"]  # the cached prior is the fitted one
    assert first.iterations == 6 + 4


def test_the_prior_is_fitted_on_the_split_disjoint_from_the_attacked_one(cache: pathlib.Path) -> None:
    for attacked, public in (("test", "train"), ("train", "test")):
        prepared = prepare_trial(_spec(split=attacked))
        assert prepared.attack.public_data == PublicData("digits", public, 16, None, False)

    run_trial(_spec())  # attacks the test split
    (file,) = cache.glob("prior-*.pt")
    state = torch.load(file, weights_only=True)
    assert state["public"] == {"dataset": "digits", "split": "train", "image_size": 16}
    train = load_dataset("digits", split="train", image_size=16)
    test = load_dataset("digits", split="test", image_size=16)
    assert state["fitted_on"] == len(train)
    # The stored mean is that of the train split's images, not of the test split the batch comes from.
    assert torch.allclose(state["mean"], train.load_all().flatten(1).mean(dim=0), atol=1e-5)
    assert not torch.allclose(state["mean"], test.load_all().flatten(1).mean(dim=0), atol=1e-3)


def test_the_prior_is_keyed_by_what_it_depends_on_and_not_by_the_attacked_batch(cache: pathlib.Path) -> None:
    for seed, batch_size in ((0, 2), (1, 1), (5, 3)):
        assert run_trial(_spec(seed=seed, batch_size=batch_size)).status == "COMPLETE"
    assert len(list(cache.glob("prior-*.pt"))) == 1  # one prior served three different batches

    public = PublicData("cifar10", "train", 32)
    base = prior_key(public, PriorSettings())
    assert prior_key(PublicData("cifar10", "train", 32, root="/elsewhere"), PriorSettings()) == base
    others = {prior_key(PublicData("mnist", "train", 32), PriorSettings()),
              prior_key(PublicData("cifar10", "test", 32), PriorSettings()),
              prior_key(PublicData("cifar10", "train", 16), PriorSettings()),
              prior_key(public, PriorSettings(images=100)),
              prior_key(public, PriorSettings(images=100, seed=1))}
    assert base not in others and len(others) == 5


def test_penalty_prefers_images_of_the_domain_to_noise(cache: pathlib.Path) -> None:
    prior = load_or_fit_prior(PublicData("digits", "train", 16), PriorSettings())
    test = load_dataset("digits", split="test", image_size=16).load(range(8))
    noise = torch.rand_like(test)
    assert prior.penalty(test, 1e-4) < prior.penalty(noise, 1e-4) / 10
    reloaded = load_or_fit_prior(PublicData("digits", "train", 16), PriorSettings())
    assert isinstance(reloaded, GaussianImagePrior) and torch.equal(reloaded.mean, prior.mean)


def test_a_subsample_of_the_public_split_is_drawn_by_the_prior_seed(cache: pathlib.Path) -> None:
    a = load_or_fit_prior(PublicData("digits", "train", 16), PriorSettings(images=50, seed=0))
    b = load_or_fit_prior(PublicData("digits", "train", 16), PriorSettings(images=50, seed=1))
    assert not torch.equal(a.mean, b.mean)
    assert len(list(cache.glob("prior-*.pt"))) == 2


def test_the_prior_preset_is_strong_plus_the_learned_prior() -> None:
    prior, strong = PRESETS["prior"], PRESETS["strong"]
    assert prior["prior"] == "gaussian" and strong["prior"] == PRESETS["paper"]["prior"] == "none"
    assert set(prior) == set(strong)
    # The same budget as strong: 3x the paper preset's victim-gradient evaluations.
    assert ATTACKS.create("grnn", preset="prior").iterations == ATTACKS.create("grnn", preset="strong").iterations
    assert ATTACKS.create("grnn", preset="prior").iterations == 3 * ATTACKS.create("grnn").iterations


def test_the_prior_preset_keeps_tv_beside_the_prior_on_a_small_model_only() -> None:
    attack = ATTACKS.create("grnn", preset="prior")
    lenet = list(create_victim("lenet", num_classes=10, seed=0).parameters())
    resnet = list(create_victim("resnet18", num_classes=10, seed=0).parameters())
    assert attack._tv_weight(lenet) == 0.6 and attack._tv_weight(resnet) == 0.0
    assert ATTACKS.create("grnn", preset="prior", tv_weight=0.0)._tv_weight(lenet) == 0.0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"prior": "vae"}, r"grnn prior must be one of none, gaussian, patch_gmm \(got 'vae'\)"),
        ({"prior_weight": -1.0}, "grnn prior_weight must be a finite number >= 0"),
        ({"refine_prior_weight": float("nan")}, "grnn refine_prior_weight must be a finite number >= 0"),
        ({"prior_floor": 0}, "grnn prior_floor must be a finite number > 0"),
        ({"prior_images": -1}, "grnn prior_images must be an integer >= 0"),
        ({"prior_seed": 1.5}, "grnn prior_seed must be an integer >= 0"),
        ({"prior_weight": 0}, "grnn prior 'gaussian' needs prior_weight > 0 or refine_prior_weight > 0"),
    ],
)
def test_bad_prior_settings_are_one_line_config_errors(params: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        ATTACKS.create("grnn", preset="prior", **params)
    assert "\n" not in str(info.value)


def test_prior_needs_public_data_and_a_size_it_can_fit(cache: pathlib.Path) -> None:
    data = load_dataset("digits", split="test", image_size=16)
    images, labels, _ = select_batch(data, 1, 0)
    model = create_victim("lenet", num_classes=10, image_size=16, seed=0)
    grads = victim_gradient(model, trainable_parameters(model), images, labels, create_graph=False)
    attack = ATTACKS.create("grnn", **TINY)
    with pytest.raises(ConfigError, match="needs public images of the victim's domain"):
        attack.reconstruct(model, SharedUpdate(tensors=grads), num_classes=10, batch_size=1,
                           image_shape=(3, 16, 16), generator=torch.Generator().manual_seed(0))

    with pytest.raises(ConfigError, match="at most 4096 values .* image_size 64 gives 12288"):
        run_trial(_spec(image_size=64))
    with pytest.raises(ConfigError, match="prior_images 5000 is more than the"):
        run_trial(_spec(attack_params={**TINY, "prior_images": 5000}))


def test_a_batch_from_all_of_a_dataset_runs_without_a_prior_and_the_prior_refuses_it(cache: pathlib.Path) -> None:
    import os

    shared = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"
    root = os.environ.get("GRNN_DATA_ROOT") or (str(shared) if shared.is_dir() else None)
    if root is None or not (pathlib.Path(root) / "att_faces").is_dir():
        pytest.skip("att_faces (the dataset with an `all` split) needs GRNN_DATA_ROOT")
    spec = TrialSpec(dataset="att_faces", data_root=root, split="all", image_size=16, batch_size=2,
                     attack="grnn", attack_params={"iterations": 3})  # fmt: skip
    assert prepare_trial(spec).attack.public_data is None  # no split is disjoint from `all`
    paper = run_trial(spec)
    assert paper.status == "COMPLETE", paper.error
    with pytest.raises(ConfigError, match="split 'all' leaves none"):
        run_trial(TrialSpec(**{**spec.__dict__, "attack_params": {"iterations": 3, "preset": "prior"}}))
    assert not list(cache.glob("prior-*.pt"))
