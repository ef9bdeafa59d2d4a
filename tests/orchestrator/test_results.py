"""The ledger: atomic parts, compaction (newest wins), stale-table detection, typed columns, bad files.

Rows are built by the engine's own TrialResult.to_row() from real TrialSpecs (no trial is run), so
the tests see the exact row shape a sweep writes.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grnn_engine import TrialResult, TrialSpec
from orchestrator.results import SCHEMA_VERSION, Ledger, load


def complete_row(seed: int = 0, psnr: float = 12.5, **spec_fields: object) -> dict:
    spec = TrialSpec(attack="grnn", attack_params={"iterations": 10, "lr": 1e-4}, batch_size=2, seed=seed,
                     **spec_fields)  # type: ignore[arg-type]
    result = TrialResult(
        spec=spec, status="COMPLETE", wall_s=1.5, attack_s=1.0, iterations=10,
        metrics={"psnr": psnr, "ssim": 0.4, "mse": 0.05, "label_acc": 1.0, "success": False,
                 "psnr_per_image": [psnr - 1, psnr + 1], "labels_true": [3, 7], "labels_recovered": [3, 7],
                 "matching": [1, 0], "indices": [10, 20]},
    )
    return result.to_row()


def failed_row(seed: int = 0, **spec_fields: object) -> dict:
    spec = TrialSpec(attack="grnn", attack_params={"iterations": 10, "lr": 1e-4}, batch_size=2, seed=seed,
                     **spec_fields)  # type: ignore[arg-type]
    return TrialResult.failed(spec, error_type="ConfigError", error="batch size 2 is too large", wall_s=0.2).to_row()


def quiet_load(ledger: Ledger) -> pd.DataFrame:
    """Load, failing the test on any warning (the ledger must only warn about bad files)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return ledger.load()


def test_columns_keep_their_types(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "s")
    ledger.write_part(complete_row(seed=0), b"\x89PNG fake")
    ledger.write_part(failed_row(seed=1))
    df = quiet_load(ledger).set_index("seed")

    assert (df["schema_version"] == SCHEMA_VERSION).all() and str(df["schema_version"].dtype) == "Int64"
    assert str(df["batch_size"].dtype) == "Int64" and str(df["iterations"].dtype) == "Int64"
    assert str(df["attack.iterations"].dtype) == "Int64"
    assert df["attack.lr"].dtype == "float64" and df["psnr"].dtype == "float64"
    assert str(df["success"].dtype) == "boolean"
    assert isinstance(df.loc[0, "psnr_per_image"], list) and df.loc[0, "psnr_per_image"] == [11.5, 13.5]
    assert df.loc[0, "labels_true"] == [3, 7] and all(isinstance(v, int) for v in df.loc[0, "labels_true"])
    assert df.loc[0, "status"] == "COMPLETE" and pd.isna(df.loc[0, "error"])
    # the FAILED row: metrics null in the same typed columns
    assert df.loc[1, "status"] == "FAILED" and df.loc[1, "error_type"] == "ConfigError"
    assert math.isnan(df.loc[1, "psnr"]) and df.loc[1, "psnr_per_image"] is None
    assert pd.isna(df.loc[1, "success"])
    assert (df["sweep"] == "s").all()
    assert pd.api.types.is_datetime64_any_dtype(df["finished_at"])
    assert ledger.image_path(df.loc[0, "trial_key"]).read_bytes() == b"\x89PNG fake"


def test_leftover_temp_files_are_ignored(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "s")
    row = complete_row()
    ledger.write_part(row)
    # A driver killed mid-write leaves its temporary behind: torn bytes under a hidden name.
    (ledger.parts_dir / f".{row['trial_key']}.4242.tmp").write_bytes(b"PAR1 torn")
    (ledger.parts_dir / f".{complete_row(seed=9)['trial_key']}.4242.tmp").write_bytes(b"")
    ledger.images_dir.mkdir(parents=True, exist_ok=True)
    (ledger.images_dir / f".{row['trial_key']}.4242.tmp").write_bytes(b"\x89PNG torn")
    assert [p.name for p in ledger.part_paths()] == [f"{row['trial_key']}.parquet"]
    assert len(quiet_load(ledger)) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ledger.compact()
    assert pq.read_table(ledger.trials_path).num_rows == 1


def test_writes_leave_no_temporaries(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "s")
    for seed in range(3):
        ledger.write_part(complete_row(seed=seed), b"png")
    ledger.compact()
    leftovers = [p for d in (ledger.folder, ledger.parts_dir, ledger.images_dir) for p in d.iterdir()
                 if p.name.startswith(".")]
    assert leftovers == []


