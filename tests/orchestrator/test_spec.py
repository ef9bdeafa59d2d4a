"""orchestrator.spec: every user mistake is one SpecError sentence naming file, path and value; expansion
is the full cartesian product with stable, unique keys; every sweeps/*.yaml loads and round-trips."""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import grnn_engine
from grnn_engine.errors import ConfigError
from grnn_engine.trial_spec import TrialSpec
from orchestrator.spec import FLSpec, SpecError, SweepSpec, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[2]
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))

BASE = """\
name: unit
data: {dataset: digits, image_size: 32}
grid:
  victim: [lenet]
  batch_size: [1, 4]
  defense:
    - {name: none}
    - {name: gaussian, params: {sigma: [0.01, 0.1]}}
  attack:
    - {name: grnn, params: {iterations: 5}}
    - {name: dlg, params: {iterations: 2}}
  seed: [0]
"""


def write(tmp_path: Path, text: str, name: str = "unit_spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_error(path: Path) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return str(info.value)


def assert_names(message: str, path: Path | str, dotted: str, value: str) -> None:
    """The message is one sentence that names the file, the dotted field path and the bad value."""
    assert str(path) in message, message
    assert f": {dotted}:" in message, message
    assert value in message, message
    assert "\n" not in message, message


def base_data() -> dict[str, Any]:
    return yaml.safe_load(BASE)


# ---------------------------------------------------------------------------------------------- mistakes


def test_base_spec_loads(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, BASE))
    assert spec.name == "unit" and spec.data.dataset == "digits"


def test_typo_in_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "max_concurent: 2\n")
    message = load_error(path)
    assert_names(message, path, "max_concurent", "'max_concurent'")
    assert "did you mean 'max_concurrent'" in message


def test_typo_in_nested_key(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("batch_size:", "batch_sise:"))
    message = load_error(path)
    assert_names(message, path, "grid.batch_sise", "'batch_sise'")
    assert "did you mean 'batch_size'" in message


def test_typo_in_plugin_entry_key(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("{name: dlg, params:", "{name: dlg, prams:"))
    message = load_error(path)
    assert_names(message, path, "grid.attack[1].prams", "'prams'")
    assert "did you mean 'params'" in message


@pytest.mark.parametrize(
    ("old", "new", "dotted", "meant"),
    [
        ("name: unit\n", "namex: unit\n", "namex", "name"),  # top level
        ("data: {dataset: digits,", "data: {datset: digits,", "data.datset", "dataset"),  # nested section
        ("  victim: [lenet]\n", "  victm: [lenet]\n", "grid.victm", "victim"),
        ("{name: dlg, params:", "{nme: dlg, params:", "grid.attack[1].nme", "name"),  # inside a list
    ],
)
def test_misspelt_required_key_names_the_typo_and_the_key_it_stands_for(
    tmp_path: Path, old: str, new: str, dotted: str, meant: str
) -> None:
    path = write(tmp_path, BASE.replace(old, new))
    message = load_error(path)
    typo = dotted.rsplit(".", 1)[-1]
    assert_names(message, path, dotted, f"'{typo}'")
    assert f"unknown key '{typo}' — did you mean '{meant}', a required key that is missing?" in message
    assert "required key is missing" not in message
    assert "more problem" not in message  # the typo and the key it stands for are one problem


def test_unknown_key_unlike_the_missing_one_leaves_the_missing_key_first(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("name: unit\n", "colour: blue\n"))
    message = load_error(path)
    assert_names(message, path, "name", "got nothing")
    assert "required key is missing" in message and "1 more problem in this spec" in message


def test_wrong_type(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("batch_size: [1, 4]", 'batch_size: "four"'))
    message = load_error(path)
    assert_names(message, path, "grid.batch_size", "'four'")
    assert "integer" in message


def test_wrong_type_inside_a_list_names_the_item(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("batch_size: [1, 4]", "batch_size: [1, four]"))
    assert_names(load_error(path), path, "grid.batch_size[1]", "'four'")


