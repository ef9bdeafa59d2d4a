"""The sweep spec parser, fuzzed: random YAML documents, random mutations of the real sweeps/*.yaml, and
random edits of their text. Every input is either accepted, and then round-trips (to_yaml -> parse gives
the same spec and hash), or refused with the project's one validation error, SpecError: one line that
names the file, and the dotted field path when the problem is in a field. Any other exception is a bug.

`make test` runs a fixed (derandomized) sample; the `faults` marker runs many more random cases
(GRNN_FUZZ_EXAMPLES, default 2000 per strategy). Each test prints a `reliability:` line with its count.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.spec import SpecError, SweepSpec, load_spec, parse_spec

SWEEPS = sorted((Path(__file__).resolve().parents[2] / "sweeps").glob("*.yaml"))
# The fast sample mutates the sweeps on small victims: load_spec builds every victim once, and a
# ResNet-18 takes ~0.25 s to build here. The long run mutates all of them.
SMALL_SWEEPS = [p for p in SWEEPS if "resnet" not in p.read_text()]
FAST = {"random_documents": 100, "mutations": 150, "text_edits": 100}
LONG = int(os.environ.get("GRNN_FUZZ_EXAMPLES", "2000"))

# Problems the parser reports without a field path: the file as a whole (YAML syntax, encoding, empty,
# not a mapping at the top). Everything else must name the field.
_WHOLE_FILE = ("invalid YAML", "not UTF-8", "the file is empty", "(top level)")


def _settings(name: str, long: bool) -> settings:
    if long:
        return settings(max_examples=LONG, deadline=None, database=None,
                        suppress_health_check=list(HealthCheck))
    return settings(max_examples=FAST[name], deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


# ---------------------------------------------------------------------------------------------- the check


class Tally:
    def __init__(self) -> None:
        self.accepted = 0
        self.refused = 0

    def line(self, name: str) -> str:
        return f"reliability: fuzz={name} cases={self.accepted + self.refused} accepted={self.accepted} refused={self.refused}"


def check_text(text: str | bytes, tally: Tally) -> None:
    """load_spec on `text` written to a file: accepted and round-trips, or one SpecError line with a path."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzzed.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        try:
            spec = load_spec(path)
        except SpecError as err:
            message = str(err)
            assert "\n" not in message, message
            assert message.startswith(str(path)), message
            assert err.path or any(marker in message for marker in _WHOLE_FILE), message
            tally.refused += 1
            return
    check_round_trip(spec)
    tally.accepted += 1


def check_round_trip(spec: SweepSpec) -> None:
    again = parse_spec(yaml.safe_load(spec.to_yaml()))
    assert again.model_dump_json() == spec.model_dump_json()
    assert again.spec_hash() == spec.spec_hash()
    if spec.cell_count() <= 500:
        keys = [c.key() for c in spec.cells()]
        assert len(keys) == len(set(keys)) and 1 <= len(keys) <= spec.cell_count()


def dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------------- strategies

# Words the parser knows, so random documents reach past the first unknown key.
_FIELDS = [
    "name", "description", "data", "grid", "fl", "update", "eval_every", "success_psnr", "resources",
    "max_concurrent", "trial_timeout_s", "max_failures", "max_cells", "search", "dataset", "root", "download",
    "image_size", "split", "distinct_labels", "victim", "fl_round", "batch_size", "defense", "attack", "seed",
    "params", "kind", "local_steps", "local_lr", "cpu", "gpu", "method", "iterations", "lr", "sigma", "clip",
    "ratio", "bits", "max_norm", "scale", "restarts", "init", "preset", "steps",
]
_WORDS = [
    "digits", "mnist", "cifar10", "lenet", "resnet18", "grnn", "dlg", "idlg", "ig", "none", "gaussian", "dp_sgd",
    "prune", "fedsgd", "fedavg", "grid", "optuna", "train", "test", "all", "../x", "/abs", "", "a b", "1e-4",
]
# Integers stay small: a seed *count* of 10**8 or more is a known defect (test_safety) that this fuzz must
# not trip over and over (it allocates the whole range before any limit is checked).
scalars = (
    st.none() | st.booleans() | st.integers(-10**4, 10**4) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(_WORDS)
)
# Keys without control characters: a key holding a newline breaks the one-line message, a known defect
# with its own test (test_safety); the fuzz must not stop at it every run.
keys = st.sampled_from(_FIELDS) | st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=8)
documents = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=25,
)
top_level = st.dictionaries(keys, documents, max_size=8) | documents


