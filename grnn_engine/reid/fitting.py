"""fit_identifier: an identifier fitted on a dataset's gallery minus the attacked photos, from the cache or
fitted now and cached like the FL stages (`<cache>/<key>.pt`, the key a hash of the identifier and its
params, dataset, image size, excluded gallery photos and seed; grnn_engine.cache_files)."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from grnn_engine.cache_files import atomic_torch_save, content_hash, load_torch_cache
from grnn_engine.data import load_dataset
from grnn_engine.reid.gallery import (
    GALLERY_SPLIT,
    HELDOUT_SPLIT,
    check_identity_dataset,
    excluded_gallery_indices,
    load_gallery,
    load_heldout,
)
from grnn_engine.reid.identifier import IDENTIFIER_FORMAT, IDENTIFIERS, Identifier

__all__ = ["DEFAULT_CACHE_DIR", "fit_identifier", "identifier_key", "resolve_identifier_cache_dir"]

DEFAULT_CACHE_DIR = pathlib.Path("~/.cache/grnn")


def resolve_identifier_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """cache_dir, else $GRNN_CACHE_DIR/identifiers, else ~/.cache/grnn/identifiers."""
    if cache_dir:
        return pathlib.Path(cache_dir).expanduser()
    return pathlib.Path(os.environ.get("GRNN_CACHE_DIR") or DEFAULT_CACHE_DIR).expanduser() / "identifiers"


def identifier_key(
    name: str, params: Mapping[str, Any], dataset: str, image_size: int, excluded: Sequence[int], seed: int
) -> str:
    """Content address (24 hex digits) of one fitted identifier: the name of its cache file."""
    payload = {
        "format": IDENTIFIER_FORMAT, "name": name, "params": dict(params), "dataset": dataset,
        "image_size": image_size, "excluded": sorted(int(i) for i in excluded), "seed": int(seed),
    }  # fmt: skip
    return content_hash(payload)


def _read_cached(path: pathlib.Path) -> dict[str, Any] | None:
    return load_torch_cache(path, "identifier")


def _write_cached(path: pathlib.Path, state: dict[str, Any]) -> None:
    atomic_torch_save(path, state)


def fit_identifier(
    name: str,
    params: Mapping[str, Any] | None,
    *,
    dataset: str,
    image_size: int,
    split: str,
    indices: Sequence[int],
    attacked: Tensor | None = None,
    seed: int = 0,
    root: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Identifier:
    """The identifier `name` fitted on `dataset`'s gallery minus the attacked photos (`indices` of
    `split`; `attacked` their pixels, needed only for splits other than train/test), from the cache or
    fitted now and cached. Raises ConfigError for a bad name or params or a dataset without identities,
    DataError when the data is missing or the identifier is no better than chance on held-out photos."""
    identifier = IDENTIFIERS.create(name, **dict(params or {}))
    check_identity_dataset(dataset)
    gallery_set = None
    if split not in (GALLERY_SPLIT, HELDOUT_SPLIT):
        gallery_set = load_dataset(dataset, root=root, split=GALLERY_SPLIT, image_size=image_size)
    excluded = excluded_gallery_indices(gallery_set, split, indices, attacked)
    key = identifier_key(name, identifier.params, dataset, image_size, excluded, seed)
    path = resolve_identifier_cache_dir(cache_dir) / f"{key}.pt"
    cached = _read_cached(path)
    if cached is not None:
        return identifier.load_state(cached)
    gallery = load_gallery(dataset, root, image_size, excluded)
    heldout = load_heldout(dataset, root, image_size)
    identifier.fit(gallery, heldout.load_all(), heldout.labels, seed=seed)
    _write_cached(path, identifier.state())
    return identifier