def test_quoted_number_is_not_coerced(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("batch_size: [1, 4]", 'batch_size: ["4"]'))
    assert_names(load_error(path), path, "grid.batch_size[0]", "'4'")


def test_batch_size_out_of_range(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("batch_size: [1, 4]", "batch_size: 0"))
    message = load_error(path)
    assert_names(message, path, "grid.batch_size", "got 0")
    assert ">= 1" in message


def test_negative_sigma_is_caught_by_building_the_defense(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("sigma: [0.01, 0.1]", "sigma: [0.01, -0.1]"))
    assert_names(load_error(path), path, "grid.defense[1].params.sigma", "-0.1")


def test_bad_plugin_value_is_caught_by_load_not_parse(tmp_path: Path) -> None:
    data = base_data()
    data["grid"]["attack"][1]["params"]["iterations"] = -3
    parse_spec(data, "unit")  # names and param names only
    path = write(tmp_path, yaml.safe_dump(data))
    assert_names(load_error(path), path, "grid.attack[1].params.iterations", "-3")


@pytest.mark.parametrize("victim", ["lenet", "{name: lenet, params: {init: default}}"])
def test_image_size_too_small_for_the_victim(tmp_path: Path, victim: str) -> None:
    text = BASE.replace("image_size: 32", "image_size: 12").replace("victim: [lenet]", f"victim: [{victim}]")
    path = write(tmp_path, text)
    message = load_error(path)
    assert_names(message, path, "data.image_size", "12")
    assert "lenet" in message


def test_unknown_attack_suggests_the_closest(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("{name: grnn,", "{name: grn,"))
    message = load_error(path)
    assert_names(message, path, "grid.attack[0].name", "'grn'")
    assert "did you mean 'grnn'" in message
    for name in grnn_engine.ATTACKS.names():
        assert name in message


def test_unknown_victim(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("victim: [lenet]", "victim: [lenet, lenett]"))
    message = load_error(path)
    assert_names(message, path, "grid.victim[1].name", "'lenett'")
    assert "did you mean 'lenet'" in message


def test_unknown_defense(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("{name: gaussian,", "{name: gausian,"))
    message = load_error(path)
    assert_names(message, path, "grid.defense[1].name", "'gausian'")
    assert "did you mean 'gaussian'" in message


def test_unknown_dataset(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("dataset: digits", "dataset: cifar"))
    message = load_error(path)
    assert_names(message, path, "data.dataset", "'cifar'")
    assert "cifar10" in message


def test_unknown_attack_param(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("{iterations: 2}", "{iterationz: 2}"))
    message = load_error(path)
    assert_names(message, path, "grid.attack[1].params.iterationz", "'iterationz'")
    assert "did you mean 'iterations'" in message


def test_victim_param_set_by_the_sweep_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path, BASE.replace("victim: [lenet]", "victim: [{name: lenet, params: {image_size: 16}}]")
    )
    message = load_error(path)
    assert_names(message, path, "grid.victim[0].params.image_size", "'image_size'")
    assert "data.image_size" in message


def test_empty_param_axis(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("sigma: [0.01, 0.1]", "sigma: []"))
    assert_names(load_error(path), path, "grid.defense[1].params.sigma", "[]")


@pytest.mark.parametrize("bad", ["../x", "/abs", "..", ".", "a/b", "x y", ""])
def test_bad_results_name(tmp_path: Path, bad: str) -> None:
    path = write(tmp_path, BASE.replace("name: unit", f"name: {bad!r}"))
    message = load_error(path)
    assert_names(message, path, "name", repr(bad))
    assert "[A-Za-z0-9._-]+" in message


def test_unknown_update_kind(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "update: {kind: fedprox}\n")
    message = load_error(path)
    assert_names(message, path, "update.kind", "'fedprox'")
    assert "fedsgd" in message and "fedavg" in message


def test_fedavg_setting_out_of_range(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "update: {kind: fedavg, local_steps: 0}\n")
    assert_names(load_error(path), path, "update.local_steps", "got 0")


