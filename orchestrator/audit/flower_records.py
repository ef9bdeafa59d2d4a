"""Flower's records in the auditor's terms: ArrayRecords as named tensors, replies as `ClientUpdate`s, and the
truth record a test federation's client may add to its reply so that the audit can score the attacks.

The tensors are decoded copies (`Array.numpy()` deserialises its bytes each time), so nothing the auditor
does can reach the messages the strategy aggregates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from torch import Tensor

from grnn_engine.errors import ConfigError
from orchestrator.audit.auditor import ClientUpdate
from orchestrator.audit.job import Truth

# The reply's ConfigRecord that carries where the client's batch comes from (test federations only).
TRUTH_KEY = "grnn-audit-truth"


def truth_record(dataset: str, split: str, indices: Sequence[int]) -> ConfigRecord:
    """What a test federation's ClientApp adds to its reply (`content[TRUTH_KEY] = truth_record(...)`): the
    dataset split and indices it trained on, which the auditor (holding the same dataset) scores against.
    Strategies ignore ConfigRecords in replies, so it changes nothing they aggregate."""
    return ConfigRecord({"dataset": dataset, "split": split, "indices": [int(i) for i in indices]})


def arrays_to_state(record: ArrayRecord, names: Sequence[str]) -> dict[str, Tensor]:
    """The record as {state_dict name: tensor}. Records built from a state_dict (`ArrayRecord(model.state_dict())`)
    match by name; records built from a list of arrays (keys '0', '1', ...) by position."""
    keys = list(record.keys())
    if set(names) <= set(keys):
        chosen = {name: name for name in names}
    elif len(keys) == len(names):
        chosen = dict(zip(names, keys, strict=True))
    else:
        raise ConfigError(
            f"the federation's arrays ({len(keys)}: {', '.join(keys[:4])}...) do not fit the audited model's "
            f"{len(names)} state entries ({', '.join(names[:4])}...); give the audit the federation's model"
        )
    return {name: torch.from_numpy(record[key].numpy()).clone() for name, key in chosen.items()}


def only_array_record(content: RecordDict) -> ArrayRecord:
    records = list(content.array_records.values())
    if len(records) != 1:
        raise ConfigError(f"the audit reads one ArrayRecord per message; this one has {len(records)}")
    return records[0]


def read_truth(content: RecordDict, data_root: str | None) -> Truth | None:
    """The reply's truth record as a `Truth`, or None when the client sent none (a real federation)."""
    if TRUTH_KEY not in content.config_records:
        return None
    record = content.config_records[TRUTH_KEY]
    try:
        dataset, split, indices = str(record["dataset"]), str(record["split"]), record["indices"]
    except KeyError as err:
        raise ConfigError(f"the reply's '{TRUTH_KEY}' record lacks '{err.args[0]}'; build it with truth_record()") from None
    if not isinstance(indices, list):
        raise ConfigError(f"the reply's '{TRUTH_KEY}' indices must be a list of ints, not {type(indices).__name__}")
    return Truth(dataset=dataset, split=split, indices=tuple(int(i) for i in indices), data_root=data_root)


def client_update(reply: Message, names: Sequence[str], examples_key: str, data_root: str | None) -> ClientUpdate:
    """One successful train reply as the auditor's `ClientUpdate`."""
    content = reply.content
    metrics = list(content.metric_records.values())
    if not metrics or examples_key not in metrics[0]:
        raise ConfigError(f"the audit reads the batch size from the reply's MetricRecord key '{examples_key}', "
                          f"which client {reply.metadata.src_node_id} did not send")  # fmt: skip
    return ClientUpdate(
        client_id=str(reply.metadata.src_node_id),
        local_params=arrays_to_state(only_array_record(content), names),
        num_examples=int(metrics[0][examples_key]),  # type: ignore[arg-type]
        truth=read_truth(content, data_root),
    )
