"""Optuna search and ASHA in sweeps: a breaking-point search on digits runs on the embedded Ray and writes one
normal row per sampled trial, resumes from the ledger, and a bad search space is one clear SpecError."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from orchestrator import sweep
from orchestrator.results import Ledger, load
from orchestrator.running.options import RunOptions
from orchestrator.running.optuna_search import study_runs
from orchestrator.running.scoring import Scoring
from orchestrator.spec import OptunaSearch, SpecError, load_spec, parse_spec

SIGMA = {"type": "loguniform", "low": 1.0e-4, "high": 1.0}
SEARCH = {
    "method": "optuna",
    "params": {"defense.params.sigma": SIGMA},
    "breaking_point": {"threshold": 8.0},
    "num_samples": 3,
}


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory, ray_session: None, make_spec: Any) -> dict:
    tmp = tmp_path_factory.mktemp("search")
    spec = make_spec(
        tmp / "search.yaml", name="search", search=SEARCH,
        scheduler={"name": "asha", "metric": "grad_loss", "grace_period": 5, "reduction_factor": 2},
        grid={"defense": ["none", "gaussian"], "seed": [0]},
    )  # fmt: skip
    results = tmp / "results"
    summary = sweep.run([str(spec), "--results", str(results)])
    return {"spec": spec, "results": results, "df": load(results / "search"), "summary": summary}


def test_search_writes_one_row_per_sampled_trial(searched: dict) -> None:
    df = searched["df"]
    assert len(df) == 4 and df["trial_key"].is_unique and (df["status"] == "COMPLETE").all()
    assert df["search_id"].nunique() == 2  # one study per grid cell: none (run once) and gaussian (searched)
    baseline = df[df["defense"] == "none"]
    assert len(baseline) == 1 and json.loads(baseline["search_params"].item()) == {}
    noisy = df[df["defense"] == "gaussian"]
    assert len(noisy) == 3 and noisy["search_id"].nunique() == 1
    for _, row in noisy.iterrows():
        sampled = json.loads(row["search_params"])["defense.params.sigma"]
        assert row["defense.sigma"] == sampled and 1e-4 <= sampled <= 1.0  # the sampled value is the row's setting
    assert noisy["defense.sigma"].nunique() == 3


def test_a_study_of_a_re_tuned_preset_sets_its_earlier_trials_aside_and_runs_again(
        tmp_path: Path, ray_session: None, capsys: pytest.CaptureFixture[str], make_spec: Any) -> None:
    """The prior preset has been re-tuned (revision >= 1): trials of a study under its id of the previous
    revision are moved aside, and the study (under its new id) runs its samples."""
    spec = make_spec(tmp_path / "s.yaml", name="retuned", data={"dataset": "digits", "image_size": 16},
                     search={**SEARCH, "num_samples": 1},
                     grid={"defense": ["gaussian"], "seed": [0],
                           "attack": [{"name": "grnn", "params": {"preset": "prior", "iterations": 3}}]})
    [study] = load_spec(spec).studies()
    old_id = study.earlier_ids()[-1]
    folder = tmp_path / "results" / "retuned"
    Ledger(folder).write_part({"trial_key": "0123456789abcdef", "search_id": old_id, "status": "COMPLETE",
                               "psnr": 99.0})
    assert sweep.main([str(spec), "--results", str(folder.parent), "--dry-run"]) == 0
    assert "superseded results there (an earlier revision of their attack's settings): 1;" in capsys.readouterr().out
    summary = sweep.run([str(spec), "--results", str(folder.parent)])
    assert summary is not None and summary.ran == 1
    df = load(folder)
    assert df["search_id"].tolist() == [study.id] and df["psnr"].iloc[0] < 99
    [aside] = folder.parent.glob("retuned.superseded-*")
    assert load(aside)["search_id"].tolist() == [old_id]


def test_asha_rows_say_whether_and_where_a_trial_stopped(searched: dict) -> None:
    df = searched["df"]
    for _, row in df.iterrows():
        if row["stopped_early"]:
            assert row["stopped_at"] == row["iterations"] == 5 and math.isfinite(row["psnr"])
        else:
            assert row["iterations"] == 10 and pd.isna(row["stopped_at"])


def test_a_finished_search_resumes_with_nothing_to_run(searched: dict, capsys: pytest.CaptureFixture[str]) -> None:
    summary = sweep.run([str(searched["spec"]), "--results", str(searched["results"])])
    assert summary is not None and summary.ran == 0
    assert "nothing to run, all 4 trials have results" in capsys.readouterr().out


def test_ledger_rows_are_fed_back_to_their_study(searched: dict) -> None:
    spec = load_spec(searched["spec"])
    assert isinstance(spec.search, OptunaSearch)
    scoring = Scoring.of(spec.search, spec.success_psnr)
    rows = searched["df"].to_dict("records")
    options = RunOptions(name="search")
    runs, known = study_runs(spec.studies(), spec.search, scoring, rows, options)
    assert [run.remaining for run in runs] == [0, 0] and set(known) == set(searched["df"]["trial_key"])
    study = next(run for run in runs if run.searcher is not None).searcher._ot_study  # Optuna's own record
    values = sorted(t.value for t in study.trials)
    expected = sorted(abs(p - 8.0) for p in searched["df"].loc[searched["df"]["defense"] == "gaussian", "psnr"])
    assert values == pytest.approx(expected)
    # a larger budget leaves the rest to run, and the next sample is new
    bigger = spec.model_copy(update={"search": spec.search.model_copy(update={"num_samples": 5})})
    runs, _ = study_runs(bigger.studies(), bigger.search, scoring, rows, options)
    assert sorted(run.remaining for run in runs) == [0, 2]


def test_several_objectives_resume_into_a_multi_objective_study() -> None:
    spec = parse_spec({
        "name": "mo", "data": {"dataset": "digits"},
        "grid": {"victim": ["lenet"], "defense": ["gaussian"], "attack": [{"name": "grnn"}]},
        "search": {**SEARCH, "breaking_point": None,
                   "objectives": [{"metric": "psnr", "direction": "minimize"},
                                  {"metric": "model_acc", "direction": "maximize"}]},
    })  # fmt: skip
    assert isinstance(spec.search, OptunaSearch) and spec.search.sampler_name() == "nsga2"
    (study,) = spec.studies()
    trial = study.trial({"defense.params.sigma": 0.01})
    row = {"search_id": study.id, "trial_key": trial.key(), "status": "COMPLETE", "psnr": 12.5, "model_acc": 0.1,
           "search_params": json.dumps({"defense.params.sigma": 0.01})}  # fmt: skip
    scoring = Scoring.of(spec.search, spec.success_psnr)
    runs, known = study_runs([study], spec.search, scoring, [row], RunOptions(name="mo"))
    assert runs[0].remaining == 2 and known[trial.key()] == {"psnr": 12.5, "model_acc": 0.1}
    (told,) = runs[0].searcher._ot_study.trials
    assert told.values == [12.5, 0.1] and told.params == {"defense.params.sigma": 0.01}


def test_asha_stops_a_hopeless_grid_trial(tmp_path: Path, ray_session: None, make_spec: Any) -> None:
    # One trial at a time: the clean trial sets the bar at iteration 5, the drowned one is far worse there.
    spec = make_spec(
        tmp_path / "asha.yaml", name="asha", max_concurrent=1,
        scheduler={"name": "asha", "metric": "grad_loss", "grace_period": 5, "reduction_factor": 2},
        grid={"defense": ["none", {"name": "gaussian", "params": {"sigma": 10.0}}], "seed": [0]},
    )  # fmt: skip
    sweep.run([str(spec), "--results", str(tmp_path / "results")])
    df = load(tmp_path / "results" / "asha").set_index("defense")
    assert not df.loc["none", "stopped_early"] and df.loc["none", "iterations"] == 10
    assert df.loc["gaussian", "stopped_early"] and df.loc["gaussian", "stopped_at"] == 5
    assert df.loc["gaussian", "status"] == "COMPLETE" and df.loc["gaussian", "iterations"] == 5
    history = json.loads(df.loc["gaussian", "history_json"])
    assert [h["iteration"] for h in history] == [5]


# ---------------------------------------------------------------------------------------------- bad spaces

BASE = """\
name: unit
data: {dataset: digits}
grid:
  victim: [lenet]
  defense: [none, gaussian, quantize]
  attack: [{name: grnn, params: {iterations: 5}}]
