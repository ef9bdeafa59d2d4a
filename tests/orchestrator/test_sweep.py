"""The sweep command end to end on a real embedded Ray, with real (tiny) GRNN trials on digits.

One sweep of four cells covers every way a trial ends: COMPLETE, FAILED (a batch larger than the
dataset, which only the worker finds out) and TIMEOUT (far too many iterations for trial_timeout_s).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from grnn_engine import TrialSpec
from orchestrator import sweep
from orchestrator.results import Ledger, load
from orchestrator.running.execute import execute_cell
from orchestrator.running.ray_start import embedded_cpus
from orchestrator.running.watchdog import TrialTimeout, Watchdog
from orchestrator.spec import load_spec
from orchestrator.status import main as status_main

TIMEOUT_S = 45  # generous: a loaded CI machine must not time out the 10-iteration trial
FOREVER = 10**7  # GRNN iterations no trial finishes within TIMEOUT_S


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory, ray_session: None, make_spec: Any) -> dict:
    """The 4-cell sweep, run once: iterations {10, FOREVER} x batch size {1, 1000 > 359 test digits}."""
    tmp = tmp_path_factory.mktemp("sweep")
    spec = make_spec(
        tmp / "mixed.yaml", name="mixed", trial_timeout_s=TIMEOUT_S,
        grid={
            "batch_size": [1, 1000],
            "attack": [{"name": "grnn", "params": {"iterations": [10, FOREVER]}, "eval_every": 5}],
            "seed": [0],
        },
    )
    results = tmp / "results"
    summary = sweep.run([str(spec), "--results", str(results)])
    return {"spec": spec, "results": results, "folder": results / "mixed", "summary": summary}


def test_every_cell_gets_one_row_with_its_outcome(mixed: dict) -> None:
    df = load(mixed["folder"])
    assert len(df) == 4 and df["trial_key"].is_unique
    by = {(int(r["attack.iterations"]), int(r["batch_size"])): r for _, r in df.iterrows()}

    ok = by[(10, 1)]
    assert ok["status"] == "COMPLETE" and ok["psnr"] > 0 and ok["iterations"] == 10
    assert (mixed["folder"] / "images" / f"{ok['trial_key']}.png").read_bytes()[:4] == b"\x89PNG"
    assert (mixed["folder"] / "parts" / f"{ok['trial_key']}.parquet").is_file()
    assert ok["ray_version"] and ok["sweep"] == "mixed" and ok["device"] == "cpu"

    for cell in [(10, 1000), (FOREVER, 1000)]:
        row = by[cell]
        assert row["status"] == "FAILED" and row["error_type"] == "ConfigError"
        assert "1000" in row["error"]

    slow = by[(FOREVER, 1)]
    assert slow["status"] == "TIMEOUT" and slow["error_type"] == "Timeout"
    assert TIMEOUT_S <= slow["wall_s"] < TIMEOUT_S + 30

    s = mixed["summary"]
    assert (s.ran, s.complete, s.failed, s.timeout) == (4, 1, 2, 1)
    assert s.efficiency is not None and 0 < s.efficiency <= 1.05
    assert s.slots == 2
    assert (mixed["folder"] / "trials.parquet").is_file()


def test_summary_reports_efficiency(mixed: dict) -> None:
    text = mixed["summary"].format()
    assert "sweep efficiency" in text and "4 trials run" in text and "2 concurrent slots" in text


def test_rerun_runs_nothing_and_keeps_parts(mixed: dict, capsys: pytest.CaptureFixture[str]) -> None:
    parts = sorted((mixed["folder"] / "parts").glob("*.parquet"))
    before = {p.name: p.stat().st_mtime_ns for p in parts}
    start = time.monotonic()
    summary = sweep.run([str(mixed["spec"]), "--results", str(mixed["results"])])
    assert summary is not None and summary.ran == 0
    assert time.monotonic() - start < 30
    assert {p.name: p.stat().st_mtime_ns for p in parts} == before
    assert "nothing to run" in capsys.readouterr().out
    assert len(load(mixed["folder"])) == 4


def test_retry_failed_picks_failed_and_timeout_cells(mixed: dict, capsys: pytest.CaptureFixture[str]) -> None:
    assert sweep.main([str(mixed["spec"]), "--results", str(mixed["results"]), "--dry-run", "--retry-failed"]) == 0
    out = capsys.readouterr().out
    assert "4 cells" in out and "1 already have results" in out and "3 to run" in out


def test_changed_spec_is_refused(
    mixed: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], make_spec: Any
) -> None:
    changed = make_spec(tmp_path / "changed.yaml", name="mixed", trial_timeout_s=TIMEOUT_S,
                         grid={"batch_size": [1, 2], "seed": [0]})
    before = sorted(p.name for p in (mixed["folder"] / "parts").iterdir())
    assert sweep.main([str(changed), "--results", str(mixed["results"])]) == 2
    err = capsys.readouterr().err
    assert "grid dropped" in err and "--prune" in err and "--fresh" in err and err.count("\n") == 1
    assert sorted(p.name for p in (mixed["folder"] / "parts").iterdir()) == before


def test_a_grown_grid_keeps_its_results_and_runs_only_its_new_cells(
    tmp_path: Path, ray_session: None, capsys: pytest.CaptureFixture[str], make_spec: Any
) -> None:
    results = tmp_path / "results"
    first = make_spec(tmp_path / "first.yaml", name="grow", grid={"seed": [0]})
    assert sweep.run([str(first), "--results", str(results)]).ran == 1
    [part] = (results / "grow" / "parts").glob("*.parquet")
    written = part.stat().st_mtime_ns

    grown = make_spec(tmp_path / "grown.yaml", name="grow", grid={"seed": [0, 1]})
    summary = sweep.run([str(grown), "--results", str(results)])
    assert summary is not None and summary.ran == 1  # seed 1 only
    assert part.stat().st_mtime_ns == written
    assert sorted(load(results / "grow")["seed"]) == [0, 1]
    assert Ledger(results / "grow").spec_hash() == load_spec(grown).spec_hash()  # the folder records the new spec
    assert "grew" in capsys.readouterr().out

    # The same cells under a setting outside the grid (ASHA would have stopped trials early) are not growth.
    scheduled = make_spec(tmp_path / "asha.yaml", name="grow", grid={"seed": [0, 1, 2]}, scheduler="asha")
    assert sweep.main([str(scheduled), "--results", str(results)]) == 2
    assert "a grid may only gain values" in capsys.readouterr().err
    # Nor is a grid that lost a value, unless --prune sets the dropped cells' results aside.
    shrunk = make_spec(tmp_path / "shrunk.yaml", name="grow", grid={"seed": [1, 2]})
    assert sweep.main([str(shrunk), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert "results of 1 cells this spec's grid dropped" in err and "--prune" in err and err.count("\n") == 1
    assert len(load(results / "grow")) == 2
    assert sweep.main([str(shrunk), "--results", str(results), "--dry-run"]) == 0
    assert "cells this grid dropped: 1; a run refuses them without --prune" in capsys.readouterr().out
    assert sweep.main([str(shrunk), "--results", str(results), "--dry-run", "--prune"]) == 0
    assert "cells this grid dropped: 1; --prune moves them aside" in capsys.readouterr().out
    summary = sweep.run([str(shrunk), "--results", str(results), "--prune"])
    assert summary is not None and summary.ran == 1  # seed 2 only; seed 1 keeps its result
    assert sorted(load(results / "grow")["seed"]) == [1, 2]
    assert Ledger(results / "grow").spec_hash() == load_spec(shrunk).spec_hash()
    [pruned] = results.glob("grow.pruned-*")
    assert load(pruned)["seed"].tolist() == [0]
    assert "moved 1 results of cells this grid dropped" in capsys.readouterr().out


def test_results_of_a_re_tuned_preset_are_set_aside_and_their_cells_run_again(
    tmp_path: Path, ray_session: None, capsys: pytest.CaptureFixture[str], make_spec: Any
) -> None:
    """The prior preset has been re-tuned (revision >= 1): a folder holding a result under a cell's key of the
    previous revision (written before the re-tuning) keeps it, moved aside with its image, and the cell runs
    again."""
    spec = make_spec(tmp_path / "prior.yaml", name="retuned", data={"dataset": "digits", "image_size": 16},
                     grid={"attack": [{"name": "grnn", "params": {"preset": "prior", "iterations": 3}}],
                           "seed": [0]})
    [cell] = load_spec(spec).cells()
    old_key = cell.earlier_keys()[-1]
    folder = tmp_path / "results" / "retuned"
    Ledger(folder).write_part({"trial_key": old_key, "status": "COMPLETE", "psnr": 99.0}, image_png=b"\x89PNG old")
    Ledger(folder).compact()  # in trials.parquet as well as in its part

    assert sweep.main([str(spec), "--results", str(folder.parent), "--dry-run"]) == 0
    assert "superseded results there (an earlier revision of their attack's settings): 1;" in capsys.readouterr().out
    summary = sweep.run([str(spec), "--results", str(folder.parent)])
    assert summary is not None and summary.ran == 1 and summary.complete == 1
    assert "moved 1 superseded results" in capsys.readouterr().out
    df = load(folder)
    assert df["trial_key"].tolist() == [cell.key()] and df["psnr"].iloc[0] < 99
    [aside] = folder.parent.glob("retuned.superseded-*")
    assert load(aside)["trial_key"].tolist() == [old_key] and load(aside)["psnr"].tolist() == [99.0]
    assert (aside / "images" / f"{old_key}.png").read_bytes() == b"\x89PNG old"
    assert not (folder / "parts" / f"{old_key}.parquet").exists()


def test_compact_only_rebuilds_the_table(mixed: dict) -> None:
    (mixed["folder"] / "trials.parquet").unlink()
    assert sweep.main([str(mixed["spec"]), "--results", str(mixed["results"]), "--compact"]) == 0
    assert (mixed["folder"] / "trials.parquet").is_file()
    assert len(load(mixed["folder"] / "trials.parquet")) == 4


def test_status_reads_the_ledger(mixed: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert status_main([str(mixed["folder"])]) == 0
    out = capsys.readouterr().out
    assert "4 cells" in out and "complete 1" in out and "failed 2" in out and "timeout 1" in out
    assert "pending 0" in out and "best" in out
    assert status_main([str(tmp_path)]) == 2
    assert "not a sweep results folder" in capsys.readouterr().err


def test_dry_run_counts_cells(tmp_path: Path, capsys: pytest.CaptureFixture[str], make_spec: Any) -> None:
    spec = make_spec(tmp_path / "s.yaml", grid={"batch_size": [1, 2, 4], "seed": 3})
    assert sweep.main([str(spec), "--results", str(tmp_path / "r"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "9 cells" in out and "and 4 more" in out
    assert not (tmp_path / "r").exists()


def test_too_many_cells_need_yes(tmp_path: Path, capsys: pytest.CaptureFixture[str], make_spec: Any) -> None:
    spec = make_spec(tmp_path / "s.yaml", max_cells=1)
    assert sweep.main([str(spec), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "max_cells=1" in err and "--yes" in err
    assert not (tmp_path / "r").exists()


def test_unwritable_results_root_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make_spec: Any
) -> None:
    spec = make_spec(tmp_path / "s.yaml")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert sweep.main([str(spec), "--results", str(blocker)]) == 2
    assert "not writable" in capsys.readouterr().err


def test_bad_spec_exits_2_before_ray_starts(
    tmp_path: Path, subprocess_env: dict, make_spec: Any, project_root: Path
) -> None:
    spec = make_spec(tmp_path / "s.yaml", resources={"cpus": 1})
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.sweep", str(spec), "--results", str(tmp_path / "r")],
        cwd=project_root, env=subprocess_env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "cpus" in proc.stderr
    assert not (Path(subprocess_env["RAY_TMPDIR"]) / "ray").exists()  # Ray never started
    assert not (tmp_path / "r").exists()


class _RayStarted(Exception):
    """Raised by the recording start_ray below: the test only wants to know how Ray would start."""


@pytest.mark.parametrize(("fl_round", "pool"), [(0, False), (2, True)])
def test_embedded_ray_pools_workers_only_for_stage_tasks(
    tmp_path: Path, make_spec: Any, monkeypatch: pytest.MonkeyPatch, fl_round: int, pool: bool
) -> None:
    from orchestrator.running import ray_start

    asked: list[dict[str, Any]] = []

    def record(*args: Any, **kwargs: Any) -> bool:
        asked.append(kwargs)
        raise _RayStarted

    monkeypatch.setattr(ray_start, "start_ray", record)
    spec = make_spec(tmp_path / "s.yaml", grid={"fl_round": [fl_round]})
    with pytest.raises(_RayStarted):
        sweep.run([str(spec), "--results", str(tmp_path / "r")])
    assert len(asked) == 1 and asked[0]["worker_pool"] is pool


def test_submit_command_runs_the_same_sweep_on_the_cluster() -> None:
    cmd = sweep.submit_command(["sweeps/x.yaml", "--retry-failed", "--max-concurrent", "3", "--submit"])
    assert cmd.startswith("python -m orchestrator.sweep sweeps/x.yaml --address auto --results ")
    assert "--retry-failed" in cmd and "--max-concurrent 3" in cmd and "--submit" not in cmd
    assert "--results /data/r" in sweep.submit_command(["x.yaml", "--results", "/data/r"])


def test_embedded_ray_takes_the_cpus_of_the_trials_that_run_at_once() -> None:
    assert embedded_cpus(None, 1.0, cores=16) is None  # no limit: every core
    assert embedded_cpus(3, 1.0, cores=16) == 3
    assert embedded_cpus(3, 2.0, cores=16) == 6
    assert embedded_cpus(3, 0.5, cores=16) == 2  # 1.5 CPUs: Ray counts whole ones, so 2 (and 3 trials fit)
    assert embedded_cpus(1, 0.25, cores=16) == 1
    assert embedded_cpus(40, 1.0, cores=16) == 16  # never more than the machine has


# Runs the sweep command as it is, and says how many CPUs its embedded Ray had just before stopping it.
CPU_PROBE = """
import sys, ray
from orchestrator import sweep
from orchestrator.running import ray_start
stop = ray_start.stop_ray
def tell_then_stop(started):
    print(f"ray cpus {ray.cluster_resources().get('CPU')}", flush=True)
    stop(started)
