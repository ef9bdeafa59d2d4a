"""AuditedStrategy: a Flower (Message API) strategy around the user's own, auditing what the server receives.

    strategy = AuditedStrategy(FedAvg(...), {"attacks": [{"name": "idlg"}], "local_lr": 0.1}, model_fn=Net)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()), num_rounds=3)

Composition, not subclassing: every call goes to the wrapped strategy, which sees exactly the messages it
would see without the audit, so what it aggregates is unchanged (bit for bit). On an audited round the
wrapper keeps a decoded copy of the arrays each node was sent (from the messages `configure_train` built)
and of each successful reply, before the wrapped strategy aggregates (a DP strategy may clip the replies
in place; the audit attacks what the clients sent), then hands them to the `Auditor`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from torch import Tensor, nn

from orchestrator.audit.auditor import Auditor, ClientUpdate
from orchestrator.audit.config import AuditConfig, load_audit_config
from orchestrator.audit.flower_records import arrays_to_state, client_update, only_array_record


class AuditedStrategy(Strategy):
    """The user's strategy plus a leakage audit of (a sample of) the updates of every `every`-th round.

    `config`: an AuditConfig, a dict or a YAML path (see orchestrator.audit.config). `model_fn`: builds the
    federation's model, whose state_dict names the arrays; without it the config's registry victim is used.
    `start()` finishes the audit when the run ends (waits for Ray attacks, compacts the ledger); a caller
    driving the rounds itself calls `finish_audit()`.
    """

    def __init__(self, strategy: Strategy, config: AuditConfig | Mapping[str, Any] | str | Path,
                 model_fn: Callable[[], nn.Module] | None = None) -> None:  # fmt: skip
        self.strategy = strategy
        self.audit_config = load_audit_config(config)
        self.auditor = Auditor(self.audit_config, model_fn, {"fl_strategy": type(strategy).__name__})
        self._sent: dict[int, dict[str, Tensor]] = {}  # node id -> the arrays it was sent this round

    def __getattr__(self, name: str) -> Any:
        # Settings of the wrapped strategy (fraction_train, ...) read through the wrapper.
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    # ------------------------------------------------------------------------------------------ train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._sent = {}
        if self.auditor.audits_round(server_round):
            decoded: dict[int, dict[str, Tensor]] = {}  # by record identity: FedAvg sends one record to all
            for message in messages:
                record = only_array_record(message.content)
                if id(record) not in decoded:
                    decoded[id(record)] = arrays_to_state(record, self.auditor.state_names)
                self._sent[message.metadata.dst_node_id] = decoded[id(record)]
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        updates = self._updates(replies) if self.auditor.audits_round(server_round) else []
        result = self.strategy.aggregate_train(server_round, replies)
        if updates:
            # Grouped by the arrays each node was sent: one group (one global model) unless the strategy
            # personalises what it sends.
            groups: dict[int, list[ClientUpdate]] = {}
            for update in updates:
                groups.setdefault(id(self._sent[int(update.client_id)]), []).append(update)
            for group in groups.values():
                self.auditor.audit_round(server_round, self._sent[int(group[0].client_id)], group)
        return result

    def _updates(self, replies: list[Message]) -> list[ClientUpdate]:
        cfg = self.audit_config
        return [
            client_update(reply, self.auditor.state_names, cfg.examples_key, cfg.data_root)
            for reply in replies
            if not reply.has_error() and reply.metadata.src_node_id in self._sent
        ]

    # ------------------------------------------------------------------------------------------ the rest
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:  # fmt: skip
        """Flower's round loop (Strategy.start) through this wrapper, then `finish_audit()`."""
        try:
            return super().start(grid, initial_arrays, num_rounds=num_rounds, timeout=timeout,
                                 train_config=train_config, evaluate_config=evaluate_config, evaluate_fn=evaluate_fn)  # fmt: skip
        finally:
            self.finish_audit()

    def finish_audit(self) -> int:
        """Wait for attacks still running, compact the ledger; the number of rows this audit wrote."""
        return self.auditor.finish()
