"""A real Flower federation on this machine, audited for gradient leakage as it runs.

Starts Flower 1.42's local deployment on loopback: one SuperLink (`flower-superlink --insecure`) and C
SuperNodes (`flower-supernode --insecure`), each a process of its own, then submits the Flower App in
benchmarks/flower_app/ with `flwr run --stream`. Its ClientApps train a LeNet on their shards of a real
dataset (MNIST from the data root by default) with Flower's FedAvg; its ServerApp wraps FedAvg in the
project's `AuditedStrategy`, which attacks the updates the SuperLink delivers and writes one ledger row per
attacked update to results/<name>_<update>/. Then the report is rendered from that folder.

    python benchmarks/flower_audit.py                           # FedSGD-style: one SGD step per round
    python benchmarks/flower_audit.py --update fedavg           # multi-step FedAvg (--local-steps 3)
    python benchmarks/flower_audit.py --update both --rounds 3 --clients 3 --use-ray

Flower's state (its config, the installed app, logs) and, with --use-ray, Ray's session live in a temporary
folder removed at the end; every process started is stopped by pid, SuperNodes first, with the processes
Flower started under them.
Ends with one JSON line per configuration: rounds, clients, rows, psnr_mean, label_acc_mean, fl_accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from grnn_engine.cli_values import OneLineParser, run_command, user_error  # noqa: E402
from grnn_engine.data import load_dataset  # noqa: E402
from grnn_engine.errors import ConfigError, DataError, GrnnError  # noqa: E402

APP = REPO / "benchmarks" / "flower_app"
HOST = "127.0.0.1"
CONNECTION = "grnn-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DataError(f"the SuperLink exited with code {process.returncode} before listening on {HOST}:{port}")
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.5)
    raise DataError(f"the SuperLink did not listen on {HOST}:{port} within {timeout_s:.0f} s")


def children(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc): the SuperExec, ServerApp and ClientApp processes Flower
    starts under the processes this script started."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop(processes: list[subprocess.Popen[bytes]], grace_s: float = 20.0) -> None:
    """SIGTERM each started process (and the processes under it), wait, SIGKILL what is left; by pid."""
    for process in processes:
        if process.poll() is not None:
            continue
        below = children(process.pid)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for pid in below:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_config(args: argparse.Namespace, update: str, summary: Path) -> str:
    values = {
        "num-server-rounds": args.rounds, "num-clients": args.clients, "dataset": args.dataset,
        "victim": args.victim, "image-size": args.image_size, "batch-size": args.batch_size,
        "local-steps": 1 if update == "fedsgd" else args.local_steps, "local-lr": args.local_lr,
        "seed": args.seed, "audit-name": f"{args.name}_{update}", "audit-results": str(Path(args.results).resolve()),
        "audit-every": args.every, "audit-clients": args.audit_clients or 0, "audit-attack": args.attack,
        "audit-iterations": args.iterations, "audit-use-ray": args.use_ray, "summary-path": str(summary),
    }  # fmt: skip
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def federation(args: argparse.Namespace, update: str, work: Path) -> dict[str, object]:
    """One audited federation, started and stopped here; its JSON figures."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "FLWR_HOME": str(work / "flwr_home"), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "FLWR_TELEMETRY_ENABLED": "0", "RAY_TMPDIR": str(work / "ray")}  # fmt: skip  (--use-ray: Ray's session too)
    port = free_port()
    (work / "flwr_home").mkdir()
    (work / "flwr_home" / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{HOST}:{port}"\ninsecure = true\n'
    )
    processes: list[subprocess.Popen[bytes]] = []
    summary = work / "summary.json"
    started = time.perf_counter()
    try:
        link = start([str(bin_dir / "flower-superlink"), "--insecure", "--host", HOST, "--port", str(port),
                      "--disable-runtime-dependency-installation"], work / "superlink.log", env)  # fmt: skip
        processes.append(link)
        wait_for_port(port, link, timeout_s=120)
        for c in range(args.clients):
            processes.insert(0, start(  # SuperNodes first in the stop order
                [str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"{HOST}:{port}", "--host", HOST,
                 "--port", str(free_port()), "--node-config", f"partition-id={c} num-partitions={args.clients}"],
                work / f"supernode{c}.log", env,
            ))  # fmt: skip
        run_log = work / "flwr_run.log"
        with open(run_log, "wb") as out:
            code = subprocess.run(
                [str(bin_dir / "flwr"), "run", str(APP), CONNECTION, "--stream",
                 "--run-config", run_config(args, update, summary)],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work, timeout=args.timeout,
            ).returncode  # fmt: skip
        if code != 0 or not summary.is_file():
            raise DataError(f"the Flower run failed (exit {code}); its log ends: {tail(run_log, 15)!r}")
    except subprocess.TimeoutExpired:
        raise DataError(f"the Flower run took longer than --timeout {args.timeout} s") from None
    finally:
        stop(processes)
        if args.keep_logs:
            keep = Path(args.keep_logs) / update
            keep.mkdir(parents=True, exist_ok=True)
            for log in work.glob("*.log"):
                shutil.copy2(log, keep / log.name)
    wall_s = time.perf_counter() - started
    return figures(args, update, json.loads(summary.read_text()), wall_s)


