"""Worker side: the Tune function trainable of one trial (a grid cell, or a searched trial's sampled cell).

It runs the cell through `execute_cell`, reports intermediate metrics every `eval_every` iterations, and always
ends with one final report carrying the whole result row (and the image as base64): a trial that raises, runs out
of memory or overruns `trial_timeout_s` still ends with a row (FAILED or TIMEOUT), so Tune's own failure handling
(`max_failures`) only comes into play when a worker process dies. Embedded Ray workers import this module as they
start (orchestrator.running.ray_start.WORKER_PRELOAD): it imports only what a trial needs.
"""

from __future__ import annotations

import json
from typing import Any

from ray import tune

from grnn_engine import TrialSpec
from orchestrator.running.execute import execute_cell, reset_process_state, trial_device
from orchestrator.running.scoring import Scoring, final_metrics
from orchestrator.running.stages import StagePlan


def trainable(
    config: dict[str, Any],
    cells: dict[str, dict[str, Any]] | None = None,
    cpu: float = 1.0,
    gpu: float = 0.0,
    trial_timeout_s: float | None = None,
    stages: StagePlan | None = None,
    scoring: Scoring | None = None,
) -> None:
    """Tune function trainable: `config["trial_key"]` names the cell in `cells` (TrialSpec fields), or
    `config["cell_json"]` holds it (a searched trial)."""
    key = config["trial_key"]
    fields = dict(cells[key]) if cells and key in cells else json.loads(config["cell_json"])
    reset_process_state(int(fields.get("seed", 0)), cpu)
    fields["device"] = trial_device(str(fields.get("device", "auto")), gpu)
    spec = TrialSpec(**fields)
    if scoring is None:
        report = tune.report
    else:

        def report(metrics: dict[str, Any]) -> None:
            tune.report({**metrics, **scoring.extra(metrics)})

    load = (lambda: stages.load(spec)) if stages is not None else None
    result = execute_cell(spec, report, trial_timeout_s, load)
    tune.report(final_metrics(result, scoring))