ray_start.stop_ray = tell_then_stop
sys.exit(sweep.main(sys.argv[1:]))
"""


def test_max_concurrent_starts_the_embedded_ray_with_the_cpus_it_needs(
    tmp_path: Path, subprocess_env: dict, make_spec: Any, project_root: Path
) -> None:
    """--max-concurrent 1 with 1 CPU per trial: a 1-CPU embedded Ray (not one per core), on which the FL stage
    tasks (fl_round 1, two chains) and then the trials all still run."""
    spec = make_spec(tmp_path / "one.yaml", name="one", grid={"fl_round": [0, 1], "seed": 2},
                     fl={"clients": 2, "local_epochs": 1})  # fmt: skip
    results = tmp_path / "r"
    proc = subprocess.run(
        [sys.executable, "-c", CPU_PROBE, str(spec), "--results", str(results), "--max-concurrent", "1"],
        cwd=project_root, env=subprocess_env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ray cpus 1.0" in proc.stdout, proc.stdout
    rows = load(results / "one")
    assert len(rows) == 4 and set(rows["status"]) == {"COMPLETE"}
    assert "FL stages ready" in proc.stdout and "2 chains trained" in proc.stdout, proc.stdout


def test_watchdog_stops_a_trial_stuck_in_python() -> None:
    start = time.monotonic()
    with pytest.raises(TrialTimeout):
        dog = Watchdog(0.3)
        dog.start()
        try:
            while True:  # a hang inside one step: no report, no return
                sum(range(1000))
        finally:
            dog.stop()
    assert time.monotonic() - start < 5


def test_execute_cell_turns_a_timeout_into_a_row() -> None:
    reports: list[dict] = []
    execute_cell(TrialSpec(attack_params={"iterations": 1}, dataset="digits"), reports.append)  # warm imports
    result = execute_cell(
        TrialSpec(attack_params={"iterations": FOREVER}, dataset="digits", eval_every=1), reports.append,
        trial_timeout_s=1.5,
    )
    assert result.status == "TIMEOUT" and result.error_type == "Timeout"
    assert 1.5 <= result.wall_s < 10
    assert reports and all(set(r) <= {"iteration", "iterations", "grad_loss", "psnr"} for r in reports)


def test_gpu_request_on_a_machine_without_gpu_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make_spec: Any
) -> None:
    import torch

    if torch.cuda.device_count():
        pytest.skip("this machine has a GPU")
    spec = make_spec(tmp_path / "s.yaml", resources={"cpu": 1, "gpu": 0.25})
    assert sweep.main([str(spec), "--results", str(tmp_path / "r")]) == 2
    assert "resources.gpu=0.25" in capsys.readouterr().err
