"""Safety: nothing bad gets in. Untrusted files are never executed or unpickled (checkpoints and caches
load with torch.load(weights_only=True), YAML with a SafeLoader, no eval/exec/pickle of anything read),
forged results files are skipped and reported, results and caches follow the user's umask, and values
that would hurt (huge grids, seeds torch cannot take, names that leave the results root, negative or
NaN defense settings) are refused with one sentence before anything runs.
"""

from __future__ import annotations

import ast
import math
import os
import pathlib
import shutil
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from grnn_engine import DEFENSES
from orchestrator import sweep
from orchestrator.results import Ledger, load
from orchestrator.spec import SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]
CODE = [ROOT / d for d in ("grnn_engine", "orchestrator", "benchmarks")]
FIXTURE = ROOT / "tests" / "data" / "report_defenses"


def _python_files(folders: list[Path]) -> Iterator[tuple[Path, ast.Module]]:
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _calls(tree: ast.AST) -> Iterator[tuple[str, ast.Call]]:
    """(dotted name of the callee, call) for every call: `torch.load`, `pickle.loads`, `eval`, ..."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts: list[str] = []
            func: ast.AST = node.func
            while isinstance(func, ast.Attribute):
                parts.append(func.attr)
                func = func.value
            if isinstance(func, ast.Name):
                parts.append(func.id)
                yield ".".join(reversed(parts)), node


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


# ---------------------------------------------------------------------------------------------- the code


def test_torch_load_is_always_weights_only() -> None:
    seen, bad = 0, []
    for path, tree in _python_files([*CODE, ROOT / "tests"]):
        if path == Path(__file__).resolve():
            continue  # this file loads its own payload unsafely, once, to prove the payload is live
        for name, call in _calls(tree):
            if name == "torch.load":
                seen += 1
                value = _keyword(call, "weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    bad.append(f"{path.relative_to(ROOT)}:{call.lineno}")
    assert seen >= 2  # the stage cache and the identifier cache
    assert bad == [], f"torch.load without weights_only=True: {bad}"


def test_yaml_is_only_read_with_a_safe_loader() -> None:
    bad = []
    for path, tree in _python_files([*CODE, ROOT / "tests"]):
        module = None
        for name, call in _calls(tree):
            short = name.split(".")[-1]
            if not name.startswith("yaml."):
                continue
            if short in ("unsafe_load", "unsafe_load_all", "full_load", "full_load_all"):
                bad.append(f"{path.relative_to(ROOT)}:{call.lineno} {name}")
            elif short in ("load", "load_all"):
                loader = _keyword(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
                # The loader must be a SafeLoader subclass: look the name up in the module that uses it.
                if isinstance(loader, ast.Attribute) and loader.attr in ("SafeLoader", "CSafeLoader"):
                    continue
                if isinstance(loader, ast.Name):
                    if module is None:
                        import importlib

                        rel = path.relative_to(ROOT).with_suffix("")
                        module = importlib.import_module(".".join(rel.parts))
                    if issubclass(getattr(module, loader.id), yaml.SafeLoader):
                        continue
                bad.append(f"{path.relative_to(ROOT)}:{call.lineno} {name}")
    assert bad == [], f"YAML read without a SafeLoader: {bad}"


_UNPICKLERS = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "cPickle.loads", "marshal.load",
    "marshal.loads", "shelve.open", "pd.read_pickle", "pandas.read_pickle", "joblib.load", "dill.load",
    "dill.loads", "cloudpickle.load", "cloudpickle.loads", "torch.jit.load",
}


def test_no_eval_exec_or_unpickling_in_the_project() -> None:
    bad = []
    for path, tree in _python_files(CODE):
        for name, call in _calls(tree):
            where = f"{path.relative_to(ROOT)}:{call.lineno} {name}"
            if name in ("eval", "exec", "compile", "__import__") or name in _UNPICKLERS:
                bad.append(where)
            elif name.endswith("np.load") or name == "numpy.load":
                value = _keyword(call, "allow_pickle")
                if not (value is None or (isinstance(value, ast.Constant) and value.value is False)):
                    bad.append(where)
            elif name.endswith(("subprocess.run", "subprocess.Popen", "subprocess.call", "os.system")):
                shell = _keyword(call, "shell")
                if name.endswith("os.system") or (isinstance(shell, ast.Constant) and shell.value):
                    bad.append(where)
    assert bad == [], f"code that runs or unpickles data: {bad}"


# ---------------------------------------------------------------------------------------------- untrusted files


class _Payload:
    """Unpickling this touches `marker`: what a poisoned cache file would do with a real command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_poisoned_stage_cache_file_is_never_unpickled(tmp_path: Path) -> None:
    from grnn_engine.fl import FLSettings, stage_key, train_chain

    cache = tmp_path / "cache"
    cache.mkdir()
    path = cache / f"{stage_key('digits', 16, 'lenet', {}, FLSettings.from_dict({}), 0, 0)}.pt"
    marker = tmp_path / "pwned"
    torch.save({"state_dict": _Payload(marker), "model_acc": 1.0}, path)
    # The payload is live: an unsafe load would run it.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stages = train_chain("digits", "lenet", {}, 16, {}, 0, [0], cache_dir=cache)
    assert not marker.exists()
    assert any("unreadable stage cache file" in str(w.message) for w in caught)
    assert 0 <= stages[0]["model_acc"] <= 1
    assert torch.load(path, weights_only=True)["model_acc"] == stages[0]["model_acc"]  # replaced by a real stage


