"""FedAvg training stages: they learn, the cache trains each chain once, round 0 is the untrained victim,
chains resume exactly, trials find their stages, and dp_sgd training reports its epsilon."""

from __future__ import annotations

import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from grnn_engine import fl, run_trial
from grnn_engine.data import load_dataset
from grnn_engine.dp_accounting import epsilon
from grnn_engine.errors import ConfigError
from grnn_engine.fl import (
    FLSettings,
    chain_key,
    dp_epsilon,
    partition,
    stage_for_trial,
    stage_key,
    stage_requests,
    train_chain,
)
from grnn_engine.trial import global_model
from grnn_engine.trial_spec import TrialSpec
from grnn_engine.victims import create_victim

# Small and fast on one CPU thread; measured: test accuracy 0.10 at round 0, 0.48 at 2, 0.84 at 4.
FAST = {"clients": 4, "clients_per_round": 1.0, "local_epochs": 2, "local_lr": 0.5}
SETTINGS = FLSettings(**FAST)
SIZE = 32
ROUNDS = [0, 2, 4]
_SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
DATA_ROOT = os.environ.get("GRNN_DATA_ROOT") or (str(_SHARED) if _SHARED.is_dir() else None)
HAS_FACES = DATA_ROOT is not None and (Path(DATA_ROOT) / "att_faces").is_dir()


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> None:
    # Module scope, so that it also holds while the module-scoped chain trains (fixed threads, fixed floats).
    torch.set_num_threads(1)


def _chain(
    cache: Path, rounds: list[int] = ROUNDS, settings: FLSettings = SETTINGS
) -> dict[int, dict[str, Any]]:
    return train_chain("digits", "lenet", {}, SIZE, settings, 0, rounds, cache_dir=cache)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict[str, Any]], int]:
    """One chain trained into a fresh cache; also how many chains that took."""
    cache = tmp_path_factory.mktemp("stages")
    before = fl.chains_trained
    stages = _chain(cache)
    return cache, stages, fl.chains_trained - before


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- training


def test_fedavg_learns_digits(trained: tuple[Path, dict[int, dict[str, Any]], int]) -> None:
    _, stages, _ = trained
    assert sorted(stages) == ROUNDS
    acc = {r: stages[r]["model_acc"] for r in ROUNDS}
    loss = {r: stages[r]["model_loss"] for r in ROUNDS}
    assert acc[0] < 0.25  # chance is 0.1
    assert acc[4] >= 0.5, acc
    assert loss[4] < loss[2] < loss[0], loss


@pytest.mark.parametrize(("magnitude", "learns"), [("none", False), ("mean", True)])
def test_fedavg_under_sign_trains_only_with_scaled_signs(tmp_path: Path, magnitude: str, learns: bool) -> None:
    """Every client shares the signs of its delta (`utility: true` with defense sign): plain signs move each
    weight by 1 a round and FedAvg stays at chance; scaled by each tensor's mean magnitude it learns (measured:
    0.097 and 0.791 at round 4, 0.836 undefended)."""
    settings = FLSettings(**FAST, defense="sign", defense_params={"magnitude": magnitude})
    stages = _chain(tmp_path, [0, 4], settings)
    assert (stages[4]["model_acc"] >= 0.5) == learns, stages[4]["model_acc"]


def test_round_zero_is_the_untrained_victim(trained: tuple[Path, dict[int, dict[str, Any]], int]) -> None:
    _, stages, _ = trained
    victim = create_victim("lenet", num_classes=10, image_size=SIZE, seed=0)
    assert _same_state(stages[0]["state_dict"], victim.state_dict())
    assert not _same_state(stages[2]["state_dict"], victim.state_dict())


def test_stage_contents(trained: tuple[Path, dict[int, dict[str, Any]], int]) -> None:
    _, stages, _ = trained
    for r, stage in stages.items():
        assert stage["fl_round"] == r
        assert stage["dp_epsilon"] is None and stage["dp_delta"] is None
        assert all(t.device.type == "cpu" for t in stage["state_dict"].values())
        assert math.isfinite(stage["model_loss"]) and 0 <= stage["model_acc"] <= 1


