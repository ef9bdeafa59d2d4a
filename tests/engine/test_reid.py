"""Face re-identification: the identifier never trains on the attacked photo, re-identifies clean unseen
photos far above chance and noise at chance, is cached, refuses to be a chance-level metric, and its
columns reach run_trial's row. Needs att_faces ($GRNN_DATA_ROOT, else ../shared/data); skips without it."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any

import pytest
import torch
from torch import Tensor

from grnn_engine import TrialSpec, run_trial
from grnn_engine.data import load_dataset
from grnn_engine.errors import ConfigError, DataError
from grnn_engine.reid import (
    IDENTIFIERS,
    Gallery,
    Identifier,
    excluded_gallery_indices,
    fit_identifier,
    identifier_key,
    matched_gallery,
    resolve_identifier_cache_dir,
)
from grnn_engine.result import REID_COLUMNS

torch.set_num_threads(1)

_SHARED = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"
DATA_ROOT = os.environ.get("GRNN_DATA_ROOT") or (str(_SHARED) if _SHARED.is_dir() else None)
HAS_FACES = DATA_ROOT is not None and (pathlib.Path(DATA_ROOT) / "att_faces").is_dir()
needs_faces = pytest.mark.skipif(not HAS_FACES, reason="att_faces needs GRNN_DATA_ROOT (../shared/data)")

SIZE = 32
PEOPLE = 40
ATTACKED = [3, 50]  # train-split photos of s1 (photo 4) and s7 (photo 3): must leave the gallery


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Where the identifiers go: $GRNN_CACHE_DIR/identifiers, with GRNN_CACHE_DIR a temporary folder."""
    return tmp_path_factory.mktemp("grnn_cache") / "identifiers"


@pytest.fixture(scope="module")
def identifier(cache: pathlib.Path) -> Identifier:
    """The default identifier as a trial attacking train photos ATTACKED (seed 0) gets it: trained once."""
    if not HAS_FACES:
        pytest.skip("att_faces needs GRNN_DATA_ROOT (../shared/data)")
    return fit_identifier(
        "trained", {}, dataset="att_faces", image_size=SIZE, split="train", indices=ATTACKED, seed=0,
        root=DATA_ROOT, cache_dir=cache,
    )  # fmt: skip


def _faces(split: str) -> Any:
    return load_dataset("att_faces", root=DATA_ROOT, split=split, image_size=SIZE)


# ---------------------------------------------------------------------------------------------- the gallery


@needs_faces
def test_identifier_is_trained_without_the_probe_photo(identifier: Identifier) -> None:
    train = _faces("train")
    assert identifier.excluded == ATTACKED
    assert not set(ATTACKED) & set(identifier.trained_on)
    assert sorted(identifier.trained_on) == [i for i in range(len(train)) if i not in ATTACKED]
    # Its people are all still known: the attacked photos' owners keep their other gallery photos.
    assert identifier.num_identities == PEOPLE


@needs_faces
def test_photos_attacked_from_the_all_split_are_found_in_the_gallery_by_their_pixels() -> None:
    everything, train = _faces("all"), _faces("train")
    # all-split index 0 is s1 photo 1 (train index 0); index 9 is s1 photo 10 (a test photo); 15 is s2/6.
    picked = [0, 9, 15]
    excluded = excluded_gallery_indices(train, "all", picked, everything.load(picked))
    assert excluded == [0, 13]
    assert excluded_gallery_indices(None, "test", [0, 1]) == []
    assert excluded_gallery_indices(None, "train", [5, 2, 5]) == [2, 5]


# ---------------------------------------------------------------------------------------------- the metric


@needs_faces
def test_clean_unseen_photos_are_re_identified_far_above_chance(identifier: Identifier) -> None:
    test = _faces("test")
    ranks = identifier.ranks(test.load_all(), test.labels)
    top1 = float((ranks == 1).double().mean())
    assert top1 >= 0.6, top1  # chance is 1/40 = 0.025
    assert float((ranks <= 5).double().mean()) >= 0.85
    assert identifier.heldout_top1 == pytest.approx(top1)
    # The attacked photos themselves, which it never saw, are re-identified too.
    train = _faces("train")
    assert (identifier.ranks(train.load(ATTACKED), train.labels[ATTACKED]) <= 5).all()


@needs_faces
def test_random_images_are_re_identified_at_chance(identifier: Identifier) -> None:
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(8 * PEOPLE, 3, SIZE, SIZE, generator=generator)
    labels = torch.arange(8 * PEOPLE) % PEOPLE  # every identity equally often
    ranks = identifier.ranks(noise, labels).double()
    assert float((ranks == 1).double().mean()) <= 0.08  # chance 0.025
    assert float((ranks <= 5).double().mean()) <= 0.3  # chance 0.125
    assert 12 <= float(ranks.mean()) <= 29  # chance (40 + 1) / 2 = 20.5