def test_unknown_search_method(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "search: {method: bayes}\n")
    message = load_error(path)
    assert_names(message, path, "search.method", "'bayes'")
    assert "grid" in message and "optuna" in message


@pytest.mark.parametrize("bad", ["0", "-1", "'4'", "2.0", "true"])
def test_pack_must_be_a_whole_number_of_cells(tmp_path: Path, bad: str) -> None:
    path = write(tmp_path, BASE + f"pack: {bad}\n")
    message = load_error(path)
    assert_names(message, path, "pack", bad.strip("'").replace("true", "True"))
    assert "integer" in message


@pytest.mark.parametrize(
    ("extra", "used"),
    [
        ("scheduler: asha\n", "scheduler: asha"),
        ("search: {method: optuna, params: {attack.params.lr: {type: loguniform, low: 0.0001, high: 0.01}}, "
         "objectives: [{metric: psnr, direction: maximize}]}\n", "search: {method: optuna}"),
    ],
)  # fmt: skip
def test_pack_with_early_stopping_or_a_search_is_refused(tmp_path: Path, extra: str, used: str) -> None:
    path = write(tmp_path, BASE + "pack: 4\n" + extra)
    message = load_error(path)
    assert_names(message, path, "pack", "4")
    assert "cannot be stopped or sampled one by one" in message and used in message
    assert parse_spec(yaml.safe_load(BASE + "pack: 1\n" + extra)).pack == 1  # pack 1 goes with anything
    assert load_spec(write(tmp_path, BASE + "pack: 4\n", "grid.yaml")).pack == 4


def test_fractional_gpu_above_one(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "resources: {cpu: 1, gpu: 1.5}\n")
    assert_names(load_error(path), path, "resources.gpu", "1.5")


def test_missing_required_section(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("name: unit\n", ""))
    message = load_error(path)
    assert_names(message, path, "name", "got nothing")
    assert "missing" in message


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("  batch_size: [1, 4]", "  batch_size: [1, 4\n  seed: 0"))
    message = load_error(path)
    assert str(path) in message
    assert "line 6" in message and "seed: 0" in message, message  # where the parser gave up
    assert "starts on line 5" in message, message  # where the unclosed '[' was opened


def test_yaml_bad_indentation_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: unit\ndata:\n  dataset: digits\n   split: test\n")
    message = load_error(path)
    assert str(path) in message and "line 4" in message and "split: test" in message


def test_duplicate_key_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "name: other\n")
    message = load_error(path)
    assert str(path) in message and "duplicate key 'name'" in message


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    message = load_error(path)
    assert str(path) in message and "empty" in message


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- a\n- b\n")
    message = load_error(path)
    assert str(path) in message and "mapping" in message and "['a', 'b']" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "no_such_sweep.yaml"
    message = load_error(path)
    assert str(path) in message and "no such file" in message


def test_spec_error_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        parse_spec({"name": 3}, "x.yaml")


def test_several_problems_report_the_first_and_count_the_rest() -> None:
    data = base_data()
    data["eval_every"] = 0
    data["max_cells"] = 0
    with pytest.raises(SpecError) as info:
        parse_spec(data, "x.yaml")
    assert "x.yaml: eval_every:" in str(info.value) and "1 more problem" in str(info.value)


# Values a user might put anywhere: pydantic's ValidationError must never escape, only SpecError.
_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=True),
    st.text(max_size=4),
    st.lists(st.integers(-1, 2), max_size=2),
    st.dictionaries(st.sampled_from(["name", "x"]), st.integers(), max_size=2),
)
_PLACES = [
    ("name",),
    ("data",),
    ("data", "dataset"),
    ("data", "image_size"),
    ("data", "split"),
    ("grid",),
    ("grid", "victim"),
    ("grid", "batch_size"),
    ("grid", "defense"),
    ("grid", "attack"),
    ("grid", "seed"),
    ("grid", "fl_round"),
    ("update",),
    ("resources",),
    ("resources", "gpu"),
    ("max_concurrent",),
    ("pack",),
    ("search",),
    ("fl",),
    ("eval_every",),
    ("bogus",),
    ("grid", "attack", 0),
    ("grid", "attack", 0, "params"),
]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(place=st.sampled_from(_PLACES), value=_JUNK)
def test_any_bad_value_is_a_spec_error_never_a_validation_error(place: tuple[Any, ...], value: Any) -> None:
    data = base_data()
    target = data
    for key in place[:-1]:
        target = target.setdefault(key, {}) if isinstance(target, dict) else target[key]
    target[place[-1]] = value
    try:
        parse_spec(data, "fuzz.yaml")
    except SpecError as exc:
        assert str(exc).startswith("fuzz.yaml: ") and "\n" not in str(exc)


