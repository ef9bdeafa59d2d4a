"""Regenerate the report tests' results folders under tests/data/ with the project's own engine and ledger.

    .venv/bin/python tests/data/make_fixture.py        (about a minute on 2 CPUs; needs no data files)

Each folder is what `python -m orchestrator.sweep` leaves behind (spec.yaml with its hash line,
trials.parquet, images/<key>.png), made by running every cell of a tiny digits sweep through
`grnn_engine.run_trial` and writing the rows with `orchestrator.results.Ledger`, without Ray. The parts
are compacted and then dropped, to keep the checked-in fixture small. To exercise the report's marking
of holes, report_defenses deliberately has:
- one cell with no rows at all (grnn, batch 2, gaussian sigma=0.1): a trial that never reported;
- one cell whose every seed FAILED (dlg, batch 2, gaussian sigma=0.1), recorded as the runner records
  an out-of-memory trial;
- one cell where one of the two seeds is a TIMEOUT (grnn, batch 1, none), the other complete.
The iteration counts are far below the papers', so the PSNRs are low; success_psnr is lowered to match,
so that the success table has both marks.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from grnn_engine import TrialResult, TrialSpec, run_trial  # noqa: E402
from orchestrator.results import Ledger  # noqa: E402
from orchestrator.spec import parse_spec  # noqa: E402

HERE = Path(__file__).resolve().parent
HOSTNAME = "fixture-host"  # not this machine's name: the fixture is checked in

ATTACKS = [
    {"name": "grnn", "params": {"iterations": 40}, "eval_every": 20},
    {"name": "dlg", "params": {"iterations": 4, "max_iter": 5}, "eval_every": 2},
]

SPECS: dict[str, dict[str, Any]] = {
    "report_defenses": {
        "name": "report_defenses",
        "description": "Report test fixture: GRNN and DLG on LeNet/digits, batch 1 and 2, none vs Gaussian noise.",
        "data": {"dataset": "digits", "image_size": 32, "split": "test"},
        "grid": {
            "victim": ["lenet"],
            "fl_round": [0],
            "batch_size": [1, 2],
            "defense": [{"name": "none"}, {"name": "gaussian", "params": {"sigma": [0.01, 0.1]}}],
            "attack": ATTACKS,
            "seed": 2,
        },
        "success_psnr": 9.0,
        "trial_timeout_s": 120,
    },
    "report_convergence": {
        "name": "report_convergence",
        "description": "Report test fixture: GRNN and DLG on LeNet/digits at FL rounds 0, 1 and 3.",
        "data": {"dataset": "digits", "image_size": 32, "split": "test"},
        "grid": {
            "victim": ["lenet"],
            "fl_round": [0, 1, 3],
            "batch_size": [1],
            "defense": [{"name": "none"}],
            "attack": ATTACKS,
            "seed": 2,
        },
        "fl": {"clients": 4, "local_epochs": 1, "local_batch_size": 64},
        "success_psnr": 9.0,
        "trial_timeout_s": 120,
    },
}


def _is(spec: TrialSpec, attack: str, batch_size: int, defense: str, sigma: float | None = None) -> bool:
    return (
        spec.attack == attack
        and spec.batch_size == batch_size
        and spec.defense == defense
        and spec.defense_params.get("sigma") == sigma
    )


def _outcome(spec: TrialSpec) -> TrialResult | None:
    """The planted holes of report_defenses; None: run the trial for real."""
    if _is(spec, "dlg", 2, "gaussian", 0.1):
        return TrialResult.failed(
            spec,
            error_type="OutOfMemory",
            wall_s=3.2,
            error="CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.77 GiB total capacity)",
        )
    if _is(spec, "grnn", 1, "none") and spec.seed == 1:
        return TrialResult.failed(
            spec,
            status="TIMEOUT",
            error_type="Timeout",
            wall_s=120.4,
            error="trial ran past trial_timeout_s=120 s and was stopped",
        )
    return None


def build(name: str, data: dict[str, Any]) -> None:
    spec = parse_spec(data, name)
    folder = HERE / name
    shutil.rmtree(folder, ignore_errors=True)
    ledger = Ledger(folder)
    ledger.write_spec(spec.to_yaml(), spec.spec_hash())
    for cell in spec.cells():
        if name == "report_defenses" and _is(cell, "grnn", 2, "gaussian", 0.1):
            continue  # the cell that never reported
        result = (_outcome(cell) if name == "report_defenses" else None) or run_trial(cell)
        result.hostname = HOSTNAME
        row = result.to_row()
        row["ray_version"] = "2.60.0"
        ledger.write_part(row, result.image_png)
        print(
            f"{name}: {cell.attack:5s} bs={cell.batch_size} r={cell.fl_round} {cell.defense:8s} "
            f"{cell.defense_params} seed={cell.seed} -> {result.status} {row['psnr']}"
        )
    ledger.compact()
    shutil.rmtree(ledger.parts_dir)


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["GRNN_CACHE_DIR"] = cache  # FL stages of the convergence fixture: not the user's cache
        for name, data in SPECS.items():
            build(name, data)


if __name__ == "__main__":
    main()
