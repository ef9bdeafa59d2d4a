"""FL training stages in a sweep, on the embedded Ray: each chain trained once before the trials, model accuracy
rising with the round, utility training under each defense, and a chain that cannot train failing its cells.

One sweep (digits, LeNet, fl_round 0/5/20, defenses none and gaussian sigma=1 with `utility: true`) serves
most tests; its FL settings are small enough to train 20 rounds in seconds and still learn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from grnn_engine import fl
from grnn_engine.trial_spec import TrialSpec
from orchestrator import sweep
from orchestrator.results import load
from orchestrator.running.stages import (
    STAGES_DIR,
    StagePlan,
    needs_stage_tasks,
    prepare_stages,
    stage_id,
    task_groups,
)
from orchestrator.spec import load_spec

# Large local batches and a large step: 20 rounds of digits train in seconds and reach ~0.97 accuracy.
FAST_FL = {"clients": 2, "local_epochs": 1, "local_batch_size": 128, "local_lr": 1.0}


@pytest.fixture(scope="module")
def stages_sweep(tmp_path_factory: pytest.TempPathFactory, ray_session: None, make_spec: Any) -> dict:
    tmp = tmp_path_factory.mktemp("fl")
    spec = make_spec(
        tmp / "fl.yaml", name="fl", fl=FAST_FL, utility=True,
        grid={
            "fl_round": [0, 5, 20],
            "defense": ["none", {"name": "gaussian", "params": {"sigma": 1.0}}],
            "attack": [{"name": "grnn", "params": {"iterations": 5}, "eval_every": 5}],
            "seed": [0],
        },
    )  # fmt: skip
    results = tmp / "results"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = sweep.run([str(spec), "--results", str(results)])
    return {"spec": spec, "results": results, "df": load(results / "fl"), "summary": summary, "out": out.getvalue()}


def test_model_accuracy_rises_with_the_round(stages_sweep: dict) -> None:
    df = stages_sweep["df"]
    assert len(df) == 6 and (df["status"] == "COMPLETE").all(), df[["status", "error"]]
    clean = df[df["defense"] == "none"].sort_values("fl_round")
    assert clean["fl_round"].tolist() == [0, 5, 20]
    acc = clean["model_acc"].tolist()
    assert acc[0] < acc[1] < acc[2], acc
    assert acc[0] < 0.2 and acc[2] > 0.6  # untrained is at chance (10 classes); 20 rounds learn clearly
    assert clean["model_loss"].is_monotonic_decreasing
    assert (clean["fl.local_lr"] == 1.0).all() and (clean["fl.clients"] == 2).all()


def test_every_chain_is_trained_once_and_then_cached(stages_sweep: dict) -> None:
    # 2 chains (one per defense, as utility trains under it), each trained by one task for all its rounds
    assert "FL stages: 2 chains (6 stages)" in stages_sweep["out"]
    assert "2 chains trained, 0 from the cache, 0 failed" in stages_sweep["out"]
    cache = stages_sweep["results"] / STAGES_DIR
    assert len(list(cache.glob("*.pt"))) == 6  # one file per stage: rounds 0, 5, 20 of each chain
    # the next sweep on this machine finds them all: loading trains nothing
    before = fl.chains_trained
    for request in fl.stage_requests(load_spec(stages_sweep["spec"]).cells()):
        stages = request.train(cache_dir=cache)
        assert sorted(stages) == [0, 5, 20]
    assert fl.chains_trained == before


def test_utility_measures_what_the_defense_costs(stages_sweep: dict) -> None:
    df = stages_sweep["df"]
    utility = df.groupby("defense")["utility_acc"].agg(["min", "max"])
    # one value per defense (its chain at utility_round = 20), on every row of it, whatever the row's round
    assert (utility["min"] == utility["max"]).all()
    assert utility.loc["none", "max"] > 0.6
    assert utility.loc["gaussian", "max"] < utility.loc["none", "max"] - 0.3  # noise this large stops learning
    noisy = df[df["defense"] == "gaussian"]
    assert (noisy["fl.defense"] == "gaussian").all()
    assert noisy.loc[noisy["fl_round"] == 20, "model_acc"].item() == pytest.approx(utility.loc["gaussian", "max"])


def test_a_chain_that_cannot_train_fails_its_cells_and_the_sweep_goes_on(
    tmp_path: Path, ray_session: None, make_spec: Any
) -> None:
    spec = make_spec(
        tmp_path / "bad.yaml", name="bad", data={"dataset": "mnist", "root": str(tmp_path / "no-mnist-here")},
        grid={"fl_round": [1], "seed": [0, 1]},
    )  # fmt: skip
    summary = sweep.run([str(spec), "--results", str(tmp_path / "results")])
    assert summary is not None and summary.ran == 2 and summary.failed == 2
    df = load(tmp_path / "results" / "bad")
    assert len(df) == 2 and (df["status"] == "FAILED").all()
    assert df["error"].str.startswith("FL training stage failed").all()
    assert (df["error_type"] == "DataError").all()


def test_untrained_chains_need_no_task_and_every_trial_gets_its_stage(
    tmp_path: Path, ray_session: None
) -> None:
    untrained = [TrialSpec(dataset="digits", victim=v, seed=s) for v in ("lenet", "lenet_zhu") for s in (0, 1)]
    trained = TrialSpec(dataset="digits", victim="lenet", seed=0, fl_round=2, fl=FAST_FL)
    requests = fl.stage_requests([*untrained, trained])
    # untrained chains that do need a task (utility at round 0) are dealt to as many tasks as there are slots
    assert [len(g) for g in task_groups(requests, parallel=1)] == [1, 4]
    assert [[r.seed for r in g] for g in task_groups(requests, parallel=2)] == [[0], [0, 0], [1, 1]]
    assert [len(g) for g in task_groups(requests, parallel=8)] == [1, 1, 1, 1, 1]
    plan = prepare_stages([*untrained, trained], cache_dir=str(tmp_path))
    # only the chain with a trained round became a task; the untrained ones are the trials' own to build
    assert plan.errors == {} and plan.trained == [fl.chain_key(trained)] and len(plan.refs) == 1
    assert prepare_stages(untrained, cache_dir=str(tmp_path)).refs == {}  # no task at all
    # what the sweep asks before it starts Ray (a worker pool only for stage tasks) says the same
    assert needs_stage_tasks([*untrained, trained]) and not needs_stage_tasks(untrained)
    cache = tmp_path / "trial-built"
    for spec in untrained:  # what a trial builds equals what fl trains (and caches) for that chain
        expected = fl.train_chain(spec.dataset, spec.victim, {}, spec.image_size, {}, spec.seed, [0],
                                  cache_dir=tmp_path / "reference")[0]  # fmt: skip
        built = StagePlan(cache_dir=str(cache)).load(spec).stage
        assert built is not None and built["model_acc"] == expected["model_acc"]
        for name, tensor in expected["state_dict"].items():
            assert (built["state_dict"][name] == tensor).all(), name
    assert len(list(cache.glob("*.pt"))) == len(untrained)  # and cached: the next trial of the chain loads it
    expected = fl.stage_for_trial(trained, tmp_path)  # from the cache the task wrote
    assert plan.load(trained).stage["model_acc"] == expected["model_acc"]
    assert plan.accuracy[stage_id(fl.chain_key(trained), trained.fl_round)] == expected["model_acc"]


def test_utility_round_of_a_defended_cell_needs_a_stage_task() -> None:
    plain = TrialSpec(dataset="digits", victim="lenet", seed=0)
    defended = TrialSpec(dataset="digits", victim="lenet", seed=0, fl={"defense": {"name": "dp_sgd"}})
    assert not needs_stage_tasks([plain, defended])  # no utility asked: round 0 is the trials' own
    assert not needs_stage_tasks([plain], utility_round=3)  # utility is measured only under a defense
    assert needs_stage_tasks([plain, defended], utility_round=3)


def test_a_dp_sgd_utility_row_carries_the_epsilon_its_accuracy_was_bought_with(
    tmp_path: Path, ray_session: None, make_spec: Any
) -> None:
    """Under `utility: true` a dp_sgd cell's chain trains with DP-SGD: its rows carry that training's (epsilon,
    delta) at utility_round, and the attacked model's own at its round (model_dp_*), the values the stages
    themselves record; a cell of any other defense, or the untrained model, carries none."""
    dp = {"name": "dp_sgd", "params": {"clip": 1.0, "sigma": 1.0}}
    spec = make_spec(
        tmp_path / "dp.yaml", name="dp", fl=FAST_FL, utility=True, utility_round=2,
        grid={"fl_round": [0, 1], "defense": ["none", dp],
              "attack": [{"name": "grnn", "params": {"iterations": 3}, "eval_every": 3}], "seed": [0]},
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        sweep.run([str(spec), "--results", str(tmp_path / "results")])
    df = load(tmp_path / "results" / "dp").set_index(["defense", "fl_round"])
    assert (df["status"] == "COMPLETE").all(), df[["status", "error"]]
    private = next(c for c in load_spec(spec).cells() if c.defense == "dp_sgd")
    stages = {r: fl.stage_for_trial(dataclasses.replace(private, fl_round=r), tmp_path / "results" / STAGES_DIR)
              for r in (1, 2)}  # fmt: skip
    assert 0 < stages[1]["dp_epsilon"] < stages[2]["dp_epsilon"]
    for r in (0, 1):
        assert df.loc[("dp_sgd", r), "utility_dp_epsilon"] == pytest.approx(stages[2]["dp_epsilon"])
        assert df.loc[("dp_sgd", r), "utility_dp_delta"] == pytest.approx(stages[2]["dp_delta"])
        assert df.loc[("dp_sgd", r), "utility_acc"] == pytest.approx(stages[2]["model_acc"])
        assert df.loc[("none", r), ["utility_dp_epsilon", "utility_dp_delta"]].isna().all()
    assert df.loc[("dp_sgd", 1), "model_dp_epsilon"] == pytest.approx(stages[1]["dp_epsilon"])
    assert df.loc[("dp_sgd", 1), "model_dp_delta"] == pytest.approx(stages[1]["dp_delta"])
    assert df.loc[("dp_sgd", 1), "model_acc"] == pytest.approx(stages[1]["model_acc"])
    assert pd.isna(df.loc[("dp_sgd", 0), "model_dp_epsilon"])  # the untrained model spent nothing
    assert df.xs("none", level="defense")[["model_dp_epsilon", "model_dp_delta"]].isna().all().all()
