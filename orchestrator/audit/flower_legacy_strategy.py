"""AuditedLegacyStrategy: the same audit around a strategy of Flower's legacy API (`flwr.server.strategy`,
`configure_fit`/`aggregate_fit` on `Parameters`), which Flower 1.42 still ships for ServerApps built with
`server_fn` and `ServerConfig`.

Legacy parameters are a list of arrays without names, in the order of the model's `state_dict()` (what
Flower's NumPyClient examples send), so they are matched to the audited model by position. A legacy reply's
metrics hold only scalars, so a test federation's client sends its truth as one JSON text
(`truth_metrics`). The legacy loop has no end hook: rows are written (and the ledger compacted) as each
audited round finishes; call `finish_audit()` after the run to wait for Ray attacks still running.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from flwr.common import FitIns, FitRes, Parameters, Scalar, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from torch import Tensor, nn

from grnn_engine.errors import ConfigError
from orchestrator.audit.auditor import Auditor, ClientUpdate
from orchestrator.audit.config import AuditConfig, load_audit_config
from orchestrator.audit.flower_records import TRUTH_KEY
from orchestrator.audit.job import Truth


def truth_metrics(dataset: str, split: str, indices: Sequence[int]) -> dict[str, Scalar]:
    """What a legacy test-federation client adds to its fit metrics so the audit can score it."""
    return {TRUTH_KEY: json.dumps({"dataset": dataset, "split": split, "indices": [int(i) for i in indices]})}


def parameters_to_state(parameters: Parameters, names: Sequence[str]) -> dict[str, Tensor]:
    arrays = parameters_to_ndarrays(parameters)
    if len(arrays) != len(names):
        raise ConfigError(f"the federation sends {len(arrays)} arrays but the audited model has {len(names)} "
                          f"state entries; give the audit the federation's model")  # fmt: skip
    return {name: torch.from_numpy(array).clone() for name, array in zip(names, arrays, strict=True)}


def _truth(metrics: Mapping[str, Scalar], data_root: str | None) -> Truth | None:
    text = metrics.get(TRUTH_KEY)
    if text is None:
        return None
    data = json.loads(str(text))
    return Truth(dataset=str(data["dataset"]), split=str(data["split"]),
                 indices=tuple(int(i) for i in data["indices"]), data_root=data_root)  # fmt: skip


class AuditedLegacyStrategy(Strategy):
    """A legacy Flower strategy plus the leakage audit (see AuditedStrategy for the Message API)."""

    def __init__(self, strategy: Strategy, config: AuditConfig | Mapping[str, Any] | str | Path,
                 model_fn: Callable[[], nn.Module] | None = None) -> None:  # fmt: skip
        self.strategy = strategy
        self.audit_config = load_audit_config(config)
        self.auditor = Auditor(self.audit_config, model_fn, {"fl_strategy": type(strategy).__name__})
        self._sent: dict[str, dict[str, Tensor]] = {}  # client id -> the parameters it was sent this round

    def __getattr__(self, name: str) -> Any:
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:  # fmt: skip
        instructions = self.strategy.configure_fit(server_round, parameters, client_manager)
        self._sent = {}
        if self.auditor.audits_round(server_round):
            decoded: dict[int, dict[str, Tensor]] = {}
            for proxy, fit_ins in instructions:
                key = id(fit_ins.parameters)
                if key not in decoded:
                    decoded[key] = parameters_to_state(fit_ins.parameters, self.auditor.state_names)
                self._sent[proxy.cid] = decoded[key]
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]) -> tuple[Parameters | None, dict[str, Scalar]]:  # fmt: skip
        updates = [
            ClientUpdate(client_id=proxy.cid, num_examples=int(res.num_examples),
                         local_params=parameters_to_state(res.parameters, self.auditor.state_names),
                         truth=_truth(res.metrics, self.audit_config.data_root))  # fmt: skip
            for proxy, res in results
            if proxy.cid in self._sent
        ]
        aggregated = self.strategy.aggregate_fit(server_round, results, failures)
        groups: dict[int, list[ClientUpdate]] = {}
        for update in updates:
            groups.setdefault(id(self._sent[update.client_id]), []).append(update)
        for group in groups.values():
            self.auditor.audit_round(server_round, self._sent[group[0].client_id], group)
        if updates and self.auditor.rows_written:
            self.auditor.ledger.compact()
        return aggregated

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> Any:
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters) -> Any:
        return self.strategy.evaluate(server_round, parameters)

    def finish_audit(self) -> int:
        """Wait for attacks still running, compact the ledger; the number of rows this audit wrote."""
        return self.auditor.finish()
