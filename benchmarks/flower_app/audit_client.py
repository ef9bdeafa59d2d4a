"""ClientApp of the audited benchmark federation: each SuperNode trains on its own shard of a real dataset.

Shard `partition-id` of `num-partitions` holds the train-split images whose index is congruent to it; every
round the client draws `batch-size` of them (seeded by round and partition) and takes `local-steps` full-batch
SGD steps at `local-lr`: one step is a FedSGD-style update, more a FedAvg one. Being a test federation, it
also tells the server which images it used (`truth_record`), so the audit can score its reconstructions.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from grnn_engine.data import load_dataset
from grnn_engine.victims import create_victim
from orchestrator.audit import TRUTH_KEY, truth_record

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    run, node = context.run_config, context.node_config
    partition, partitions = int(node["partition-id"]), int(node["num-partitions"])
    server_round = int(msg.content["config"]["server-round"])
    image_size, batch = int(run["image-size"]), int(run["batch-size"])
    images = load_dataset(str(run["dataset"]), split="train", image_size=image_size)
    shard = torch.arange(partition, len(images), partitions)
    pick = torch.Generator().manual_seed(int(run["seed"]) * 1_000_003 + server_round * 1009 + partition)
    indices = shard[torch.randperm(len(shard), generator=pick)[:batch]].tolist()
    x, y = images.load(indices), images.labels[indices]

    model = create_victim(str(run["victim"]), num_classes=images.num_classes, image_size=image_size)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=float(run["local-lr"]))
    for _ in range(int(run["local-steps"])):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"num-examples": len(indices), "train-loss": loss.item()}),
    })  # fmt: skip
    if bool(run["send-truth"]):
        content[TRUTH_KEY] = truth_record(str(run["dataset"]), "train", indices)
    return Message(content=content, reply_to=msg)
