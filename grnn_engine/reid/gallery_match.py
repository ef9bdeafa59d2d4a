"""matched_gallery: for the report's gallery figure, per attacked photo the identity the identifier ranked
first for its reconstruction and a gallery photo of that identity (never one of the attacked photos)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from grnn_engine.data import load_dataset
from grnn_engine.errors import ConfigError, DataError
from grnn_engine.reid.gallery import GALLERY_SPLIT, HELDOUT_SPLIT, excluded_gallery_indices

__all__ = ["GalleryMatch", "matched_gallery"]


@dataclass(frozen=True)
class GalleryMatch:
    """One attacked photo's re-identification, for the report's gallery figure: the identity the
    identifier ranked first for the reconstruction, a gallery photo of that identity (never one of the
    attacked photos), and whether it is the true person."""

    position: int  # the photo's place in the batch (truth order)
    identity: int
    identity_name: str
    true_identity: int
    true_name: str
    hit: bool
    image: Tensor  # (3, S, S) in [0, 1]: the first gallery photo of `identity` not in the attacked batch


def _as_list(value: Any) -> list[Any]:
    # Rows loaded through pandas hold numpy arrays where the engine wrote lists.
    if value is None or isinstance(value, float | int | str):  # null (NaN once in a DataFrame) or a scalar
        return []
    return [v.item() if hasattr(v, "item") else v for v in list(value)]


def matched_gallery(row: Mapping[str, Any], root: str | None = None) -> list[GalleryMatch]:
    """For a trial row with reid columns: per attacked photo, the matched identity's gallery photo.

    Uses the row's dataset, split, image_size, indices, labels_true and reid_identity; `root` is where
    the data lives here (None: $GRNN_DATA_ROOT, else ~/.cache/grnn/data). ConfigError for a row
    without reid columns (not run with `reid` set, or not COMPLETE).
    """
    identities = _as_list(row.get("reid_identity"))
    if not identities:
        raise ConfigError(
            f"trial {row.get('trial_key', '?')} has no reid_identity; only COMPLETE trials of a sweep run "
            f"with `reid` set (e.g. sweeps/faces.yaml) have a matched gallery photo"
        )
    dataset, split, size = str(row["dataset"]), str(row["split"]), int(row["image_size"])
    indices = [int(i) for i in _as_list(row.get("indices"))]
    gallery_set = load_dataset(dataset, root=root, split=GALLERY_SPLIT, image_size=size)
    attacked = None
    if split not in (GALLERY_SPLIT, HELDOUT_SPLIT):
        attacked = load_dataset(dataset, root=root, split=split, image_size=size).load(indices)
    excluded = set(excluded_gallery_indices(gallery_set, split, indices, attacked))
    labels = gallery_set.labels.tolist()
    truth = [int(v) for v in _as_list(row.get("labels_true"))]
    out = []
    for position, identity in enumerate(int(v) for v in identities):
        photo = next((i for i, y in enumerate(labels) if y == identity and i not in excluded), None)
        if photo is None:
            raise DataError(f"identity {gallery_set.classes[identity]} has no gallery photo in {dataset}")
        true_identity = truth[position] if position < len(truth) else -1
        out.append(
            GalleryMatch(
                position=position, identity=identity, identity_name=gallery_set.classes[identity],
                true_identity=true_identity,
                true_name=gallery_set.classes[true_identity] if true_identity >= 0 else "?",
                hit=identity == true_identity, image=gallery_set.load([photo])[0],
            )
        )  # fmt: skip
    return out