def test_yaml_python_tags_in_a_spec_are_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    spec = tmp_path / "evil.yaml"
    spec.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\ndata: {{dataset: digits}}\n")
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    assert "python/object/apply" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def _legit_ledger(folder: Path, rows: int = 3) -> list[dict[str, Any]]:
    """A results folder with real rows (from the report fixture) written through the ledger."""
    table = pq.read_table(FIXTURE / "trials.parquet")
    written = []
    ledger = Ledger(folder, sweep=folder.name)
    ledger.write_spec((FIXTURE / "spec.yaml").read_text().split("\n", 1)[1], "0" * 16)
    for row in table.to_pylist()[:rows]:
        image = FIXTURE / "images" / f"{row['trial_key']}.png"
        ledger.write_part(row, image.read_bytes() if image.exists() else None)
        written.append(row)
    return written


def test_forged_results_files_are_skipped_and_reported(tmp_path: Path) -> None:
    from orchestrator.report import write_report
    from orchestrator.status import sweep_status

    folder = tmp_path / "defenses"
    rows = _legit_ledger(folder)
    parts = folder / "parts"
    model = rows[0]
    forged = {
        "text_psnr": {**model, "trial_key": "a" * 16, "psnr": "very high"},
        "text_batch": {**model, "trial_key": "b" * 16, "batch_size": "four"},
        "text_time": {**model, "trial_key": "c" * 16, "finished_at": "tomorrow"},
        "escape": {**model, "trial_key": "../../../../tmp/x"},
        "other_key": {**model, "trial_key": "d" * 16},  # a part named for one key holding another
    }
    for name, row in forged.items():
        pq.write_table(pa.Table.from_pylist([row]), parts / f"{'d' * 15 + 'e' if name == 'other_key' else name}.parquet")
    two = pa.Table.from_pylist([{**model, "trial_key": "f" * 16}, {**model, "trial_key": "f" * 16}])
    pq.write_table(two, parts / f"{'f' * 16}.parquet")

    with pytest.warns(UserWarning) as record:
        df = load(folder)
    assert sorted(df["trial_key"]) == sorted(r["trial_key"] for r in rows)
    messages = " ".join(str(w.message) for w in record)
    for name in ("text_psnr", "text_batch", "text_time", "escape", "d" * 15 + "e", "f" * 16):
        assert f"{name}.parquet" in messages

    assert "6 unreadable results files skipped" in sweep_status(folder).note
    report = write_report(folder)  # the forged files must not break a figure or a table
    assert report.html.is_file() and sum("skipping" in n for n in report.notes) == 6
    with pytest.warns(UserWarning):
        Ledger(folder).compact()
    assert pq.read_table(folder / "trials.parquet").num_rows == len(rows)

    # A forged compacted table is skipped the same way; the parts still hold every row.
    pq.write_table(pa.Table.from_pylist([forged["text_psnr"]]), folder / "trials.parquet")
    for p in parts.glob("*.parquet"):
        if p.stem not in {r["trial_key"] for r in rows}:
            p.unlink()
    with pytest.warns(UserWarning, match="trials.parquet"):
        assert sorted(load(folder)["trial_key"]) == sorted(r["trial_key"] for r in rows)


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_results_and_caches_follow_the_umask(tmp_path: Path, mask: int, file_mode: int, dir_mode: int) -> None:
    from grnn_engine.fl import train_chain
    from orchestrator.report import write_report

    old = os.umask(mask)
    try:
        folder = tmp_path / "results" / "defenses"
        _legit_ledger(folder)
        Ledger(folder).compact()
        write_report(folder, fmt="md")
        train_chain("digits", "lenet", {}, 16, {}, 0, [0], cache_dir=tmp_path / "results" / ".stages")
    finally:
        os.umask(old)
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "results").rglob("*")}
    assert any(p.suffix == ".pt" for p in modes) and any(p.suffix == ".png" for p in modes)
    assert any(p.name == "trials.parquet" for p in modes) and any(p.name == "report.md" for p in modes)
    for path, mode in modes.items():
        assert not mode & stat.S_IWOTH, f"{path} is world-writable ({mode:o})"
        assert mode == (dir_mode if path.is_dir() else file_mode), f"{path}: {mode:o} under umask {mask:o}"


