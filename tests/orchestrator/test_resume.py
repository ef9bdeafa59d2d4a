"""A sweep whose driver is SIGKILLed resumes with the same command: no finished trial is redone, no
row is duplicated. Runs the real command line in a child process with its own embedded Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from orchestrator.results import load

CELLS = 6


def test_killed_sweep_resumes_without_redoing_or_duplicating(
    tmp_path: Path, subprocess_env: dict, make_spec: Any, project_root: Path
) -> None:
    # 40 GRNN iterations: a few seconds per trial, so the kill lands while trials are still pending.
    spec = make_spec(
        tmp_path / "resume.yaml", name="resume",
        grid={"attack": [{"name": "grnn", "params": {"iterations": 40}, "eval_every": 20}], "seed": CELLS},
    )
    results = tmp_path / "results"
    parts_dir = results / "resume" / "parts"
    cmd = [sys.executable, "-m", "orchestrator.sweep", str(spec), "--results", str(results)]

    # Own session: after killing the driver, the test can also end the Ray helpers it leaves behind.
    driver = subprocess.Popen(cmd, cwd=project_root, env=subprocess_env, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 150
        while not list(parts_dir.glob("*.parquet")):
            assert driver.poll() is None, f"the sweep ended before any part was written:\n{driver.stdout.read()}"
            assert time.monotonic() < deadline, "no part written within 150 s"
            time.sleep(0.05)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # the killed driver's orphaned Ray processes
        except ProcessLookupError:
            pass
        if driver.stdout:
            driver.stdout.close()
    assert driver.returncode == -signal.SIGKILL

    before = {p.name: p.stat().st_mtime_ns for p in parts_dir.glob("*.parquet")}
    assert 1 <= len(before) < CELLS, f"kill landed too late: {len(before)} parts"

    rerun = subprocess.run(cmd, cwd=project_root, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{CELLS - len(before)} of {CELLS} cells to run" in rerun.stdout

    after = {p.name: p.stat().st_mtime_ns for p in parts_dir.glob("*.parquet")}
    assert len(after) == CELLS
    assert {name: after[name] for name in before} == before  # finished trials were not run again

    df = load(results / "resume")
    assert len(df) == CELLS and df["trial_key"].is_unique and (df["status"] == "COMPLETE").all()
    table = pq.read_table(results / "resume" / "trials.parquet")
    assert table.num_rows == CELLS and len(set(table.column("trial_key").to_pylist())) == CELLS
