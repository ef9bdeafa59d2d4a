"""grnn_engine: gradient-inversion attacks (GRNN, DLG, iDLG, Inverting Gradients) on federated-learning
victims, with defenses and honest scoring. Pure PyTorch: never imports ray, pandas or the orchestrator.

Importing the package registers every plugin (datasets, victims, attacks, defenses).
"""

from grnn_engine import attacks, data, defenses, imprint_victim, victims  # noqa: F401  (registration on import)
from grnn_engine.attacks.base import ATTACKS, Attack, Reconstruction, SharedUpdate
from grnn_engine.data import DATASETS, load_dataset, select_batch
from grnn_engine.defenses import DEFENSES
from grnn_engine.errors import ConfigError, DataError, GrnnError
from grnn_engine.result import TrialResult
from grnn_engine.trial import run_trial
from grnn_engine.trial_spec import TrialSpec
from grnn_engine.victims import VICTIMS, create_victim

__all__ = [
    "ATTACKS", "DATASETS", "DEFENSES", "VICTIMS", "Attack", "ConfigError", "DataError", "GrnnError",
    "Reconstruction", "SharedUpdate", "TrialResult", "TrialSpec", "create_victim", "load_dataset",
    "run_trial", "select_batch",
]
