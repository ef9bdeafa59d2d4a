"""Where FL stages live on disk and what names them: a stage is the file `<cache_dir>/<key>.pt`, the key a
content hash of what determines it (dataset, image size, victim and its parameters, canonical FL settings,
seed, round), never of the machine or device. A chain's key is the same hash without the round. A user's
victim by import path adds its fingerprint (architecture and initial weights), so an edited model file
never loads the stages of the old one.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

from grnn_engine.cache_files import (
    DEFAULT_CACHE_DIR,
    atomic_torch_save,
    content_hash,
    load_torch_cache,
    resolve_cache_dir,
)
from grnn_engine.fl_settings import FLSettings
from grnn_engine.victims import victim_fingerprint

__all__ = ["DEFAULT_CACHE_DIR", "STAGE_FORMAT", "chain_id", "load_stage", "resolve_cache_dir", "save_stage", "stage_key"]

# Bump when a change to the training changes what a stage holds: old cache entries then miss.
STAGE_FORMAT = 1


def _chain_identity(
    dataset: str,
    image_size: int,
    victim: str,
    victim_params: Mapping[str, Any],
    settings: FLSettings,
    seed: int,
) -> dict[str, Any]:
    identity = {
        "format": STAGE_FORMAT,
        "dataset": dataset,
        "image_size": image_size,
        "victim": victim,
        "victim_params": dict(victim_params),
        "fl": settings.canonical(),
        "seed": seed,
    }
    fingerprint = victim_fingerprint(victim, victim_params, image_size)
    if fingerprint is not None:  # only for import paths: registered victims' stage keys stay as they were
        identity["victim_fingerprint"] = fingerprint
    return identity


def chain_id(
    dataset: str, image_size: int, victim: str, victim_params: Mapping[str, Any], settings: FLSettings, seed: int
) -> str:
    """Content address (24 hex digits) of one FedAvg chain: every stage key of the chain, without the round."""
    return content_hash(_chain_identity(dataset, image_size, victim, victim_params, settings, seed))


def stage_key(
    dataset: str,
    image_size: int,
    victim: str,
    victim_params: Mapping[str, Any],
    settings: FLSettings,
    seed: int,
    fl_round: int,
) -> str:
    """Content address (24 hex digits) of one stage: the name of its cache file."""
    return content_hash(
        {**_chain_identity(dataset, image_size, victim, victim_params, settings, seed), "round": fl_round}
    )


def load_stage(path: pathlib.Path) -> dict[str, Any] | None:
    """The stage cached at `path`, or None when it is missing or unreadable (then it is trained again)."""
    return load_torch_cache(path, "stage")


def save_stage(path: pathlib.Path, stage: dict[str, Any]) -> None:
    atomic_torch_save(path, stage)