# ---------------------------------------------------------------------------------------------- expansion


GRID = {
    "name": "grid",
    "data": {"dataset": "digits"},
    "grid": {
        "victim": ["lenet", {"name": "lenet_zhu"}],
        "fl_round": [0, 1],
        "batch_size": [1, 2, 4],
        "defense": [{"name": "none"}, {"name": "gaussian", "params": {"sigma": [0.01, 0.1]}}],
        "attack": [{"name": "grnn", "params": {"iterations": [1, 2], "lr": 0.1}}, "dlg"],
        "seed": 2,
    },
}


def test_cell_count_is_the_product_of_axis_lengths() -> None:
    spec = parse_spec(GRID)
    cells = spec.cells()
    assert len(cells) == spec.cell_count() == 2 * 2 * 3 * 3 * 3 * 2
    assert len({c.key() for c in cells}) == len(cells)


def test_cells_are_exactly_the_cartesian_product() -> None:
    cells = parse_spec(GRID).cells()
    got = {
        (
            c.victim,
            c.fl_round,
            c.batch_size,
            c.defense,
            tuple(sorted(c.defense_params.items())),
            c.attack,
            tuple(sorted(c.attack_params.items())),
            c.seed,
        )
        for c in cells
    }
    defenses = [("none", ()), ("gaussian", (("sigma", 0.01),)), ("gaussian", (("sigma", 0.1),))]
    attacks = [
        ("grnn", (("iterations", 1), ("lr", 0.1))),
        ("grnn", (("iterations", 2), ("lr", 0.1))),
        ("dlg", ()),
    ]
    want = {
        (v, r, b, d, dp, a, ap, s)
        for v, r, b, (d, dp), (a, ap), s in itertools.product(
            ["lenet", "lenet_zhu"], [0, 1], [1, 2, 4], defenses, attacks, [0, 1]
        )
    }
    assert got == want


def test_cells_carry_the_spec_settings() -> None:
    data = {
        **GRID,
        "update": {"kind": "fedavg", "local_steps": 3},
        "success_psnr": 25.0,
        "eval_every": 7,
        "fl": {"clients": 4},
    }
    data["data"] = {
        "dataset": "digits",
        "root": "/data/here",
        "image_size": 16,
        "split": "train",
        "distinct_labels": True,
    }
    cell = parse_spec(data).cells()[0]
    assert (cell.dataset, cell.data_root, cell.image_size, cell.split, cell.distinct_labels) == (
        "digits",
        "/data/here",
        16,
        "train",
        True,
    )
    assert cell.update == "fedavg" and cell.update_params == {"local_steps": 3, "local_lr": 0.01}
    assert (cell.success_psnr, cell.eval_every, cell.fl["clients"]) == (25.0, 7, 4)
    assert set(cell.fl) == set(FLSpec.model_fields)  # every FL setting, spelled out in the cell


def test_keys_do_not_depend_on_axis_order_in_the_file() -> None:
    shuffled = {
        "name": "other-name",
        "data": {"dataset": "digits"},
        "grid": {
            "seed": [1, 0],
            "attack": ["dlg", {"params": {"lr": 0.1, "iterations": [2, 1]}, "name": "grnn"}],
            "defense": [{"name": "gaussian", "params": {"sigma": [0.1, 0.01]}}, "none"],
            "batch_size": [4, 2, 1],
            "fl_round": [1, 0],
            "victim": ["lenet_zhu", "lenet"],
        },
    }
    a, b = parse_spec(GRID).cells(), parse_spec(shuffled).cells()
    assert {c.key() for c in a} == {c.key() for c in b}
    assert [c.key() for c in a] != [c.key() for c in b]  # same cells, in the file's order


