"""The report's face re-identification section: how much of who-is-who a reconstruction gives away.

Only sweeps run with `reid` set (sweeps/faces.yaml) get it; their rows carry the reid_* columns
(grnn_engine.reid). Two parts:
- `reid_table`: per attack x batch size x defense (and any other setting that varies), the share of
  attacked photos whose reconstruction re-identifies the true person first (top-1) and among the first
  five (top-5), next to the same for the clean photo (the ceiling: a perfect reconstruction) and for
  uniform noise (the floor: chance).
- `reid_gallery_figure`: per attacked photo, the true photo, its reconstruction and a gallery photo of
  the identity the identifier ranked first for it, framed green (hit: the true person) or red (miss).
  The gallery photo comes from the dataset (`reid.matched_gallery`), so the data must be readable where
  the report is made: the spec's data.root, else $GRNN_DATA_ROOT.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from grnn_engine.errors import GrnnError
from orchestrator.report.labels import norm, slug
from orchestrator.report.section import NotApplicable, Section, save_figure
from orchestrator.report.selection import (
    COMPLETE,
    context_columns,
    defense_rank,
    index_sort_key,
    select,
    varying,
    with_settings,
)
from orchestrator.results import IMAGES_DIR, Ledger

__all__ = ["data_root_of", "faces_sections", "has_reid", "reid_gallery_figure", "reid_table"]

_GALLERY_MAX_PHOTOS = 16
_TILES_PER_ROW = 4
_HIT, _MISS = "#1a9641", "#d7191c"
# (table column, row column): each probe's top-1 and top-5 rate, the attack's next to its ceiling and floor.
_RATES = (
    ("top-1 attack", "reid_top1"),
    ("top-1 clean (ceiling)", "reid_clean_top1"),
    ("top-1 noise (floor)", "reid_random_top1"),
    ("top-5 attack", "reid_top5"),
    ("top-5 clean (ceiling)", "reid_clean_top5"),
    ("top-5 noise (floor)", "reid_random_top5"),
    ("mean rank attack", "reid_rank"),
)


def _reid_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Complete rows that carry reid results."""
    if "reid_top1" not in df.columns or "status" not in df.columns:
        return df.iloc[0:0]
    top1 = pd.to_numeric(df["reid_top1"], errors="coerce")
    return df[(df["status"] == COMPLETE) & top1.notna()]


def _reid_rows_or_raise(df: pd.DataFrame) -> pd.DataFrame:
    """The complete reid rows of `df` with setting labels; NotApplicable when there are none."""
    d = _reid_rows(with_settings(df))
    if d.empty:
        raise NotApplicable("no complete trial has re-identification columns (the sweep ran without `reid`)")
    return d


def has_reid(df: pd.DataFrame) -> bool:
    """True when some complete trial of the table was re-identified (the sweep ran with `reid` set)."""
    return not _reid_rows(df).empty


def _index_columns(d: pd.DataFrame) -> list[str]:
    extra = [c for c in varying(d, context_columns(d)) if c != "victim"]
    return ["attack_setting", "victim", *extra, "batch_size", "defense_setting"]


def reid_table(df: pd.DataFrame) -> pd.DataFrame:
    """Re-identification rates of complete trials per attack, victim, any other varying setting, batch
    size and defense: each rate is the share of attacked photos (every image of every seed's batch), the
    mean rank is over the same photos. Raises NotApplicable when no trial has reid columns."""
    d = _reid_rows_or_raise(df)
    index = _index_columns(d)
    rank = defense_rank(d)
    records = []
    for _, cell in d.groupby([d[c].map(norm) for c in index], sort=False):
        first = cell.iloc[0]
        weights = pd.to_numeric(cell["batch_size"]).astype(float)  # each row's rates are over its batch
        record: dict[str, Any] = {c: first[c] for c in index}
        record["photos"] = int(weights.sum())
        for name, column in _RATES:
            values = pd.to_numeric(cell[column], errors="coerce").astype(float)
            record[name] = float((values * weights).sum() / weights.sum())
        records.append(record)
    table = pd.DataFrame(sorted(records, key=lambda r: index_sort_key(index, [r[c] for c in index], rank)))
    names = {"attack_setting": "attack", "defense_setting": "defense", "batch_size": "batch"}
    table = table.rename(columns=names).set_index([names.get(c, c) for c in index])
    shown = {name: table[name].map(lambda v: f"{v:.2f}") for name, _ in _RATES[:-1]}
    return table.assign(**shown, **{"mean rank attack": table["mean rank attack"].map(lambda v: f"{v:.1f}")})


