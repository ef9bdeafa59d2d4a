"""Faults: a sweep keeps every result and loses none when its driver is killed, a result write is torn,
a worker node is lost, or trials raise, go NaN, hang or run out of memory; a full or read-only disk is
refused before any trial runs.

The sweeps run the real command line (`python -m orchestrator.sweep`) in a child process with its own
embedded Ray, real GRNN trials on digits, and `fault_plugins/` on PYTHONPATH: its sitecustomize loads a
test-only attack `fault` (fails on demand) and an execution counter into every process of that run,
Ray workers included, and never into this pytest process. The fast tests share one sweep that is killed
once; the `faults` marker runs the long variants (several kills, node loss, hangs in native code).
Each test prints a `reliability:` line with the figures README's Reliability section quotes.
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from orchestrator import sweep
from orchestrator.results import Ledger, load

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PLUGINS = Path(__file__).resolve().parent / "fault_plugins"
TIMEOUT_S = 120  # trial_timeout_s of the fast sweep: far above a cold worker's first trial (~10 s here)
HANG_TIMEOUT_S = 20  # trial_timeout_s of the `hang`/`sleep` sweep: above a cold first trial under load
OK_LRS = [5e-5, 1e-4, 2e-4, 4e-4]  # the real GRNN cells that must complete whatever else fails
FAULT_MODES = ["memcap", "raise", "nan", "cuda_oom"]


# ---------------------------------------------------------------------------------------------- helpers


def fault_env(tmp: Path) -> dict[str, str]:
    """Environment of a child sweep: its own Ray temp dir, the fault plugins and the trial log."""
    env = {
        **os.environ,
        "RAY_TMPDIR": tempfile.mkdtemp(prefix="rf", dir="/tmp"),  # short: Ray's socket paths are limited
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "GRNN_FAULTS_TRIAL_LOG": str(tmp / "trials.log"),
        "PYTHONPATH": os.pathsep.join([str(PLUGINS), str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        ),
    }
    env.pop("RAY_ADDRESS", None)
    return env


def write_spec(path: Path, name: str, attacks: list[dict[str, Any]], seeds: int = 1, **top: Any) -> Path:
    """A digits/LeNet sweep of `attacks` x `seeds` seeds, batch size 1, one CPU per trial."""
    spec = {
        "name": name,
        "data": {"dataset": "digits"},
        "grid": {"victim": ["lenet"], "batch_size": [1], "attack": attacks, "seed": seeds},
        "resources": {"cpu": 1},
        "trial_timeout_s": TIMEOUT_S,
        **top,
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def read_log(path: Path) -> list[tuple[str, str, int]]:
    """(event, trial_key, pid) per line of the execution counter."""
    if not path.exists():
        return []
    lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
    return [(e, k, int(p)) for e, k, p in lines]


def count(events: list[tuple[str, str, int]], event: str) -> collections.Counter[str]:
    return collections.Counter(k for e, k, _ in events if e == event)


def parts_of(folder: Path) -> dict[str, int]:
    """trial_key -> mtime_ns of every finished part."""
    parts = folder / "parts"
    if not parts.is_dir():
        return {}
    return {p.stem: p.stat().st_mtime_ns for p in parts.glob("*.parquet")}


def _group_alive(pgid: int) -> bool:
    """Any process of the group still running (zombies that no one reaps do not count)?"""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def start_sweep(cmd: list[str], env: dict[str, str], out: Path) -> subprocess.Popen[bytes]:
    # Own session: the test can end the Ray processes a killed driver leaves behind, and only those.
    with open(out, "ab") as log:
        return subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, start_new_session=True, stdout=log, stderr=log)


def kill_sweep(driver: subprocess.Popen[bytes]) -> None:
    """SIGKILL the driver (unless it ended already), then everything of its Ray, and wait until none of
    it runs any more."""
    if driver.poll() is None:  # an ended driver's pid may belong to another process by now
        os.kill(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    try:
        os.killpg(driver.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 30
    while _group_alive(driver.pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def wait_for_parts(driver: subprocess.Popen[bytes], folder: Path, n: int, out: Path, limit_s: float = 240) -> None:
    deadline = time.monotonic() + limit_s
    while len(parts_of(folder)) < n:
        assert driver.poll() is None, f"the sweep ended before {n} parts were written:\n{out.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"fewer than {n} parts within {limit_s} s:\n{out.read_text()[-3000:]}"
        time.sleep(0.05)


def rerun(cmd: list[str], env: dict[str, str], limit_s: float = 400) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=limit_s)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def cell_keys(spec: Path) -> list[str]:
    """The keys of a spec's cells, in run order. Validated without the registries: the `fault` attack
    exists only in the child processes."""
    from orchestrator.spec import SweepSpec

    return [c.key() for c in SweepSpec.model_validate(yaml.safe_load(spec.read_text())).cells()]


def crash_while_writing(folder: Path, key: str) -> None:
    """A writer that dies (SIGKILL) between writing the part of `key` to its temporary file and renaming it."""
    code = f"""
