"""Gradient-inversion attacks. Importing this package registers every attack in `ATTACKS`."""

from grnn_engine.attacks import dlg, gradinversion, grnn, idlg, ig, imprint, rgap  # noqa: F401  (registration on import)
from grnn_engine.attacks.base import ATTACKS, Attack, Reconstruction, SharedUpdate

__all__ = ["ATTACKS", "Attack", "Reconstruction", "SharedUpdate"]
