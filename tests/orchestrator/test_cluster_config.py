"""cluster.yaml: a complete Ray cluster-launcher config that keeps Ray's ports off the internet
(CVE-2023-48022, "ShadowRay"): dashboard on the head's localhost, only SSH admitted, token auth on."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster.yaml"


@pytest.fixture(scope="module")
def text() -> str:
    return CLUSTER.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def config(text: str) -> dict[str, Any]:
    loaded = yaml.safe_load(text)
    assert isinstance(loaded, dict)
    return loaded


def _commands(config: dict[str, Any], key: str) -> list[str]:
    commands = config.get(key) or []
    assert isinstance(commands, list) and all(isinstance(c, str) for c in commands), key
    return commands


def test_required_keys(config: dict[str, Any]) -> None:
    assert isinstance(config["cluster_name"], str) and config["cluster_name"]
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    assert "cache_stopped_nodes" in config["provider"]
    assert config["auth"]["ssh_user"]
    node_types = config["available_node_types"]
    assert isinstance(node_types, dict) and node_types
    assert config["head_node_type"] in node_types
    for name, node in node_types.items():
        assert node["node_config"]["InstanceType"], name
        assert isinstance(node["resources"], dict), name


def test_a_gpu_worker_type_can_scale(config: dict[str, Any]) -> None:
    workers = {n: t for n, t in config["available_node_types"].items() if n != config["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu, "no worker node type offers a GPU"
    assert all(t.get("max_workers", 0) >= 1 and t.get("min_workers", 0) >= 0 for t in gpu)


def test_setup_installs_the_project_in_a_venv(config: dict[str, Any]) -> None:
    assert config["file_mounts"]["~/grnn-sweep"] == "."
    setup = " ; ".join(_commands(config, "setup_commands"))
    assert "venv" in setup
    assert re.search(r"pip install -e ~/grnn-sweep\b", setup), setup


def test_start_commands_start_ray(config: dict[str, Any]) -> None:
    head = " ; ".join(_commands(config, "head_start_ray_commands"))
    worker = " ; ".join(_commands(config, "worker_start_ray_commands"))
    assert re.search(r"ray start --head\b", head), head
    assert re.search(r"ray start --address=\$RAY_HEAD_IP:\d+", worker), worker


def test_dashboard_binds_to_the_head_localhost_only(config: dict[str, Any]) -> None:
    head = " ; ".join(_commands(config, "head_start_ray_commands"))
    hosts = re.findall(r"--dashboard-host[= ](\S+)", head)
    assert hosts == ["127.0.0.1"], hosts


def test_token_auth_is_on_and_never_disabled(config: dict[str, Any], text: str) -> None:
    assert not re.search(r"RAY_AUTH_MODE\s*[=:]\s*[\"']?disabled", text, re.IGNORECASE)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in _commands(config, key) if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    # every node gets the same token, which `ray get-auth-token --generate` made on the operator's machine
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_only_ssh_is_admitted_from_outside(config: dict[str, Any]) -> None:
    group = config["provider"]["security_group"]
    assert group["GroupName"]
    permissions = group["IpPermissions"]
    assert permissions
    for rule in permissions:
        assert rule["IpProtocol"] == "tcp", rule
        assert rule["FromPort"] == 22 and rule["ToPort"] == 22, rule


def test_shadowray_is_explained(text: str) -> None:
    assert "CVE-2023-48022" in text and "ShadowRay" in text


def test_ray_accepts_the_config(config: dict[str, Any]) -> None:
    util = pytest.importorskip("ray.autoscaler._private.util")
    prepared = util.prepare_config(config)  # fills Ray's defaults, as `ray up` does before validating
    util.validate_config(prepared)