import os, signal
from orchestrator.results import Ledger

real_replace = os.replace
def replace(src, dst):
    if str(dst).endswith(".parquet"):
        os.kill(os.getpid(), signal.SIGKILL)  # the image was renamed; the part never is
    return real_replace(src, dst)
os.replace = replace
Ledger({str(folder)!r}).write_part({{"trial_key": {key!r}, "status": "COMPLETE", "psnr": 99.0}}, b"PNG torn")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def report(**figures: Any) -> None:
    print("reliability: " + " ".join(f"{k}={v}" for k, v in figures.items()))


# ---------------------------------------------------------------------------------------------- fast: one sweep, killed once


@pytest.fixture(scope="module")
def killed_sweep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The fault sweep: real GRNN cells (OK_LRS), one GRNN cell that diverges to NaN (lr 1e30) and one
    cell per fault mode. Killed (SIGKILL) at a random moment after 2-4 parts exist (if that came after the last
    part, again from nothing, killed after 2); a writer then dies before renaming the part of a pending cell; then
    the same command runs the sweep to its end."""
    tmp = tmp_path_factory.mktemp("faults")
    env = fault_env(tmp)
    spec = write_spec(
        tmp / "faults.yaml", "faults",
        [  # memcap first: the real trials after it on the same worker show that the cap was lifted
            {"name": "fault", "params": {"mode": "memcap"}, "eval_every": 5},
            {"name": "grnn", "params": {"iterations": 20, "lr": OK_LRS}, "eval_every": 10},
            {"name": "fault", "params": {"mode": [m for m in FAULT_MODES if m != "memcap"]}, "eval_every": 5},
            {"name": "grnn", "params": {"iterations": 10, "lr": 1.0e30}, "eval_every": 5},
        ],
    )
    results = tmp / "results"
    folder = results / "faults"
    cmd = [sys.executable, "-m", "orchestrator.sweep", str(spec), "--results", str(results)]
    seed = int(os.environ.get("GRNN_FAULTS_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    out = tmp / "driver.out"
    log = Path(env["GRNN_FAULTS_TRIAL_LOG"])

    keys = cell_keys(spec)
    cells = len(keys)
    t0 = time.monotonic()
    for attempt in range(3):
        driver = start_sweep(cmd, env, out)
        try:
            wait_for_parts(driver, folder, rng.randint(2, 4) if attempt == 0 else 2, out)
            time.sleep(rng.uniform(0.0, 0.3) if attempt == 0 else 0.0)
            finished = driver.poll() is not None
        finally:
            kill_sweep(driver)
        before = parts_of(folder)
        if not finished and len(before) < cells:
            break
        # The trials are quick and the rest of them can end within the wait: a kill after the last part leaves
        # nothing to resume, so that run is thrown away and the sweep starts again from nothing, killed sooner.
        shutil.rmtree(results, ignore_errors=True)
        log.unlink(missing_ok=True)
        for tune in Path(env["RAY_TMPDIR"]).glob("grnn-tune-*"):
            shutil.rmtree(tune, ignore_errors=True)
    assert not finished and len(before) < cells, f"every kill landed after the last part (seed {seed})"
    log_at_kill = len(read_log(log))

    torn = next(k for k in keys if k not in before)
    crash_while_writing(folder, torn)
    temporaries = sorted(p.name for p in (folder / "parts").iterdir() if p.name.startswith("."))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a temporary is not a bad file to warn about: it is invisible
        rows_with_temp = load(folder)
        Ledger(folder).compact()
        compacted_with_temp = pq.read_table(folder / "trials.parquet")

    t1 = time.monotonic()
    proc = rerun(cmd, env)
    print(f"faults fixture: killed run + torn write {t1 - t0:.0f} s, resumed run {time.monotonic() - t1:.0f} s")
    # Tune's experiment folders: the killed driver's one too, which the resumed run must have removed.
    tune_folders = sorted(p.name for p in Path(env["RAY_TMPDIR"]).glob("grnn-tune-*"))
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    yield {
        "spec": spec, "folder": folder, "cells": cells, "seed": seed, "before": before,
        "log": read_log(log), "log_at_kill": log_at_kill, "torn": torn, "temporaries": temporaries,
        "tune_folders": tune_folders,
        "rows_with_temp": rows_with_temp, "compacted_with_temp": compacted_with_temp, "rerun": proc,
        "df": load(folder), "files": sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()),
    }


def test_killed_driver_loses_and_duplicates_nothing(killed_sweep: dict[str, Any]) -> None:
    s = killed_sweep
    df, folder, cells = s["df"], s["folder"], s["cells"]
    assert len(df) == cells and df["trial_key"].is_unique, f"seed {s['seed']}"
    table = pq.read_table(folder / "trials.parquet")
    assert table.num_rows == cells and len(set(table.column("trial_key").to_pylist())) == cells
    assert len(parts_of(folder)) == cells
    assert f"{cells - len(s['before'])} of {cells} cells to run" in s["rerun"].stdout

    # No part written before the kill was rewritten, and its cell was never started again.
    after = parts_of(folder)
    assert {k: after[k] for k in s["before"]} == s["before"], f"seed {s['seed']}"
    starts_before = count(s["log"][: s["log_at_kill"]], "start")
    starts = count(s["log"], "start")
    for key in s["before"]:
        assert starts[key] == starts_before[key] == 1, (key, s["seed"])

    # Each COMPLETE cell was computed once, except a cell whose result was in flight when the driver
    # died (computed, not yet in the ledger): that one is computed again, never recorded twice.
    ends_before = count(s["log"][: s["log_at_kill"]], "end")
    in_flight = {k for k in ends_before if k not in s["before"]}
    ends = count(s["log"], "end")
    complete = set(df.loc[df["status"] == "COMPLETE", "trial_key"])
    assert complete, "no cell completed"
    for key in complete:
        assert ends[key] == (2 if key in in_flight else 1), (key, s["seed"])
    report(test="kill_once", kills=1, cells=cells, rows_lost=cells - len(df), duplicates=len(df) - df["trial_key"].nunique(),
           parts_before_kill=len(s["before"]), recomputed_in_flight=len(in_flight), seed=s["seed"])


def test_torn_write_leaves_only_a_temporary_that_is_ignored_and_the_cell_reruns(killed_sweep: dict[str, Any]) -> None:
    s = killed_sweep
    torn = s["torn"]
    assert any(name.startswith(f".{torn}.") and name.endswith(".tmp") for name in s["temporaries"]), s["temporaries"]
    assert torn not in set(s["rows_with_temp"]["trial_key"])
    assert torn not in set(s["compacted_with_temp"].column("trial_key").to_pylist())
    # On resume the cell ran for real: started after the kill, and its row is not the torn one's.
    assert count(s["log"][s["log_at_kill"]:], "start")[torn] == 1
    row = s["df"].set_index("trial_key").loc[torn]
    assert row["psnr"] != 99.0 and (s["folder"] / "parts" / f"{torn}.parquet").is_file()
    # The resumed run removed the dead writer's temporary.
    assert not [f for f in s["files"] if f.startswith(f"parts/.{torn}.")], s["files"]


def test_a_killed_sweep_leaves_only_ledger_files(killed_sweep: dict[str, Any]) -> None:
    # After the resume: the spec, the table, one part and at most one image per cell. Nothing a later run
    # would have to read, unpickle or clean up: Tune's experiment folders (tuner.pkl) never were in the
    # results, and the killed driver's one, in Ray's temp folder, was removed by the resumed run.
    s = killed_sweep
    keys = set(s["df"]["trial_key"])
    allowed = {"spec.yaml", "trials.parquet"} | {f"parts/{k}.parquet" for k in keys} | {f"images/{k}.png" for k in keys}
    extra = [f for f in s["files"] if f not in allowed]
    assert extra == [], extra[:10]
    assert s["tune_folders"] == [], s["tune_folders"]


def _row(df: Any, mode: str) -> Any:
    rows = df[df.get("attack.mode", df["attack"]).eq(mode)]
    assert len(rows) == 1, mode
    return rows.iloc[0]


@pytest.mark.parametrize(
    ("mode", "status", "error_type", "needle"),
    [
        ("raise", "FAILED", "ValueError", "injected failure"),
        ("nan", "FAILED", "NonFinite", "non-finite"),
        ("cuda_oom", "FAILED", "OutOfMemory", "CUDA out of memory"),
    ],
)
def test_a_failing_trial_becomes_a_row(
    killed_sweep: dict[str, Any], mode: str, status: str, error_type: str, needle: str
) -> None:
    row = _row(killed_sweep["df"], mode)
    assert (row["status"], row["error_type"]) == (status, error_type), row["error"]
    assert needle in row["error"]


def test_the_other_trials_complete(killed_sweep: dict[str, Any]) -> None:
    df = killed_sweep["df"]
    ok = df[(df["attack"] == "grnn") & df["attack.lr"].isin(OK_LRS)]
    assert len(ok) == len(OK_LRS) and (ok["status"] == "COMPLETE").all()
    assert (ok["psnr"] > 0).all() and (ok["iterations"] == 20).all()
    report(test="fault_rows", failed_rows=len(FAULT_MODES) + 1, other_trials_complete=len(ok))


def test_a_real_memory_cap_is_an_out_of_memory_row(killed_sweep: dict[str, Any]) -> None:
    row = _row(killed_sweep["df"], "memcap")
    assert row["status"] == "FAILED" and "allocate" in row["error"]
    assert row["error_type"] == "OutOfMemory"


def test_the_worker_survives_its_memory_cap(killed_sweep: dict[str, Any]) -> None:
    # The cap is lifted when the trial ends: the same (reused) worker process completes later trials.
    log, df = killed_sweep["log"], killed_sweep["df"]
    key = _row(df, "memcap")["trial_key"]
    where = max(i for i, (e, k, _) in enumerate(log) if e == "start" and k == key)
    pid = log[where][2]
    later = [k for e, k, p in log[where + 1:] if e == "start" and p == pid]
    if not later:
        pytest.skip("the capped trial was the last its worker ran")
    rows = df.set_index("trial_key").loc[later]
    assert not rows["error"].fillna("").str.contains("DefaultCPUAllocator").any(), rows[["status", "error"]]
    real = rows[rows["attack.lr"].isin(OK_LRS)]
    assert (real["status"] == "COMPLETE").all()


def test_a_real_divergence_to_nan_is_a_nonfinite_row(killed_sweep: dict[str, Any]) -> None:
    df = killed_sweep["df"]
    row = df[(df["attack"] == "grnn") & (df["attack.lr"] == 1.0e30)].iloc[0]
    assert row["status"] == "FAILED"
    assert row["error_type"] == "NonFinite"


# ---------------------------------------------------------------------------------------------- fast: watchdog


def test_the_watchdog_raises_after_an_import_not_inside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The deadline passes while this thread imports a module that is busy in Python bytecode: the timeout
    # must land after the import, which completes, not inside it (that would leave it half-imported).
    from orchestrator.running.watchdog import TrialTimeout, Watchdog

    name = f"grnn_wd_slow_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(
        "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end:\n    pass\nDONE = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    watchdog = Watchdog(0.2, grace_s=600)
    imported = False
    try:
        watchdog.start()
        __import__(name)
        imported = True
        while True:  # the deferred timeout arrives in the next bytecodes after the import
            sum(range(100))
    except TrialTimeout:
        pass
    finally:
        watchdog.stop()
        module = sys.modules.pop(name, None)
    assert imported and watchdog.fired and watchdog.deferred
    assert module is not None and module.DONE


# ---------------------------------------------------------------------------------------------- fast: stage objects


def test_a_stage_object_that_cannot_be_fetched_is_loaded_from_the_cache(
    tmp_path: Path, ray_session: None, make_spec: Any
) -> None:
    # What a trial meets when the object holding its stage is gone (its node lost): it loads the same
    # stage through the content-addressed cache instead of waiting for Ray to rebuild it.
    import ray
    import torch

    from grnn_engine import fl
    from orchestrator.running.stages import prepare_stages
    from orchestrator.spec import load_spec

    fast_fl = {"clients": 2, "local_epochs": 1, "local_batch_size": 128, "local_lr": 1.0}
    spec = make_spec(tmp_path / "s.yaml", name="stage", fl=fast_fl, grid={"fl_round": [1], "seed": [0]})
    cell = load_spec(spec).cells()[0]
    plan = prepare_stages([cell], cache_dir=str(tmp_path / "cache"))
    assert len(plan.refs) == 1 and not plan.errors
    fetched = plan.load(cell).stage
    assert fetched is not None

    @ray.remote
    def lost() -> None:
        raise RuntimeError("the node that held this stage is gone (test)")

    stage_id = next(iter(plan.refs))
    plan.refs[stage_id] = lost.remote()
    trained = fl.chains_trained
    loaded = plan.load(cell).stage
    assert loaded is not None and fl.chains_trained == trained  # from the cache, not trained again
    assert loaded["model_acc"] == fetched["model_acc"]
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in fetched["state_dict"].items())


# ---------------------------------------------------------------------------------------------- fast: disk


def test_read_only_results_folder_is_refused_before_ray_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make_spec: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.running import ray_start

    started: list[Any] = []
    monkeypatch.setattr(ray_start, "start_ray", lambda *a, **k: started.append(a) or False)
    spec = make_spec(tmp_path / "s.yaml", name="ro")
    if os.geteuid() == 0:
        root = Path("/proc/grnn-results")  # root ignores file modes: /proc takes no new folders from anyone
    else:
        root = tmp_path / "ro"
        (root / "ro").mkdir(parents=True)
        root.chmod(0o500)
        (root / "ro").chmod(0o500)
    try:
        assert sweep.main([str(spec), "--results", str(root)]) == 2
    finally:
        if os.geteuid() != 0:
            (root / "ro").chmod(0o700)
            root.chmod(0o700)
    err = capsys.readouterr().err
    assert "not writable" in err and "--results" in err and err.count("\n") == 1
    assert started == []


def test_full_disk_is_refused_before_ray_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make_spec: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.running import ray_start

    started: list[Any] = []
    monkeypatch.setattr(ray_start, "start_ray", lambda *a, **k: started.append(a) or False)
    real = shutil.disk_usage

    def nearly_full(path: Any) -> Any:  # what statvfs says of a disk with 5 MiB left
        usage = real(path)
        return usage._replace(free=5 * 2**20)

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    spec = make_spec(tmp_path / "s.yaml", name="full")
    assert sweep.main([str(spec), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "MiB free" in err and "--results" in err and err.count("\n") == 1
    assert started == [] and not list((tmp_path / "r").rglob("*.parquet"))


# ---------------------------------------------------------------------------------------------- faults marker: long runs


@pytest.mark.faults
def test_repeated_driver_kills_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    kills_wanted, cells = 5, 24  # enough cells that 3 or more kills land before the sweep ends, under load too
    env = fault_env(tmp_path)
    spec = write_spec(tmp_path / "kills.yaml", "kills",
                      [{"name": "grnn", "params": {"iterations": 30}, "eval_every": 10}], seeds=cells)
    results = tmp_path / "results"
    folder = results / "kills"
    cmd = [sys.executable, "-m", "orchestrator.sweep", str(spec), "--results", str(results)]
    seed = int(os.environ.get("GRNN_FAULTS_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    log = Path(env["GRNN_FAULTS_TRIAL_LOG"])
    out = tmp_path / "driver.out"

    kills = 0
    frozen: dict[str, int] = {}  # part -> mtime, for every part that existed at some kill
    in_flight: set[str] = set()
    for _ in range(kills_wanted):
        have = len(parts_of(folder))
        if have >= cells - 1:
            break
        driver = start_sweep(cmd, env, out)
        try:
            wait_for_parts(driver, folder, have + 1, out)  # some trials of this run finished
            time.sleep(rng.uniform(0.0, 1.0))
        finally:
            finished = driver.poll() is not None
            kill_sweep(driver)
        if finished:
            break
        kills += 1
        now = parts_of(folder)
        ends = count(read_log(log), "end")
        in_flight |= {k for k in ends if k not in now}
        for key, mtime in now.items():
            assert frozen.setdefault(key, mtime) == mtime, f"part {key} rewritten (seed {seed})"
    rerun(cmd, env)
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)

    events = read_log(log)
    df = load(folder)
    assert len(df) == cells and df["trial_key"].is_unique and (df["status"] == "COMPLETE").all()
    after = parts_of(folder)
    assert {k: after[k] for k in frozen} == frozen, f"seed {seed}"
    ends = count(events, "end")
    for key in df["trial_key"]:
        # computed once; a cell whose result was in flight at a kill at most once more per kill
        allowed = range(1, 2 + kills) if key in in_flight else range(1, 2)
        assert ends[key] in allowed, (key, ends[key], seed)
    starts = count(events, "start")
    assert all(starts[k] >= 1 for k in df["trial_key"])
    assert kills >= 3, f"only {kills} kills landed before the sweep finished (seed {seed})"
    report(test="kill_repeated", kills=kills, cells=cells, rows_lost=cells - len(df), duplicates=0,
           recomputed_in_flight=len(in_flight), trial_starts=sum(starts.values()), seed=seed)


@pytest.mark.faults
def test_hangs_and_a_dead_worker_become_rows(tmp_path: Path) -> None:
    # `hang` loops in Python inside one step: the trial's watchdog interrupts it at the deadline. `sleep`
    # blocks in one native call, which nothing can interrupt: the watchdog ends the worker after its
    # grace period and the driver records TIMEOUT. `exit` kills its worker: a FAILED WorkerDied row.
    env = fault_env(tmp_path)
    spec = write_spec(
        tmp_path / "hangs.yaml", "hangs",
        [{"name": "fault", "params": {"mode": ["hang", "sleep", "exit", "ok"]}, "eval_every": 5}],
        max_failures=0, trial_timeout_s=HANG_TIMEOUT_S,
    )
    results = tmp_path / "results"
    start = time.monotonic()
    rerun([sys.executable, "-m", "orchestrator.sweep", str(spec), "--results", str(results)], env)
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    df = load(results / "hangs")
    assert len(df) == 4 and df["trial_key"].is_unique
    hang, sleep, exit_, ok = (_row(df, m) for m in ("hang", "sleep", "exit", "ok"))
    assert (hang["status"], hang["error_type"]) == ("TIMEOUT", "Timeout")
    assert HANG_TIMEOUT_S <= hang["wall_s"] < HANG_TIMEOUT_S + 15
    assert (sleep["status"], sleep["error_type"]) == ("TIMEOUT", "Timeout")
    assert f"trial_timeout_s={HANG_TIMEOUT_S}" in sleep["error"]
    assert (exit_["status"], exit_["error_type"]) == ("FAILED", "WorkerDied")
    assert ok["status"] == "COMPLETE"
    report(test="hangs", rows=len(df), wall_s=round(time.monotonic() - start))


@pytest.mark.faults
def test_a_timeout_inside_an_import_does_not_break_the_next_trial(tmp_path: Path) -> None:
    # One slot, so the three cells run in order on one reused worker: a warm-up, a trial whose timeout
    # lands inside a slow import (busy for 40 s), and a trial that imports the same package.
    env = fault_env(tmp_path)
    spec = write_spec(
        tmp_path / "imports.yaml", "imports",
        [{"name": "fault", "params": {"mode": ["ok", "slow_import", "import"]}, "eval_every": 5}],
        max_failures=0, max_concurrent=1, trial_timeout_s=HANG_TIMEOUT_S,
    )
    results = tmp_path / "results"
    rerun([sys.executable, "-m", "orchestrator.sweep", str(spec), "--results", str(results)], env)
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    df = load(results / "imports")
    slow = _row(df, "slow_import")
    assert (slow["status"], slow["error_type"]) == ("TIMEOUT", "Timeout")
    assert f"trial_timeout_s={HANG_TIMEOUT_S}" in slow["error"]
    after = _row(df, "import")
    assert after["status"] == "COMPLETE", after["error"]
    # One worker ran all three: the timed-out one did not end its process (the raise waited for the import).
    starts = [(k, pid) for e, k, pid in read_log(Path(env["GRNN_FAULTS_TRIAL_LOG"])) if e == "start"]
    assert len(starts) == 3 and len({pid for _, pid in starts}) == 1, starts
    report(test="timeout_in_import", rows=len(df), next_trial=after["status"])


NODE_LOSS = """
import os, signal, sys, threading, time
import ray
from ray._private import ray_constants
from ray.cluster_utils import Cluster
from orchestrator.results import Ledger
from orchestrator.running.options import RunOptions
from orchestrator.running.ray_start import start_ray
from orchestrator.running.stages import stage_cache_dir
from orchestrator.running.tune_run import run_cells
from orchestrator.spec import load_spec