def figures(args: argparse.Namespace, update: str, summary: dict[str, object], wall_s: float) -> dict[str, object]:
    from orchestrator.report import write_report
    from orchestrator.results import load

    folder = Path(args.results) / f"{args.name}_{update}"
    df = load(folder)
    df = df[df["audit_run"] == summary["audit_run"]]
    report = write_report(folder)

    def mean(column: str) -> float | None:
        values = [float(v) for v in df[column].dropna()] if column in df else []
        return round(sum(values) / len(values), 3) if values and all(math.isfinite(v) for v in values) else None

    return {
        "update": update, "rounds": summary["rounds"], "clients": args.clients, "rows": len(df),
        "psnr_mean": mean("psnr"), "label_acc_mean": mean("label_acc"), "fl_accuracy": summary["fl_accuracy"],
        "attack": f"{args.attack} x{args.iterations}", "dataset": args.dataset, "batch_size": args.batch_size,
        "wall_s": round(wall_s, 1), "results": str(folder), "report": str(report.html),
    }  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="python benchmarks/flower_audit.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--update", choices=("fedsgd", "fedavg", "both"), default="fedsgd",
                   help="fedsgd: one local SGD step per round; fedavg: --local-steps steps; both: one federation each")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--clients", type=int, default=2, help="SuperNodes (each one a client with its own shard)")
    p.add_argument("--dataset", default="mnist", help="a dataset of the registry, read from the data root")
    p.add_argument("--victim", default="lenet_zhu", help="the federation's model (a registry victim)")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=1, help="examples each client trains on per round")
    p.add_argument("--local-steps", type=int, default=3, help="SGD steps per round for --update fedavg")
    p.add_argument("--local-lr", type=float, default=0.1)
    p.add_argument("--attack", default="idlg")
    p.add_argument("--iterations", type=int, default=5, help="attack iterations (iDLG: L-BFGS steps of 20 evaluations)")
    p.add_argument("--every", type=int, default=1, help="audit every N-th round")
    p.add_argument("--audit-clients", type=int, default=None, help="updates attacked per audited round (all)")
    p.add_argument("--use-ray", action="store_true", help="hand the attacks to Ray tasks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="flower_audit", help="results/<name>_<update>/")
    p.add_argument("--results", default=str(REPO / "results"))
    p.add_argument("--timeout", type=int, default=1800, help="seconds one federation may take")
    p.add_argument("--keep-logs", default=None, help="copy the Flower processes' logs to DIR/<update>/ (else discarded)")
    args = p.parse_args(argv)
    for name in ("rounds", "clients", "batch_size", "local_steps", "iterations", "every"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid; allowed: an integer >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if shutil.which("flower-superlink", path=str(Path(sys.executable).parent)) is None:
            raise ConfigError("Flower is not installed in this environment; pip install 'grnn-sweep[audit]'")
        train = load_dataset(args.dataset, split="train", image_size=args.image_size)  # missing data: fail now
        if len(train) < args.clients * args.batch_size:
            raise ConfigError(f"--clients {args.clients} x --batch-size {args.batch_size} exceeds the "
                              f"{len(train)} images of {train.description}")  # fmt: skip
        updates = ("fedsgd", "fedavg") if args.update == "both" else (args.update,)
        for update in updates:
            with tempfile.TemporaryDirectory(prefix="grnn-flower-") as tmp:
                print(json.dumps(federation(args, update, Path(tmp))), flush=True)
    except GrnnError as err:
        return user_error(err)
    return 0


if __name__ == "__main__":
    run_command(main)
