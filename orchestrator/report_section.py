"""One section of a sweep report, as plain data: what orchestrator.report lays out as HTML or Markdown.

Its own module so that the report's parts (orchestrator.breakpoints, orchestrator.faces_report) build
sections without importing the report, which imports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:  # matplotlib only where a figure is drawn (breakpoints.py imports this module without it)
    from matplotlib.figure import Figure

__all__ = ["Section", "save_figure"]


@dataclass
class Section:
    """A titled part of the report: an introduction, figures (file name, caption), a table, skip notes."""

    title: str
    intro: str = ""
    figures: list[tuple[str, str]] = field(default_factory=list)
    table: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)


def save_figure(fig: Figure, folder: Path, name: str, written: list[Path]) -> str:
    """Write `fig` as folder/<name>.png, record the path in `written`, return the file name."""
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=110)
    written.append(path)
    return path.name