def test_cache_trains_each_chain_once(trained: tuple[Path, dict[int, dict[str, Any]], int]) -> None:
    cache, stages, trainings = trained
    assert trainings == 1  # three rounds, one FedAvg run
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 3 and all(f.endswith(".pt") for f in files)  # no temp files left behind
    before = fl.chains_trained
    again = _chain(cache, [4, 0, 2])
    subset = _chain(cache, [2])
    assert fl.chains_trained == before  # everything came from the cache
    for r in ROUNDS:
        assert _same_state(again[r]["state_dict"], stages[r]["state_dict"])
        assert again[r]["model_acc"] == stages[r]["model_acc"]
    assert _same_state(subset[2]["state_dict"], stages[2]["state_dict"])


def test_chain_resumes_from_a_cached_round_exactly(
    trained: tuple[Path, dict[int, dict[str, Any]], int], tmp_path: Path
) -> None:
    cache, stages, _ = trained
    key2 = stage_key("digits", SIZE, "lenet", {}, SETTINGS, 0, 2)
    shutil.copy(cache / f"{key2}.pt", tmp_path / f"{key2}.pt")
    before = fl.chains_trained
    resumed = _chain(tmp_path, [4])
    assert fl.chains_trained == before + 1
    # Rounds 3 and 4 from the round-2 snapshot give the weights of the run from round 0.
    assert _same_state(resumed[4]["state_dict"], stages[4]["state_dict"])