def test_compaction_keeps_one_row_per_key_newest_wins(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "s")
    ledger.write_part(failed_row(seed=0))
    ledger.write_part(complete_row(seed=1, psnr=10.0))
    ledger.compact()
    # A retry of seed 0 succeeds, and seed 1 is rerun with a new score: the newer rows must win.
    ledger.write_part(complete_row(seed=0, psnr=20.0))
    ledger.write_part(complete_row(seed=1, psnr=11.0))
    ledger.compact()

    table = pq.read_table(ledger.trials_path)
    keys = table.column("trial_key").to_pylist()
    assert len(keys) == len(set(keys)) == 2
    df = load(ledger.folder).set_index("seed")
    assert df.loc[0, "status"] == "COMPLETE" and df.loc[0, "psnr"] == 20.0
    assert df.loc[1, "psnr"] == 11.0


def test_compacted_rows_survive_without_their_parts(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "s")
    ledger.write_part(complete_row(seed=0))
    ledger.compact()
    for part in ledger.part_paths():
        part.unlink()
    ledger.write_part(complete_row(seed=1))
    ledger.compact()
    assert sorted(load(ledger.folder)["seed"].tolist()) == [0, 1]


def test_load_reads_parts_when_the_compacted_table_is_stale(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "s")
    ledger.write_part(complete_row(seed=0))
    ledger.compact()
    time.sleep(0.01)
    ledger.write_part(complete_row(seed=1))  # after compaction: trials.parquet lacks it
    assert pq.read_table(ledger.trials_path).num_rows == 1
    assert sorted(quiet_load(ledger)["seed"].tolist()) == [0, 1]

    ledger.compact()
    # Fresh table: load reads trials.parquet, so a row survives even if its part file goes away.
    first = ledger.part_paths()[0]
    first.unlink()
    assert len(quiet_load(ledger)) == 2


def test_load_without_compaction_reads_parts(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "s")
    assert len(quiet_load(ledger)) == 0
    ledger.write_part(complete_row(seed=0))
    assert not ledger.trials_path.exists()
    assert quiet_load(ledger)["seed"].tolist() == [0]


def test_corrupt_and_foreign_parts_are_skipped_with_a_warning(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "s")
    ledger.write_part(complete_row(seed=0))
    (ledger.parts_dir / "deadbeefdeadbeef.parquet").write_bytes(b"PAR1 this is not parquet")
    pq.write_table(pa.table({"x": [1, 2]}), ledger.parts_dir / "foreign.parquet")

    with pytest.warns(UserWarning) as record:
        df = ledger.load()
    messages = " ".join(str(w.message) for w in record)
    assert "deadbeefdeadbeef.parquet" in messages and "foreign.parquet" in messages
    assert df["seed"].tolist() == [0]

    with pytest.warns(UserWarning):
        ledger.compact()
    assert pq.read_table(ledger.trials_path).num_rows == 1


def test_rows_of_different_sweeps_union(tmp_path: Path) -> None:
    a = Ledger(tmp_path / "a")
    a.write_part(complete_row(seed=0))
    b = Ledger(tmp_path / "b")
    spec = TrialSpec(attack="dlg", attack_params={"max_iter": 20, "lr": "auto"}, defense="gaussian",
                     defense_params={"sigma": 0.1})
    b.write_part(TrialResult.failed(spec, error_type="X", error="y").to_row())
    a.compact()

    df = load(tmp_path).set_index("sweep")
    assert sorted(df.index) == ["a", "b"]
    assert df.loc["b", "attack.max_iter"] == 20 and pd.isna(df.loc["a", "attack.max_iter"])
    assert df.loc["b", "defense.sigma"] == 0.1 and pd.isna(df.loc["a", "defense.sigma"])
    # attack.lr is a number in one sweep and text in the other: it becomes text, nothing is lost
    assert df.loc["b", "attack.lr"] == "auto" and float(df.loc["a", "attack.lr"]) == 1e-4
    assert str(df["iterations"].dtype) == "Int64"


def test_spec_hash_and_key_checks(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "s")
    assert ledger.spec_hash() is None and not ledger.exists()
    ledger.write_spec("name: s\n", "abc123")
    assert ledger.spec_hash() == "abc123" and ledger.exists()
    assert ledger.spec_path.read_text().endswith("name: s\n")
    with pytest.raises(ValueError):
        ledger.write_part({"trial_key": "../escape", "status": "COMPLETE"})
    assert not (tmp_path / "escape.parquet").exists()


def test_load_of_a_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nope")
    os.makedirs(tmp_path / "empty")
    assert len(load(tmp_path / "empty")) == 0
