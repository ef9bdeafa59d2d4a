"""cluster.yaml (AWS) and cluster/onprem.yaml (your machines over SSH): complete Ray cluster-launcher configs
that keep Ray's ports off the network (CVE-2023-48022, "ShadowRay"): dashboard on the head's localhost,
token auth on, and for AWS only SSH admitted. Both are validated against Ray's own schema, as `ray up` does."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster.yaml"
ONPREM = ROOT / "cluster" / "onprem.yaml"
BOTH = pytest.mark.parametrize("path", [CLUSTER, ONPREM], ids=["aws", "onprem"])


def _load(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def text() -> str:
    return CLUSTER.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return _load(CLUSTER)


@pytest.fixture(scope="module")
def onprem() -> dict[str, Any]:
    return _load(ONPREM)


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


def test_onprem_names_its_machines_by_address(onprem: dict[str, Any]) -> None:
    provider = onprem["provider"]
    assert provider["type"] == "local"
    assert re.fullmatch(r"[\w.:-]+", provider["head_ip"]), provider["head_ip"]
    assert isinstance(provider["worker_ips"], list)
    assert onprem["auth"]["ssh_user"] and onprem["auth"]["ssh_private_key"]
    # the local provider makes its single node type itself: a config that sets one is refused by `ray up`
    assert "available_node_types" not in onprem and "head_node_type" not in onprem


@BOTH
def test_setup_installs_the_project_in_a_venv(path: Path) -> None:
    config = _load(path)
    assert config["file_mounts"]["~/grnn-sweep"] == "."
    assert {".venv", ".git", "results"} <= set(config["rsync_exclude"])
    setup = " ; ".join(_commands(config, "setup_commands"))
    assert "venv" in setup
    assert re.search(r"pip install (--quiet )?-e ~/grnn-sweep\b", setup), setup


def test_onprem_gives_the_account_its_own_ray_temp_dir(onprem: dict[str, Any]) -> None:
    # else `--address auto` may find another user's Ray on a shared machine (through /tmp/ray)
    setup = " ; ".join(_commands(onprem, "setup_commands"))
    assert "RAY_TMPDIR=/tmp/ray-$(id -un)" in setup


@BOTH
def test_start_commands_start_ray(path: Path) -> None:
    config = _load(path)
    head = " ; ".join(_commands(config, "head_start_ray_commands"))
    worker = " ; ".join(_commands(config, "worker_start_ray_commands"))
    assert re.search(r"ray start --head\b", head), head
    assert re.search(r"ray start --address=\$RAY_HEAD_IP:\d+", worker), worker


@BOTH
def test_dashboard_binds_to_the_head_localhost_only(path: Path) -> None:
    head = " ; ".join(_commands(_load(path), "head_start_ray_commands"))
    hosts = re.findall(r"--dashboard-host[= ](\S+)", head)
    assert hosts == ["127.0.0.1"], hosts


@BOTH
def test_token_auth_is_on_and_never_disabled(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    config = _load(path)
    assert not re.search(r"RAY_AUTH_MODE\s*[=:]\s*[\"']?disabled", text, re.IGNORECASE)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in _commands(config, key) if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    assert "export RAY_AUTH_MODE=token" in " ; ".join(_commands(config, "setup_commands"))  # login shells too
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


@BOTH
def test_shadowray_is_explained(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert "CVE-2023-48022" in text and "ShadowRay" in text


@BOTH
def test_ray_accepts_the_config(path: Path) -> None:
    util = pytest.importorskip("ray.autoscaler._private.util")
    prepared = util.prepare_config(_load(path))  # fills Ray's defaults, as `ray up` does before validating
    util.validate_config(prepared)


def test_ray_schema_check_is_not_toothless(onprem: dict[str, Any]) -> None:
    util = pytest.importorskip("ray.autoscaler._private.util")
    import jsonschema

    bad = {**onprem, "auth": {**onprem["auth"], "ssh_port": 2222}}  # not a key Ray knows
    with pytest.raises(jsonschema.ValidationError):
        util.validate_config(util.prepare_config(bad))
