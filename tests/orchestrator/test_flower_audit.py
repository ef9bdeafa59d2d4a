"""The Flower audit: Flower's own FedAvg (Message API, and the legacy API) wrapped by the audit, driven with
real Flower messages (no processes), clients that really train on real digits, and a real iDLG attack on their updates."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.common import (  # noqa: E402
    Code,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import SimpleClientManager  # noqa: E402
from flwr.server.client_proxy import ClientProxy  # noqa: E402
from flwr.server.strategy import FedAvg as LegacyFedAvg  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from grnn_engine.data import load_dataset  # noqa: E402
from grnn_engine.errors import ConfigError  # noqa: E402
from grnn_engine.victims import create_victim  # noqa: E402
from orchestrator import results  # noqa: E402
from orchestrator.audit import (  # noqa: E402
    TRUTH_KEY,
    AuditedLegacyStrategy,
    AuditedStrategy,
    load_audit_config,
    truth_metrics,
    truth_record,
)
from orchestrator.report import write_report  # noqa: E402

NODES = (11, 2**63 + 5)  # Flower node ids are unsigned 64-bit: the second does not fit an int64
LR = 0.5
IMAGE_SIZE = 8


class DirectGrid(Grid):
    """The one part of a Grid a strategy's configure step calls: which nodes are connected."""

    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        raise NotImplementedError

    @property
    def run(self):  # type: ignore[override]
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # type: ignore[override]
        raise NotImplementedError

    def get_node_ids(self):  # type: ignore[override]
        return list(NODES)

    def push_messages(self, messages):  # type: ignore[override]
        raise NotImplementedError

    def pull_messages(self, message_ids):  # type: ignore[override]
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[override]
        raise NotImplementedError


def model_fn() -> torch.nn.Module:
    return create_victim("lenet_zhu", num_classes=10, image_size=IMAGE_SIZE, seed=0)


