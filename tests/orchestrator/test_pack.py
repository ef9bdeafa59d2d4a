"""`pack: N` end to end on a real embedded Ray: compatible cells run together in grnn_engine.batched, one row each.

The sweep has 5 GRNN cells that pack (a pack of 4 and one cell alone) and 5 DLG cells that cannot. Its rows
must be those of the same sweep with pack 1, i.e. of `run_trial` on each cell (what the unpacked trainable
runs; computed here in-process, which saves a second Ray sweep), as the batched executor promises
(tests/engine/test_batched.py). A packed cell is recognisable in its row: the cells of one pack share the
batch's time, so their wall_s are the same number.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from grnn_engine import TrialSpec, run_trial
from orchestrator import sweep
from orchestrator.progress import Progress, SweepStats
from orchestrator.results import Ledger, load
from orchestrator.running.ledger_callback import LedgerCallback
from orchestrator.running.packing import pack_groups, run_pack
from orchestrator.spec import load_spec

SEEDS = 5
GRNN = {"name": "grnn", "params": {"iterations": 10}, "eval_every": 5}
DLG = {"name": "dlg", "params": {"iterations": 2}, "eval_every": 1}  # no batched loop: runs alone


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory, ray_session: None, make_spec: Any) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("pack")
    spec = make_spec(tmp / "pack.yaml", name="pack", pack=4, grid={"attack": [GRNN, DLG], "seed": SEEDS})
    out: dict[str, Any] = {"spec": spec, "results": tmp / "results", "folder": tmp / "results" / "pack"}
    out["summary"] = sweep.run([str(spec), "--results", str(out["results"])])
    return out


def _by_key(folder: Path) -> dict[str, dict[str, Any]]:
    return {row["trial_key"]: row for row in load(folder).to_dict("records")}


def test_packed_sweep_writes_one_row_per_cell_as_unpacked(packed: dict[str, Any]) -> None:
    rows = _by_key(packed["folder"])
    cells = {c.key(): c for c in load_spec(packed["spec"]).cells()}
    assert len(rows) == 2 * SEEDS and set(rows) == set(cells)
    for key, row in rows.items():
        alone = run_trial(cells[key]).to_row()
        assert set(alone) <= set(row)  # the row's schema: the same keys as an unpacked trial's
        assert row["status"] == alone["status"] == "COMPLETE"
        assert list(row["labels_recovered"]) == list(alone["labels_recovered"])
        # vmapped float32 kernels sum in another order than the one-by-one loop, and 10 optimizer steps amplify
        # that: on this project's CI CPU one GRNN cell of five ends 1.1e-3 dB away (the others within 4e-6). A
        # packing mistake (wrong cell, batch or weights) moves PSNR by whole dB.
        assert row["psnr"] == pytest.approx(alone["psnr"], abs=1e-2)
        assert row["iterations"] == alone["iterations"]
        assert (packed["folder"] / "images" / f"{key}.png").read_bytes()[:4] == b"\x89PNG"
    s = packed["summary"]
    assert (s.cells, s.ran, s.complete) == (2 * SEEDS, 2 * SEEDS, 2 * SEEDS)  # progress counts cells

    # Seeds 0-3 of GRNN ran as one pack (one shared time), seed 4 and every DLG cell alone.
    grnn = sorted((r for r in rows.values() if r["attack"] == "grnn"), key=lambda r: r["seed"])
    assert len({r["wall_s"] for r in grnn[:4]}) == 1
    alone_s = [grnn[4]["wall_s"]] + [r["wall_s"] for r in rows.values() if r["attack"] == "dlg"]
    assert len(set(alone_s)) == len(alone_s) and grnn[0]["wall_s"] not in alone_s


def test_rerun_of_a_packed_sweep_runs_nothing(
    packed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    parts = sorted((packed["folder"] / "parts").glob("*.parquet"))
    before = {p.name: p.stat().st_mtime_ns for p in parts}
    summary = sweep.run([str(packed["spec"]), "--results", str(packed["results"])])
    assert summary is not None and summary.ran == 0
    assert {p.name: p.stat().st_mtime_ns for p in parts} == before
    assert "nothing to run" in capsys.readouterr().out


def test_cells_of_an_interrupted_pack_without_rows_run_again_packed(packed: dict[str, Any]) -> None:
    """As after a pack killed with its driver: two of its cells have rows, two do not; only those two run."""
    folder = packed["folder"]
    grnn = sorted((r for r in _by_key(folder).values() if r["attack"] == "grnn"), key=lambda r: r["seed"])
    lost = [r["trial_key"] for r in grnn[:2]]
    (folder / "trials.parquet").unlink()
    for key in lost:
        (folder / "parts" / f"{key}.parquet").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in (folder / "parts").glob("*.parquet")}

    summary = sweep.run([str(packed["spec"]), "--results", str(packed["results"])])
    assert summary is not None and summary.ran == 2
    after = {p.name: p.stat().st_mtime_ns for p in (folder / "parts").glob("*.parquet")}
    assert {name: after[name] for name in kept} == kept and len(after) == 2 * SEEDS
    rows = _by_key(folder)
    assert rows[lost[0]]["wall_s"] == rows[lost[1]]["wall_s"]  # the two ran as a pack of 2
    assert rows[lost[0]]["psnr"] == pytest.approx(grnn[0]["psnr"], abs=1e-3)


def test_pack_groups_keeps_incompatible_cells_alone() -> None:
    grnn = [TrialSpec(attack="grnn", seed=s) for s in range(5)]
    dlg = TrialSpec(attack="dlg")
    groups = pack_groups({c.key(): c for c in [*grnn, dlg]}, 4)
    assert groups == {
        f"pack4-{grnn[0].key()}": [c.key() for c in grnn[:4]],
        grnn[4].key(): [grnn[4].key()],
        dlg.key(): [dlg.key()],
    }


def test_a_pack_that_cannot_run_batched_runs_its_cells_one_by_one() -> None:
    """One cell's bad data fails the batched run; each cell then gets the row it would have had alone."""
    good = TrialSpec(attack="grnn", attack_params={"iterations": 4}, eval_every=2, device="cpu", seed=1)
    bad = TrialSpec(
        attack="grnn", attack_params={"iterations": 4}, eval_every=2, device="cpu", indices=[10**6]
    )
    results = list(run_pack([good, bad], None, trial_timeout_s=120))
    assert [r.status for r in results] == ["COMPLETE", "FAILED"]
    assert results[0].to_row()["psnr"] == run_trial(good).to_row()["psnr"]
    assert results[1].error_type == "ConfigError" and str(10**6) in (results[1].error or "")


