"""The ledger: a sweep's durable results under `<results root>/<sweep name>/`.

    spec.yaml              the spec as run, first line `# spec_hash: <hash>`
    parts/<key>.parquet    one row per finished trial, written by the driver as results arrive
    images/<key>.png       truth (top row) vs reconstruction (bottom row)
    trials.parquet         the compacted table: one row per trial_key, newest part wins

Every file is written to a hidden temporary name in the same folder, fsynced, then renamed over its
final name, so a crash (even SIGKILL) leaves either the old file or the new one, never a torn one;
loaders ignore the hidden temporaries, and the next sweep run removes those of dead writers
(`remove_temporaries`). Parts are the source of truth: compaction never deletes them,
and `load()` falls back to reading them when trials.parquet is missing or older than the newest part.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA_VERSION = 1

SPEC_FILE = "spec.yaml"
TRIALS_FILE = "trials.parquet"
PARTS_DIR = "parts"
IMAGES_DIR = "images"
_HASH_PREFIX = "# spec_hash:"
# Schema metadata of trials.parquet: the newest part it includes, so load() can tell it is stale even
# when a part landed while compaction was running.
_META_NEWEST_PART = b"grnn.newest_part_mtime_ns"

# Columns every row has, with fixed types, so that a FAILED row (all metrics null) and a COMPLETE row
# land in the same typed column. Config parameter columns (`attack.lr`, ...) are inferred per value.
_LIST_F = pa.list_(pa.float64())
_LIST_I = pa.list_(pa.int64())
FIXED_COLUMNS: dict[str, pa.DataType] = {
    "schema_version": pa.int64(),
    "sweep": pa.string(),
    "trial_key": pa.string(),
    "attack": pa.string(),
    "victim": pa.string(),
    "dataset": pa.string(),
    "split": pa.string(),
    "image_size": pa.int64(),
    "batch_size": pa.int64(),
    "fl_round": pa.int64(),
    "update": pa.string(),
    "defense": pa.string(),
    "seed": pa.int64(),
    "success_psnr": pa.float64(),
    "status": pa.string(),
    "error_type": pa.string(),
    "error": pa.string(),
    "psnr": pa.float64(),
    "ssim": pa.float64(),
    "mse": pa.float64(),
    "label_acc": pa.float64(),
    "label_set_acc": pa.float64(),
    "success": pa.bool_(),
    "psnr_per_image": _LIST_F,
    "ssim_per_image": _LIST_F,
    "mse_per_image": _LIST_F,
    "labels_true": _LIST_I,
    "labels_recovered": _LIST_I,
    "matching": _LIST_I,
    "indices": _LIST_I,
    "model_acc": pa.float64(),
    "model_loss": pa.float64(),
    "model_dp_epsilon": pa.float64(),
    "model_dp_delta": pa.float64(),
    "wall_s": pa.float64(),
    "s_per_iter": pa.float64(),
    "iterations": pa.int64(),
    "device": pa.string(),
    "hostname": pa.string(),
    "torch_version": pa.string(),
    "ray_version": pa.string(),
    "project_version": pa.string(),
    "git_sha": pa.string(),
    "history_json": pa.string(),
    "finished_at": pa.timestamp("us", tz="UTC"),
}
_FIRST = ("schema_version", "sweep", "trial_key")


def _fsync_dir(folder: Path) -> None:
    # The rename itself must reach the disk, not only the file's bytes.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via `.<name>.<pid>.tmp` in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _atomic_write_table(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def row_to_table(row: dict[str, Any]) -> pa.Table:
    """One typed row: fixed columns get their fixed type, other columns the type of their value."""
    names = [c for c in _FIRST if c in row] + [c for c in row if c not in _FIRST]
    arrays = []
    for name in names:
        value = row[name]
        arrays.append(pa.array([value], type=FIXED_COLUMNS.get(name)))
    return pa.table(arrays, names=names)


def _json_text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def union_tables(tables: list[pa.Table]) -> pa.Table:
    """Stack tables whose columns differ: a missing column is null; int and float widen to float.

    A column that holds incompatible types in different tables (text in one sweep, numbers in
    another) becomes text, so rows of unrelated sweeps can always be loaded together.
    """
    if not tables:
        return pa.table({name: pa.array([], type=t) for name, t in FIXED_COLUMNS.items()})
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        pass
    types: dict[str, set[pa.DataType]] = {}
    for t in tables:
        for field in t.schema:
            if field.type != pa.null():
                types.setdefault(field.name, set()).add(field.type)
    mixed = {name for name, ts in types.items() if len(ts) > 1}
    fixed = []
    for t in tables:
        for name in mixed & set(t.column_names):
            text = pa.array([_json_text(v) for v in t.column(name).to_pylist()], type=pa.string())
            t = t.set_column(t.column_names.index(name), name, text)
        fixed.append(t)
    return pa.concat_tables(fixed, promote_options="permissive")


def is_plain_key(key: object) -> bool:
    """A trial_key that can name a file in parts/ and images/: no path separator, not hidden, short."""
    return (
        isinstance(key, str) and 0 < len(key) <= 128 and not key.startswith(".")
        and not any(c in key for c in "/\\\0")
    )


def _schema_problem(table: pa.Table, part_key: str | None) -> str | None:
    """Why `table` is not a ledger table this code wrote, or None. Parts and trials.parquet are read
    from a folder anyone with write access could drop files into: a file whose fixed columns have other
    types, or whose keys would name paths outside the folder, is skipped rather than let into the report."""
    if "trial_key" not in table.column_names:
        return "it has no trial_key column (not a results file)"
    for name, expected in FIXED_COLUMNS.items():
        if name in table.column_names:
            actual = table.schema.field(name).type
            if actual != expected and actual != pa.null():
                return f"its column {name} has type {actual}, not {expected} (not a results file of this project)"
    keys = table.column("trial_key").to_pylist()
    bad = next((k for k in keys if not is_plain_key(k)), None)
    if bad is not None or None in keys:
        return f"its trial_key {bad!r} is not a plain key (no path separator, not hidden, 1-128 characters)"
    if part_key is not None and keys != [part_key]:
        return f"a part must hold exactly one row, for the key in its file name ({part_key}), not {keys[:3]!r}"
    if "schema_version" in table.column_names:
        versions = {v for v in table.column("schema_version").to_pylist() if v is not None}
        if any(v > SCHEMA_VERSION for v in versions):
            return f"schema_version {max(versions)} is newer than this code ({SCHEMA_VERSION})"
    return None


def _read_parquet(path: Path, part_key: str | None = None) -> pa.Table | None:
    """The table in `path`, or None with a warning when it is unreadable or not a ledger file.

    `part_key`: `path` is the part of that trial_key, so it must hold exactly that one row.
    """
    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001  (any reader error means: not a usable part)
        warnings.warn(f"skipping unreadable results file {path}: {err}", stacklevel=3)
        return None
    problem = _schema_problem(table, part_key)
    if problem is not None:
        warnings.warn(f"skipping results file {path}: {problem}", stacklevel=3)
        return None
    return table


def _newest_wins(sources: list[tuple[pa.Table, int]]) -> pa.Table:
    """One row per trial_key: the latest `finished_at`, ties to the later source (parts after trials)."""
    if not sources:
        return union_tables([])
    table = union_tables([t for t, _ in sources])
    order = [rank for t, rank in sources for _ in range(t.num_rows)]
    keys = table.column("trial_key").to_pylist()
    if "finished_at" in table.column_names and pa.types.is_timestamp(table.schema.field("finished_at").type):
        stamps = table.column("finished_at").cast(pa.int64()).to_pylist()
    else:
        stamps = [None] * table.num_rows
    best: dict[str, tuple[tuple[int, int], int]] = {}
    for i, key in enumerate(keys):
        if key is None:
            continue
        newness = (stamps[i] if stamps[i] is not None else -1, order[i])
        if key not in best or newness >= best[key][0]:
            best[key] = (newness, i)
    keep = sorted(i for _, i in best.values())
    return table.take(pa.array(keep, type=pa.int64()))


class Ledger:
    """The results folder of one sweep. Creating the object touches nothing on disk."""

    def __init__(self, folder: str | os.PathLike[str], sweep: str | None = None) -> None:
        self.folder = Path(folder)
        self.sweep = sweep if sweep is not None else self.folder.name
        self.spec_path = self.folder / SPEC_FILE
        self.parts_dir = self.folder / PARTS_DIR
        self.images_dir = self.folder / IMAGES_DIR
        self.trials_path = self.folder / TRIALS_FILE

    # spec.yaml -------------------------------------------------------------------------------------
    def exists(self) -> bool:
        """True when the folder looks like a results folder (a spec, parts or a compacted table)."""
        return self.spec_path.is_file() or self.parts_dir.is_dir() or self.trials_path.is_file()

    def write_spec(self, yaml_text: str, spec_hash: str) -> None:
        atomic_write_bytes(self.spec_path, f"{_HASH_PREFIX} {spec_hash}\n{yaml_text}".encode())

    def spec_hash(self) -> str | None:
        """The hash recorded in spec.yaml, or None when there is no spec.yaml (or no hash line)."""
        try:
            with open(self.spec_path, encoding="utf-8") as f:
                for line in f:
                    if line.startswith(_HASH_PREFIX):
                        return line[len(_HASH_PREFIX):].strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return None

    # parts and images ------------------------------------------------------------------------------
    def write_part(self, row: dict[str, Any], image_png: bytes | None = None) -> Path:
        """Write one finished trial (image first, so a part never points at a missing image)."""
        key = row.get("trial_key")
        if not is_plain_key(key):
            raise ValueError(f"a result row needs a plain trial_key, got {key!r}")
        if image_png is not None:
            atomic_write_bytes(self.image_path(str(key)), image_png)
        full = {"schema_version": SCHEMA_VERSION, "sweep": self.sweep, **row}
        full["schema_version"] = SCHEMA_VERSION
        full.setdefault("finished_at", dt.datetime.now(dt.UTC))
        path = self.part_path(str(key))
        _atomic_write_table(path, row_to_table(full))
        return path

    def part_paths(self) -> list[Path]:
        """Finished parts; hidden temporaries and other files are not parts."""
        if not self.parts_dir.is_dir():
            return []
        return sorted(
            p for p in self.parts_dir.iterdir()
            if p.suffix == ".parquet" and not p.name.startswith(".") and p.is_file()
        )

    def part_path(self, key: str) -> Path:
        return self.parts_dir / f"{key}.parquet"

    def image_path(self, key: str) -> Path:
        return self.images_dir / f"{key}.png"

    def remove_temporaries(self, older_than_ns: int) -> int:
        """Delete the hidden `.<name>.<pid>.tmp` files of writers that died before their rename (every reader
        ignores them, but they would stay for good); returns how many. Only files last written before
        `older_than_ns` (time.time_ns()): pass the start of the run, so that a write still in progress (a
        `--compact` or a report run beside the sweep) is never pulled from under its writer."""
        removed = 0
        for folder in (self.folder, self.parts_dir, self.images_dir):
            try:
                names = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
            except (FileNotFoundError, NotADirectoryError):
                continue
            for path in names:
                try:
                    if path.is_file() and not path.is_symlink() and path.stat().st_mtime_ns < older_than_ns:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:  # its writer renamed or removed it meanwhile
                    continue
        return removed

    def close_run(self, started_ns: int) -> Path:
        """What every sweep run ends with: compact the parts into trials.parquet (returned), then delete the
        temporaries of writes torn by a killed earlier run. This run's own writes are all renamed by then,
        and a writer beside it (`--compact`, a report) began after `started_ns`, so neither is touched."""
        path = self.compact()
        self.remove_temporaries(older_than_ns=started_ns)
        return path

    # compaction and loading ------------------------------------------------------------------------
    def _newest_part_ns(self, parts: Iterable[Path]) -> int:
        newest = 0
        for p in parts:
            try:
                newest = max(newest, p.stat().st_mtime_ns)
            except FileNotFoundError:
                continue
        return newest

    def _compacted_is_fresh(self, parts: list[Path]) -> bool:
        if not self.trials_path.is_file():
            return False
        newest = self._newest_part_ns(parts)
        try:
            meta = pq.read_schema(self.trials_path).metadata or {}
        except Exception:  # noqa: BLE001  (unreadable: treat as stale, the merge will warn)
            return False
        if _META_NEWEST_PART in meta:
            return newest <= int(meta[_META_NEWEST_PART])
        return self.trials_path.stat().st_mtime_ns > newest

    def _merged(self) -> tuple[pa.Table, int]:
        parts = self.part_paths()
        newest = self._newest_part_ns(parts)  # read before the parts: a later part makes us stale
        sources: list[tuple[pa.Table, int]] = []
        if self.trials_path.is_file():
            compacted = _read_parquet(self.trials_path)
            if compacted is not None:
                sources.append((compacted, 0))
        for p in parts:
            table = _read_parquet(p, part_key=p.stem)
            if table is not None:
                sources.append((table, 1))
        return _newest_wins(sources), newest

    def table(self) -> pa.Table:
        """The ledger as one Arrow table, one row per trial_key."""
        parts = self.part_paths()
        if self._compacted_is_fresh(parts):
            table = _read_parquet(self.trials_path)
            if table is not None:
                return table.replace_schema_metadata(None)
        return self._merged()[0]

    def compact(self) -> Path:
        """Rewrite trials.parquet atomically from trials.parquet and every part (newest wins)."""
        table, newest = self._merged()
        meta = {_META_NEWEST_PART: str(newest).encode()}
        _atomic_write_table(self.trials_path, table.replace_schema_metadata(meta))
        return self.trials_path

    def set_aside(self, keys: Iterable[str], folder: Path) -> int:
        """Move the results of `keys` (rows, parts, images) out of this ledger into `folder`, a new results
        folder of their own (with a copy of spec.yaml); returns how many rows moved. The moved rows are
        written there before anything leaves this folder, so nothing is lost if the move stops part-way
        (running it again moves what is left)."""
        table, newest = self._merged()
        moving = pc.is_in(table.column("trial_key"), value_set=pa.array(sorted(set(keys)), type=pa.string()))
        moved = table.filter(moving)
        if moved.num_rows == 0:
            return 0
        aside = Ledger(folder, sweep=self.sweep)
        aside.parts_dir.mkdir(parents=True, exist_ok=True)
        if self.spec_path.is_file():
            shutil.copy2(self.spec_path, aside.spec_path)
        _atomic_write_table(aside.trials_path, moved)
        for key in moved.column("trial_key").to_pylist():
            for source, target in ((self.part_path(key), aside.part_path(key)),
                                   (self.image_path(key), aside.image_path(key))):
                if source.is_file():
                    target.parent.mkdir(exist_ok=True)
                    os.replace(source, target)
        kept = table.filter(pc.invert(moving))
        _atomic_write_table(self.trials_path, kept.replace_schema_metadata({_META_NEWEST_PART: str(newest).encode()}))
        return moved.num_rows

    def load(self) -> pd.DataFrame:
        return to_pandas(self.table())

    def statuses(self) -> dict[str, str]:
        """trial_key -> status of every finished trial in the ledger."""
        table = self.table()
        if table.num_rows == 0 or "status" not in table.column_names:
            return {}
        return dict(zip(table.column("trial_key").to_pylist(), table.column("status").to_pylist(), strict=True))


def _pandas_type(t: pa.DataType) -> Any:
    # Nullable pandas types: an int column with a missing value stays int, a bool column stays bool.
    if pa.types.is_integer(t):
        return pd.Int64Dtype()
    if pa.types.is_boolean(t):
        return pd.BooleanDtype()
    return None


def to_pandas(table: pa.Table) -> pd.DataFrame:
    """Arrow -> pandas keeping types: nullable ints and bools, list cells as Python lists."""
    df = table.to_pandas(types_mapper=_pandas_type)
    for field in table.schema:
        if pa.types.is_list(field.type) or pa.types.is_large_list(field.type):
            df[field.name] = pd.Series(table.column(field.name).to_pylist(), index=df.index, dtype=object)
    return df


def is_results_folder(path: str | os.PathLike[str]) -> bool:
    return Ledger(path).exists()


def load(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The results as a DataFrame, one row per trial.

    `path` is a sweep's results folder (reads trials.parquet, or the parts when it is missing or
    older than the newest part), a single Parquet file, or a results root: then every sweep folder
    in it is loaded and the rows unioned (columns a sweep lacks are null).
    """
    p = Path(path)
    if p.is_file():
        table = _read_parquet(p)
        return to_pandas(table if table is not None else union_tables([]))
    if not p.is_dir():
        raise FileNotFoundError(f"no results at {p}")
    if Ledger(p).exists():
        return Ledger(p).load()
    sweeps = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".") and Ledger(d).exists())
    tables = [Ledger(d).table() for d in sweeps]
    return to_pandas(union_tables([t for t in tables if t.num_rows]) if any(t.num_rows for t in tables)
                     else union_tables([]))
