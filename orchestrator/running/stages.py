"""FedAvg training stages of a sweep: trained once per chain as Ray tasks before the trials, fetched by each trial.

Before any trial runs, `prepare_stages` trains every FedAvg chain the trials need (`grnn_engine.fl.stage_requests`),
each chain once, as parallel Ray tasks with the trials' resources, into the content-addressed stage cache (on one
machine it survives between sweeps). A chain that trials only need at round 0 (the untrained, seeded model) gets no
task: each such trial builds it and measures its accuracy itself (`round_zero_stage`), which costs a fraction of a
second, where a task costs a worker's start-up before the first trial may start. Each task returns its stages as
objects in Ray's object store and the driver keeps its own copy of each (so a lost worker node takes none with it);
a trial fetches its own (`StagePlan`), so trials on other nodes need no shared disk, and falls back to the cache
when the fetch fails. A chain that fails gives every trial that needs it a FAILED row; the sweep goes on. A trial
whose chain was not planned (a search that samples FL settings) loads or trains it through the cache itself.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import ray

from grnn_engine import TrialResult, TrialSpec
from grnn_engine.trial import model_facts

STAGES_DIR = ".stages"  # the stage cache under a results root (unless $GRNN_CACHE_DIR says otherwise)
STAGE_FETCH_TIMEOUT_S = 120.0  # a trial's wait for its stage object before it loads or trains it itself
# What a trial's row says about the training under its defense (utility: true), besides the attack.
UTILITY_FIELDS = ("utility_acc", "utility_dp_epsilon", "utility_dp_delta")


class StageFailed(Exception):
    """The FedAvg chain a trial attacks could not be trained; its message says why."""


@dataclasses.dataclass
class StageContext:
    """What a trial knows about its global model once its stage is loaded (added to every report)."""

    stage: dict[str, Any] | None = None
    utility_acc: float | None = None
    # The (epsilon, delta) of DP-SGD training that utility_acc is the accuracy of (a dp_sgd defense under
    # utility: true); None for any other defense.
    utility_dp_epsilon: float | None = None
    utility_dp_delta: float | None = None

    def metrics(self) -> dict[str, float]:
        """The stage's finite MODEL_FACTS (accuracy, loss, DP budget) and the utility figures, for the trial's
        reports."""
        figures = {**model_facts(self.stage), **{name: getattr(self, name) for name in UTILITY_FIELDS}}
        return {name: value for name, value in figures.items() if value is not None and math.isfinite(value)}

    def annotate(self, result: TrialResult) -> None:
        """Give the trial's result (complete or failed) the utility figures of its defense's training."""
        for name in UTILITY_FIELDS:
            setattr(result, name, getattr(self, name))


def stage_id(chain: str, fl_round: int) -> str:
    """The id of one stage in a StagePlan: "<chain key>:<round>"."""
    return f"{chain}:{fl_round}"


@dataclasses.dataclass
class StagePlan:
    """The trained stages of a sweep, handed to every trial (pickled with the trainable; refs stay refs).

    refs: "<chain key>:<round>" -> object ref of the stage dict (state_dict, model_acc, ...), driver-owned;
    accuracy: the same ids -> the stage's test accuracy (utility lookups need no fetch); privacy: the same ids
    -> (epsilon, delta) of a stage trained with DP-SGD; errors: chain key
    -> (exception type, message) of a chain that failed; trained/cached: chain keys that were trained now /
    found complete in the cache (a chain needed at round 0 only has no task: its trials build the stage).
    """

    cache_dir: str | None = None
    utility_round: int | None = None
    refs: dict[str, Any] = dataclasses.field(default_factory=dict)
    accuracy: dict[str, float] = dataclasses.field(default_factory=dict)
    privacy: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    errors: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    trained: list[str] = dataclasses.field(default_factory=list)
    cached: list[str] = dataclasses.field(default_factory=list)

    def failure_of(self, spec: TrialSpec) -> tuple[str, str] | None:
        """(error type, message) when the chain of `spec` failed and the trial needs it, else None.

        A trial at round 0 without utility does not need its stage (run_trial builds the untrained model;
        only model_acc is then missing), so a round-0 failure, e.g. a dataset without a test split to
        measure accuracy on, does not fail it."""
        from grnn_engine.fl import chain_key

        error = self.errors.get(chain_key(spec))
        if error is None or not self.needs_training(spec):
            return None
        return error[0], f"FL training stage failed: {error[1]}"[:2000]

    def needs_training(self, spec: TrialSpec) -> bool:
        """Whether the trial cannot run without its chain's stage (a trained round, or utility under its defense)."""
        return spec.fl_round > 0 or (self.utility_round is not None and "defense" in spec.fl)

    def load(self, spec: TrialSpec) -> StageContext:
        """The trial's stage (from the object store, else the cache, training it there if need be) and its
        utility accuracy. Runs on the worker."""
        from grnn_engine import fl

        failure = self.failure_of(spec)
        if failure is not None:
            raise StageFailed(failure[1])
        chain = fl.chain_key(spec)
        ref = self.refs.get(stage_id(chain, spec.fl_round))
        stage = _fetch_stage(ref) if ref is not None else None
        if stage is None and self.needs_training(spec):
            stage = fl.stage_for_trial(spec, self.cache_dir)
        elif stage is None and chain not in self.errors:
            try:  # round 0 only measures the untrained model's accuracy: nice to have, never fatal
                stage = round_zero_stage(spec, self.cache_dir)
            except Exception:  # noqa: BLE001  (the trial runs on the model run_trial builds)
                stage = None
        context = StageContext(stage=stage)
        if self.utility_round is not None and "defense" in spec.fl:
            at_id = stage_id(chain, self.utility_round)
            context.utility_acc, privacy = self.accuracy.get(at_id), self.privacy.get(at_id)
            if context.utility_acc is None:
                at = fl.stage_for_trial(dataclasses.replace(spec, fl_round=self.utility_round), self.cache_dir)
                context.utility_acc, privacy = float(at["model_acc"]), stage_privacy(at)
            if privacy is not None:
                context.utility_dp_epsilon, context.utility_dp_delta = privacy
        return context