spec_path, folder, log = sys.argv[1], sys.argv[2], os.environ["GRNN_FAULTS_TRIAL_LOG"]
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 0, "include_dashboard": False,
    "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4},
})
workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
cluster.wait_for_nodes()
start_ray(address=cluster.address)
spec = load_spec(spec_path)
options = RunOptions(name=spec.name, cpu=1, max_failures=3, trial_timeout_s=300,
                     cache_dir=stage_cache_dir(os.path.dirname(folder)))
lost = []
raylet = workers[0].all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid

def on_lost_node(pid):
    # Is the process a descendant of the first worker node's raylet (one of that node's workers)?
    while pid > 1:
        if pid == raylet:
            return True
        try:
            pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False

def node_workers():
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and int(d) != raylet and on_lost_node(int(d))]

def lose_a_node():
    # Once a trial has finished and one runs on the first worker node, remove that node with everything on it:
    # its trial dies mid-computation and must be retried on the other node.
    while True:
        events = [line.split() for line in open(log).read().splitlines()] if os.path.exists(log) else []
        ended = {key for event, key, _ in events if event == "end"}
        running = [key for event, key, pid in events if event == "start" and key not in ended and on_lost_node(int(pid))]
        if ended and running:
            break
        time.sleep(0.05)
    # A lost machine takes its processes with it at once: its workers die with the raylet (left alone, a worker
    # whose raylet is gone may still finish its trial and hand the result to the driver directly).
    for pid in node_workers():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    cluster.remove_node(workers[0], allow_graceful=False)
    lost.append(running[0])

