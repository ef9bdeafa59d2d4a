"""ServerApp of the audited benchmark federation: Flower's FedAvg, wrapped by the project's leakage audit.

The audit is the marked line and its settings (`audit`); the rest is an ordinary Message-API ServerApp with a central evaluation
of the global model on the dataset's test split.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from grnn_engine.data import load_dataset
from grnn_engine.victims import create_victim
from orchestrator.audit import AuditedStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = context.run_config
    image_size = int(run["image-size"])
    test = load_dataset(str(run["dataset"]), split="test", image_size=image_size)
    model_fn = functools.partial(create_victim, str(run["victim"]), num_classes=test.num_classes,
                                 image_size=image_size, seed=int(run["seed"]))  # fmt: skip
    # A seeded sample of the test split: its files are sorted by class, so its first images are all one digit.
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(int(run["seed"])))
    chosen = pick[: int(run["eval-images"])].tolist()
    test_x, test_y = test.load(chosen), test.labels[chosen]
    accuracy: dict[int, float] = {}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = model_fn()
        model.load_state_dict(arrays.to_torch_state_dict())
        with torch.no_grad():
            accuracy[server_round] = float((model(test_x).argmax(1) == test_y).float().mean())
        return MetricRecord({"accuracy": accuracy[server_round]})

    audit = {
        "name": str(run["audit-name"]), "results": str(run["audit-results"]),
        "every": int(run["audit-every"]), "clients": int(run["audit-clients"]) or None,
        "attacks": [{"name": str(run["audit-attack"]), "params": {"iterations": int(run["audit-iterations"])}}],
        "victim": str(run["victim"]), "image_size": image_size, "num_classes": test.num_classes,
        "local_steps": int(run["local-steps"]), "local_lr": float(run["local-lr"]),
        "use_ray": bool(run["audit-use-ray"]), "seed": int(run["seed"]), "eval_every": 5,
    }  # fmt: skip
    clients = int(run["num-clients"])  # wait for every SuperNode, train on all of them each round
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=clients, min_available_nodes=clients)
    strategy = AuditedStrategy(strategy, audit)  # <- the audit (the model: the registry victim named in `audit`)
    result = strategy.start(
        grid=grid, initial_arrays=ArrayRecord(model_fn().state_dict()), num_rounds=int(run["num-server-rounds"]),
        train_config=ConfigRecord({"lr": float(run["local-lr"])}), evaluate_fn=evaluate,
    )  # fmt: skip
    if run["summary-path"]:
        summary = {"rounds": len(result.train_metrics_clientapp), "fl_accuracy": accuracy[max(accuracy)],
                   "audit_rows": strategy.auditor.rows_written, "audit_run": strategy.auditor.audit_run}  # fmt: skip
        Path(str(run["summary-path"])).write_text(json.dumps(summary), encoding="utf-8")