class _Constant(Identifier):
    """An identifier that sees every face alike: the metric it would give is pure chance."""

    name = "constant"

    def embed(self, images: Tensor) -> Tensor:
        return torch.ones(len(images), 4) / 2


@needs_faces
def test_an_identifier_at_chance_is_an_error_not_a_metric() -> None:
    train, test = _faces("train"), _faces("test")
    gallery = Gallery(
        images=train.load_all(), labels=train.labels, indices=list(range(len(train))), excluded=[],
        num_identities=train.num_classes, identity_names=train.classes,
    )  # fmt: skip
    with pytest.raises(DataError, match=r"identifier 'constant' re-identifies only 0\.0% .* chance \(2\.5%"):
        _Constant().fit(gallery, test.load_all(), test.labels)


# ---------------------------------------------------------------------------------------------- the cache


@needs_faces
def test_the_fitted_identifier_is_cached_by_what_it_learnt_from(
    identifier: Identifier, cache: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    key = identifier_key("trained", identifier.params, "att_faces", SIZE, ATTACKED, 0)
    assert (cache / f"{key}.pt").is_file()
    # Another attacked photo, seed or image size is another identifier.
    assert key != identifier_key("trained", identifier.params, "att_faces", SIZE, [3], 0)
    assert key != identifier_key("trained", identifier.params, "att_faces", SIZE, ATTACKED, 1)
    assert key != identifier_key("trained", identifier.params, "att_faces", 64, ATTACKED, 0)
    # A second fit reads the file (weights_only) instead of training: a marked copy comes back marked.
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    state = torch.load(copy / f"{key}.pt", weights_only=True)
    state["heldout_top1"] = 0.123
    torch.save(state, copy / f"{key}.pt")
    again = fit_identifier(
        "trained", {}, dataset="att_faces", image_size=SIZE, split="train", indices=list(reversed(ATTACKED)),
        seed=0, root=DATA_ROOT, cache_dir=copy,
    )  # fmt: skip
    assert again.heldout_top1 == 0.123
    assert torch.equal(again.centroids, identifier.centroids)  # type: ignore[arg-type]
    test = _faces("test")
    assert torch.equal(again.ranks(test.load([0, 1]), test.labels[:2]), identifier.ranks(test.load([0, 1]), test.labels[:2]))


def test_cache_folder_follows_grnn_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("GRNN_CACHE_DIR", str(tmp_path))
    assert resolve_identifier_cache_dir() == tmp_path / "identifiers"
    assert resolve_identifier_cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("GRNN_CACHE_DIR")
    assert resolve_identifier_cache_dir() == pathlib.Path("~/.cache/grnn/identifiers").expanduser()


# ---------------------------------------------------------------------------------------------- settings


def test_identifier_names_and_params_are_checked() -> None:
    assert {"trained", "dlib"} <= set(IDENTIFIERS.names())
    with pytest.raises(ConfigError, match="unknown identifier 'traind' .*did you mean 'trained'"):
        IDENTIFIERS.create("traind")
    with pytest.raises(ConfigError, match="epochs must be an integer >= 1 .*got 0"):
        IDENTIFIERS.create("trained", epochs=0)
    with pytest.raises(ConfigError, match="unknown parameter 'depth'"):
        IDENTIFIERS.create("trained", depth=3)


def test_dlib_without_the_faces_extra_says_how_to_install_it() -> None:
    try:
        import dlib  # noqa: F401
        import face_recognition_models  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"needs the optional 'faces' extra.*grnn-sweep\[faces\]"):
            IDENTIFIERS.create("dlib")
    else:
        pytest.skip("the faces extra is installed here")


@needs_faces
def test_dlib_re_identifies_clean_photos_when_the_extra_is_installed() -> None:
    pytest.importorskip("dlib")
    pytest.importorskip("face_recognition_models")
    train, test = _faces("train"), _faces("test")
    # 5 people, 4 gallery photos each: dlib's ResNet takes ~0.2 s a face on one CPU thread.
    few = [i for i in range(len(train)) if int(train.labels[i]) < 5 and i % 8 < 4]
    probes = [i for i in range(len(test)) if int(test.labels[i]) < 5]
    gallery = Gallery(
        images=train.load(few), labels=train.labels[few], indices=few, excluded=[], num_identities=5,
        identity_names=train.classes[:5],
    )  # fmt: skip
    dlib_identifier = IDENTIFIERS.create("dlib").fit(gallery, test.load(probes), test.labels[probes])
    assert dlib_identifier.heldout_top1 is not None and dlib_identifier.heldout_top1 >= 0.7  # chance 1/5