# The test split last decoded in this worker process (data identity -> ImageSet, whose images decode once):
# the round-0 trials of one dataset that a reused worker runs one after another share it.
_test_split: dict[tuple[str, str | None, int], Any] = {}


def stage_privacy(stage: dict[str, Any]) -> tuple[float, float] | None:
    """(epsilon, delta) of a stage trained with DP-SGD (grnn_engine.fl records them), else None."""
    epsilon, delta = stage.get("dp_epsilon"), stage.get("dp_delta")
    return (float(epsilon), float(delta)) if epsilon is not None and delta is not None else None


def round_zero_stage(spec: TrialSpec, cache_dir: str | None) -> dict[str, Any]:
    """The round-0 stage of `spec` (its untrained, seeded model and that model's test accuracy), from the cache
    or built and measured now in this process, on the trial's device, and cached (as fl.stage_for_trial)."""
    from grnn_engine import fl, load_dataset
    from grnn_engine.devices import resolve_device

    (request,) = fl.stage_requests([dataclasses.replace(spec, fl_round=0)])
    device = resolve_device(spec.device)
    if request.cached(cache_dir):
        return request.train(cache_dir=cache_dir, device=device)[0]
    identity = request.data_identity()
    if identity not in _test_split:
        _test_split.clear()  # one split at a time: CIFAR-10's test images are 120 MB decoded
        _test_split[identity] = load_dataset(spec.dataset, root=spec.data_root, split="test",
                                             image_size=spec.image_size)  # fmt: skip
    return request.train(cache_dir=cache_dir, device=device, test_set=_test_split[identity])[0]


