"""The engine's plugin registries as the spec sees them: by family, and which parameters the sweep sets itself.

grnn_engine is imported on first use, not when the spec package is imported: importing the engine
registers every plugin and pulls in torch, which the commands that only read a ledger do not need.
"""

from __future__ import annotations

from typing import Any

from grnn_engine.registry import Registry

__all__ = ["VICTIM_SET_BY_SWEEP", "plugin_registries"]

# Victim parameters the sweep sets itself (from data.image_size, the dataset and the trial seed).
VICTIM_SET_BY_SWEEP = {"num_classes": "the dataset", "image_size": "data.image_size", "seed": "grid.seed"}


def plugin_registries() -> dict[str, Registry[Any]]:
    """The registry of each plugin family a spec names: dataset, victim, defense, attack, identifier."""
    import grnn_engine  # importing the package registers every plugin
    from grnn_engine.reid import IDENTIFIERS

    return {
        "dataset": grnn_engine.DATASETS,
        "victim": grnn_engine.VICTIMS,
        "defense": grnn_engine.DEFENSES,
        "attack": grnn_engine.ATTACKS,
        "identifier": IDENTIFIERS,
    }

