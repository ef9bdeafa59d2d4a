"""Federated training stages: the global model after r rounds of FedAvg, trained once per chain and cached.

A stage is the global model that an attack trial attacks at `fl_round = r`: round 0 is the untrained
victim (exactly `create_victim(..., seed=seed)`, the model run_trial builds), round r the global model
after r rounds of FedAvg (McMahan et al. 2017) on the dataset's train split:
- the train split is dealt to K `clients` (IID shards, or non-IID by a Dirichlet(alpha) draw per class);
- each round samples `clients_per_round` of them; each trains `local_epochs` epochs of SGD
  (`local_batch_size`, `local_lr`, no momentum) from the global weights in train() mode;
- the server adds the mean of their model deltas weighted by shard size (buffers such as BatchNorm
  running statistics are averaged the same way).
With a `defense` in the settings (a sweep's `utility: true`), every client applies it during training:
dp_sgd and soteria on each local step's gradient, the others on the delta it shares, so the stage's test
accuracy measures what the defense costs. Each stage records the global model's accuracy and mean
cross-entropy on the test split, and, when trained with dp_sgd, its (epsilon, delta) from the accountant in
grnn_engine.dp_accounting.

Chains and the cache: one FedAvg run up to the largest requested round snapshots every requested round.
Each snapshot is a file `<cache_dir>/<key>.pt` (grnn_engine.stage_cache: the key a hash of what determines
it, written atomically, read back with `torch.load(weights_only=True)`); the settings are FLSettings
(grnn_engine.fl_settings). The randomness of round r is drawn from generators seeded by (seed, r),
so a chain may resume from any cached round and give the same weights as one run from round 0. The
device is not in the key: a stage trained on a GPU serves a CPU trial too (their floats differ slightly).
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grnn_engine import dp_accounting
from grnn_engine.attacks.base import trainable_parameters
from grnn_engine.data import ImageSet, load_dataset
from grnn_engine.defenses import DPSGD, Compose, Defense
from grnn_engine.devices import resolve_device
from grnn_engine.errors import ConfigError
from grnn_engine.fl_settings import FLSettings
from grnn_engine.stage_cache import chain_id, load_stage, resolve_cache_dir, save_stage, stage_key
from grnn_engine.trial_spec import TrialSpec
from grnn_engine.user_victims import to_victim_channels, victim_channels
from grnn_engine.victims import create_victim

# FLSettings, stage_key and resolve_cache_dir live in their own modules; they are part of this module's
# interface too, where the FL stages are.
__all__ = [
    "DP_DELTA",
    "ChainRequest",
    "FLSettings",
    "chain_key",
    "dp_epsilon",
    "partition",
    "resolve_cache_dir",
    "stage_for_trial",
    "stage_key",
    "stage_requests",
    "train_chain",
    "train_chains",
]

# delta of the (epsilon, delta) reported for dp_sgd stages: below 1/N for every dataset here.
DP_DELTA = 1e-5
_EVAL_BATCH = 500

# How many FedAvg chains this process has trained (not loaded): lets tests and callers see cache hits.
chains_trained = 0


# ---------------------------------------------------------------------------------------------- data split


def partition(labels: Tensor, clients: int, *, iid: bool, alpha: float, seed: int) -> list[Tensor]:
    """Indices of each client's shard. IID: a seeded shuffle cut into K near-equal shards. Non-IID: for
    each class, Dirichlet(alpha)-distributed proportions of its examples go to the K clients (shards may
    then be empty). Deterministic from `seed`."""
    n = labels.numel()
    if iid:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(_stream_seed(seed, 0, "partition")))
        return [shard.sort().values for shard in torch.tensor_split(order, clients)]
    rng = np.random.default_rng(_stream_seed(seed, 0, "partition"))
    shards: list[list[int]] = [[] for _ in range(clients)]
    for cls in sorted(set(labels.tolist())):
        members = torch.nonzero(labels == cls).flatten().numpy()
        members = members[rng.permutation(members.size)]
        cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * members.size).astype(int)[:-1]
        for k, part in enumerate(np.split(members, cuts)):
            shards[k].extend(part.tolist())
    return [torch.tensor(sorted(s), dtype=torch.int64) for s in shards]


def _stream_seed(seed: int, fl_round: int, stream: str) -> int:
    # Independent, reproducible randomness per (seed, round, purpose): what lets a chain resume mid-way.
    digest = hashlib.sha256(f"{seed}:{fl_round}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _clients_of_round(settings: FLSettings, seed: int, fl_round: int) -> list[int]:
    generator = torch.Generator().manual_seed(_stream_seed(seed, fl_round, "clients"))
    return sorted(torch.randperm(settings.clients, generator=generator)[: settings.sampled_clients].tolist())


# ---------------------------------------------------------------------------------------------- DP guarantee


def _dp_sgd_of(defense: Defense) -> DPSGD | None:
    """The DP-SGD step whose guarantee the training keeps, if any: dp_sgd alone or first in a compose whose
    other steps are post-processing (soteria reads the private batch, so it voids the guarantee)."""
    if isinstance(defense, DPSGD):
        return defense
    if isinstance(defense, Compose) and defense.steps and isinstance(defense.steps[0], DPSGD):
        if not any(step.needs_batch for step in defense.steps[1:]):
            return defense.steps[0]
    return None


def dp_epsilon(settings: FLSettings, shard_sizes: Sequence[int], seed: int, fl_round: int) -> float | None:
    """Sample-level epsilon (at DP_DELTA) of the global model after `fl_round` rounds of DP-SGD training.

    For each client: a round in which it is sampled makes local_epochs * ceil(n / local_batch_size) steps,
    each a subsampled Gaussian of rate local_batch_size / n (the RDP bound assumes Poisson sampling; the
    training shuffles into batches, the usual approximation of TF-Privacy and Opacus). Reported is the
    largest epsilon over clients (the guarantee every example gets). The server's sampling of clients is
    not credited, so the bound is conservative. None when the stage was not trained with dp_sgd.
    """
    dp = _dp_sgd_of(settings.make_defense())
    if dp is None:
        return None
    participations = [0] * settings.clients
    for r in range(1, fl_round + 1):
        for k in _clients_of_round(settings, seed, r):
            participations[k] += 1
    worst = 0.0
    for k, n in enumerate(shard_sizes):
        if n == 0 or participations[k] == 0:
            continue
        steps = participations[k] * settings.local_epochs * math.ceil(n / settings.local_batch_size)
        q = min(1.0, settings.local_batch_size / n)
        worst = max(worst, dp_accounting.epsilon(q, dp.sigma, steps, DP_DELTA))
    return worst


# ---------------------------------------------------------------------------------------------- training


def _evaluate(model: nn.Module, images: Tensor, labels: Tensor, device: torch.device) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the model in eval() mode."""
    model.eval()
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for start in range(0, labels.numel(), _EVAL_BATCH):
            x = images[start : start + _EVAL_BATCH].to(device)
            y = labels[start : start + _EVAL_BATCH].to(device)
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
    return correct / labels.numel(), loss_sum / labels.numel()