def test_same_cell_in_two_specs_has_the_same_key() -> None:
    small = {
        "name": "one",
        "data": {"dataset": "digits"},
        "grid": {"victim": "lenet", "batch_size": 2, "attack": {"name": "dlg", "params": {"iterations": 3}}},
    }
    (cell,) = parse_spec(small).cells()
    by_hand = TrialSpec(
        attack="dlg",
        attack_params={"iterations": 3},
        victim="lenet",
        dataset="digits",
        batch_size=2,
        eval_every=50,
    )
    assert cell.key() == by_hand.key()
    bigger = {**small, "grid": {**small["grid"], "batch_size": [1, 2, 8], "seed": 3}}
    assert cell.key() in {c.key() for c in parse_spec(bigger).cells()}


def test_duplicate_cells_are_kept_once() -> None:
    data = {
        "name": "dup",
        "data": {"dataset": "digits"},
        "grid": {"victim": "lenet", "batch_size": [1, 1, 2], "attack": ["dlg", "dlg"]},
    }
    spec = parse_spec(data)
    assert spec.cell_count() == 6
    assert [c.batch_size for c in spec.cells()] == [1, 2]


def test_scalar_axes_and_seed_count() -> None:
    spec = parse_spec(
        {
            "name": "s",
            "data": {"dataset": "digits"},
            "grid": {"victim": "lenet", "batch_size": 4, "fl_round": 2, "attack": "dlg", "seed": 3},
        }
    )
    assert spec.grid.batch_size == [4] and spec.grid.fl_round == [2] and spec.grid.seed == [0, 1, 2]
    assert [c.seed for c in spec.cells()] == [0, 1, 2]


def test_per_attack_eval_every_overrides_the_spec() -> None:
    spec = parse_spec(
        {
            "name": "e",
            "data": {"dataset": "digits"},
            "eval_every": 40,
            "grid": {"victim": "lenet", "attack": ["grnn", {"name": "dlg", "eval_every": 4}]},
        }
    )
    assert {c.attack: c.eval_every for c in spec.cells()} == {"grnn": 40, "dlg": 4}


def test_list_of_lists_sweeps_list_values(tmp_path: Path) -> None:
    steps = [{"name": "clip", "params": {"max_norm": 1.0}}, {"name": "gaussian", "params": {"sigma": 0.01}}]
    data = {
        "name": "c",
        "data": {"dataset": "digits"},
        "grid": {
            "victim": "lenet",
            "attack": "dlg",
            "defense": {"name": "compose", "params": {"steps": [steps]}},
        },
    }
    (cell,) = load_spec(write(tmp_path, yaml.safe_dump(data))).cells()
    assert cell.defense == "compose" and cell.defense_params == {"steps": steps}


def test_exponent_floats_without_a_dot_load_as_numbers(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, BASE.replace("sigma: [0.01, 0.1]", "sigma: [1e-4, 1E-3]")))
    assert spec.grid.defense[1].params["sigma"] == [1e-4, 1e-3]


def test_spec_hash_ignores_where_data_lives_but_not_what_is_run() -> None:
    spec = parse_spec(GRID)
    moved = parse_spec({**GRID, "data": {"dataset": "digits", "root": "/elsewhere", "download": True}})
    changed = parse_spec({**GRID, "grid": {**GRID["grid"], "seed": 3}})
    assert len(spec.spec_hash()) == 16 and int(spec.spec_hash(), 16) >= 0
    assert spec.spec_hash() == parse_spec(GRID).spec_hash() == moved.spec_hash()
    assert spec.spec_hash() != changed.spec_hash()


def test_spec_hash_ignores_run_settings() -> None:
    spec = parse_spec(GRID)
    rerun = parse_spec({**GRID, "resources": {"cpu": 2, "gpu": 0}, "max_concurrent": 1, "trial_timeout_s": 99,
                        "max_failures": 3, "max_cells": 10, "description": "again", "pack": 4})
    assert rerun.spec_hash() == spec.spec_hash()