def _fetch_stage(ref: Any) -> dict[str, Any] | None:
    """The stage behind `ref`, or None when it cannot be had in STAGE_FETCH_TIMEOUT_S (its node and the
    driver that owns it are gone, the object store is wedged): the trial then loads or trains it through the
    cache itself, rather than wait for Ray to rebuild it with resources the waiting trials hold."""
    try:
        return cast(dict[str, Any], ray.get(ref, timeout=STAGE_FETCH_TIMEOUT_S))
    except ray.exceptions.RayError:
        return None


def _train_chains(requests: list[Any], cache_dir: str | None, cpu: float, gpu: float) -> tuple[Any, ...]:
    """Ray task: FedAvg chains -> (a summary per chain, then every chain's stages of its requested rounds, in
    order). Several chains share one task only when none needs training (see `task_groups`)."""
    import torch

    from grnn_engine import fl

    torch.set_num_threads(max(1, int(cpu)))
    device = "cuda" if gpu > 0 and torch.cuda.is_available() else "cpu"
    cached = [request.cached(cache_dir) for request in requests]
    before = fl.chains_trained
    chains = fl.train_chains(requests, cache_dir=cache_dir, device=device)
    summaries = [
        {
            "trained": fl.chains_trained > before and request.rounds != (0,),
            "cached": was_cached,
            "accuracy": {int(r): float(s["model_acc"]) for r, s in stages.items()},
            "privacy": {int(r): p for r, s in stages.items() if (p := stage_privacy(s)) is not None},
        }
        for request, was_cached, stages in zip(requests, cached, chains, strict=True)
    ]
    return (summaries, *(stages[r] for request, stages in zip(requests, chains, strict=True) for r in request.rounds))


def task_groups(requests: Sequence[Any], parallel: int) -> list[list[Any]]:
    """One Ray task per chain that trains. The untrained (round-0-only) chains of one dataset split and image
    size are dealt to at most `parallel` tasks (the slots the cluster has for them), so that the split,
    decoded to measure each untrained model's accuracy, is decoded once per task rather than once per seed
    and victim (10,000 JPEGs for CIFAR-10: seconds each), while large victims still evaluate in parallel."""
    trained = [[r] for r in requests if r.rounds != (0,)]
    untrained: dict[Any, list[Any]] = {}
    for request in requests:
        if request.rounds == (0,):
            untrained.setdefault(request.data_identity(), []).append(request)
    dealt = []
    for chains in untrained.values():
        tasks = min(len(chains), max(1, parallel))
        dealt += [chains[i::tasks] for i in range(tasks)]
    return trained + dealt


def _own(ref: Any) -> Any:
    """A copy of a task's returned object that the driver owns (ray.put), or None when it is lost already.

    A task's return value lives on the node that ran it and is owned through that task: when the node is
    lost, a trial that fetches it waits while Ray re-runs the task, which needs a CPU the waiting trials
    hold, and the sweep hangs. The driver's copy lives in the driver's object store and needs no task."""
    try:
        return ray.put(ray.get(ref))
    except ray.exceptions.RayError:
        return None


def stage_cache_dir(results_root: str | os.PathLike[str]) -> str:
    """Where stages are cached: $GRNN_CACHE_DIR, else `<results root>/.stages` (shared by its sweeps)."""
    chosen = os.environ.get("GRNN_CACHE_DIR") or os.path.join(os.fspath(results_root), STAGES_DIR)
    return os.path.abspath(os.path.expanduser(chosen))


def needs_stage_tasks(cells: Sequence[TrialSpec], utility_round: int | None = None) -> bool:
    """Whether `prepare_stages(cells, utility_round=...)` will run Ray tasks: some cell attacks a trained round or
    needs the utility round of its defense (chains needed at round 0 only are built by their trials)."""
    plan = StagePlan(utility_round=utility_round)
    return any(plan.needs_training(c) for c in cells)