def _local_training(
    global_model: nn.Module,
    images: Tensor,
    labels: Tensor,
    settings: FLSettings,
    defense: Defense,
    generator: torch.Generator,
    device: torch.device,
) -> nn.Module:
    """One client's E epochs of minibatch SGD from the global weights, in train() mode, defended per step."""
    local = copy.deepcopy(global_model).train()
    params = trainable_parameters(local)
    for _ in range(settings.local_epochs):
        order = torch.randperm(labels.numel(), generator=generator)
        for batch in torch.split(order, settings.local_batch_size):
            x, y = images[batch].to(device), labels[batch].to(device)
            grads = torch.autograd.grad(F.cross_entropy(local(x), y), params)
            if defense.needs_batch:
                grads = defense.defend_gradient(local, x, y, grads, generator)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.sub_(settings.local_lr * g)
    return local


def _fedavg_round(
    model: nn.Module,
    train_images: Tensor,
    train_labels: Tensor,
    shards: list[Tensor],
    settings: FLSettings,
    defense: Defense,
    seed: int,
    fl_round: int,
    device: torch.device,
) -> None:
    """One FedAvg round, in place on `model`: sampled clients train, the server adds their weighted mean delta."""
    generator = torch.Generator().manual_seed(_stream_seed(seed, fl_round, "train"))
    global_params = trainable_parameters(model)
    buffer_names = [n for n, b in model.named_buffers() if b.is_floating_point()]
    delta_sum = [torch.zeros_like(p) for p in global_params]
    buffer_sum = {n: torch.zeros_like(b) for n, b in model.named_buffers() if n in buffer_names}
    total = 0
    for k in _clients_of_round(settings, seed, fl_round):
        shard = shards[k]
        if shard.numel() == 0:
            continue
        local = _local_training(
            model, train_images[shard], train_labels[shard], settings, defense, generator, device
        )
        delta = tuple(
            (new - old).detach() for new, old in zip(trainable_parameters(local), global_params, strict=True)
        )
        delta = defense.defend_update(delta, generator)
        weight = shard.numel()
        total += weight
        for acc, d in zip(delta_sum, delta, strict=True):
            acc.add_(d, alpha=weight)
        local_buffers = dict(local.named_buffers())
        for n in buffer_names:
            buffer_sum[n].add_(local_buffers[n], alpha=weight)
    if total == 0:
        return  # every sampled client had an empty shard (possible with Dirichlet splits): nothing to add
    with torch.no_grad():
        for p, acc in zip(global_params, delta_sum, strict=True):
            p.add_(acc / total)
        for n, b in model.named_buffers():
            if n in buffer_sum:
                b.copy_(buffer_sum[n] / total)


