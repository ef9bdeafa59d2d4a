"""The photos of face re-identification: the gallery an identifier learns who is who from (the dataset's
`train` split minus every photo of the attacked batch, so a probe is never a photo it saw), and the held-out
photos (the `test` split: unseen photos of known people) that measure it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from grnn_engine.data import DATASETS, ImageSet, load_dataset
from grnn_engine.errors import ConfigError, DataError

__all__ = [
    "GALLERY_SPLIT",
    "HELDOUT_SPLIT",
    "IDENTITY_DATASETS",
    "Gallery",
    "check_identity_dataset",
    "excluded_gallery_indices",
    "load_gallery",
    "load_heldout",
]

GALLERY_SPLIT = "train"  # who is who is learnt from these photos only
HELDOUT_SPLIT = "test"  # unseen photos of the same people: the identifier's clean accuracy
# The datasets whose labels are people, split per person into gallery and held-out photos (grnn_engine.data).
# On any other dataset an identifier would learn classes (digits, objects), and its "reid" would not be one.
IDENTITY_DATASETS = ("att_faces", "identities")


def check_identity_dataset(dataset: str) -> None:
    """ConfigError when `dataset` is a known dataset whose labels are not people (an unknown name is left
    to the dataset registry, which lists the known ones)."""
    if dataset in DATASETS and dataset not in IDENTITY_DATASETS:
        raise ConfigError(
            f"reid needs a dataset of people, split per person into gallery and held-out photos; "
            f"dataset '{dataset}' has classes, not identities; allowed: {', '.join(IDENTITY_DATASETS)}"
        )


@dataclass(frozen=True)
class Gallery:
    """The photos an identifier learns identities from: `images[i]` is photo `indices[i]` of the
    dataset's gallery split, of identity `labels[i]`; `excluded` are gallery photos left out because
    they are in the attacked batch."""

    images: Tensor
    labels: Tensor
    indices: list[int]
    excluded: list[int]
    num_identities: int
    identity_names: list[str]


def excluded_gallery_indices(
    gallery_set: ImageSet | None, split: str, indices: Sequence[int], attacked: Tensor | None = None
) -> list[int]:
    """Gallery-split indices of the attacked photos, sorted: what the identifier must not train on.

    Attacked from the gallery split itself: those indices. From the held-out split: none (the splits
    are disjoint by construction). From any other split (att_faces `all`): the gallery photos whose
    pixels equal an attacked photo's, which needs `gallery_set` and the attacked images.
    """
    if split == GALLERY_SPLIT:
        return sorted({int(i) for i in indices})
    if split == HELDOUT_SPLIT:
        return []
    if gallery_set is None or attacked is None:
        raise ValueError(f"split '{split}' needs the gallery set and the attacked images to find overlaps")
    pixels = gallery_set.load_all().flatten(1)
    found: set[int] = set()
    for image in attacked.detach().cpu().flatten(1):
        found.update(torch.nonzero((pixels == image).all(dim=1)).flatten().tolist())
    return sorted(found)


def load_gallery(dataset: str, root: str | None, image_size: int, excluded: Sequence[int]) -> Gallery:
    """The dataset's gallery split without the photos `excluded` (gallery-split indices)."""
    full = load_dataset(dataset, root=root, split=GALLERY_SPLIT, image_size=image_size)
    drop = set(excluded)
    keep = [i for i in range(len(full)) if i not in drop]
    return Gallery(
        images=full.load_all()[keep],
        labels=full.labels[keep].clone(),
        indices=keep,
        excluded=sorted(drop),
        num_identities=full.num_classes,
        identity_names=list(full.classes),
    )


def load_heldout(dataset: str, root: str | None, image_size: int) -> ImageSet:
    """The held-out photos of the gallery's people; DataError naming what is needed when there are none."""
    try:
        return load_dataset(dataset, root=root, split=HELDOUT_SPLIT, image_size=image_size)
    except DataError as exc:
        raise DataError(
            f"reid needs held-out photos of the gallery's people in {dataset}/{HELDOUT_SPLIT} to check "
            f"the identifier, and found none ({exc})"
        ) from exc
