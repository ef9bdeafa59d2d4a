"""The analysis report of a sweep: figures and tables from its results table, as HTML (and Markdown).

    python -m orchestrator.report results/<sweep> [--format html|md] [--out DIR]

writes `results/<sweep>/report/` (or DIR): one PNG per figure and `index.html` that shows them with the
tables inline; it opens from disk and fetches nothing. `--format md` also writes `report.md`. Everything
comes from the results table (`orchestrator.results.load`) and images/; nothing is recomputed from logs.

Each figure is a function that takes the DataFrame and returns a matplotlib Figure, for notebooks:
`robustness_heatmap`, `convergence_figure`, `privacy_utility_figure`, `gallery_figure`,
`reid_gallery_figure`; the tables are `success_table`, `failures_table`, `reid_table`, `breaking_points`,
`run_facts`; `heatmap_values` holds the numbers a heatmap shows. A figure the data has no axis for (one
fl_round, no utility column) raises `NotApplicable`, which the report turns into a note. A figure never
pools rows of different settings silently (see `selection`).

One module per section, each holding its figure or table and the `Section` it adds to the report:
success_table, breakpoints, heatmaps, convergence, privacy_utility, gallery, faces, failures. They share
labels (how values read), selection (setting labels, slices, metric values) and section (`Section`,
`save_figure`); layout writes the HTML and Markdown, run_facts the facts at the top, write puts it together
(`write_report`, `main`). Every name below is importable from here.
"""

from __future__ import annotations

from orchestrator.report.breakpoints import (
    STRENGTH,
    breaking_points,
    grid_position,
    report_part,
    within_one_step,
)
from orchestrator.report.convergence import convergence_figure
from orchestrator.report.faces import faces_sections, has_reid, reid_gallery_figure, reid_table
from orchestrator.report.failures import failures_table
from orchestrator.report.gallery import gallery_figure
from orchestrator.report.heatmaps import heatmap_values, robustness_heatmap
from orchestrator.report.privacy_utility import pareto_front, privacy_utility_figure, privacy_utility_values
from orchestrator.report.run_facts import run_facts
from orchestrator.report.section import NotApplicable, Section, save_figure
from orchestrator.report.selection import METRICS, defense_settings, with_settings
from orchestrator.report.success_table import success_table
from orchestrator.report.write import Report, main, write_report

__all__ = [
    "METRICS",
    "STRENGTH",
    "NotApplicable",
    "Report",
    "Section",
    "breaking_points",
    "convergence_figure",
    "defense_settings",
    "faces_sections",
    "failures_table",
    "gallery_figure",
    "grid_position",
    "has_reid",
    "heatmap_values",
    "main",
    "pareto_front",
    "privacy_utility_figure",
    "privacy_utility_values",
    "reid_gallery_figure",
    "reid_table",
    "report_part",
    "robustness_heatmap",
    "run_facts",
    "save_figure",
    "success_table",
    "with_settings",
    "within_one_step",
    "write_report",
]
