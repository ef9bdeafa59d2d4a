"""GRNN's patch prior (`prior: patch_gmm`): a Gaussian mixture over patches of the public split only, cached."""

from __future__ import annotations

import pathlib
import warnings

import pytest
import torch
from torch.nn import functional as F

from grnn_engine import TrialSpec, run_trial
from grnn_engine.attacks import image_prior, patch_prior
from grnn_engine.attacks.image_prior import PriorSettings, PublicData
from grnn_engine.attacks.patch_prior import PatchGMMPrior, load_or_fit_patch_prior, patch_prior_key
from grnn_engine.data import load_dataset
from grnn_engine.errors import ConfigError

TINY = {"preset": "prior", "prior": "patch_gmm", "iterations": 6}


@pytest.fixture
def cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """An empty cache, and a mixture small enough to fit in a second (the same code, fewer patches and steps)."""
    monkeypatch.setenv("GRNN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(patch_prior, "PATCHES", 3000)
    monkeypatch.setattr(patch_prior, "COMPONENTS", 4)
    monkeypatch.setattr(patch_prior, "_EM_ITERATIONS", 20)
    return tmp_path


def _spec(seed: int = 0, **overrides: object) -> TrialSpec:
    values: dict[str, object] = {"attack": "grnn", "attack_params": TINY, "dataset": "digits", "image_size": 16,
                                 "victim": "lenet", "batch_size": 2, "seed": seed, "eval_every": 2, "device": "cpu"}
    values.update(overrides)
    return TrialSpec(**values)  # type: ignore[arg-type]


def test_patch_prior_runs_from_a_clean_cache_then_from_the_warm_one(cache: pathlib.Path) -> None:
    fitted = image_prior.priors_fitted
    first = run_trial(_spec())
    assert first.status == "COMPLETE", first.error
    (file,) = cache.glob("prior-*.pt")
    assert image_prior.priors_fitted == fitted + 1
    second = run_trial(_spec(seed=1, batch_size=1))  # another batch: the same prior serves it
    assert second.status == "COMPLETE", second.error
    assert image_prior.priors_fitted == fitted + 1 and list(cache.glob("prior-*.pt")) == [file]
    assert run_trial(_spec()).metrics["psnr"] == first.metrics["psnr"]  # the cached prior is the fitted one


def test_the_mixture_is_fitted_on_the_split_disjoint_from_the_attacked_one(cache: pathlib.Path) -> None:
    run_trial(_spec(split="test"))
    (file,) = cache.glob("prior-*.pt")
    state = torch.load(file, weights_only=True)
    assert state["kind"] == "patch_gmm" and state["public"] == {"dataset": "digits", "split": "train", "image_size": 16}
    assert state["fitted_on"] == len(load_dataset("digits", split="train", image_size=16))
    prior = PatchGMMPrior.from_state(state)
    assert prior.means.shape == (4, 3 * patch_prior.PATCH**2)
    assert torch.allclose(prior.log_weights.exp().sum(), torch.tensor(1.0), atol=1e-5)


def test_penalty_prefers_images_of_the_domain_to_noise_and_to_shifted_colours(cache: pathlib.Path) -> None:
    prior = load_or_fit_patch_prior(PublicData("digits", "train", 16), PriorSettings())
    test = load_dataset("digits", split="test", image_size=16).load(range(8))
    assert prior.penalty(test) < prior.penalty(torch.rand_like(test)) - 1
    # Not a function of smoothness alone: the same digits in a colour the public images never have cost more.
    assert prior.penalty(test) < prior.penalty(test * torch.tensor([1.0, 0.3, 0.3]).view(1, 3, 1, 1))
    # The penalty is the mixture's mean negative log-likelihood per value (x2) over the stride-2 patches.
    patches = F.unfold(test, patch_prior.PATCH, stride=patch_prior.STRIDE).transpose(1, 2).reshape(-1, prior.means.shape[1])
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=prior.log_weights.double()),
        torch.distributions.MultivariateNormal(
            prior.means.double(),
            precision_matrix=prior.precision_cholesky.double() @ prior.precision_cholesky.double().transpose(1, 2)),
    )
    constant = 0.5 * prior.means.shape[1] * torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64))
    expected = -2.0 * (mixture.log_prob(patches.double()) + constant).mean() / prior.means.shape[1]
    assert torch.allclose(prior.penalty(test).double(), expected, rtol=1e-4)


def test_the_patch_prior_is_keyed_by_what_it_depends_on(cache: pathlib.Path) -> None:
    public = PublicData("cifar10", "train", 32)
    base = patch_prior_key(public, PriorSettings())
    assert patch_prior_key(PublicData("cifar10", "train", 32, root="/elsewhere"), PriorSettings()) == base
    assert base != image_prior.prior_key(public, PriorSettings())  # never the Gaussian prior's file
    others = {patch_prior_key(PublicData("mnist", "train", 32), PriorSettings()),
              patch_prior_key(PublicData("cifar10", "test", 32), PriorSettings()),
              patch_prior_key(public, PriorSettings(images=100))}
    assert base not in others and len(others) == 3


def test_images_smaller_than_a_patch_are_a_config_error(cache: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="the patch prior needs images of at least 6 x 6 pixels; image_size is 4"):
        load_or_fit_patch_prior(PublicData("digits", "train", 4), PriorSettings())


def test_the_fit_uses_only_the_threads_torch_may_use(cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EM's BLAS (and its k-means start's OpenMP) is held to torch's thread count for the fit, as a trial's
    CPUs are: unlimited, BLAS takes every core and, beside other work, runs several times slower."""
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_info

    seen: list[int] = []
    fit = GaussianMixture.fit

    def counting_fit(self: GaussianMixture, x: object) -> GaussianMixture:
        seen.extend(pool["num_threads"] for pool in threadpool_info())
        return fit(self, x)

    monkeypatch.setattr(GaussianMixture, "fit", counting_fit)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load_or_fit_patch_prior(PublicData("digits", "train", 16), PriorSettings())
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}


def test_a_fit_that_spends_its_em_budget_warns_nobody(cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One EM step cannot converge: scikit-learn's ConvergenceWarning stays inside the fit (the budget is the
    design), so a trial's output shows none."""
    from sklearn.exceptions import ConvergenceWarning

    monkeypatch.setattr(patch_prior, "_EM_ITERATIONS", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        prior = load_or_fit_patch_prior(PublicData("digits", "train", 16), PriorSettings())
    assert prior.means.shape[0] == patch_prior.COMPONENTS