def train_reply(message: Message, index: int) -> Message:
    """A test-federation client: one SGD step at LR on its one private digit, and its truth record."""
    images = load_dataset("digits", split="train", image_size=IMAGE_SIZE)
    model = model_fn()
    model.load_state_dict(message.content["arrays"].to_torch_state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loss = torch.nn.functional.cross_entropy(model(images.load([index])), images.labels[[index]])
    loss.backward()
    optimizer.step()
    return Message(
        content=RecordDict({
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": 1, "train_loss": loss.item()}),
            TRUTH_KEY: truth_record("digits", "train", [index]),
        }),
        reply_to=message,
    )  # fmt: skip


@pytest.fixture()
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    # What a ServerApp process has set when a strategy builds its messages.
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def audit_config(tmp_path: Path, **overrides: object) -> dict[str, object]:
    return {
        "name": "fl", "results": str(tmp_path), "attacks": [{"name": "idlg", "params": {"iterations": 3}}],
        "victim": "lenet_zhu", "image_size": IMAGE_SIZE, "local_lr": LR, "eval_every": 20, **overrides,
    }  # fmt: skip


def test_audited_fedavg_writes_scored_rows_and_aggregates_bit_identically(
    tmp_path: Path, server_identity: None, one_torch_thread: None
) -> None:
    plain = FedAvg(fraction_evaluate=0.0)
    audited = AuditedStrategy(FedAvg(fraction_evaluate=0.0), audit_config(tmp_path, every=2), model_fn=model_fn)
    assert audited.min_train_nodes == 2  # the wrapped strategy's settings read through
    arrays = ArrayRecord(model_fn().state_dict())
    for server_round in (1, 2, 3):
        messages = list(audited.configure_train(server_round, arrays, ConfigRecord({"lr": LR}), DirectGrid()))
        assert sorted(m.metadata.dst_node_id for m in messages) == sorted(NODES)
        by_node = {m.metadata.dst_node_id: m for m in messages}
        replies = [train_reply(by_node[node], index) for node, index in zip(NODES, (3, 40), strict=True)]
        untouched = copy.deepcopy(replies)
        got_arrays, got_metrics = audited.aggregate_train(server_round, replies)
        want_arrays, want_metrics = plain.aggregate_train(server_round, untouched)
        assert got_arrays is not None and want_arrays is not None
        assert list(got_arrays.keys()) == list(want_arrays.keys())
        for key in want_arrays:
            assert np.array_equal(got_arrays[key].numpy(), want_arrays[key].numpy())  # bit for bit
        assert dict(got_metrics or {}) == dict(want_metrics or {})
        arrays = got_arrays
    assert audited.finish_audit() == 4  # rounds 1 and 3 (every 2), 2 clients, 1 attack

    df = results.load(tmp_path / "fl")
    assert len(df) == 4 and set(df["status"]) == {"COMPLETE"}
    assert set(df["fl_framework"]) == {"flower"} and set(df["fl_strategy"]) == {"FedAvg"}
    assert sorted(df["server_round"].tolist()) == [1, 1, 3, 3]
    assert set(df["client_id"]) == {str(n) for n in NODES}
    assert set(df["fl_round"]) == {0, 2} and set(df["update"]) == {"fedsgd"}
    # Scored against the truth the clients named: iDLG's label from a B=1 gradient is exact.
    assert df["psnr"].notna().all() and (df["label_acc"] == 1.0).all()
    assert sorted(map(tuple, df["indices"])) == [(3,), (3,), (40,), (40,)]
    assert all((tmp_path / "fl" / "images" / f"{k}.png").is_file() for k in df["trial_key"])
    assert (tmp_path / "fl" / "trials.parquet").is_file()
    report = write_report(tmp_path / "fl")
    assert (report.folder / "gallery.png").is_file()


def test_audit_without_truth_records_the_reconstruction_unscored(
    tmp_path: Path, server_identity: None, one_torch_thread: None
) -> None:
    audited = AuditedStrategy(FedAvg(fraction_evaluate=0.0), audit_config(tmp_path, clients=1), model_fn=model_fn)
    arrays = ArrayRecord(model_fn().state_dict())
    messages = list(audited.configure_train(1, arrays, ConfigRecord(), DirectGrid()))
    replies = []
    for message, index in zip(messages, (5, 6), strict=True):
        reply = train_reply(message, index)
        del reply.content[TRUTH_KEY]  # a real federation: the server never learns the client's data
        replies.append(reply)
    audited.aggregate_train(1, replies)
    assert audited.finish_audit() == 1  # clients: 1 of the 2
    row = results.load(tmp_path / "fl").iloc[0]
    assert row["status"] == "COMPLETE" and np.isnan(row["psnr"]) and row["dataset"] == "unknown"
    assert len(row["labels_recovered"]) == 1
    assert (tmp_path / "fl" / "images" / f"{row['trial_key']}.png").is_file()


def test_audit_handed_to_ray_lands_every_row_and_leaves_the_callers_ray_running(
    tmp_path: Path, server_identity: None, ray_session: None
) -> None:
    import ray

    audited = AuditedStrategy(FedAvg(fraction_evaluate=0.0), audit_config(tmp_path, use_ray=True), model_fn=model_fn)
    arrays = ArrayRecord(model_fn().state_dict())
    messages = list(audited.configure_train(1, arrays, ConfigRecord(), DirectGrid()))
    audited.aggregate_train(1, [train_reply(m, i) for m, i in zip(messages, (9, 10), strict=True)])
    assert audited.finish_audit() == 2  # waits for the Ray tasks
    df = results.load(tmp_path / "fl")
    assert len(df) == 2 and df["psnr"].notna().all() and (df["label_acc"] == 1.0).all()
    assert ray.is_initialized()  # the audit did not start this Ray, so it does not stop it


class DirectProxy(ClientProxy):
    """A connected client as the legacy ClientManager holds it; the strategy only reads its cid."""

    def get_properties(self, ins, timeout, group_id):  # type: ignore[override]
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):  # type: ignore[override]
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):  # type: ignore[override]
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):  # type: ignore[override]
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):  # type: ignore[override]
        raise NotImplementedError


