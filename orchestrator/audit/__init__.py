"""Leakage audit of a running federation: the project's attacks on the updates a real FL server receives.

`AuditConfig`/`load_audit_config` (config.py), the framework-neutral `Auditor` (auditor.py) and the job it
runs per attacked update (job.py); Flower's adapters, `AuditedStrategy` (Message API) and
`AuditedLegacyStrategy` (`flwr.server.strategy`), with the test federation's `truth_record`/`truth_metrics`,
are imported on first use, since they need the optional `flwr` (`pip install
'grnn-sweep[audit]'`).
"""

from __future__ import annotations

import importlib
from typing import Any

from orchestrator.audit.auditor import Auditor, ClientUpdate
from orchestrator.audit.config import AttackSetting, AuditConfig, load_audit_config
from orchestrator.audit.job import AuditJob, AuditOutcome, Truth, run_audit_job

_FLOWER = {
    "AuditedStrategy": "orchestrator.audit.flower_strategy",
    "AuditedLegacyStrategy": "orchestrator.audit.flower_legacy_strategy",
    "truth_metrics": "orchestrator.audit.flower_legacy_strategy",
    "TRUTH_KEY": "orchestrator.audit.flower_records",
    "truth_record": "orchestrator.audit.flower_records",
}

__all__ = [
    "AttackSetting", "AuditConfig", "AuditJob", "AuditOutcome", "AuditedLegacyStrategy", "AuditedStrategy", "Auditor",
    "ClientUpdate", "TRUTH_KEY", "Truth", "load_audit_config", "run_audit_job", "truth_metrics", "truth_record",
]


def __getattr__(name: str) -> Any:
    if name not in _FLOWER:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(_FLOWER[name])
    except ModuleNotFoundError as err:
        if err.name != "flwr" and not str(err.name).startswith("flwr."):
            raise
        from grnn_engine.errors import ConfigError

        raise ConfigError("auditing a Flower federation needs flwr: pip install 'grnn-sweep[audit]'") from None
    return getattr(module, name)