# ---------------------------------------------------------------------------------------------- sweeps/*.yaml


def _missing_defenses(path: Path) -> list[str]:
    grid = yaml.safe_load(path.read_text())["grid"]
    entries = grid.get("defense", [])
    names = [
        e if isinstance(e, str) else e["name"] for e in (entries if isinstance(entries, list) else [entries])
    ]
    return sorted({n for n in names if n != "none" and n not in grnn_engine.DEFENSES})


@pytest.fixture(params=SWEEPS, ids=[p.stem for p in SWEEPS])
def sweep_file(request: pytest.FixtureRequest) -> Path:
    path: Path = request.param
    missing = _missing_defenses(path)
    if missing:
        pytest.skip(f"defenses registry not yet present (missing: {', '.join(missing)})")
    return path


def test_the_four_sweeps_exist() -> None:
    assert {p.stem for p in SWEEPS} >= {"quickstart", "defenses", "batch_sizes", "convergence"}


def test_every_sweep_loads(sweep_file: Path) -> None:
    spec = load_spec(sweep_file)
    cells = spec.cells()
    assert spec.name == sweep_file.stem
    assert 0 < len(cells) <= spec.max_cells
    assert len(cells) == spec.cell_count()


def test_every_sweep_round_trips(sweep_file: Path) -> None:
    spec = load_spec(sweep_file)
    again = parse_spec(yaml.safe_load(spec.to_yaml()), "round-trip")
    assert again == spec
    assert again.spec_hash() == spec.spec_hash()
    assert [c.key() for c in again.cells()] == [c.key() for c in spec.cells()]


def test_quickstart_needs_no_data_files() -> None:
    spec = load_spec(REPO / "sweeps" / "quickstart.yaml")
    assert spec.data.dataset == "digits" and spec.resources.gpu == 0 and spec.resources.cpu == 1
    assert {c.attack for c in spec.cells()} == {"grnn", "dlg", "idlg", "ig"}


def test_round_trip_keeps_every_setting() -> None:
    data = {
        **GRID,
        "description": "d",
        "update": {"kind": "fedavg", "local_steps": 2, "local_lr": 0.5},
        "resources": {"cpu": 2, "gpu": 0.25},
        "max_concurrent": 3,
        "pack": 8,
        "fl": {"clients": 4, "local_lr": 0.5},
    }
    spec = parse_spec(data)
    assert isinstance(spec, SweepSpec)
    assert parse_spec(yaml.safe_load(spec.to_yaml())) == spec


def test_reid_identifier_is_checked_and_reaches_every_cell(tmp_path: Path) -> None:
    faces = {**base_data(), "data": {"dataset": "att_faces", "image_size": 32}}
    spec = parse_spec({**faces, "reid": {"name": "trained", "params": {"epochs": 5}}})
    assert {(c.reid, c.reid_params["epochs"]) for c in spec.cells()} == {("trained", 5)}
    assert spec.spec_hash() != parse_spec(faces).spec_hash()
    assert all(c.reid is None for c in parse_spec(faces).cells())
    faces_base = BASE.replace("dataset: digits", "dataset: att_faces")
    path = write(tmp_path, faces_base + "reid: traind\n")
    assert_names(load_error(path), path, "reid.name", "'traind'")
    path = write(tmp_path, faces_base + "reid: {name: trained, params: {depth: 3}}\n")
    assert_names(load_error(path), path, "reid.params.depth", "'depth'")
    path = write(tmp_path, faces_base + "reid: {name: trained, params: {epochs: 0}}\n")
    assert_names(load_error(path), path, "reid.params.epochs", "0")
    # digits' labels are classes, not people: an identifier there would not re-identify anyone
    path = write(tmp_path, BASE + "reid: trained\n")
    message = load_error(path)
    assert_names(message, path, "reid", "'digits'")
    assert "att_faces or identities" in message