def _snapshot(
    model: nn.Module, acc: float, loss: float, fl_round: int, epsilon: float | None
) -> dict[str, Any]:
    return {
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "model_acc": acc,
        "model_loss": loss,
        "fl_round": fl_round,
        "dp_epsilon": epsilon,
        "dp_delta": DP_DELTA if epsilon is not None else None,
    }


def _check_rounds(rounds: Iterable[int]) -> list[int]:
    out = sorted(set(rounds))
    if not out:
        raise ConfigError("train_chain needs at least one round (got none)")
    for r in out:
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ConfigError(f"fl_round must be an integer >= 0 (got {r!r})")
    return out


def train_chain(
    dataset: str,
    victim: str,
    victim_params: Mapping[str, Any],
    image_size: int,
    settings: FLSettings | Mapping[str, Any],
    seed: int,
    rounds: Iterable[int],
    root: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    test_set: ImageSet | None = None,
) -> dict[int, dict[str, Any]]:
    """The stages of `rounds` of one FedAvg chain: {round: {state_dict, model_acc, model_loss, fl_round,
    dp_epsilon, dp_delta}} (state_dict on the CPU).

    Cached stages are loaded; if any requested round is missing, ONE FedAvg run trains from the latest
    cached round before the first missing one (round 0 = the untrained victim) up to the largest
    requested round, snapshotting and caching every requested round on the way. Deterministic from `seed`.
    `test_set`: the dataset's test split when the caller already has it (decoded once for several chains).
    """
    global chains_trained
    settings = settings if isinstance(settings, FLSettings) else FLSettings.from_dict(settings)
    wanted = _check_rounds(rounds)
    identity = (dataset, image_size, victim, dict(victim_params), settings, seed)
    folder = resolve_cache_dir(cache_dir)

    def path_of(r: int) -> pathlib.Path:
        return folder / f"{stage_key(*identity, r)}.pt"

    stages: dict[int, dict[str, Any] | None] = {r: load_stage(path_of(r)) for r in wanted}
    missing = [r for r in wanted if stages[r] is None]
    if not missing:
        return {r: s for r, s in stages.items() if s is not None}

    device = torch.device(device)
    test = test_set if test_set is not None else load_dataset(dataset, root=root, split="test", image_size=image_size)
    test_images, test_labels = test.load_all(), test.labels
    model = create_victim(
        victim, num_classes=test.num_classes, image_size=image_size, seed=seed, **victim_params
    )
    model = model.to(device)
    channels = victim_channels(model, victim, num_classes=test.num_classes, image_size=image_size)
    test_images = to_victim_channels(test_images, channels, victim)
    # Resume from the latest stage on disk before the first missing round (any round, requested or not).
    start = 0
    for r in range(missing[0] - 1, 0, -1):
        cached = stages.get(r) or load_stage(path_of(r))
        if cached is not None:
            model.load_state_dict(cached["state_dict"])
            start = r
            break

    defense = settings.make_defense()
    shard_sizes: list[int] = []
    if missing[-1] > 0:
        train = load_dataset(dataset, root=root, split="train", image_size=image_size)
        train_images, train_labels = to_victim_channels(train.load_all(), channels, victim), train.labels
        shards = partition(
            train_labels, settings.clients, iid=settings.iid, alpha=settings.dirichlet_alpha, seed=seed
        )
        shard_sizes = [int(s.numel()) for s in shards]
        chains_trained += 1

    for r in range(start, missing[-1] + 1):
        if r > start:
            _fedavg_round(model, train_images, train_labels, shards, settings, defense, seed, r, device)
        if r in missing:
            acc, loss = _evaluate(model, test_images, test_labels, device)
            epsilon = dp_epsilon(settings, shard_sizes, seed, r) if r > 0 else None
            stage = _snapshot(model, acc, loss, r, epsilon)
            save_stage(path_of(r), stage)
            stages[r] = stage
    model.eval()
    return {r: s for r, s in stages.items() if s is not None}


