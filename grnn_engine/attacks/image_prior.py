"""A learned image prior for the attacks: a Gaussian model of the domain's images, fitted on public images.

Generative-prior attacks (GIAS, GGL, GIFD) constrain a reconstruction with a model of what images of the
victim's domain look like, trained on public images the attacker can get. Here that model is the Gaussian
of the public images (their mean and full covariance), that is, the linear generator
`x = mean + U diag(sqrt(eigenvalues)) z` with z ~ N(0, I) (probabilistic PCA keeping every component).
Its negative log-likelihood, `GaussianImagePrior.penalty`, replaces or joins the hand-made TV prior in an
attack's loss: unlike TV it knows the domain's colour statistics and how much each spatial frequency
varies, which is what fills the directions the shared gradient does not determine.

Honest threat model: the prior is fitted on the *other* split of the victim's dataset than the one the
private batch is drawn from (`PublicData`: the trial's `train` split when it attacks `test`), so the
attacker never sees the private images. It is keyed by what it depends on (the public data's identity,
its image size, the prior's settings), never by the attacked batch or the trial seed, and cached with the
FL stages' content-addressed cache (grnn_engine.cache_files: `content_hash`, `load_torch_cache` /
`atomic_torch_save`, read back with `weights_only=True`, in the stages' folder): trained once per dataset and image size, in seconds on a CPU.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from grnn_engine.cache_files import atomic_torch_save, content_hash, load_torch_cache, resolve_cache_dir
from grnn_engine.data import SPLITS, load_dataset
from grnn_engine.errors import ConfigError

__all__ = ["MAX_PRIOR_DIMENSION", "PRIOR_FORMAT", "FittedPrior", "GaussianImagePrior", "PriorSettings",
           "PublicData", "cached_prior_state", "load_or_fit_prior", "prior_key", "priors_fitted", "public_image_chunks"]

# Bump when a change to the fitting changes what a cached prior holds: old cache entries then miss.
PRIOR_FORMAT = 1
# The covariance is D x D for images of D = C * S * S values, and its eigendecomposition O(D^3): 3x32x32
# (3072) takes ~20 s on one CPU core; 3x64x64 (12288) would take ~20 min and 600 MB per cached prior.
MAX_PRIOR_DIMENSION = 4096
_CHUNK = 2000  # images decoded and accumulated at a time: bounds the memory of a fit

# How many priors this process has fitted (not loaded from the cache): lets tests and callers see cache hits.
priors_fitted = 0


@dataclass(frozen=True)
class PublicData:
    """Where an attacker's public images of the victim's domain come from: a dataset split disjoint from
    the attacked one (run_trial passes the dataset's other split). `root` and `download` do not change which
    images these are, so they are not part of the prior's key."""

    dataset: str
    split: str
    image_size: int
    root: str | None = None
    download: bool = False

    @classmethod
    def disjoint_from(cls, dataset: str, attacked_split: str, image_size: int, *, root: str | None = None,
                      download: bool = False) -> PublicData | None:
        """The public split of `dataset` when the private batch comes from `attacked_split`: the other one;
        None for a batch drawn from `all` of a dataset (no split is disjoint from it)."""
        if attacked_split == "all":
            return None
        if attacked_split not in SPLITS:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)} (got {attacked_split!r})")
        public = next(s for s in SPLITS if s != attacked_split)
        return cls(dataset=dataset, split=public, image_size=image_size, root=root, download=download)

    def identity(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "split": self.split, "image_size": self.image_size}


@dataclass(frozen=True)
class PriorSettings:
    """How the prior is fitted: on `images` public images drawn with `seed` (0 = the whole split)."""

    images: int = 0
    seed: int = 0


def prior_key(public: PublicData, settings: PriorSettings, kind: str = "gaussian", **geometry: int) -> str:
    """Content address (24 hex digits) of the prior of `kind` fitted on `public` with `settings` (and, for a kind
    with fixed fitting constants, those `geometry` values)."""
    return content_hash({"format": PRIOR_FORMAT, "kind": kind, **public.identity(), **asdict(settings), **geometry})


class FittedPrior(Protocol):
    """A prior a fit returns: `state()` is its part of the cache file (tensors and plain values)."""

    def state(self) -> dict[str, Any]: ...