# ---------------------------------------------------------------------------------------------- values that would hurt


def _base() -> dict[str, Any]:
    return {
        "name": "s", "data": {"dataset": "digits"},
        "grid": {"victim": ["lenet"], "attack": [{"name": "grnn", "params": {"iterations": 5}}]},
        "resources": {"cpu": 1},
    }


@pytest.mark.parametrize("name", ["../escape", "../../etc", "/abs/path", "a/b", "..", "."])
def test_a_results_name_never_leaves_the_results_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({**_base(), "name": name}))
    root = tmp_path / "deep" / "root"
    assert sweep.main([str(spec), "--results", str(root)]) == 2
    err = capsys.readouterr().err
    assert "name" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]  # nothing created, inside or out


def _numeric_params() -> list[tuple[str, str]]:
    return [(d, p) for d in DEFENSES.names() for p, v in DEFENSES.parameters(d).items()
            if isinstance(v, int | float) and not isinstance(v, bool)]


@pytest.mark.parametrize(("defense", "param"), _numeric_params())
@pytest.mark.parametrize("value", [-1, math.nan], ids=["negative", "nan"])
def test_negative_or_nan_defense_settings_are_spec_errors(
    tmp_path: Path, defense: str, param: str, value: float
) -> None:
    data = _base()
    data["grid"]["defense"] = [{"name": "none"}, {"name": defense, "params": {param: value}}]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert err.value.path == f"grid.defense[1].params.{param}", str(err.value)
    assert "\n" not in str(err.value)


def test_a_huge_grid_asks_for_yes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _base()
    data["grid"]["seed"] = 6000  # 6000 cells > max_cells 5000
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(data))
    assert sweep.main([str(spec), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "6000 cells" in err and "--yes" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.timeout(5, method="signal")
def test_a_grid_of_a_hundred_million_cells_asks_for_yes_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _base()
    data["grid"].update(batch_size=list(range(1, 101)), seed=100)
    data["grid"]["defense"] = [{"name": "gaussian", "params": {"sigma": [i / 1000 for i in range(100)]}}]
    data["grid"]["attack"] = [{"name": "grnn", "params": {"iterations": list(range(1, 101))}}]
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(data))
    assert sweep.main([str(spec), "--results", str(tmp_path / "r")]) == 2
    assert "100000000 cells" in capsys.readouterr().err


@pytest.mark.parametrize("count", [2**40, 10**20])
def test_a_huge_seed_count_is_a_spec_error(count: int) -> None:
    data = _base()
    data["grid"]["seed"] = count
    with pytest.raises(SpecError) as err:
        parse_spec(data)
    assert err.value.path == "grid.seed"


def test_a_seed_torch_cannot_take_is_a_spec_error() -> None:
    data = _base()
    data["grid"]["seed"] = [2**64]
    with pytest.raises(SpecError) as err:
        parse_spec(data)
    assert err.value.path.startswith("grid.seed")


def test_an_unknown_key_with_a_newline_still_gives_one_line(tmp_path: Path) -> None:
    data = _base()
    data["data"]["\n"] = None
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------- who gets in


def test_readme_shows_the_tunnel_and_the_token() -> None:
    # cluster.yaml's own properties are tested in test_cluster_config.py; the README must tell users how
    # to reach a dashboard that is bound to the head's localhost, and how to submit with the token.
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "ray dashboard cluster.yaml" in text
    assert "auth_token" in text and "ray get-auth-token" in text
    assert "CVE-2023-48022" in text


def test_nothing_in_a_results_folder_is_executable(tmp_path: Path) -> None:
    folder = tmp_path / "defenses"
    _legit_ledger(folder)
    Ledger(folder).compact()
    for path in folder.rglob("*"):
        if path.is_file():
            assert not stat.S_IMODE(path.stat().st_mode) & 0o111, path
    shutil.rmtree(folder)