# ---------------------------------------------------------------------------------------------- trials


@needs_faces
def test_run_trial_row_carries_the_reid_columns(
    identifier: Identifier, cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRNN_CACHE_DIR", str(cache.parent))  # so the trial finds the fixture's identifier
    spec = TrialSpec(
        dataset="att_faces", data_root=DATA_ROOT, split="train", indices=ATTACKED, batch_size=2,
        attack="grnn", attack_params={"iterations": 4}, eval_every=2, reid="trained", device="cpu",
    )  # fmt: skip
    result = run_trial(spec)
    row = result.to_row()
    assert row["status"] == "COMPLETE", row["error"]
    assert set(REID_COLUMNS) <= set(row) and row["reid"] == "trained"
    # The clean columns are the fixture identifier's ranks of the attacked photos: the trial used it.
    train = _faces("train")
    clean = identifier.ranks(train.load(ATTACKED), train.labels[ATTACKED]).double()
    assert row["reid_clean_rank"] == float(clean.mean()) and row["reid_clean_top1"] == float((clean == 1).double().mean())
    for prefix in ("reid", "reid_clean", "reid_random"):
        assert 0 <= row[f"{prefix}_top1"] <= row[f"{prefix}_top5"] <= 1
        assert 1 <= row[f"{prefix}_rank"] <= PEOPLE
    assert len(row["reid_identity"]) == 2 and all(1 <= r <= PEOPLE for r in row["reid_rank_per_image"])
    assert row["reid_top1"] == sum(r == 1 for r in row["reid_rank_per_image"]) / 2

    # The report's gallery: a gallery photo of the identity ranked first, never an attacked photo.
    matches = matched_gallery(row, root=DATA_ROOT)
    attacked = train.load(ATTACKED)
    assert [m.identity for m in matches] == row["reid_identity"]
    for m, true in zip(matches, row["labels_true"], strict=True):
        assert m.hit == (m.identity == true) and m.true_name == train.classes[true]
        assert m.image.shape == (3, SIZE, SIZE)
        assert not any(torch.equal(m.image, a) for a in attacked)

    plain = TrialSpec(attack_params={"iterations": 2}, eval_every=1, device="cpu")
    assert not {"reid", *REID_COLUMNS} & set(run_trial(plain).to_row())
    assert "reid" not in plain.canonical()  # keys of trials without reid are unchanged
    assert TrialSpec(reid="trained").key() != TrialSpec().key()
    with pytest.raises(ConfigError, match="no reid_identity"):
        matched_gallery(run_trial(plain).to_row())


@needs_faces
def test_the_one_trial_command_prints_the_reid_columns_of_a_sweep_row(
    identifier: Identifier, cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from grnn_engine.__main__ import build_parser, main

    assert "--reid IDENTIFIER" in build_parser().format_help() and "--reid-param" in build_parser().format_help()
    monkeypatch.setenv("GRNN_CACHE_DIR", str(cache.parent))  # the fixture's identifier: the same photos left out
    argv = [
        "--dataset", "att_faces", "--data-root", str(DATA_ROOT), "--split", "train", "--index", str(ATTACKED[0]),
        "--index", str(ATTACKED[1]), "--batch-size", "2", "--iterations", "2", "--eval-every", "1",
        "--device", "cpu", "--no-progress", "--reid", "trained",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    row = json.loads(out)
    assert out.count("\n") == 1 and row["status"] == "COMPLETE" and row["reid"] == "trained"
    assert set(REID_COLUMNS) <= set(row)
    # The same columns run_trial gives a sweep row, from the same identifier: the clean ceiling is its ranks.
    train = _faces("train")
    clean = identifier.ranks(train.load(ATTACKED), train.labels[ATTACKED]).double()
    assert row["reid_clean_rank"] == float(clean.mean()) and row["reid_clean_top1"] == float((clean == 1).double().mean())
    expected = run_trial(TrialSpec(
        dataset="att_faces", data_root=str(DATA_ROOT), split="train", indices=ATTACKED, batch_size=2,
        attack_params={"iterations": 2}, eval_every=1, device="cpu", reid="trained",
    )).to_row()  # fmt: skip
    for column in REID_COLUMNS:
        assert row[column] == expected[column], column
    assert row["trial_key"] == expected["trial_key"]