def test_unreadable_cache_file_is_retrained(tmp_path: Path) -> None:
    path = tmp_path / f"{stage_key('digits', SIZE, 'lenet', {}, SETTINGS, 0, 0)}.pt"
    path.write_bytes(b"not a torch file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stage = _chain(tmp_path, [0])[0]
    assert any("unreadable stage cache file" in str(w.message) for w in caught)
    assert torch.load(path, weights_only=True)["model_acc"] == stage["model_acc"]


def test_trials_find_their_stage(
    trained: tuple[Path, dict[int, dict[str, Any]], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, stages, _ = trained
    monkeypatch.setenv("GRNN_CACHE_DIR", str(cache))
    # clients_per_round 1.0 (all) is the same training as the explicit count 4: same stage.
    spec = TrialSpec(
        dataset="digits",
        victim="lenet",
        image_size=SIZE,
        fl_round=4,
        fl={**FAST, "clients_per_round": 4},
        device="cpu",
        seed=0,
    )
    before = fl.chains_trained
    stage = stage_for_trial(spec)
    images = load_dataset("digits", split="test", image_size=SIZE)
    model, facts = global_model(spec, images, torch.device("cpu"), None)
    assert fl.chains_trained == before
    assert _same_state(stage["state_dict"], stages[4]["state_dict"])
    assert _same_state(model.state_dict(), stages[4]["state_dict"]) and not model.training
    assert (facts["model_acc"], facts["model_loss"]) == (stages[4]["model_acc"], stages[4]["model_loss"])
    assert facts["model_dp_epsilon"] is None and facts["model_dp_delta"] is None  # trained without DP-SGD


# Faces: 40 people, 8 training photos each; measured (seed 0) test accuracy 0.36 at round 5, 0.88 at 10.
FACES_FL = {"clients": 2, "clients_per_round": 1.0, "local_epochs": 5, "local_batch_size": 8, "local_lr": 0.3}


@pytest.mark.skipif(not HAS_FACES, reason="att_faces needs GRNN_DATA_ROOT (../shared/data)")
def test_faces_trial_attacks_a_stage_trained_on_every_persons_training_photos(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRNN_CACHE_DIR", str(tmp_path))
    spec = TrialSpec(
        dataset="att_faces", data_root=DATA_ROOT, split="test", victim="lenet", image_size=SIZE, fl_round=5,
        fl=FACES_FL, attack="grnn", attack_params={"iterations": 2}, eval_every=1, device="cpu", seed=0,
    )  # fmt: skip
    result = run_trial(spec)
    assert result.status == "COMPLETE", result.error
    assert result.model_acc is not None and result.model_acc >= 0.2, result.model_acc  # chance: 1/40
    # The stage learnt from the per-person training split: photos of all 40 people, none of them the
    # attacked (held-out) photo.
    train = load_dataset("att_faces", root=DATA_ROOT, split="train", image_size=SIZE)
    probe = load_dataset("att_faces", root=DATA_ROOT, split="test", image_size=SIZE).load(
        result.metrics["indices"]
    )
    assert sorted(set(train.labels.tolist())) == list(range(40))
    assert not (train.load_all() == probe).flatten(1).all(dim=1).any()


def test_dp_sgd_training_reports_epsilon(tmp_path: Path) -> None:
    settings = FLSettings(
        clients=4,
        clients_per_round=1,
        local_lr=0.5,
        defense="dp_sgd",
        defense_params={"clip": 1.0, "sigma": 1.0},
    )
    stage = train_chain("digits", "lenet", {}, 16, settings, 0, [1], cache_dir=tmp_path)[1]
    eps = stage["dp_epsilon"]
    assert stage["dp_delta"] == fl.DP_DELTA
    assert eps is not None and 0 < eps < math.inf
    # Opacus's RDP accountant on the sampled client's steps: one round of local_epochs epochs of its shard.
    from opacus.accountants import RDPAccountant

    from grnn_engine.data import load_dataset

    labels = load_dataset("digits", split="train", image_size=16).labels
    sizes = [int(s.numel()) for s in fl.partition(labels, 4, iid=True, alpha=settings.dirichlet_alpha, seed=0)]

    def opacus_epsilon(n: int) -> float:
        accountant = RDPAccountant()
        q, steps = settings.local_batch_size / n, settings.local_epochs * math.ceil(n / settings.local_batch_size)
        accountant.history = [(1.0, q, steps)]
        return float(accountant.get_epsilon(fl.DP_DELTA))

    assert eps in [opacus_epsilon(n) for n in sizes]
    plain = FLSettings(clients=4, clients_per_round=1, local_lr=0.5)
    assert stage_key("digits", 16, "lenet", {}, settings, 0, 1) != stage_key(
        "digits", 16, "lenet", {}, plain, 0, 1
    )


# ---------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"rounds": 3}, "unknown fl setting 'rounds'; allowed: clients"),
        ({"clients": 0}, "clients must be an integer >= 1 (got 0)"),
        ({"clients": True}, "got True"),
        ({"clients_per_round": 11}, "1..10"),
        ({"clients_per_round": 0.0}, "(0, 1]"),
        ({"local_lr": -0.1}, "local_lr must be a finite number > 0 (got -0.1)"),
        ({"local_lr": float("nan")}, "got nan"),
        ({"local_batch_size": 2.5}, "local_batch_size"),
        ({"iid": "yes"}, "iid must be true or false"),
        ({"dirichlet_alpha": 0}, "dirichlet_alpha"),
        ({"defense": "gausian"}, "unknown defense 'gausian'"),
        ({"defense": "gaussian", "defense_params": {"sigma": -1}}, "gaussian sigma"),
    ],
)
def test_bad_settings_raise_config_error(values: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        FLSettings.from_dict(values)
    assert fragment in str(info.value)


def test_settings_that_train_alike_share_a_key() -> None:
    def key(**values: Any) -> str:
        return stage_key("digits", 32, "lenet", {}, FLSettings(**values), 0, 3)

    assert key(clients_per_round=1.0) == key(clients_per_round=10) != key()
    assert key(clients_per_round=0.2) == key(clients_per_round=2) == key()  # the default: 2 of 10
    assert key(dirichlet_alpha=0.1) == key()  # unused while iid
    assert key(iid=False, dirichlet_alpha=0.1) != key(iid=False, dirichlet_alpha=0.5)
    assert key(local_lr=0.2) != key()
    assert key(defense="gaussian", defense_params={"sigma": 0.1}) != key()
    assert FLSettings(clients=20, clients_per_round=0.25).sampled_clients == 5


def test_partition_iid_and_dirichlet() -> None:
    labels = load_dataset("digits", split="train", image_size=8).labels
    n = labels.numel()
    iid = partition(labels, 5, iid=True, alpha=0.5, seed=0)
    assert sorted(torch.cat(iid).tolist()) == list(range(n))
    assert max(s.numel() for s in iid) - min(s.numel() for s in iid) <= 1
    skewed = partition(labels, 5, iid=False, alpha=0.1, seed=0)
    assert sorted(torch.cat(skewed).tolist()) == list(range(n))
    assert all(
        torch.equal(a, b)
        for a, b in zip(skewed, partition(labels, 5, iid=False, alpha=0.1, seed=0), strict=True)
    )

    # With alpha 0.1 a non-empty client is dominated by few classes; IID shards hold every class evenly.
    def top_share(shard: torch.Tensor) -> float:
        return float(torch.bincount(labels[shard], minlength=10).max()) / max(shard.numel(), 1)

    assert max(top_share(s) for s in skewed if s.numel()) > 0.5
    assert max(top_share(s) for s in iid) < 0.2


def test_stage_requests_group_trials_into_chains() -> None:
    base = {"dataset": "digits", "victim": "lenet", "fl": dict(FAST)}
    specs = [
        TrialSpec(**base, fl_round=5, seed=0, batch_size=1),
        TrialSpec(**base, fl_round=2, seed=0, batch_size=4, attack="dlg"),
        TrialSpec(**base, fl_round=5, seed=0, batch_size=8),
        TrialSpec(**base, fl_round=0, seed=0),
        TrialSpec(**base, fl_round=2, seed=1),
    ]
    requests = stage_requests(specs)
    assert [(r.seed, r.rounds) for r in requests] == [(0, (0, 2, 5)), (1, (2,))]
    assert requests[0].key() == chain_key(specs[0]) == chain_key(specs[3]) != chain_key(specs[4])
    assert [r.rounds for r in stage_requests(specs, include_round_zero=False)] == [(2, 5), (2,)]
    with pytest.raises(ConfigError, match="unknown fl setting"):
        stage_requests([TrialSpec(fl={"bogus": 1})])


def test_untrained_chains_decode_their_test_split_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[tuple[str, str]] = []

    def counted(name: str, **kwargs: Any) -> Any:  # the real loader, counted
        loads.append((name, kwargs["split"]))
        return load_dataset(name, **kwargs)

    requests = stage_requests([TrialSpec(dataset="digits", victim=v, seed=s) for v in ("lenet", "lenet_zhu")
                               for s in (0, 1)])  # fmt: skip
    monkeypatch.setattr(fl, "load_dataset", counted)
    together = fl.train_chains(requests, cache_dir=tmp_path / "together")
    assert loads == [("digits", "test")]  # four untrained models, one decoded split
    alone = [r.train(cache_dir=tmp_path / "alone") for r in requests]
    assert len(loads) == 5
    assert [c[0]["model_acc"] for c in together] == [c[0]["model_acc"] for c in alone]
    assert len({c[0]["model_acc"] for c in together}) > 1  # four different models, not one answer four times
    # cached: loading them again needs no data at all
    assert [c[0]["model_acc"] for c in fl.train_chains(requests, cache_dir=tmp_path / "together")] == [
        c[0]["model_acc"] for c in together
    ] and len(loads) == 5


def test_dp_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    def settings(sigma: float) -> FLSettings:
        return FLSettings(
            clients=4, clients_per_round=1.0, local_epochs=1, defense="dp_sgd",
            defense_params={"clip": 1.0, "sigma": sigma},
        )

    sizes = [360, 360, 359, 359]
    e1, e5 = dp_epsilon(settings(1.0), sizes, 0, 1), dp_epsilon(settings(1.0), sizes, 0, 5)
    assert e1 is not None and e5 is not None and 0 < e1 < e5
    assert dp_epsilon(settings(2.0), sizes, 0, 5) < e5  # type: ignore[operator]
    assert dp_epsilon(settings(0.0), sizes, 0, 1) == math.inf
    assert dp_epsilon(FLSettings(), sizes, 0, 5) is None
    soteria_after = FLSettings(
        defense="compose",
        defense_params={
            "steps": [
                {"name": "dp_sgd", "params": {"sigma": 1.0}},
                {"name": "soteria", "params": {"ratio": 0.5}},
            ]
        },
    )
    assert dp_epsilon(soteria_after, sizes, 0, 1) is None  # soteria reads the private batch: no guarantee
    # One client, 360 examples, batches of 32: 12 steps of rate 32/360 per round.
    one = dp_epsilon(settings(1.0), [360, 0, 0, 0], 0, 1)
    assert one == pytest.approx(epsilon(32 / 360, 1.0, 12, fl.DP_DELTA))