threading.Thread(target=lose_a_node, daemon=True).start()
summary = run_cells(spec.cells(), Ledger(folder, sweep=spec.name), options, strict_resources=False)
Ledger(folder).compact()
print("node lost:", bool(lost), "ran:", summary.ran)
print("lost trial:", lost[0] if lost else None)
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.faults
def test_lost_worker_node_trials_are_retried_elsewhere(tmp_path: Path) -> None:
    cells = 6
    env = fault_env(tmp_path)
    spec = write_spec(tmp_path / "nodes.yaml", "nodes",
                      [{"name": "grnn", "params": {"iterations": 60}, "eval_every": 20}], seeds=cells)
    folder = tmp_path / "results" / "nodes"
    out = tmp_path / "cluster.out"
    driver = start_sweep([sys.executable, "-c", NODE_LOSS, str(spec), str(folder)], env, out)
    try:
        driver.wait(timeout=300)  # about a minute when nothing goes wrong
    except subprocess.TimeoutExpired:
        pass
    finally:
        hung = driver.poll() is None
        kill_sweep(driver)  # the driver and its whole cluster (head and worker nodes)
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    text = out.read_text()
    assert not hung, f"the sweep hung after the node was lost:\n{text[-3000:]}"
    assert driver.returncode == 0 and "node lost: True" in text, text[-3000:]
    df = load(folder)
    assert len(df) == cells and df["trial_key"].is_unique
    assert (df["status"] == "COMPLETE").all(), df[["status", "error_type", "error"]].to_string()
    events = read_log(Path(env["GRNN_FAULTS_TRIAL_LOG"]))
    starts, ends = count(events, "start"), count(events, "end")
    lost = text.split("lost trial: ")[1].split()[0]
    assert starts[lost] >= 2, f"the trial on the lost node ({lost}) was not run again"
    # Every trial computed to its end once; the lost node's trial at most once more (had it just finished when
    # its node went, its result was lost with it).
    assert all(ends[k] == 1 for k in df["trial_key"] if k != lost) and ends[lost] in (1, 2), ends
    retried = [k for k in df["trial_key"] if starts[k] > 1]
    report(test="node_loss", cells=cells, rows_lost=cells - len(df), duplicates=0, retried=len(retried))
