"""One section of a sweep report, as plain data: what every section module builds and the layout writes.

`NotApplicable` is how a figure says the table has no axis for it; `figure_section` turns that into the
section's skip note, so a report of any sweep opens with every section present.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from grnn_engine.errors import ConfigError

if TYPE_CHECKING:  # matplotlib only where a figure is drawn
    from matplotlib.figure import Figure

__all__ = ["NotApplicable", "Section", "figure_section", "save_figure"]


class NotApplicable(ConfigError):
    """The table has no axis for this figure (one fl_round, no utility column, no images)."""


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


def figure_section(
    title: str, intro: str, build: Callable[[], Figure], folder: Path, name: str, written: list[Path]
) -> Section:
    """A section of one figure, `build()` saved as folder/<name>.png; a note instead when it is NotApplicable."""
    section = Section(title, intro)
    try:
        fig = build()
    except NotApplicable as err:
        section.notes.append(f"Skipped: {err}.")
        return section
    section.figures.append((save_figure(fig, folder, name, written), title))
    return section
