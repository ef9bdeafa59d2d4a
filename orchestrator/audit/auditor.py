"""Auditor: the framework-neutral half of a federation audit.

Each round the framework adapter (e.g. `orchestrator.audit.flower_strategy`) hands it the global model's
arrays and the client updates the server received; the auditor decides whether this round is audited
(`every`), samples `clients` of the updates, turns each (update, attack) into an `AuditJob`, runs it inline
or as a Ray task, and writes one row per attacked update to the project's ledger (`results/<name>/`).
It never touches what the strategy aggregates: it works on tensors copied out of the messages.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from grnn_engine.errors import ConfigError
from grnn_engine.victims import create_victim
from orchestrator.audit.config import AuditConfig
from orchestrator.audit.job import AuditJob, AuditOutcome, Truth, run_audit_job
from orchestrator.results import Ledger

log = logging.getLogger(__name__)


@dataclass
class ClientUpdate:
    """One client's reply as the auditor sees it: its trainable arrays after local training, by name."""

    client_id: str
    local_params: dict[str, Tensor]
    num_examples: int
    truth: Truth | None = None


def classifier_outputs(model: nn.Module) -> int:
    """The number of classes: the out_features of the model's last nn.Linear."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ConfigError(f"the audit needs num_classes for {type(model).__name__}, which has no nn.Linear to read it from")
    return int(last[-1].out_features)


# Packages every Ray worker imports on its own; any other module's model code travels with the task.
_INSTALLED = {"grnn_engine", "orchestrator", "torch", "torchvision", "functools"}


def ship_model_code(model_fn: Callable[[], nn.Module]) -> None:
    """Make Ray pickle the user's model code by value. A ServerApp's own modules (its `Net`) are imported from
    the Flower App's folder, which Ray workers do not have on their path: by reference they would not load."""
    import ray.cloudpickle

    target = model_fn.func if isinstance(model_fn, functools.partial) else model_fn
    module = getattr(target, "__module__", None)
    if module and module.split(".")[0] not in _INSTALLED and module in sys.modules:
        ray.cloudpickle.register_pickle_by_value(sys.modules[module])


