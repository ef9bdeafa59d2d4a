"""The one-trial command line (`python -m grnn_engine`), fuzzed with hypothesis: whatever the arguments, it
exits 0 (one JSON line), 1 (one JSON line of a FAILED trial) or 2 (one `error:` line on stderr, nothing on
stdout), and never ends in a traceback.

Two depths: `validate` parses the arguments and builds what main() checks before a trial runs (the spec,
the attack, the defense, the victim, the --out folder), for many cases; `main` calls main() itself, real
trials included, with small values so that a valid case runs one attack iteration in well under a second.
`make test` runs a fixed sample; the `faults` marker runs many more random cases (GRNN_FUZZ_EXAMPLES).
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grnn_engine import ATTACKS, DATASETS, DEFENSES, VICTIMS, GrnnError, create_victim
from grnn_engine.__main__ import _prepare_out, build_parser, main, spec_from_args
from grnn_engine.cli_values import one_line

FAST = {"validate": 100, "main": 20}
LONG = int(os.environ.get("GRNN_FUZZ_EXAMPLES", "2000"))
EMPTY_ROOT = tempfile.mkdtemp(prefix="grnn-no-data-")  # datasets other than digits: not found, exit 2
atexit.register(shutil.rmtree, EMPTY_ROOT, ignore_errors=True)

GARBAGE = st.sampled_from(
    ["", "x", "1.5", "nan", "inf", "-inf", "1e400", "[1, 2]", "{a: 1}", "-1", "true", "null", "0x10", " 3", "=", "a=b=c"]
)


def _ints(small: bool) -> st.SearchStrategy[str]:
    edge = st.sampled_from([0, -1, 2**31, 2**63 - 1, 2**63, 2**64, 10**30])
    return st.one_of(st.integers(-2, 4 if small else 70), edge if not small else st.sampled_from([0, -1])).map(str)


def _floats() -> st.SearchStrategy[str]:
    return st.floats(allow_nan=True, allow_infinity=True).map(repr) | st.sampled_from(["1e-4", "0.01", "-0.5", "20"])


def _names(names: list[str]) -> st.SearchStrategy[str]:
    return st.sampled_from(names) | GARBAGE | st.text(st.characters(blacklist_categories=("Cs",)), max_size=6)


def _assignment(keys: list[str], small: bool) -> st.SearchStrategy[str]:
    key = st.sampled_from(keys) | st.text(st.characters(blacklist_categories=("Cs",)), max_size=5)
    value = _ints(small) | _floats() | GARBAGE | st.sampled_from(["paper", "strong", "adam", "default", "global"])
    return st.tuples(key, value).map(lambda kv: f"{kv[0]}={kv[1]}") | GARBAGE


def _params(registry: Any) -> list[str]:
    return sorted({p for n in registry.names() for p in registry.parameters(n)} | {"restarts", "lr", "iterations"})


_DEFENSE_SETTINGS = [("gaussian", "sigma=0.01"), ("laplace", "scale=0.01"), ("clip", "max_norm=1.0"),
                     ("prune", "ratio=0.5"), ("quantize", "bits=8"), ("soteria", "ratio=0.5"), ("dp_sgd", "clip=1.0")]


def _options(small: bool) -> dict[str, tuple[st.SearchStrategy[str] | None, st.SearchStrategy[str] | None]]:
    """option -> (a valid value, a broken or out-of-range value); None: a flag without a value."""
    ints = _ints(small)
    return {
        "--attack": (st.sampled_from(ATTACKS.names()), _names(ATTACKS.names())),
        "--victim": (st.sampled_from(VICTIMS.names()), _names(VICTIMS.names())),
        "--dataset": (st.just("digits"), _names(DATASETS.names())),
        "--data-root": (st.just(EMPTY_ROOT), st.sampled_from(["/nonexistent", "", "/proc/self"])),
        "--split": (st.sampled_from(["train", "test"]), st.just("all") | GARBAGE),
        "--image-size": (st.sampled_from(["16", "32"]), st.sampled_from(["-1", "0", "7", "8", "12", "600"]) | GARBAGE),
        "--batch-size": (st.sampled_from(["1", "2"]), st.sampled_from(["0", "-3", "1000"]) | GARBAGE),
        "--index": (st.integers(0, 358).map(str), ints | GARBAGE | st.just("359")),
        "--distinct-labels": (None, None),
        "--iterations": (st.sampled_from(["1", "2"]), ints | GARBAGE),
        "--attack-param": (st.just("lr=0.01"), _assignment(_params(ATTACKS) + ["preset", "optimizer"], small)),
        "--victim-param": (st.just("init=uniform"), _assignment(["init", "activation", "norm", "width"], small)),
        "--fl-round": (st.just("0"), st.sampled_from(["-1", "x"]) if small else ints | GARBAGE),
        "--fl-param": (st.just("clients=2"), _assignment(["clients", "local_lr", "iid", "defense", "foo"], small)),
        "--update": (st.sampled_from(["fedsgd", "fedavg"]), GARBAGE),
        "--local-steps": (st.sampled_from(["1", "2"]), ints | GARBAGE),
        "--local-lr": (st.sampled_from(["0.01", "0.1"]), _floats() | GARBAGE),
        "--defense": (st.sampled_from(DEFENSES.names()), _names(DEFENSES.names())),
        "--defense-param": (st.sampled_from([p for _, p in _DEFENSE_SETTINGS]), _assignment(_params(DEFENSES), small)),
        "--seed": (st.integers(0, 9).map(str), ints | GARBAGE),
        "--success-psnr": (st.sampled_from(["20", "15.5"]), _floats() | GARBAGE),
        "--eval-every": (st.sampled_from(["1", "5"]), ints | GARBAGE),
        "--device": (st.sampled_from(["auto", "cpu"]), st.sampled_from(["cuda", "cuda:1", "meta", "x"])),
        "--out": (st.sampled_from(["OUT", "OUT/a/b"]), st.sampled_from(["FILE", "/proc/grnn-out"])),
    }


@st.composite
def argvs(draw: st.DrawFn, small: bool) -> list[str]:
    """An argument list: a few options with valid values, and in about half the cases one to three of them
    broken (a bad type, out of range, an unknown name, garbage)."""
    options = _options(small)
    flags = draw(st.lists(st.sampled_from(sorted(options)), max_size=8))
    broken = set(draw(st.lists(st.sampled_from(flags), max_size=3))) if flags and draw(st.booleans()) else set()
    argv: list[str] = []
    if "--defense-param" in flags and "--defense" not in broken and draw(st.booleans()):
        name, setting = draw(st.sampled_from(_DEFENSE_SETTINGS))  # a matching defense and setting
        argv += ["--defense", name]
    for flag in flags:
        valid, bad = options[flag]
        argv.append(flag)
        values = bad if flag in broken else valid
        if values is not None:
            argv.append(draw(values))
    if draw(st.integers(0, 19)) == 0:  # a stray word or an unknown option
        argv.insert(draw(st.integers(0, len(argv))), draw(st.sampled_from(["foo", "--nope", "-x", "--"])))
    return argv


# ---------------------------------------------------------------------------------------------- the checks


class Tally:
    def __init__(self) -> None:
        self.codes: dict[int, int] = {}

    def add(self, code: int) -> None:
        self.codes[code] = self.codes.get(code, 0) + 1

    def line(self, name: str) -> str:
        exits = " ".join(f"exit{c}={n}" for c, n in sorted(self.codes.items()))
        return f"reliability: fuzz=cli_{name} cases={sum(self.codes.values())} {exits}"


def _materialise(argv: list[str], folder: Path) -> list[str]:
    """OUT: a fresh folder under `folder`; FILE: an existing file where a folder belongs."""
    (folder / "file").write_text("not a folder")
    return [str(folder / "out") + a[3:] if a.startswith("OUT") else str(folder / "file") if a == "FILE" else a
            for a in argv]


def _captured(call: Callable[[], int]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = call()
        except SystemExit as exit_:  # argparse: exit 2 on a bad argument
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def check_refusal(code: int, out: str, err: str, argv: list[str]) -> None:
    assert code == 2, (argv, code, out, err)
    assert out == "", (argv, out)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
    assert "Traceback" not in err


def validate(argv: list[str]) -> int:
    """What main() checks before it runs anything, as one function: raises GrnnError or exits 2."""
    args = build_parser().parse_args(argv)
    spec = spec_from_args(args)
    ATTACKS.create(spec.attack, **spec.attack_params)
    DEFENSES.create(spec.defense, **spec.defense_params)
    create_victim(spec.victim, num_classes=10, image_size=spec.image_size, seed=spec.seed, **spec.victim_params)
    if args.out is not None:
        _prepare_out(args.out)
    return 0


def _guarded(call: Callable[[], int]) -> Callable[[], int]:
    def run() -> int:
        try:
            return call()
        except GrnnError as err:
            print(f"error: {one_line(str(err))}", file=sys.stderr)  # as main() prints it
            return 2

    return run


def _settings(name: str, long: bool) -> settings:
    common: dict[str, Any] = {"deadline": None, "database": None, "suppress_health_check": list(HealthCheck)}
    if long:
        return settings(max_examples=LONG if name == "validate" else max(50, LONG // 5), **common)
    return settings(max_examples=FAST[name], derandomize=True, **common)


@pytest.fixture()
def no_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torch

    torch.set_num_threads(1)
    monkeypatch.setenv("GRNN_DATA_ROOT", EMPTY_ROOT)
    monkeypatch.setenv("GRNN_CACHE_DIR", str(tmp_path / "stages"))


@pytest.mark.parametrize("long", [pytest.param(False, id="fast"), pytest.param(True, id="long", marks=pytest.mark.faults)])
def test_fuzzed_arguments_validate_or_refuse_in_one_line(long: bool, no_data: None) -> None:
    tally = Tally()

    @_settings("validate", long)
    @given(argvs(small=False))
    def fuzz(argv: list[str]) -> None:
        with tempfile.TemporaryDirectory() as folder:
            real = _materialise(argv, Path(folder))
            code, out, err = _captured(_guarded(lambda: validate(real)))
        tally.add(code)
        if code != 0:
            check_refusal(code, out, err, real)

    fuzz()
    print(tally.line("validate"))
    assert tally.codes.get(2, 0) > 0 and tally.codes.get(0, 0) > 0


@pytest.mark.parametrize("long", [pytest.param(False, id="fast"), pytest.param(True, id="long", marks=pytest.mark.faults)])
def test_fuzzed_command_lines_exit_0_1_or_2_with_one_line(long: bool, no_data: None) -> None:
    tally = Tally()

    @_settings("main", long)
    @given(argvs(small=True))
    def fuzz(argv: list[str]) -> None:
        with tempfile.TemporaryDirectory() as folder:
            # One attack iteration: a valid case is a real trial, and a short one.
            real = [*_materialise(argv, Path(folder)), "--iterations", "1", "--no-progress"]
            code, out, err = _captured(lambda: main(real))
        tally.add(code)
        if code == 2:
            check_refusal(code, out, err, real)
            return
        assert code in (0, 1), (real, code, err)
        lines = out.splitlines()
        assert len(lines) == 1 and "Traceback" not in err, (real, out, err)
        row = json.loads(lines[0])
        assert row["status"] == ("COMPLETE" if code == 0 else "FAILED"), row

    fuzz()
    print(tally.line("main"))
    assert tally.codes.get(2, 0) > 0 and tally.codes.get(0, 0) > 0


# ---------------------------------------------------------------------------------------------- named cases


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--batch-size", "1000"], "larger than the 359 images"),  # a batch larger than the dataset
        (["--victim", "lenet", "--image-size", "12"], "12"),  # an image size the victim cannot take
        (["--image-size", "100000"], "100000"),
        (["--defense", "gaussian", "--defense-param", "sigma=-1"], "sigma"),
        (["--defense", "gaussian", "--defense-param", "sigma=nan"], "sigma"),
        (["--defense", "dp_sgd", "--defense-param", "clip=nan"], "clip"),
        (["--defense", "laplace", "--defense-param", "scale=-0.5"], "scale"),
        (["--seed", str(2**64)], "--seed"),
        (["--seed", "-1"], "--seed"),
        (["--success-psnr", "nan"], "--success-psnr"),
        (["--update", "fedavg", "--local-lr", "inf"], "--local-lr"),
        (["--out", "FILE"], "is a file"),
        (["--out", "/proc/grnn-out/x"], "cannot be created"),
        (["--victim", "\r"], "unknown victim '\\r'"),  # a control character echoed back stays on one line
        (["--attack-param", "a\nb=1"], "a\\nb"),
        (["foo\nbar"], "foo\\nbar"),
        (["--reid", "trained"], "dataset 'digits' has classes, not identities"),  # digits are not people
        (["--dataset", "att_faces", "--reid", "traind"], "unknown identifier 'traind' (did you mean 'trained'?)"),
        (["--dataset", "att_faces", "--reid", "trained", "--reid-param", "epochs=0"], "epochs must be"),
        (["--reid-param", "epochs=3"], "--reid-param applies only with --reid"),
    ],
)
def test_values_that_would_hurt_are_refused_before_the_trial(
    args: list[str], needle: str, no_data: None, tmp_path: Path
) -> None:
    code, out, err = _captured(lambda: main([*_materialise(args, tmp_path), "--iterations", "1", "--no-progress"]))
    check_refusal(code, out, err, args)
    assert needle in err
    assert not (tmp_path / "out").exists()
