"""The report's run facts: which sweep, which spec, how many trials, how much compute, on what, with what."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from grnn_engine.errors import GrnnError
from orchestrator.report.labels import unique_text
from orchestrator.report.selection import COMPLETE, FAILED_STATUSES
from orchestrator.results import Ledger

__all__ = ["run_facts"]


def _counts(series: pd.Series) -> str:
    counts = series.dropna().astype(str).value_counts()
    return ", ".join(f"{v} x {n}" for v, n in counts.items()) or "unknown"


def run_facts(result_dir: str | Path, df: pd.DataFrame) -> dict[str, str]:
    """The run in facts, label -> text: the sweep, spec hash, trials, compute time, hardware, versions;
    key "spec" holds spec.yaml as run (without its hash line)."""
    folder = Path(result_dir)
    ledger = Ledger(folder)
    facts: dict[str, str] = {"sweep": folder.name}
    cells: int | None = None
    spec_text = ""
    if ledger.spec_path.is_file():
        spec_text = "".join(
            line
            for line in ledger.spec_path.read_text(encoding="utf-8").splitlines(keepends=True)
            if not line.startswith("# spec_hash:")
        )
        from orchestrator.spec import load_spec  # imports the engine's registries: only when there is a spec

        try:
            spec = load_spec(ledger.spec_path)
            facts["sweep"] = spec.name + (f": {spec.description}" if spec.description else "")
            cells = len(spec.cells())
        except GrnnError as err:
            facts["cells in spec"] = f"unknown (spec.yaml no longer loads: {err})"
    facts["results folder"] = str(folder)
    facts["spec hash"] = ledger.spec_hash() or "unknown (no spec.yaml)"
    if cells is not None:
        facts["cells in spec"] = str(cells)
    status = df["status"] if "status" in df.columns else pd.Series(dtype=object)
    n = len(df)
    counted = ", ".join(f"{int((status == s).sum())} {s.lower()}" for s in (COMPLETE, *FAILED_STATUSES))
    pending = f", {cells - n} not run" if cells is not None and cells > n else ""
    facts["trials"] = f"{n} ({counted}{pending})"
    wall = pd.to_numeric(df.get("wall_s", pd.Series(dtype=float)), errors="coerce").dropna()
    if len(wall):
        facts["compute time"] = (
            f"{wall.sum() / 3600:.2f} h summed over trials ({wall.mean():.1f} s per trial, longest {wall.max():.1f} s)"
        )
    if "finished_at" in df.columns and df["finished_at"].notna().any():
        first, last = df["finished_at"].min(), df["finished_at"].max()
        facts["finished"] = f"{first:%Y-%m-%d %H:%M} to {last:%Y-%m-%d %H:%M} UTC"
    hosts = df["hostname"].nunique() if "hostname" in df.columns else 0
    facts["hardware"] = (
        f"devices: {_counts(df.get('device', pd.Series(dtype=object)))}; {hosts} host{'s' if hosts != 1 else ''}"
    )
    facts["versions"] = (
        f"project {unique_text(df, 'project_version')} (git {unique_text(df, 'git_sha')}), torch {unique_text(df, 'torch_version')}"
        + (f", ray {unique_text(df, 'ray_version')}" if "ray_version" in df.columns else "")
    )
    facts["spec"] = spec_text
    return facts