def prepare_stages(
    cells: Sequence[TrialSpec],
    *,
    cpu: float = 1.0,
    gpu: float = 0.0,
    cache_dir: str | None = None,
    utility_round: int | None = None,
    log: Callable[[str], None] | None = None,
) -> StagePlan:
    """Train every FedAvg chain `cells` need, each once, as parallel Ray tasks; wait for all of them.

    A chain that the cells need at round 0 only gets no task: its stage is the untrained, seeded model with its
    test accuracy, which each trial builds itself (round_zero_stage, from the cache when it is there). With
    `utility_round`, cells trained under their defense (TrialSpec.fl["defense"]) also need that round.
    Invalid FL settings raise ConfigError before anything runs; a chain that fails is recorded in
    `errors`, never raised.
    """
    from grnn_engine import fl

    plan = StagePlan(cache_dir=cache_dir, utility_round=utility_round)
    specs = list(cells)
    if utility_round is not None:
        specs += [dataclasses.replace(c, fl_round=utility_round) for c in cells if "defense" in c.fl]
    requests = fl.stage_requests(specs)  # raises ConfigError for invalid FL settings, before anything runs
    # A chain needed at round 0 only by trials that can do without it is built by those trials themselves
    # (StagePlan.load -> round_zero_stage): no task, no worker to start before the first trial.
    needed = {fl.chain_key(c) for c in cells if plan.needs_training(c)}
    requests = [r for r in requests if r.rounds != (0,) or r.key() in needed]
    if not requests:
        return plan
    start = time.monotonic()
    if log:
        rounds = sum(len(r.rounds) for r in requests)
        log(f"FL stages: {len(requests)} chains ({rounds} stages) to load or train, cache {cache_dir}")
    task = ray.remote(_train_chains)
    submitted = []
    resources = ray.cluster_resources()
    parallel = int(resources.get("GPU", 0) // gpu) if gpu > 0 else int(resources.get("CPU", 1) // max(cpu, 1e-3))
    for group in task_groups(requests, parallel):
        refs: list[Any] = task.options(  # type: ignore[assignment]  # num_returns > 1: a list of refs
            num_cpus=cpu, num_gpus=gpu, num_returns=1 + sum(len(r.rounds) for r in group), max_retries=1,
            name=f"fl-chain-{group[0].key()[:8]}" + (f"+{len(group) - 1}" if len(group) > 1 else ""),
        ).remote(group, cache_dir, cpu, gpu)  # fmt: skip
        submitted.append((group, refs))
    while submitted:  # popped: the task's own objects are freed once the driver holds its copies
        group, refs = submitted.pop(0)
        try:
            summaries = ray.get(refs[0])
        except Exception as err:  # noqa: BLE001  (a failed chain fails its trials, not the sweep)
            cause = getattr(err, "cause", None) or err
            text = str(cause).strip().splitlines()
            for request in group:
                plan.errors[request.key()] = (type(cause).__name__, (text[-1] if text else repr(cause))[:1500])
            for ref in refs[1:]:  # fetched too, or Ray prints each unfetched error with its traceback
                try:
                    ray.get(ref)
                except Exception:  # noqa: BLE001, S110  (the same error, recorded above)
                    pass
            continue
        stage_refs = iter(refs[1:])
        for request, summary in zip(group, summaries, strict=True):
            chain = request.key()
            if summary["trained"]:
                plan.trained.append(chain)
            elif summary["cached"]:
                plan.cached.append(chain)
            for r in request.rounds:
                owned = _own(next(stage_refs))
                if owned is not None:  # else the trials load the stage from the cache (or train it) themselves
                    plan.refs[stage_id(chain, r)] = owned
            for r, acc in summary["accuracy"].items():
                plan.accuracy[stage_id(chain, r)] = acc
            for r, privacy in summary["privacy"].items():
                plan.privacy[stage_id(chain, r)] = privacy
    if log:
        log(
            f"FL stages ready in {time.monotonic() - start:.1f} s: {len(plan.trained)} chains trained, "
            f"{len(plan.cached)} from the cache, {len(plan.errors)} failed"
        )
        for chain, (kind, message) in list(plan.errors.items())[:3]:
            log(f"  chain {chain[:8]} failed: {kind}: {message}")
    return plan