def test_a_pack_past_its_time_limit_gives_each_cell_a_timeout_row() -> None:
    slow = [
        TrialSpec(attack="grnn", attack_params={"iterations": 10**7}, device="cpu", seed=s) for s in (0, 1)
    ]
    start = time.monotonic()
    results = list(run_pack(slow, None, trial_timeout_s=1.0))
    assert [r.status for r in results] == ["TIMEOUT", "TIMEOUT"]
    assert "2 x trial_timeout_s" in (results[0].error or "")
    assert 2.0 <= time.monotonic() - start < 60  # the pack's limit is its size times trial_timeout_s


class _DeadTrial:
    """What the driver knows of a Tune trial whose worker process died: its config and error text."""

    def __init__(self, key: str) -> None:
        self.config = {"trial_key": key}
        self.trial_id = key

    def get_error(self) -> str:
        return "ray.exceptions.ActorDiedError: the actor died unexpectedly"


def test_a_dead_pack_gets_a_failed_row_for_each_cell_still_without_one(tmp_path: Path) -> None:
    specs = [
        TrialSpec(attack="grnn", attack_params={"iterations": 2}, eval_every=1, seed=s) for s in range(3)
    ]
    cells = {c.key(): c for c in specs}
    keys = list(cells)
    ledger = Ledger(tmp_path / "dead", sweep="dead")
    callback = LedgerCallback(ledger, cells, Progress(SweepStats(total=3), live=False), trial_timeout_s=600)
    callback.packs = {"pack3-x": keys}
    trial = _DeadTrial("pack3-x")
    callback.on_trial_start(0, [], trial)
    assert callback.progress.stats.running == set(keys)
    callback.write_row(
        run_trial(cells[keys[0]]).to_row(), None
    )  # the one cell that reported before the death
    callback.on_trial_error(0, [], trial)  # a row for each cell the pack still owes
    callback.on_trial_error(0, [], trial)  # the same trial ending again writes nothing twice
    df = load(ledger.folder)
    assert sorted(df["trial_key"]) == sorted(keys)
    status = dict(zip(df["trial_key"], df["status"], strict=True))
    assert status == {keys[0]: "COMPLETE", keys[1]: "FAILED", keys[2]: "FAILED"}
    assert set(df.loc[df["status"] == "FAILED", "error_type"]) == {"WorkerDied"}
    assert callback.progress.stats.done == 3 and not callback.progress.stats.running
