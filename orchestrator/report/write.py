"""Writing a sweep's report: every section in report order, laid out as HTML (and Markdown), figures beside
it; `main` is `python -m orchestrator.report`."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from grnn_engine.cli_values import OneLineParser, user_error
from grnn_engine.errors import ConfigError, DataError, GrnnError
from orchestrator.report.breakpoints import report_part
from orchestrator.report.convergence import convergence_section
from orchestrator.report.faces import faces_sections
from orchestrator.report.failures import failures_section
from orchestrator.report.gallery import gallery_section
from orchestrator.report.heatmaps import heatmaps_section
from orchestrator.report.layout import html_page, markdown_page
from orchestrator.report.privacy_utility import privacy_utility_section
from orchestrator.report.run_facts import run_facts
from orchestrator.report.section import Section
from orchestrator.report.selection import with_settings
from orchestrator.report.success_table import success_section
from orchestrator.results import Ledger, load

__all__ = ["REPORT_DIR", "Report", "main", "report_sections", "write_report"]

REPORT_DIR = "report"
# The figures a report writes: an earlier report's are removed first, so none is left from a sweep's past.
_OWN_PNG = re.compile(r"^(heatmap_.*|convergence|privacy_utility|gallery|faces_gallery_.*)\.png$")


@dataclass
class Report:
    """What write_report wrote: the folder, the HTML (and Markdown) file, the figures, and skip notes."""

    folder: Path
    html: Path
    markdown: Path | None = None
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def report_sections(result_dir: Path, df: pd.DataFrame, out: Path, written: list[Path]) -> list[Section]:
    """Every section of the report of `result_dir` (rows `df`) in report order, figures saved in `out`:
    the success table, breaking points (a breaking-point search only), heatmaps, convergence, privacy vs
    utility, galleries, face re-identification (sweeps with `reid` only), failures."""
    d = with_settings(df)
    return [
        success_section(d),
        *report_part(result_dir, d),
        heatmaps_section(d, out, written),
        convergence_section(d, out, written),
        privacy_utility_section(d, out, written),
        gallery_section(result_dir, d, out, written),
        *faces_sections(result_dir, d, out, written),
        failures_section(d),
    ]


def write_report(result_dir: str | Path, out: str | Path | None = None, fmt: str = "html") -> Report:
    """Write the report of the sweep in `result_dir` to `out` (default `<result_dir>/report/`).

    fmt "html" writes index.html and the PNGs; "md" also report.md. Raises DataError when `result_dir`
    is not a results folder or holds no trials, ConfigError for an unknown fmt.
    """
    if fmt not in ("html", "md"):
        raise ConfigError(f"report format '{fmt}' is not known; allowed: html, md")
    folder = Path(result_dir)
    if not folder.is_dir() or not Ledger(folder).exists():
        raise DataError(
            f"{folder} is not a sweep results folder (it has no spec.yaml, parts/ or trials.parquet); "
            f"give results/<sweep name>"
        )
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = load(folder)
    notes += [f"{w.message}" for w in caught if "results file" in str(w.message)]
    if df.empty:
        raise DataError(
            f"{folder} holds no trial results yet (its table is empty); run or resume the sweep first"
        )
    target = Path(out) if out is not None else folder / REPORT_DIR
    target.mkdir(parents=True, exist_ok=True)
    for old in target.iterdir():  # figures of an earlier report that this one may not redraw
        if _OWN_PNG.match(old.name) and old.is_file():
            old.unlink()
    written: list[Path] = []
    sections = report_sections(folder, df, target, written)
    for s in sections:
        notes += [f"{s.title}: {n}" for n in s.notes]
    facts = run_facts(folder, df)
    title = f"Sweep report: {folder.name}"
    index = target / "index.html"
    index.write_text(html_page(title, facts, sections), encoding="utf-8")
    report = Report(folder=target, html=index, figures=written, notes=notes)
    if fmt == "md":
        report.markdown = target / "report.md"
        report.markdown.write_text(markdown_page(title, facts, sections), encoding="utf-8")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m orchestrator.report",
        description="Figures and tables of a sweep's results: <folder>/report/index.html (and report.md).",
    )
    parser.add_argument("folder", help="the sweep's results folder, e.g. results/quickstart")
    parser.add_argument(
        "--format",
        choices=("html", "md"),
        default="html",
        help="html: index.html and PNGs; md: also report.md (default: html)",
    )
    parser.add_argument("--out", default=None, help="write here instead of <folder>/report/")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.folder, args.out, args.format)
    except GrnnError as err:
        return user_error(err)
    print(f"wrote {report.html} ({len(report.figures)} figures)")
    if report.markdown is not None:
        print(f"wrote {report.markdown}")
    return 0
