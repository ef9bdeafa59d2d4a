"""The report's reconstruction gallery: truth above reconstruction, from the images/ of a results folder,
for the best and worst trials by PSNR and the median trial of each attack setting."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from orchestrator.report.labels import show
from orchestrator.report.section import NotApplicable, Section, figure_section
from orchestrator.report.selection import metric_values, with_settings
from orchestrator.results import IMAGES_DIR

__all__ = ["gallery_figure", "gallery_section"]

_GALLERY_MAX_IMAGES = 8


def _gallery_picks(result_dir: Path, df: pd.DataFrame) -> list[tuple[str, pd.Series, Path]]:
    d = with_settings(df)
    d = d.assign(_psnr=metric_values(d, "psnr"))
    d = d[d["_psnr"].notna()]
    d = d[[(result_dir / IMAGES_DIR / f"{k}.png").is_file() for k in d["trial_key"]]]
    if d.empty:
        return []
    picks: list[tuple[str, pd.Series]] = [
        ("best", d.loc[d["_psnr"].idxmax()]),
        ("worst", d.loc[d["_psnr"].idxmin()]),
    ]
    for attack, rows in sorted(d.groupby("attack_setting"), key=lambda item: str(item[0])):
        ordered = rows.sort_values(["_psnr", "trial_key"])
        picks.append((f"median {attack}", ordered.iloc[(len(ordered) - 1) // 2]))
    merged: dict[str, tuple[list[str], pd.Series]] = {}
    for label, row in picks:
        merged.setdefault(row["trial_key"], ([], row))[0].append(label)
    return [
        (", ".join(labels), row, result_dir / IMAGES_DIR / f"{key}.png")
        for key, (labels, row) in merged.items()
    ]


def gallery_figure(result_dir: str | Path, df: pd.DataFrame, max_images: int = _GALLERY_MAX_IMAGES) -> Figure:
    """Truth (top) vs matched reconstruction (bottom) from images/: the best and worst trials by PSNR and
    the median trial of each attack; batches wider than `max_images` show their first images.
    Raises NotApplicable when no complete trial has an image."""
    from PIL import Image

    picks = _gallery_picks(Path(result_dir), df)
    if not picks:
        raise NotApplicable(
            f"no complete trial in {result_dir} has an image under {IMAGES_DIR}/, so there is no gallery"
        )
    grids = []
    for label, row, path in picks:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
        batch = int(row["batch_size"])
        shown = min(batch, max_images)
        cell = (array.shape[1] - 2) / max(batch, 1)  # make_grid: padding 2 around and between images
        array = array[:, : int(round(2 + shown * cell))]
        grids.append((label, row, array, batch, shown))
    cols = 1 if len(grids) <= 2 else 2
    n_rows = math.ceil(len(grids) / cols)
    aspect = max(a.shape[1] / a.shape[0] for _, _, a, _, _ in grids)  # width / height of the widest grid
    fig = Figure(figsize=(cols * max(4.6, 1.0 + 2.2 * aspect), 2.9 * n_rows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    for k, (label, row, array, batch, shown) in enumerate(grids):
        ax = fig.add_subplot(n_rows, cols, k + 1)
        ax.imshow(array, interpolation="nearest")
        h = array.shape[0]
        ax.set_yticks([h / 4, 3 * h / 4], ["truth", "recon."], fontsize=8)
        ax.set_xticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        more = f" (first {shown})" if shown < batch else ""
        ax.set_title(
            f"{label}: {row['psnr']:.1f} dB\n{row['attack_setting']} vs {row['victim']} on {row['dataset']}\n"
            f"batch {batch}{more}, {row['defense_setting']}, seed {show(row['seed'])}",
            fontsize=8.5,
        )
    fig.suptitle("Reconstructions: truth (top row) vs matched reconstruction (bottom row)", fontsize=11)
    return fig


def gallery_section(result_dir: Path, d: pd.DataFrame, folder: Path, written: list[Path]) -> Section:
    """The "Reconstructions" section of the sweep in `result_dir`, whose rows (with settings) are `d`."""
    return figure_section(
        "Reconstructions",
        "Truth above reconstruction, from images/.",
        lambda: gallery_figure(result_dir, d),
        folder,
        "gallery",
        written,
    )