# ---------------------------------------------------------------------------------------------- gallery


def data_root_of(result_dir: str | Path) -> str | None:
    """The data root the sweep was run with (spec.yaml's data.root), or None ($GRNN_DATA_ROOT)."""
    path = Ledger(Path(result_dir)).spec_path
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    data = spec.get("data") if isinstance(spec, dict) else None
    root = data.get("root") if isinstance(data, dict) else None
    return str(root) if root else None


def _crops(path: Path, batch: int, size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(true photos, matched reconstructions) cut from images/<key>.png: make_grid's two rows of `batch`
    images of `size` pixels with 2 pixels of padding around and between them."""
    from PIL import Image

    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"))
    step = size + 2
    top = [array[2 : 2 + size, 2 + i * step : 2 + i * step + size] for i in range(batch)]
    bottom = [array[2 + step : 2 + step + size, 2 + i * step : 2 + i * step + size] for i in range(batch)]
    return top, bottom


def _tiles(result_dir: Path, rows: pd.DataFrame, root: str | None, max_photos: int) -> list[dict[str, Any]]:
    from grnn_engine.reid import matched_gallery  # the engine's torch import only when a gallery is drawn

    tiles: list[dict[str, Any]] = []
    for _, row in rows.iterrows():
        path = result_dir / IMAGES_DIR / f"{row['trial_key']}.png"
        if not path.is_file():
            continue
        truth, recon = _crops(path, int(row["batch_size"]), int(row["image_size"]))
        ranks = [int(r) for r in row["reid_rank_per_image"]]
        for match in matched_gallery(row.to_dict(), root=root):
            gallery = (match.image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype("uint8")
            tiles.append(
                {
                    "truth": truth[match.position], "recon": recon[match.position], "gallery": gallery,
                    "hit": match.hit, "true": match.true_name, "matched": match.identity_name,
                    "rank": ranks[match.position], "defense": row["defense_setting"], "seed": row["seed"],
                }
            )  # fmt: skip
            if len(tiles) == max_photos:
                return tiles
    return tiles


def reid_gallery_figure(
    result_dir: str | Path,
    df: pd.DataFrame,
    where: Mapping[str, Any] | None = None,
    max_photos: int = _GALLERY_MAX_PHOTOS,
    root: str | None = None,
) -> Figure:
    """Per attacked photo of one attack setting: the photo, its reconstruction and a gallery photo of
    the identity ranked first for the reconstruction, green when that is the true person (top-1 hit),
    red when not (with the true person's rank). Shows the smallest batch size, the weakest defense
    first, up to `max_photos` photos; `where` fixes columns (attack_setting, victim, fl_round, ...) so
    that one setting remains. `root`: where the data is (None: the spec's data.root, else
    $GRNN_DATA_ROOT). Raises NotApplicable when no trial has reid columns and an image."""
    folder = Path(result_dir)
    d = _reid_rows_or_raise(df)
    single = ["attack_setting", *context_columns(d)]
    d = select(d, where, single=single, what="the re-identification gallery")
    d = d[pd.to_numeric(d["batch_size"]) == pd.to_numeric(d["batch_size"]).min()]
    rank = defense_rank(d)
    d = d.assign(_strength=d["defense_setting"].map(rank)).sort_values(["_strength", "seed", "trial_key"])
    tiles = _tiles(folder, d, root if root is not None else data_root_of(folder), max_photos)
    if not tiles:
        raise NotApplicable(f"no re-identified trial in {folder} has an image under {IMAGES_DIR}/")
    several_defenses = len({t["defense"] for t in tiles}) > 1

    cols = min(_TILES_PER_ROW, len(tiles))
    n_rows = math.ceil(len(tiles) / cols)
    fig = Figure(figsize=(2.9 * cols + 0.3, 1.55 * n_rows + 0.9), layout="constrained")
    FigureCanvasAgg(fig)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        for j, key in enumerate(("truth", "recon", "gallery")):
            ax = fig.add_subplot(n_rows, 3 * cols, r * 3 * cols + 3 * c + j + 1)
            ax.imshow(tile[key], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            colour = (_HIT if tile["hit"] else _MISS) if key == "gallery" else "#bbbbbb"
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(2.5 if key == "gallery" else 0.5)
            if r == 0:
                ax.set_title({"truth": "photo", "recon": "recon.", "gallery": "matched"}[key], fontsize=7.5)
            if j == 1:
                verdict = "hit" if tile["hit"] else f"miss: {tile['matched']}, true rank {tile['rank']}"
                extra = f"\n{tile['defense']}" if several_defenses else ""
                ax.set_xlabel(
                    f"{tile['true']} seed {norm(tile['seed'])}: {verdict}{extra}",
                    fontsize=7, color=_HIT if tile["hit"] else _MISS,
                )  # fmt: skip
    first = d.iloc[0]
    hits = sum(t["hit"] for t in tiles)
    defense = "" if several_defenses else f", {first['defense_setting']}"
    fig.suptitle(
        f"Re-identification: {first['attack_setting']} vs {first['victim']} on {first['dataset']}, round "
        f"{norm(first['fl_round'])}, batch {norm(first['batch_size'])}{defense}: top-1 hit for {hits} "
        f"of {len(tiles)} photos (green: matched the true person)",
        fontsize=9.5,
    )
    return fig


# ---------------------------------------------------------------------------------------------- section


def faces_sections(folder_in: Path, d: pd.DataFrame, out: Path, written: list[Path]) -> list[Section]:
    """The report's re-identification section, or none when the sweep ran without `reid`."""
    if not has_reid(d):
        return []
    section = Section(
        "Face re-identification",
        "Share of attacked photos whose reconstruction the identifier (trained on the gallery photos only, "
        "never on an attacked photo) ranks as the true person first (top-1) or among the first five "
        "(top-5), against the clean photo (ceiling: a perfect reconstruction) and uniform noise (floor: "
        "chance). Galleries: per attacked photo at the smallest batch size, the photo, its reconstruction "
        "and a gallery photo of the identity ranked first, framed green on a hit, red on a miss.",
        table=reid_table(d),
    )
    rows = _reid_rows(with_settings(d))
    group_columns = ["attack_setting", *varying(rows, context_columns(rows))]
    root = data_root_of(folder_in)
    for _, group in rows.groupby([rows[c].map(norm) for c in group_columns], sort=True):
        first = group.iloc[0]
        where = {c: first[c] for c in group_columns}
        name = slug("faces_gallery", *(first[c] for c in group_columns))
        try:
            fig = reid_gallery_figure(folder_in, rows, where=where, root=root)
        except (NotApplicable, GrnnError) as err:
            section.notes.append(f"Gallery of {_describe(where)} skipped: {err}.")
            continue
        section.figures.append(
            (save_figure(fig, out, name, written), f"Re-identification: {_describe(where)}")
        )
    return [section]


def _describe(where: Mapping[str, Any]) -> str:
    return ", ".join(norm(v) if c == "attack_setting" else f"{c} {norm(v)}" for c, v in where.items())