# ---------------------------------------------------------------------------------------------- trials


@dataclass(frozen=True)
class ChainRequest:
    """One FedAvg chain that a set of trials needs: train it once (`train()`, e.g. as one Ray task) and
    hand `stages[spec.fl_round]` to each trial of the chain as its `stage_state`."""

    dataset: str
    image_size: int
    victim: str
    victim_params: dict[str, Any]
    settings: FLSettings
    seed: int
    rounds: tuple[int, ...]
    data_root: str | None = None  # where the data lives on this machine: not part of the key

    def key(self) -> str:
        """Identity of the chain (rounds excluded): equal to `chain_key(spec)` of every trial it serves."""
        return chain_id(self.dataset, self.image_size, self.victim, self.victim_params, self.settings, self.seed)

    def train(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        test_set: ImageSet | None = None,
    ) -> dict[int, dict[str, Any]]:
        """train_chain for this request's rounds (loads what the cache holds)."""
        return train_chain(
            self.dataset,
            self.victim,
            self.victim_params,
            self.image_size,
            self.settings,
            self.seed,
            self.rounds,
            root=self.data_root,
            cache_dir=cache_dir,
            device=device,
            test_set=test_set,
        )

    def cached(self, cache_dir: str | os.PathLike[str] | None = None) -> bool:
        """Whether every requested round is in the cache already (nothing to load data for or train)."""
        identity = (self.dataset, self.image_size, self.victim, self.victim_params, self.settings, self.seed)
        folder = resolve_cache_dir(cache_dir)
        return all((folder / f"{stage_key(*identity, r)}.pt").exists() for r in self.rounds)

    def data_identity(self) -> tuple[str, str | None, int]:
        """What its test split depends on: chains that share it can share one decoded copy."""
        return self.dataset, self.data_root, self.image_size


def train_chains(
    requests: Sequence[ChainRequest],
    cache_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> list[dict[int, dict[str, Any]]]:
    """`request.train()` for each request in one process, decoding each test split once for all of them
    (the untrained chains of a sweep, one per seed and victim, need nothing else: decoding is their cost)."""
    splits: dict[tuple[str, str | None, int], ImageSet] = {}
    out = []
    for request in requests:
        identity = request.data_identity()
        if request.cached(cache_dir):  # loads its stages only: needs no data
            out.append(request.train(cache_dir=cache_dir, device=device))
            continue
        if identity not in splits:
            splits[identity] = load_dataset(request.dataset, root=request.data_root, split="test",
                                            image_size=request.image_size)  # fmt: skip
        out.append(request.train(cache_dir=cache_dir, device=device, test_set=splits[identity]))
    return out


def _request_of(spec: TrialSpec) -> ChainRequest:
    return ChainRequest(
        dataset=spec.dataset,
        image_size=spec.image_size,
        victim=spec.victim,
        victim_params=dict(spec.victim_params),
        settings=FLSettings.from_dict(spec.fl),
        seed=spec.seed,
        rounds=(spec.fl_round,),
        data_root=spec.data_root,
    )


def chain_key(spec: TrialSpec) -> str:
    """The key of the chain that holds this trial's stage (see ChainRequest.key)."""
    return _request_of(spec).key()


def stage_requests(specs: Sequence[TrialSpec], *, include_round_zero: bool = True) -> list[ChainRequest]:
    """Group the stages that `specs` need into chains: one ChainRequest per (dataset, image size, victim,
    victim params, FL settings, seed), holding every round its trials need, sorted.

    Round 0 needs no training, but its stage carries the untrained model's test accuracy, so trials at
    round 0 are included unless `include_round_zero` is False. Invalid FL settings raise ConfigError here,
    before anything runs. Requests come in the order their first trial appears.
    """
    chains: dict[str, ChainRequest] = {}
    for spec in specs:
        if spec.fl_round == 0 and not include_round_zero:
            continue
        request = _request_of(spec)
        _check_rounds([spec.fl_round])
        key = request.key()
        if key in chains:
            rounds = tuple(sorted(set(chains[key].rounds) | {spec.fl_round}))
            chains[key] = ChainRequest(
                **{**{f.name: getattr(chains[key], f.name) for f in fields(ChainRequest)}, "rounds": rounds}
            )
        else:
            chains[key] = request
    return list(chains.values())


def stage_for_trial(spec: TrialSpec, cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The stage (state_dict, model_acc, model_loss, ...) of the global model the trial attacks, from the
    cache or trained now (on the trial's device) and cached."""
    request = _request_of(spec)
    return request.train(cache_dir=cache_dir, device=resolve_device(spec.device))[spec.fl_round]
