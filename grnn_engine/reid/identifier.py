"""The Identifier interface: ranks a gallery's identities for face images by cosine similarity between the
probe's embedding and each identity's mean gallery embedding, and refuses to be used when it is not clearly
better than chance on held-out photos. Subclasses (one module each) register in IDENTIFIERS."""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from grnn_engine.errors import DataError
from grnn_engine.registry import Registry
from grnn_engine.reid.gallery import Gallery

__all__ = ["CHANCE_MARGIN_SE", "IDENTIFIERS", "IDENTIFIER_FORMAT", "Identifier"]

IDENTIFIERS: Registry[Identifier] = Registry("identifier")

# Bump when a change to training changes what a cached identifier holds: old cache entries then miss.
IDENTIFIER_FORMAT = 1
# "Clearly above chance": held-out top-1 more than this many binomial standard errors above 1/K.
# 40 identities x 2 held-out photos: chance 2.5%, the bar ~9.5%; a working identifier scores > 80%.
CHANCE_MARGIN_SE = 4.0


class Identifier(ABC):
    """Ranks a gallery's identities for face images (N, 3, S, S) in [0, 1].

    Build with `IDENTIFIERS.create(name, **params)`, then `fit(gallery, heldout_images, heldout_labels,
    seed=...)` (or restore a fitted one with `load_state`). Subclasses provide `embed` (L2-normalised
    embeddings) and, when they learn, `_train`, `_model_state` and `_load_model_state`.
    """

    name: str = ""

    def __init__(self, **params: Any) -> None:
        self.params: dict[str, Any] = dict(params)
        self.centroids: Tensor | None = None  # (K, d) unit-length mean gallery embedding per identity
        self.heldout_top1: float | None = None
        self.chance: float | None = None
        self.trained_on: list[int] = []  # gallery-split indices of the photos it learnt from
        self.excluded: list[int] = []

    # -- what a subclass provides

    @abstractmethod
    def embed(self, images: Tensor) -> Tensor:
        """(N, d) unit-length embeddings of images (N, 3, S, S) in [0, 1], on the CPU."""

    def _train(self, gallery: Gallery, generator: torch.Generator) -> None:
        """Learn from the gallery before its centroids are taken; pretrained identifiers learn nothing."""
        return None

    def _model_state(self) -> dict[str, Tensor]:
        return {}

    def _load_model_state(self, state: Mapping[str, Tensor]) -> None:
        return None  # nothing learnt, nothing to restore

    # -- shared

    @property
    def num_identities(self) -> int:
        if self.centroids is None:
            raise RuntimeError("identifier used before fit() or load_state()")
        return int(self.centroids.shape[0])

    def fit(
        self, gallery: Gallery, heldout_images: Tensor, heldout_labels: Tensor, *, seed: int = 0
    ) -> Identifier:
        """Learn from the gallery, take each identity's centroid, and check held-out accuracy.

        Raises DataError when held-out top-1 accuracy is not clearly above chance (see CHANCE_MARGIN_SE).
        """
        generator = torch.Generator().manual_seed(int(seed))
        self._train(gallery, generator)
        self.centroids = _centroids(
            self._embed_batched(gallery.images), gallery.labels, gallery.num_identities
        )
        self.trained_on, self.excluded = list(gallery.indices), list(gallery.excluded)
        ranks = self.ranks(heldout_images, heldout_labels)
        self.heldout_top1 = float((ranks == 1).double().mean())
        self.chance = 1.0 / gallery.num_identities
        self.check_above_chance(len(heldout_labels))
        return self

    def check_above_chance(self, n_heldout: int) -> None:
        chance, acc = self.chance or 0.0, self.heldout_top1 or 0.0
        bar = chance + CHANCE_MARGIN_SE * math.sqrt(chance * (1 - chance) / max(n_heldout, 1))
        if not acc > bar:
            raise DataError(
                f"identifier '{self.name}' re-identifies only {acc:.1%} of {n_heldout} clean held-out "
                f"photos, not clearly above chance ({chance:.1%}; needed > {bar:.1%}), so its reid "
                f"metric would be noise: use more gallery photos per person, a larger image_size or "
                f"another identifier ({', '.join(IDENTIFIERS.names())})"
            )

    def similarities(self, images: Tensor) -> Tensor:
        """(N, K) cosine similarity of each image to each identity's centroid."""
        if self.centroids is None:
            raise RuntimeError("identifier used before fit() or load_state()")
        return self._embed_batched(images) @ self.centroids.T

    def ranks(self, images: Tensor, labels: Tensor) -> Tensor:
        """(N,) rank of each image's true identity among all identities: 1 = ranked first.

        Ties count against the true identity (an identity scoring equal is ranked above it), so a
        constant embedding cannot look like a hit.
        """
        sims = self.similarities(images)
        labels = labels.detach().cpu().long()
        true = sims.gather(1, labels[:, None])
        return (sims >= true).sum(dim=1)

    def top1(self, images: Tensor) -> Tensor:
        """(N,) the identity ranked first for each image."""
        return self.similarities(images).argmax(dim=1)

    def state(self) -> dict[str, Any]:
        """Everything a fitted identifier needs, as tensors and plain data (torch.load weights_only)."""
        if self.centroids is None:
            raise RuntimeError("identifier used before fit() or load_state()")
        return {
            "format": IDENTIFIER_FORMAT,
            "name": self.name,
            "params": json.dumps(self.params, sort_keys=True),
            "model": self._model_state(),
            "centroids": self.centroids,
            "heldout_top1": self.heldout_top1,
            "chance": self.chance,
            "trained_on": list(self.trained_on),
            "excluded": list(self.excluded),
        }

    def load_state(self, state: Mapping[str, Any]) -> Identifier:
        self._load_model_state(state["model"])
        self.centroids = state["centroids"]
        self.heldout_top1, self.chance = state["heldout_top1"], state["chance"]
        self.trained_on, self.excluded = list(state["trained_on"]), list(state["excluded"])
        return self

    def _embed_batched(self, images: Tensor, batch: int = 256) -> Tensor:
        images = images.detach().cpu().float()
        with torch.no_grad():
            return torch.cat([self.embed(images[i : i + batch]) for i in range(0, len(images), batch)])


def _centroids(embeddings: Tensor, labels: Tensor, num_identities: int) -> Tensor:
    """Unit-length mean embedding of each identity; an identity with no gallery photo gets a zero vector
    (similarity 0 to everything, so it is never preferred over a known face)."""
    sums = torch.zeros(num_identities, embeddings.shape[1]).index_add_(0, labels.long(), embeddings)
    return F.normalize(sums, dim=1)
