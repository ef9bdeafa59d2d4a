"""`pack: N`: up to N compatible cells of a grid sweep run as ONE Ray Tune trial, in grnn_engine.batched.

Small victims leave a GPU idle when each trial has a process of its own; `run_trials_batched` runs N trials
of one attack and victim architecture as one vectorised computation, with results equal to running them one
by one. Here the runner's pending cells are grouped by `grnn_engine.batched.compatible_groups` (a cell the
batched executor cannot run stays a trial of its own, run exactly as without packing), and each group of two
or more becomes one Tune trial, named `pack<n>-<first cell's key>`, that reserves one trial's resources.

The ledger does not change: the packed trainable sends one final report per cell (the same row, keys and
image as an unpacked trial's), and `LedgerCallback` writes each as it arrives; progress and the summary count
cells. A pack whose worker dies gets a FAILED (or TIMEOUT) row for each cell still without a row, as an
unpacked trial does (written by the LedgerCallback, which `packed_fit` tells the packs), so a rerun runs only
the cells without rows, packed again.

Failures: when the batched run raises (out of memory, one cell's bad data or stage, anything), the pack's
cells run again one by one through `execute_cell`, each with its own time limit and error handling, so every
cell still ends with the row it would have had unpacked. A pack as a whole may run for its size times
`trial_timeout_s`; past that, each of its cells gets a TIMEOUT row. Packed trials report no intermediate
metrics: there is nothing to act on them (pack > 1 is refused with a scheduler or a search).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ray import tune

from grnn_engine import TrialResult, TrialSpec
from grnn_engine.batched import compatible_groups, run_trials_batched
from orchestrator.running.execute import (
    execute_cell,
    free_gpu_memory,
    is_oom,
    reset_process_state,
    trial_device,
)
from orchestrator.running.scoring import final_metrics
from orchestrator.running.stages import StageContext, StagePlan
from orchestrator.running.trainable import trainable
from orchestrator.running.watchdog import TrialTimeout, Watchdog

if TYPE_CHECKING:
    from orchestrator.running.ledger_callback import LedgerCallback

__all__ = ["pack_groups", "packed_fit", "packed_trainable", "run_pack"]


def pack_groups(cells: dict[str, TrialSpec], pack: int) -> dict[str, list[str]]:
    """Tune trial key -> the keys of its cells, for every cell once; a cell that runs alone keeps its own key."""
    out: dict[str, list[str]] = {}
    for group in compatible_groups(list(cells.values()), pack):
        keys = [cell.key() for cell in group]
        out[keys[0] if len(keys) == 1 else f"pack{len(keys)}-{keys[0]}"] = keys
    return out


def packed_fit(
    cells: dict[str, TrialSpec], pack: int, callback: LedgerCallback, trainable_kwargs: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainable kwargs, the rest of tune_run.fit's arguments) for running `cells` in packs of up to `pack`.

    Tells `callback` which cells each packed trial holds (it starts them together and writes their rows).
    """
    groups = pack_groups(cells, pack)
    packs = {name: keys for name, keys in groups.items() if len(keys) > 1}
    callback.packs = packs
    fit = {"param_space": {"trial_key": tune.grid_search(list(groups))}, "trainable_fn": packed_trainable}
    return {**trainable_kwargs, "packs": packs}, fit


def packed_trainable(
    config: dict[str, Any],
    cells: dict[str, dict[str, Any]] | None = None,
    packs: dict[str, list[str]] | None = None,
    cpu: float = 1.0,
    gpu: float = 0.0,
    trial_timeout_s: float | None = None,
    stages: StagePlan | None = None,
) -> None:
    """Tune function trainable: a packed trial (`config["trial_key"]` in `packs`) runs its cells together and
    reports one final result per cell; any other trial is trainable.trainable's."""
    members = (packs or {}).get(config["trial_key"])
    if members is None or cells is None:
        trainable(config, cells=cells, cpu=cpu, gpu=gpu, trial_timeout_s=trial_timeout_s, stages=stages)
        return
    specs = []
    for key in members:
        fields = dict(cells[key])
        fields["device"] = trial_device(str(fields.get("device", "auto")), gpu)
        specs.append(TrialSpec(**fields))
    for result in run_pack(specs, stages, trial_timeout_s, cpu):
        tune.report(final_metrics(result))


def run_pack(
    specs: Sequence[TrialSpec], stages: StagePlan | None, trial_timeout_s: float | None, cpu: float = 1.0
) -> Iterator[TrialResult]:
    """Each cell's result, in order: from one batched run, else (it raised) from running them one by one.

    Never raises for a cell's fault. One by one, each result is yielded as soon as its cell ends, so a pack
    killed half way keeps the rows of the cells it finished.
    """
    n = len(specs)
    reset_process_state(specs[0].seed, cpu)
    start = time.perf_counter()
    limit = trial_timeout_s * n if trial_timeout_s else None
    watchdog = Watchdog(limit) if limit else None
    results: list[TrialResult] | None = None
    try:
        try:
            if watchdog is not None:
                watchdog.start()
            contexts = [stages.load(spec) if stages is not None else StageContext() for spec in specs]
            results = run_trials_batched(specs, stage_states=[c.stage for c in contexts])
            for result, context in zip(results, contexts, strict=True):
                context.annotate(result)
        finally:
            if watchdog is not None:
                watchdog.stop()
    except TrialTimeout:  # the watchdog's one raise, wherever it landed above
        if watchdog is not None:
            watchdog.stop()
        share = (time.perf_counter() - start) / n
        for spec in specs:
            yield TrialResult.failed(
                spec, status="TIMEOUT", error_type="Timeout", wall_s=share,
                error=f"packed trial of {n} cells ran past {n} x trial_timeout_s = {limit:g} s and was stopped",
            )  # fmt: skip
        return
    except Exception as err:  # noqa: BLE001  (run each cell alone: its own row, error and all)
        if is_oom(err):
            free_gpu_memory()
    if results is not None:
        yield from results
        return
    for spec in specs:
        reset_process_state(spec.seed, cpu)  # as trainable.trainable does before each cell
        load = (lambda s=spec: stages.load(s)) if stages is not None else None
        yield execute_cell(spec, _no_report, trial_timeout_s, load)


def _no_report(metrics: dict[str, Any]) -> None:
    """Intermediate metrics of a cell run one by one inside a pack: nothing acts on them (see module doc)."""
