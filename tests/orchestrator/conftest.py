"""Shared fixtures of the orchestrator tests: a quiet embedded Ray for the session, tiny sweep specs.

Ray 2.60 turns on token auth and usage stats for local clusters and leaves a session folder per start
under its temp dir: the tests switch both off and give Ray a short temp dir of their own (Unix socket
paths must stay under ~107 characters, so not pytest's long tmp_path).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def sweep_yaml(path: Path, name: str = "tiny", **overrides: Any) -> Path:
    """Write a tiny digits/GRNN sweep spec (10 iterations per trial) to `path`; overrides replace top keys."""
    spec: dict[str, Any] = {
        "name": name,
        "data": {"dataset": "digits"},
        "grid": {
            "victim": ["lenet"],
            "batch_size": [1],
            "attack": [{"name": "grnn", "params": {"iterations": 10}, "eval_every": 5}],
            "seed": 2,
        },
        "resources": {"cpu": 1},
        "trial_timeout_s": 120,
    }
    for key, value in overrides.items():
        if key == "grid":
            spec["grid"] = {**spec["grid"], **value}
        else:
            spec[key] = value
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def make_spec() -> Any:
    """The `sweep_yaml` helper, as a fixture (test modules do not import conftest)."""
    return sweep_yaml


@pytest.fixture(scope="session")
def project_root() -> Path:
    return PROJECT_ROOT


@pytest.fixture(scope="session")
def ray_temp_dir() -> Iterator[str]:
    folder = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_session(ray_temp_dir: str) -> Iterator[None]:
    """Embedded Ray with 2 CPUs, started once through the runner's own start-up (quiet settings)."""
    import ray

    from orchestrator.running.ray_start import start_ray

    started = start_ray(num_cpus=2, temp_dir=ray_temp_dir)
    yield
    if started:
        ray.shutdown()


@pytest.fixture()
def subprocess_env() -> Iterator[dict[str, str]]:
    """Environment for running the command lines in a child process with their own embedded Ray."""
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    env = {
        **os.environ,
        "RAY_TMPDIR": ray_tmp,
        "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    env.pop("RAY_ADDRESS", None)
    yield env
    shutil.rmtree(ray_tmp, ignore_errors=True)