class GaussianImagePrior:
    """mean (D,), eigenvalues (D,) ascending and eigenvectors (D, D) of the public images' covariance.

    `penalty(images, floor)` is the mean over the batch and the D dimensions of the squared whitened
    coefficients, z_k^2 / (eigenvalue_k + floor): about 1 for an image of the domain when floor is small,
    much more for noise. `floor` (a variance) keeps the directions the public images barely vary in (JPEG
    noise) from dominating; it is an attack setting, so one fitted prior serves every floor.
    """

    def __init__(self, mean: Tensor, eigenvalues: Tensor, eigenvectors: Tensor,
                 image_shape: tuple[int, int, int]) -> None:
        self.mean, self.eigenvalues, self.eigenvectors = mean, eigenvalues, eigenvectors
        self.image_shape = image_shape
        self._inverse: dict[tuple[float, torch.device, torch.dtype], Tensor] = {}

    def to(self, device: torch.device, dtype: torch.dtype) -> GaussianImagePrior:
        return GaussianImagePrior(self.mean.to(device, dtype), self.eigenvalues.to(device, dtype),
                                  self.eigenvectors.to(device, dtype), self.image_shape)

    def penalty(self, images: Tensor, floor: float) -> Tensor:
        if tuple(images.shape[1:]) != self.image_shape:
            raise ConfigError(f"the image prior was fitted on images of shape {self.image_shape}, "
                              f"not {tuple(images.shape[1:])}")
        cache_key = (floor, images.device, images.dtype)
        if cache_key not in self._inverse:
            self._inverse[cache_key] = 1.0 / (self.eigenvalues.to(images.device, images.dtype) + floor)
        coefficients = (images.reshape(images.shape[0], -1) - self.mean) @ self.eigenvectors
        return (coefficients.pow(2) * self._inverse[cache_key]).mean()

    def state(self) -> dict[str, Any]:
        """The prior's part of its cache file: tensors and plain values only (loadable with weights_only=True)."""
        return {"mean": self.mean, "eigenvalues": self.eigenvalues, "eigenvectors": self.eigenvectors,
                "image_shape": list(self.image_shape)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> GaussianImagePrior:
        shape = tuple(int(v) for v in state["image_shape"])
        return cls(state["mean"], state["eigenvalues"], state["eigenvectors"], (shape[0], shape[1], shape[2]))


def public_image_chunks(public: PublicData, settings: PriorSettings) -> tuple[int, Iterator[Tensor]]:
    """The public images a prior is fitted on (settings.images of them drawn with settings.seed, 0 = all), as
    (count, chunks of at most _CHUNK images): decoding chunk by chunk bounds the memory of a fit."""
    images = load_dataset(public.dataset, root=public.root, split=public.split, image_size=public.image_size,
                          download=public.download)
    n = len(images)
    if settings.images:
        if settings.images > n:
            raise ConfigError(f"prior_images {settings.images} is more than the {n} images of "
                              f"{images.description}; allowed: 0 (all) or 2..{n}")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed))
        chosen = sorted(order[: settings.images].tolist())
    else:
        chosen = list(range(n))
    if len(chosen) < 2:
        raise ConfigError(f"the image prior needs at least 2 public images; {images.description} has {len(chosen)}")
    return len(chosen), (images.load(chosen[start : start + _CHUNK]) for start in range(0, len(chosen), _CHUNK))


def fit_gaussian_prior(public: PublicData, settings: PriorSettings) -> tuple[GaussianImagePrior, int]:
    """The Gaussian of the public images (float64 accumulation, float32 result) and how many it saw."""
    dimension = 3 * public.image_size**2
    if dimension > MAX_PRIOR_DIMENSION:
        raise ConfigError(
            f"the gaussian image prior needs images of at most {MAX_PRIOR_DIMENSION} values (3 x S x S, S <= 36); "
            f"image_size {public.image_size} gives {dimension}"
        )
    count, chunks = public_image_chunks(public, settings)
    total = torch.zeros(dimension, dtype=torch.float64)
    outer = torch.zeros(dimension, dimension, dtype=torch.float64)
    for chunk in chunks:
        batch = chunk.reshape(-1, dimension).double()
        total += batch.sum(dim=0)
        outer += batch.T @ batch
    mean = total / count
    covariance = (outer - count * torch.outer(mean, mean)) / (count - 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    shape = (3, public.image_size, public.image_size)
    prior = GaussianImagePrior(mean.float(), eigenvalues.clamp(min=0).float(), eigenvectors.float(), shape)
    return prior, count


def load_or_fit_prior(public: PublicData, settings: PriorSettings,
                      cache_dir: str | os.PathLike[str] | None = None) -> GaussianImagePrior:
    """The Gaussian prior of `public` with `settings`: from the cache when there, else fitted now and cached."""
    state = cached_prior_state(prior_key(public, settings), public, settings, fit_gaussian_prior, cache_dir)
    return GaussianImagePrior.from_state(state)


def cached_prior_state(key: str, public: PublicData, settings: PriorSettings,
                       fit: Callable[[PublicData, PriorSettings], tuple[FittedPrior, int]],
                       cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The cache file of the prior with content address `key`: read when there (and of this PRIOR_FORMAT), else
    `fit(public, settings)` now, its state written atomically with where it came from (public data, settings,
    how many images), and counted in `priors_fitted`."""
    global priors_fitted
    path = pathlib.Path(resolve_cache_dir(cache_dir)) / f"prior-{key}.pt"
    state = load_torch_cache(path, "image prior")
    if state is not None and state.get("format") == PRIOR_FORMAT:
        return state
    prior, count = fit(public, settings)
    state = {"format": PRIOR_FORMAT, **prior.state(), "public": public.identity(), "settings": asdict(settings),
             "fitted_on": count}
    atomic_torch_save(path, state)
    priors_fitted += 1
    return state