"""


def search_error(tmp_path: Path, search: str) -> SpecError:
    path = tmp_path / "bad.yaml"
    path.write_text(BASE + textwrap.dedent(search), encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize(
    ("space", "path", "words"),
    [
        ("defense.params.sigmaa: {type: uniform, low: 0.1, high: 1}", "search.params.defense.params.sigmaa",
         ["unknown parameter", "did you mean 'defense.params.sigma'"]),
        ("attack.params.sigma: {type: uniform, low: 0.1, high: 1}", "search.params.attack.params.sigma",
         ["unknown parameter", "no attack"]),
        ("sigma: {type: uniform, low: 0.1, high: 1}", "search.params.sigma", ["unknown parameter", "fl_round"]),
        ("defense.params.sigma: {type: uniform, low: 1, high: 0.1}", "search.params.defense.params.sigma",
         ["empty range", "low < high"]),
        ("defense.params.sigma: {type: uniform, low: 0.5, high: 0.5}", "search.params.defense.params.sigma",
         ["empty range"]),
        ("defense.params.sigma: {type: loguniform, low: 0, high: 1}", "search.params.defense.params.sigma",
         ["log range needs low > 0"]),
        ("defense.params.sigma: {type: categorical, values: []}", "search.params.defense.params.sigma",
         ["empty categorical"]),
        ("defense.params.sigma: {type: uniform, low: -1, high: 1}", "search.params.defense.params.sigma",
         ["gaussian sigma", "-1"]),
        ("defense.params.bits: {type: uniform, low: 2, high: 8}", "search.params.defense.params.bits.type",
         ["integer", "int, categorical"]),
        ("fl.local_lrr: {type: uniform, low: 0.1, high: 1}", "search.params.fl.local_lrr", ["did you mean 'local_lr'"]),
    ],
)  # fmt: skip
def test_bad_search_space_is_one_clear_error(tmp_path: Path, space: str, path: str, words: list[str]) -> None:
    error = search_error(tmp_path, f"search:\n  method: optuna\n  params:\n    {space}\n  breaking_point: {{}}\n")
    assert error.path == path and f": {path}:" in str(error), str(error)
    for word in words:
        assert word in str(error), str(error)


def test_searched_and_gridded_at_once_is_refused(tmp_path: Path) -> None:
    text = BASE.replace("gaussian,", "{name: gaussian, params: {sigma: [0.1, 1]}},")
    path = tmp_path / "both.yaml"
    path.write_text(text + "search: {method: optuna, params: {defense.params.sigma: {type: uniform, low: 0.1, "
                    "high: 1}}, breaking_point: {}}\n", encoding="utf-8")  # fmt: skip
    with pytest.raises(SpecError, match=r"both searched and set in grid\.defense\[1\]\.params\.sigma"):
        load_spec(path)


def test_objectives_must_be_measured(tmp_path: Path) -> None:
    error = search_error(tmp_path, """\
        search:
          method: optuna
          params: {defense.params.sigma: {type: uniform, low: 0.1, high: 1}}
          objectives: [{metric: psnr, direction: minimize}, {metric: utility_acc, direction: maximize}]
        """)
    assert error.path == "search.objectives[1].metric" and "utility: true" in str(error)
    error = search_error(tmp_path, """\
        search:
          method: optuna
          params: {defense.params.sigma: {type: uniform, low: 0.1, high: 1}}
        """)
    assert error.path == "search" and "objectives" in str(error) and "breaking_point" in str(error)


def test_a_dp_epsilon_objective_needs_utility_and_dp_sgd_only(tmp_path: Path) -> None:
    """utility_dp_epsilon is measured only for dp_sgd trained under utility: true; a study of another defense
    would have no value to optimise."""
    search = ("search: {method: optuna, params: {defense.params.sigma: {type: uniform, low: 0.5, high: 2}}, "
              "objectives: [{metric: psnr, direction: minimize}, {metric: utility_dp_epsilon, direction: minimize}]}\n")
    error = search_error(tmp_path, search)  # BASE: no utility, defenses none/gaussian/quantize
    assert error.path == "search.objectives[1].metric" and "utility: true" in str(error)
    fl = "fl: {clients: 2, local_epochs: 1, local_batch_size: 16}\nutility: true\nutility_round: 1\n"
    path = tmp_path / "dp.yaml"
    path.write_text(BASE + fl + search, encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.path == "search.objectives[1].metric" and "gaussian, none, quantize" in str(info.value)
    path.write_text(BASE.replace("[none, gaussian, quantize]", "[dp_sgd]") + fl + search, encoding="utf-8")
    assert [o.metric for o in load_spec(path).search.objectives] == ["psnr", "utility_dp_epsilon"]


def test_a_model_dp_epsilon_objective_needs_a_trained_round(tmp_path: Path) -> None:
    """model_dp_epsilon is the budget DP-SGD had spent by the attacked round: none at fl_round 0, grid or searched."""
    fl = "fl: {clients: 2, local_epochs: 1, local_batch_size: 16}\nutility: true\nutility_round: 2\n"
    dp_grid = BASE.replace("[none, gaussian, quantize]", "[dp_sgd]")

    def load(grid_extra: str, params: str) -> SpecError | list[str]:
        path = tmp_path / "dp.yaml"
        path.write_text(dp_grid + grid_extra + fl + "search: {method: optuna, params: {" + params + "}, objectives: "
                        "[{metric: psnr, direction: minimize}, {metric: model_dp_epsilon, direction: minimize}]}\n",
                        encoding="utf-8")
        try:
            return [o.metric for o in load_spec(path).search.objectives]
        except SpecError as error:
            return error

    sigma = "defense.params.sigma: {type: uniform, low: 0.5, high: 2}"
    untrained = load("", sigma)  # the grid's default fl_round [0]
    assert isinstance(untrained, SpecError) and untrained.path == "search.objectives[1].metric"
    assert "fl_round 0" in str(untrained)
    searched = load("", sigma + ", fl_round: {type: int, low: 0, high: 2}")
    assert isinstance(searched, SpecError) and "fl_round 0" in str(searched)
    assert load("  fl_round: [1, 2]\n", sigma) == ["psnr", "model_dp_epsilon"]
    assert load("", sigma + ", fl_round: {type: int, low: 1, high: 2}") == ["psnr", "model_dp_epsilon"]
