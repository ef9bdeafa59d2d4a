"""cluster/slurm/sweep.sbatch outside Slurm: its argument handling (one sentence and exit 2 for a mistake,
before any Ray starts), its --dry-run plan, and the stance of the Ray it starts. The script itself runs on a
real single-node Slurm in `make cluster-test` (cluster/test/cluster_test.sh)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "cluster" / "slurm" / "sweep.sbatch"
SPEC = "sweeps/quickstart.yaml"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    base.update({"GRNN_PYTHON": sys.executable, "PYTHONPATH": str(ROOT), **(env or {})})
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, env=base, capture_output=True, text=True, timeout=120
    )


def one_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "names"),
    [
        ((), "no sweep spec given"),
        (("sweeps/nope.yaml", "--results", "/tmp/r"), "'sweeps/nope.yaml' is not a file"),
        ((SPEC,), "--results is required"),
        ((SPEC, "--results"), "--results needs a folder"),
        ((SPEC, "--results="), "--results needs a folder"),
        ((SPEC, "--results", "/tmp/r", "--address", "auto"), "--address is not accepted"),
        ((SPEC, "--results", "/tmp/r", "--fresh"), "--fresh is not accepted"),
        ((SPEC, "--results", "/tmp/r", "--submit"), "--submit is not accepted"),
        ((SPEC, "--results", "/tmp/r", "--max-concurrent", "0"), "got '0'"),
        ((SPEC, "--results", "/tmp/r", "--max-concurrent=x"), "got 'x'"),
        ((SPEC, "--results", "/tmp/r", "--bogus"), "unknown option '--bogus'"),
        ((SPEC, SPEC, "--results", "/tmp/r"), "one sweep spec per job"),
    ],
)
def test_a_mistake_is_one_sentence_and_exit_2(args: tuple[str, ...], names: str) -> None:
    assert names in one_error(run(*args))


def test_a_python_without_the_project_is_named() -> None:
    line = one_error(run(SPEC, "--results", "/tmp/r", env={"GRNN_PYTHON": "/nonexistent/python"}))
    assert "/nonexistent/python" in line and "GRNN_PYTHON" in line


def test_outside_slurm_it_asks_for_sbatch(tmp_path: Path) -> None:
    line = one_error(run(SPEC, "--results", str(tmp_path)))
    assert "sbatch" in line
    assert not (tmp_path / "quickstart").exists()  # nothing written before the job runs


def test_dry_run_prints_the_plan_and_the_cells(tmp_path: Path) -> None:
    result = run(SPEC, f"--results={tmp_path}", "--max-concurrent", "2", "--retry-failed", "--prune", "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # the sweep command the job runs: absolute spec and results, the options passed on, Ray's address added
    assert f"-m orchestrator.sweep {ROOT / SPEC} --results {tmp_path} --max-concurrent 2 --retry-failed --prune" in out
    assert "--address <head>:<port>" in out
    assert "sweep 'quickstart': 24 cells" in out
    assert not (tmp_path / "quickstart").exists()


def _directives() -> list[str]:
    return [line.split(None, 1)[1] for line in SCRIPT.read_text().splitlines() if line.startswith("#SBATCH ")]


def test_header_requeues_and_warns_before_the_time_limit() -> None:
    directives = _directives()
    assert "--requeue" in directives
    assert any(re.fullmatch(r"--signal=B:TERM@\d+", d) for d in directives)
    assert "--ntasks-per-node=1" in directives  # one Ray node per Slurm node
    assert not any(d.startswith(("--gpus", "--gres")) for d in directives)  # GPUs are the user's to set


def test_ray_runs_with_a_token_and_a_local_dashboard_and_is_stopped_by_pid() -> None:
    code = [line for line in SCRIPT.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = "\n".join(code)
    assert "export RAY_AUTH_MODE=token" in text and "RAY_AUTH_TOKEN=" in text
    assert "--dashboard-host=127.0.0.1" in text
    assert not re.search(r"RAY_AUTH_MODE=['\"]?disabled", text)
    # `ray stop` would stop every Ray of the user on a node Slurm shares with other jobs
    assert not re.search(r"(\bray|ray\.scripts\.scripts|\$\{ray\[[@*]\]\}\"?)\s+stop\b", text)
    assert 'kill -TERM "${ray_pids[@]}"' in text