def legacy_fit(fit_ins: FitIns, index: int) -> FitRes:
    """A legacy NumPyClient-style client: state_dict arrays in, one SGD step on its digit, arrays out."""
    images = load_dataset("digits", split="train", image_size=IMAGE_SIZE)
    model = model_fn()
    names = list(model.state_dict())
    arrays = parameters_to_ndarrays(fit_ins.parameters)
    model.load_state_dict({n: torch.from_numpy(a) for n, a in zip(names, arrays, strict=True)})
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    torch.nn.functional.cross_entropy(model(images.load([index])), images.labels[[index]]).backward()
    optimizer.step()
    return FitRes(status=Status(Code.OK, ""), num_examples=1, metrics=truth_metrics("digits", "train", [index]),
                  parameters=ndarrays_to_parameters([v.detach().numpy() for v in model.state_dict().values()]))


def test_audited_legacy_fedavg_scores_rows_and_aggregates_bit_identically(
    tmp_path: Path, one_torch_thread: None
) -> None:
    manager = SimpleClientManager()
    proxies = [DirectProxy(str(n)) for n in NODES]
    for proxy in proxies:
        manager.register(proxy)
    plain = LegacyFedAvg(fraction_evaluate=0.0)
    audited = AuditedLegacyStrategy(LegacyFedAvg(fraction_evaluate=0.0), audit_config(tmp_path), model_fn=model_fn)
    parameters = ndarrays_to_parameters([v.numpy() for v in model_fn().state_dict().values()])
    instructions = audited.configure_fit(1, parameters, manager)
    by_cid = {proxy.cid: ins for proxy, ins in instructions}
    fit = [(proxy, legacy_fit(by_cid[proxy.cid], index)) for proxy, index in zip(proxies, (7, 8), strict=True)]
    got, _ = audited.aggregate_fit(1, fit, [])
    want, _ = plain.aggregate_fit(1, copy.deepcopy(fit), [])
    assert got is not None and want is not None
    for a, b in zip(parameters_to_ndarrays(got), parameters_to_ndarrays(want), strict=True):
        assert np.array_equal(a, b)
    assert audited.finish_audit() == 2
    df = results.load(tmp_path / "fl")
    assert set(df["client_id"]) == {str(n) for n in NODES} and set(df["fl_strategy"]) == {"FedAvg"}
    assert df["psnr"].notna().all() and (df["label_acc"] == 1.0).all()


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"evrey": 2}, "unknown setting 'evrey'"),
        ({"attacks": [{"name": "dgl"}]}, "dlg"),
        ({"attacks": [{"name": "idlg", "params": {"iters": 3}}]}, "iters"),
        ({"every": 0}, "every=0"),
        ({"local_lr": None}, "local_lr"),
    ],
)
def test_bad_audit_settings_are_one_sentence_config_errors(tmp_path: Path, overrides: dict, needle: str) -> None:
    config = audit_config(tmp_path, **overrides)
    if overrides.get("local_lr", 0) is None:
        del config["local_lr"]
    with pytest.raises(ConfigError) as err:
        load_audit_config(config)
    assert needle in str(err.value) and "\n" not in str(err.value)


_SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
_DATA_ROOT = os.environ.get("GRNN_DATA_ROOT") or (str(_SHARED) if _SHARED.is_dir() else None)


@pytest.mark.slow
@pytest.mark.skipif(_DATA_ROOT is None or not (Path(_DATA_ROOT) / "mnist").is_dir(),
                    reason="the benchmark's MNIST needs GRNN_DATA_ROOT (../shared/data)")  # fmt: skip
def test_benchmark_runs_a_real_local_flower_federation(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "benchmarks/flower_audit.py", "--rounds", "2", "--results", str(tmp_path),
         "--iterations", "3"],
        capture_output=True, text=True, timeout=1200, cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "GRNN_DATA_ROOT": str(_DATA_ROOT)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["rounds"] == 2 and line["clients"] == 2 and line["rows"] > 0
    assert line["psnr_mean"] is not None and 0.0 <= line["fl_accuracy"] <= 1.0
    assert (tmp_path / "flower_audit_fedsgd" / "trials.parquet").is_file()
