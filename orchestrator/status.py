"""`python -m orchestrator.status results/<name>`: a sweep's progress from its ledger alone.

Needs no Ray and no running driver: cells come from the spec.yaml the sweep wrote, results from the
parts and trials.parquet, so it works while the sweep runs (locally or as a cluster job writing to
this folder) and after it ended. Exit 2 with one sentence when the folder is not a results folder.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grnn_engine.cli_values import OneLineParser, run_command, user_error
from grnn_engine.errors import GrnnError
from orchestrator.results import Ledger


@dataclass
class SweepStatus:
    """Counts of a sweep's cells by outcome, and PSNR over the complete ones."""

    name: str
    folder: str
    cells: int | None  # None when spec.yaml is missing or no longer loads
    complete: int
    failed: int
    timeout: int
    other: int  # rows whose key is not a cell of spec.yaml
    psnr_best: float | None
    psnr_worst: float | None
    psnr_mean: float | None
    last: dict[str, Any] | None
    note: str = ""

    @property
    def finished(self) -> int:
        return self.complete + self.failed + self.timeout

    @property
    def pending(self) -> int | None:
        return None if self.cells is None else max(0, self.cells - self.finished)

    def format(self) -> str:
        total = f"{self.cells} cells" if self.cells is not None else "cells unknown"
        lines = [f"sweep '{self.name}' ({self.folder}): {total}"]
        pending = "?" if self.pending is None else str(self.pending)
        share = f"   ({self.finished / self.cells:.0%} done)" if self.cells else ""
        lines.append(
            f"  complete {self.complete}  failed {self.failed}  timeout {self.timeout}  pending {pending}{share}"
        )
        if self.other:
            lines.append(f"  {self.other} rows belong to cells that are not in spec.yaml")
        if self.psnr_best is not None:
            lines.append(
                f"  PSNR of complete trials: best {self.psnr_best:.2f}  worst {self.psnr_worst:.2f}  "
                f"mean {self.psnr_mean:.2f} dB"
            )
        if self.last:
            psnr = self.last.get("psnr")
            score = f" psnr {psnr:.2f}" if isinstance(psnr, float) and math.isfinite(psnr) else ""
            stamp: Any = self.last.get("finished_at")
            when = stamp.strftime("%Y-%m-%d %H:%M:%S UTC") if hasattr(stamp, "strftime") else str(stamp)
            lines.append(
                f"  last finished: {when} {self.last.get('trial_key')} {self.last.get('attack')} "
                f"{self.last.get('victim')} bs={self.last.get('batch_size')} "
                f"defense={self.last.get('defense')} seed={self.last.get('seed')} -> {self.last.get('status')}{score}"
            )
        if self.note:
            lines.append(f"  note: {self.note}")
        return "\n".join(lines)


class NotResultsFolder(Exception):
    pass


def sweep_status(folder: str | Path) -> SweepStatus:
    """The status of the sweep whose results are in `folder`."""
    ledger = Ledger(folder)
    if not Path(folder).is_dir() or not ledger.exists():
        raise NotResultsFolder(
            f"{folder} is not a sweep results folder (it has no spec.yaml, parts/ or trials.parquet); "
            f"give results/<sweep name>"
        )
    keys: set[str] | None = None
    note = ""
    name = ledger.folder.name
    if ledger.spec_path.is_file():
        from orchestrator.spec import load_spec  # imports the engine's registries: only when needed

        try:
            spec = load_spec(ledger.spec_path)
            keys = {c.key() for c in spec.cells()}
            name = spec.name
        except GrnnError as err:
            note = f"spec.yaml no longer loads, so the number of cells is unknown: {err}"
    else:
        note = "no spec.yaml, so the number of cells is unknown"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = ledger.load()
    if caught:
        note = (note + "; " if note else "") + f"{len(caught)} unreadable results files skipped"
    other = 0
    if keys is not None and len(df):
        mine = df["trial_key"].isin(keys)
        other = int((~mine).sum())
        df = df[mine]
    counts = df["status"].value_counts().to_dict() if len(df) else {}
    psnr: list[float] = []
    if len(df):
        values = df.loc[df["status"] == "COMPLETE", "psnr"].dropna().tolist()
        psnr = [float(v) for v in values if math.isfinite(v)]
    last = None
    if len(df) and "finished_at" in df.columns and df["finished_at"].notna().any():
        last = df.loc[df["finished_at"].idxmax()].to_dict()
    return SweepStatus(
        name=name,
        folder=str(folder),
        cells=len(keys) if keys is not None else None,
        complete=int(counts.get("COMPLETE", 0)),
        failed=int(counts.get("FAILED", 0)),
        timeout=int(counts.get("TIMEOUT", 0)),
        other=other,
        psnr_best=max(psnr) if psnr else None,
        psnr_worst=min(psnr) if psnr else None,
        psnr_mean=sum(psnr) / len(psnr) if psnr else None,
        last=last,
        note=note,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m orchestrator.status", description="Progress of a sweep, read from its results folder."
    )
    parser.add_argument("folder", help="the sweep's results folder, e.g. results/quickstart")
    args = parser.parse_args(argv)
    try:
        print(sweep_status(args.folder).format())
    except NotResultsFolder as err:
        return user_error(err)
    return 0


if __name__ == "__main__":
    run_command(main)