def _paths(node: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a YAML tree: () is the root, then dict keys and list indices."""
    out = [here]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*here, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*here, i))
    return out


def _get(node: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        node = node[part]
    return node


def _numbers(value: Any) -> list[Any]:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return [0, -1]
    return [-value, 0, value * 10**6, math.nan, math.inf, float(value), str(value), [value, value]]


@st.composite
def mutated_sweeps(draw: st.DrawFn, sweeps: list[Path]) -> str:
    """A real sweep file with one to three random edits of its data."""
    data = yaml.safe_load(draw(st.sampled_from(sweeps)).read_text())
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(data)))
        if not path:
            data = draw(documents) if draw(st.integers(0, 9)) == 0 else data
            continue
        parent, last = _get(data, path[:-1]), path[-1]
        value = parent[last]
        op = draw(st.sampled_from(["delete", "replace", "number", "wrap", "insert", "empty", "duplicate"]))
        if op == "delete":
            del parent[last]
        elif op == "replace":
            parent[last] = draw(documents)
        elif op == "number":
            parent[last] = draw(st.sampled_from(_numbers(value)))
        elif op == "wrap":
            parent[last] = [value] if draw(st.booleans()) else {"name": value, "params": {}}
        elif op == "insert" and isinstance(value, dict):
            value[draw(keys)] = draw(documents)
        elif op == "empty":
            parent[last] = draw(st.sampled_from([[], {}, "", None]))
        elif op == "duplicate" and isinstance(value, list) and value:
            value.append(copy.deepcopy(value[draw(st.integers(0, len(value) - 1))]))
    return dump(data)


@st.composite
def edited_texts(draw: st.DrawFn, sweeps: list[Path]) -> str | bytes:
    """A real sweep file's text with characters or lines cut, inserted or swapped, or bytes that are not UTF-8."""
    text = draw(st.sampled_from(sweeps)).read_text()
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["cut", "insert", "line", "indent"]))
        if op == "cut":
            text = text[:at] + text[at + draw(st.integers(1, 20)):]
        elif op == "insert":
            text = text[:at] + draw(st.sampled_from([":", "-", "[", "]", "{", "}", "'", '"', "\t", "&a", "*a", "!!",
                                                     "!!python/object/apply:os.system ['true']", "\n", " ", "#"])) + text[at:]
        elif op == "line":
            lines = text.splitlines(keepends=True)
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
            text = "".join(lines)
        else:
            lines = text.splitlines(keepends=True)
            i = draw(st.integers(0, len(lines) - 1))
            lines[i] = " " * draw(st.integers(1, 3)) + lines[i]
            text = "".join(lines)
    if draw(st.integers(0, 19)) == 0:
        return text.encode() + b"\xff\xfe"
    return text


# ---------------------------------------------------------------------------------------------- tests


def _run(name: str, strategy: st.SearchStrategy[Any], long: bool, to_text: Any) -> Tally:
    tally = Tally()

    @_settings(name, long)
    @given(strategy)
    def fuzz(value: Any) -> None:
        check_text(to_text(value), tally)

    fuzz()
    print(tally.line(name))
    return tally


@pytest.mark.parametrize("long", [pytest.param(False, id="fast"), pytest.param(True, id="long", marks=pytest.mark.faults)])
def test_random_documents(long: bool) -> None:
    tally = _run("random_documents", top_level, long, dump)
    assert tally.refused > 0


@pytest.mark.parametrize("long", [pytest.param(False, id="fast"), pytest.param(True, id="long", marks=pytest.mark.faults)])
def test_mutations_of_the_real_sweeps(long: bool) -> None:
    tally = _run("mutations", mutated_sweeps(SWEEPS if long else SMALL_SWEEPS), long, lambda text: text)
    assert tally.accepted > 0 and tally.refused > 0  # the sample reaches both sides of the parser


@pytest.mark.parametrize("long", [pytest.param(False, id="fast"), pytest.param(True, id="long", marks=pytest.mark.faults)])
def test_text_edits_of_the_real_sweeps(long: bool) -> None:
    tally = _run("text_edits", edited_texts(SWEEPS if long else SMALL_SWEEPS), long, lambda text: text)
    assert tally.refused > 0


@pytest.mark.parametrize("sweep_file", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_real_sweep_round_trips_through_the_fuzz_check(sweep_file: Path) -> None:
    tally = Tally()
    check_text(sweep_file.read_text(), tally)
    assert tally.accepted == 1
