"""A learned patch prior: a Gaussian mixture over the domain's small image patches, fitted on public images.

The global Gaussian of attacks/image_prior.py is linear: it knows the domain's colours and how much each
spatial frequency varies, but it cannot say that an image is made of sharp edges and flat regions, so it
prefers a blurred image to the true one. A Gaussian mixture over P x P patches (Zoran and Weiss 2011, EPLL)
is a non-linear generative model of those patches: each component is one kind of local structure (an edge at
some orientation, a texture, a flat region of some colour). Its negative log-likelihood, averaged over the
patches of an image on a stride-`STRIDE` grid, is `PatchGMMPrior.penalty`.

Same honest threat model as the Gaussian prior: fitted by scikit-learn's GaussianMixture on PATCHES patches
drawn at random from the public split only (image_prior.public_image_chunks), keyed by content (kind, public
data, prior settings, patch geometry), never by the attacked batch, and cached beside the Gaussian priors
(image_prior.cached_prior_state; read back with weights_only=True).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from grnn_engine.attacks.image_prior import (
    PriorSettings,
    PublicData,
    cached_prior_state,
    prior_key,
    public_image_chunks,
)
from grnn_engine.errors import ConfigError

__all__ = ["COMPONENTS", "PATCH", "PATCHES", "STRIDE", "PatchGMMPrior", "load_or_fit_patch_prior"]

PATCH = 6  # patch side in pixels: 6 x 6 x 3 = 108 values, where a 20-component mixture is fitted in minutes
COMPONENTS = 20
PATCHES = 100_000  # patches the mixture is fitted on, drawn uniformly from every position of the public images
STRIDE = 2  # the penalty's patch grid: 14 x 14 patches of a 32 x 32 image
_EM_ITERATIONS = 100
_REG_COVAR = 1e-5  # added to every covariance's diagonal (scikit-learn's reg_covar): JPEG-flat patches stay invertible


class PatchGMMPrior:
    """log_weights (K,), means (K, D) and precision Cholesky factors (K, D, D) of a mixture over patches of
    D = C * PATCH * PATCH values (scikit-learn's precisions_cholesky_: precision = L L^T).

    `penalty(images)` is twice the mean over patches (stride STRIDE) of the patch's negative log-likelihood
    per value, without the constant: like the Gaussian prior's penalty, a difference of 1 is a likelihood
    ratio of e^(D/2) per patch.
    """

    def __init__(self, log_weights: Tensor, means: Tensor, precision_cholesky: Tensor,
                 image_shape: tuple[int, int, int]) -> None:
        self.log_weights, self.means, self.precision_cholesky = log_weights, means, precision_cholesky
        self.image_shape = image_shape
        # log det of each component's precision factor, and its means already mapped by it (both per call else)
        self._log_det = torch.log(torch.diagonal(precision_cholesky, dim1=1, dim2=2)).sum(dim=1)
        self._mapped_means = torch.einsum("kd,kde->ke", means, precision_cholesky)

    def to(self, device: torch.device, dtype: torch.dtype) -> PatchGMMPrior:
        return PatchGMMPrior(self.log_weights.to(device, dtype), self.means.to(device, dtype),
                             self.precision_cholesky.to(device, dtype), self.image_shape)

    def penalty(self, images: Tensor) -> Tensor:
        if tuple(images.shape[1:]) != self.image_shape:
            raise ConfigError(f"the patch prior was fitted on images of shape {self.image_shape}, "
                              f"not {tuple(images.shape[1:])}")
        dimension = self.means.shape[1]
        patches = F.unfold(images, PATCH, stride=STRIDE).transpose(1, 2).reshape(-1, dimension)
        mapped = torch.einsum("nd,kde->kne", patches, self.precision_cholesky) - self._mapped_means[:, None, :]
        log_p = (self.log_weights + self._log_det)[:, None] - 0.5 * mapped.pow(2).sum(dim=2)
        return -2.0 * torch.logsumexp(log_p, dim=0).mean() / dimension

    def state(self) -> dict[str, Any]:
        """The prior's part of its cache file (image_prior.cached_prior_state adds where it came from)."""
        return {"kind": "patch_gmm", "log_weights": self.log_weights, "means": self.means,
                "precision_cholesky": self.precision_cholesky, "image_shape": list(self.image_shape)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PatchGMMPrior:
        shape = tuple(int(v) for v in state["image_shape"])
        return cls(state["log_weights"], state["means"], state["precision_cholesky"], (shape[0], shape[1], shape[2]))


def patch_prior_key(public: PublicData, settings: PriorSettings) -> str:
    """Content address of the patch prior fitted on `public` with `settings` (and this module's geometry)."""
    return prior_key(public, settings, "patch_gmm", patch=PATCH, components=COMPONENTS, patches=PATCHES,
                     em=_EM_ITERATIONS)


def fit_patch_gmm(public: PublicData, settings: PriorSettings) -> tuple[PatchGMMPrior, int]:
    """The mixture fitted on PATCHES random patches of the public images, and how many images they came from."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture  # only a fit needs it (about 1 s to import)
    from threadpoolctl import threadpool_limits

    if public.image_size < PATCH:
        raise ConfigError(f"the patch prior needs images of at least {PATCH} x {PATCH} pixels; "
                          f"image_size is {public.image_size}")
    count, chunks = public_image_chunks(public, settings)
    generator = torch.Generator().manual_seed(settings.seed)
    per_image = math.ceil(PATCHES / count)
    drawn = []
    for chunk in chunks:
        patches = F.unfold(chunk, PATCH)  # (n, D, positions)
        picks = torch.randint(0, patches.shape[2], (patches.shape[0], per_image), generator=generator)
        drawn.append(torch.gather(patches, 2, picks[:, None, :].expand(-1, patches.shape[1], -1))
                     .transpose(1, 2).reshape(-1, patches.shape[1]))
    samples = torch.cat(drawn)
    kept = samples[torch.randperm(len(samples), generator=generator)[:PATCHES]].double().numpy()
    # EM is BLAS products (its k-means start OpenMP loops), held to the threads torch may use (a trial's CPUs):
    # unlimited, BLAS starts a thread per core, and beside other work they contend. Measured on MNIST patches,
    # 2-core CPU beside two other jobs, 2026-12-06: 4-6 s an EM step on one thread, 21-46 s on two.
    # _EM_ITERATIONS is the fit's budget: on grey digits EM is still improving when it ends, which scikit-learn
    # warns of; that is expected here, not a fault to show the user.
    with threadpool_limits(limits=torch.get_num_threads()), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mixture = GaussianMixture(COMPONENTS, covariance_type="full", reg_covar=_REG_COVAR,
                                  max_iter=_EM_ITERATIONS, random_state=settings.seed).fit(kept)
    shape = (3, public.image_size, public.image_size)
    prior = PatchGMMPrior(torch.from_numpy(mixture.weights_).log().float(), torch.from_numpy(mixture.means_).float(),
                          torch.from_numpy(mixture.precisions_cholesky_).float(), shape)
    return prior, count


def load_or_fit_patch_prior(public: PublicData, settings: PriorSettings,
                            cache_dir: str | os.PathLike[str] | None = None) -> PatchGMMPrior:
    """The patch prior of `public` with `settings`: from the cache when there, else fitted now and cached."""
    state = cached_prior_state(patch_prior_key(public, settings), public, settings, fit_patch_gmm, cache_dir)
    return PatchGMMPrior.from_state(state)