class Auditor:
    """Runs the configured attacks on a sample of each audited round's updates and records the rows.

    `model_fn` builds the federation's model (the user's own architecture); without it the config's
    registry `victim` is built. Rows land as the attacks finish; `finish()` waits for those still running
    (Ray), compacts the ledger to trials.parquet and returns how many rows this audit wrote.
    """

    def __init__(self, config: AuditConfig, model_fn: Callable[[], nn.Module] | None = None,
                 fl_framework_extra: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.config = config
        self.audit_run = secrets.token_hex(4)
        self.started_ns = time.time_ns()
        self.ledger = Ledger(config.folder, sweep=config.name)
        self.extra = dict(fl_framework_extra or {})
        if model_fn is not None:
            self.model_fn = model_fn
            probe = model_fn()
            self.victim = f"custom:{type(probe).__module__}.{type(probe).__qualname__}"
            self.victim_params: dict[str, Any] = {}
            self.num_classes = config.num_classes or classifier_outputs(probe)
        else:
            num_classes = config.num_classes or 10
            self.model_fn = functools.partial(
                create_victim, config.victim, num_classes=num_classes, image_size=config.image_size,
                seed=config.seed, **config.victim_params,
            )  # fmt: skip
            probe = self.model_fn()  # bad victim parameters fail now, before the federation starts
            self.victim, self.victim_params, self.num_classes = config.victim, dict(config.victim_params), num_classes
        self.state_names = list(probe.state_dict().keys())
        self.rows_written = 0
        self.skipped = 0
        self._pending: list[Any] = []  # Ray object refs of jobs still running
        self._ray_started_here = False

    # ------------------------------------------------------------------------------------------ rounds
    def audits_round(self, server_round: int) -> bool:
        """Rounds 1, 1 + every, 1 + 2 * every, ...: the first round is always audited."""
        return (server_round - 1) % self.config.every == 0

    def sample(self, server_round: int, updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
        """Up to `clients` updates of the round, drawn from a stream seeded by (seed, round): reproducible."""
        k = self.config.clients
        if k is None or k >= len(updates):
            return list(updates)
        rng = random.Random(self.config.seed * 1_000_003 + server_round)
        picked = sorted(rng.sample(range(len(updates)), k))
        return [updates[i] for i in picked]

    def job_key(self, server_round: int, client_id: str, attack: str, params: dict[str, Any]) -> str:
        text = json.dumps([self.audit_run, server_round, client_id, attack, params], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def jobs(self, server_round: int, global_state: dict[str, Tensor], updates: Sequence[ClientUpdate]) -> list[AuditJob]:
        cfg = self.config
        out = []
        for update in self.sample(server_round, updates):
            if update.num_examples > cfg.max_batch_size:
                self.skipped += 1
                log.warning("audit: round %d client %s trained on %d examples (> max_batch_size %d); not attacked",
                            server_round, update.client_id, update.num_examples, cfg.max_batch_size)  # fmt: skip
                continue
            for attack in cfg.attacks:
                out.append(AuditJob(
                    key=self.job_key(server_round, update.client_id, attack.name, attack.params),
                    audit_run=self.audit_run, server_round=server_round, client_id=update.client_id,
                    attack=attack.name, attack_params=dict(attack.params), model_fn=self.model_fn,
                    victim=self.victim, victim_params=self.victim_params, global_state=global_state,
                    local_params=update.local_params, num_classes=self.num_classes,
                    image_shape=(3, cfg.image_size, cfg.image_size), batch_size=update.num_examples,
                    local_steps=cfg.local_steps, local_lr=cfg.local_lr, truth=update.truth, seed=cfg.seed,
                    eval_every=cfg.eval_every, success_psnr=cfg.success_psnr, device=cfg.device, extra=self.extra,
                ))  # fmt: skip
        return out

    def audit_round(self, server_round: int, global_state: dict[str, Tensor], updates: Sequence[ClientUpdate]) -> int:
        """Attack this round's sampled updates (when the round is audited); returns the jobs started."""
        self.collect(wait=False)
        if not self.audits_round(server_round) or not updates:
            return 0
        jobs = self.jobs(server_round, global_state, updates)
        if self.config.use_ray:
            self._submit(jobs)
        else:
            for job in jobs:
                self.record(run_audit_job(job))
        return len(jobs)

    # ------------------------------------------------------------------------------------------ rows
    def record(self, outcome: AuditOutcome) -> None:
        self.ledger.write_part(outcome.row, outcome.image_png)
        self.rows_written += 1
        row = outcome.row
        log.info("audit: round %s client %s %s: %s psnr=%s", row["server_round"], row["client_id"], row["attack"],
                 row["status"], row.get("psnr"))  # fmt: skip

    # ------------------------------------------------------------------------------------------ Ray
    def _submit(self, jobs: list[AuditJob]) -> None:
        import ray  # only audits that hand their attacks to Ray need it

        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
            self._ray_started_here = True
        ship_model_code(self.model_fn)
        task = ray.remote(run_audit_job).options(num_cpus=self.config.cpus_per_attack)
        self._pending += [task.remote(job) for job in jobs]

    def collect(self, wait: bool) -> None:
        """Write the rows of Ray jobs that finished (all of them, waiting, when `wait`)."""
        if not self._pending:
            return
        import ray

        done, self._pending = ray.wait(self._pending, num_returns=len(self._pending), timeout=None if wait else 0)
        for ref in done:
            self.record(ray.get(ref))

    def finish(self) -> int:
        """Wait for running attacks, compact the ledger, release a Ray this audit started; rows written."""
        self.collect(wait=True)
        if self.rows_written:
            self.ledger.close_run(self.started_ns)
        if self._ray_started_here:
            import ray

            ray.shutdown()
            self._ray_started_here = False
        return self.rows_written
