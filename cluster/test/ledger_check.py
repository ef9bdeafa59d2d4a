"""Ledger facts for `make cluster-test` (cluster/test/cluster_test.sh), read from the results folders alone.

    python cluster/test/ledger_check.py snapshot FOLDER            # JSON: each part's identity (key -> file stamp)
    python cluster/test/ledger_check.py report --slurm F --onprem F --snapshots DIR --seconds S

A part is one finished trial (`parts/<key>.parquet`, written once, atomically). A trial that ran again
rewrites its part, so a changed stamp (inode, size, mtime) between two snapshots means the trial ran again.
`report` prints the one JSON line of the test and exits 1 when a count is wrong, naming it on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from orchestrator.results import PARTS_DIR, TRIALS_FILE, Ledger
from orchestrator.spec import load_spec

Snapshot = dict[str, list[int]]


def snapshot(folder: Path) -> Snapshot:
    parts = folder / PARTS_DIR
    out: Snapshot = {}
    for path in sorted(parts.glob("*.parquet")) if parts.is_dir() else []:
        st = path.stat()
        out[path.stem] = [st.st_ino, st.st_size, st.st_mtime_ns]
    return out


def changed(before: Snapshot, after: Snapshot) -> list[str]:
    """Keys whose part was written after `before` was taken: new parts and rewritten ones."""
    return sorted(k for k, stamp in after.items() if before.get(k) != stamp)


def duplicates(folder: Path) -> int:
    """Rows beyond the first per trial_key, in the parts and in the compacted trials.parquet."""
    extra = 0
    keys: Counter[str] = Counter()
    for path in (folder / PARTS_DIR).glob("*.parquet"):
        keys.update(pq.read_table(path, columns=["trial_key"]).column("trial_key").to_pylist())
    extra += sum(n - 1 for n in keys.values() if n > 1)
    trials = folder / TRIALS_FILE
    if trials.exists():
        compacted = Counter(pq.read_table(trials, columns=["trial_key"]).column("trial_key").to_pylist())
        extra += sum(n - 1 for n in compacted.values() if n > 1)
    return extra


def ledger_facts(folder: Path) -> dict[str, Any]:
    df = Ledger(folder).load()
    cells = {c.key() for c in load_spec(folder / "spec.yaml").cells()}
    keys = set(df["trial_key"])
    return {
        "rows": len(df),
        "complete": int((df["status"] == "COMPLETE").sum()),
        "cells": len(cells),
        "missing": sorted(cells - keys),
        "dup": duplicates(folder),
    }


def load_snapshot(path: Path) -> Snapshot:
    loaded = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def report(args: argparse.Namespace) -> int:
    """The test's verdict. Snapshots of the Slurm ledger: `cancel-at` once the cancelled job had ended,
    `slurm-1` after the resubmitted job finished the sweep, `slurm-2` after the third submission."""
    snaps = Path(args.snapshots)
    problems: list[str] = []

    slurm = ledger_facts(Path(args.slurm))
    at_cancel, first, second = (load_snapshot(snaps / f"{n}.json") for n in ("cancel-at", "slurm-1", "slurm-2"))
    rerun_ran = len(changed(first, second))
    lost = sorted(set(at_cancel) - set(second))  # rows there when the job was cancelled, gone later
    redone = sorted(set(at_cancel) & set(changed(at_cancel, second)))  # finished before the cancel, ran again
    onprem = ledger_facts(Path(args.onprem))

    for name, facts in (("slurm", slurm), ("onprem", onprem)):
        if facts["rows"] != facts["cells"] or facts["missing"]:
            problems.append(f"{name}: {facts['rows']} rows for {facts['cells']} cells, missing {facts['missing']}")
        if facts["complete"] != facts["cells"]:
            problems.append(f"{name}: {facts['complete']} of {facts['cells']} rows COMPLETE")
        if facts["dup"]:
            problems.append(f"{name}: {facts['dup']} duplicated rows")
    if rerun_ran:
        problems.append(f"slurm: resubmitting the finished sweep ran {rerun_ran} trials again")
    if not at_cancel or len(at_cancel) >= slurm["cells"]:
        problems.append(f"slurm: the cancelled job had {len(at_cancel)} rows, not some of {slurm['cells']}")
    if lost:
        problems.append(f"slurm: rows lost after the cancel: {lost}")
    if redone:
        problems.append(f"slurm: trials finished before the cancel ran again: {redone}")

    line = {
        "slurm": {
            "rows": slurm["rows"], "complete": slurm["complete"], "dup": slurm["dup"] + len(redone),
            "rerun_ran": rerun_ran, "after_cancel_lost": len(lost),
        },
        "onprem": {"rows": onprem["rows"], "complete": onprem["complete"]},
        "seconds": round(float(args.seconds)),
    }
    print(json.dumps(line))
    for problem in problems:
        print(f"cluster-test: FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ledger_check.py")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("snapshot").add_argument("folder")
    r = sub.add_parser("report")
    for flag in ("--slurm", "--onprem", "--snapshots", "--seconds"):
        r.add_argument(flag, required=True)
    args = p.parse_args(argv)
    if args.command == "snapshot":
        print(json.dumps(snapshot(Path(args.folder))))
    else:
        return report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
