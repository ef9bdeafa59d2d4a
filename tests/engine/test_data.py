"""Contract tests of the datasets registry and of victim-batch selection, on real images only.

Parametrised over DATASETS.names(): a dataset joins these tests the moment it is registered. Sets that
need files use $GRNN_DATA_ROOT, else ../shared/data next to the repository, and skip when neither holds them.
"""

from __future__ import annotations

import os
import pathlib
import struct

import pytest
import torch

from grnn_engine.data import DATASETS, ImageSet, load_dataset, resolve_data_root, select_batch
from grnn_engine.errors import ConfigError, DataError

torch.set_num_threads(1)

_SHARED = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"
DATA_ROOT: pathlib.Path | None = (
    pathlib.Path(os.environ["GRNN_DATA_ROOT"])
    if os.environ.get("GRNN_DATA_ROOT")
    else (_SHARED if _SHARED.is_dir() else None)
)
SIZE = 16  # small, so the tests decode and resize little; not 32, so resizing is exercised


def _root_for(name: str) -> pathlib.Path | None:
    if name == "digits":
        return None
    if DATA_ROOT is None:
        pytest.skip(f"{name} needs image files: set GRNN_DATA_ROOT (no ../shared/data here)")
    # imagefolder's and identities' roots are trees themselves: the shared MNIST tree is one of classes, the
    # AT&T faces folder one of people.
    return {"imagefolder": DATA_ROOT / "mnist", "identities": DATA_ROOT / "att_faces"}.get(name, DATA_ROOT)


def _open(name: str, split: str = "test", image_size: int = SIZE, **params: object) -> ImageSet:
    root = _root_for(name)
    try:
        return load_dataset(
            name, root=None if root is None else str(root), split=split, image_size=image_size, **params
        )
    except DataError as exc:
        pytest.skip(f"{name} is not under {root}: {exc}")


@pytest.fixture(params=DATASETS.names())
def dataset(request: pytest.FixtureRequest) -> ImageSet:
    return _open(request.param)


# ---------------------------------------------------------------------------------------------- contract


def test_batch_shape_dtype_range_labels(dataset: ImageSet) -> None:
    images, labels, indices = select_batch(dataset, 4, seed=0)
    assert images.shape == (4, 3, SIZE, SIZE)
    assert images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert float(images.std()) > 0.02, "images are (nearly) constant: not real pixels"
    assert labels.dtype == torch.int64 and labels.shape == (4,)
    assert all(0 <= int(y) < dataset.num_classes for y in labels)
    assert labels.tolist() == dataset.labels[indices].tolist()
    assert len(dataset.classes) == dataset.num_classes
    assert int(dataset.labels.min()) >= 0 and int(dataset.labels.max()) < dataset.num_classes


def test_same_seed_same_batch_different_seed_different(dataset: ImageSet) -> None:
    a_images, a_labels, a_idx = select_batch(dataset, 4, seed=7)
    b_images, b_labels, b_idx = select_batch(dataset, 4, seed=7)
    _, _, c_idx = select_batch(dataset, 4, seed=8)
    assert a_idx == b_idx
    assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    assert a_idx != c_idx
    assert len(set(a_idx)) == 4, "chosen without replacement"


def test_selection_does_not_touch_the_global_rng(dataset: ImageSet) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    select_batch(dataset, 2, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_distinct_labels(dataset: ImageSet) -> None:
    batch = min(dataset.num_classes, 8)
    _, labels, indices = select_batch(dataset, batch, seed=3, distinct_labels=True)
    assert len(set(labels.tolist())) == batch
    assert select_batch(dataset, batch, seed=3, distinct_labels=True)[2] == indices
    with pytest.raises(ConfigError, match=str(dataset.num_classes + 1)):
        select_batch(dataset, dataset.num_classes + 1, seed=0, distinct_labels=True)


def test_explicit_indices_are_honoured_in_order(dataset: ImageSet) -> None:
    wanted = [len(dataset) - 1, 0, 2]
    images, labels, indices = select_batch(dataset, 3, seed=999, indices=wanted)
    assert indices == wanted
    assert labels.tolist() == dataset.labels[wanted].tolist()
    assert torch.equal(images, dataset.load(wanted))
    assert torch.equal(images[1], dataset.load([0])[0])


def test_image_size_is_honoured(dataset: ImageSet) -> None:
    big = _open(dataset.name, split=dataset.split, image_size=40)
    assert big.load([0]).shape == (1, 3, 40, 40)
    assert torch.equal(big.labels, dataset.labels)


def test_errors_name_the_bad_value(dataset: ImageSet) -> None:
    n = len(dataset)
    with pytest.raises(ConfigError, match=f"batch size {n + 1} is larger than the {n} images"):
        select_batch(dataset, n + 1, seed=0)
    with pytest.raises(ConfigError, match="batch size 0"):
        select_batch(dataset, 0, seed=0)
    with pytest.raises(ConfigError, match=f"index {n} is out of range"):
        select_batch(dataset, 1, seed=0, indices=[n])
    with pytest.raises(ConfigError, match="index -1 is out of range"):
        dataset.load([-1])
    with pytest.raises(ConfigError, match="'validation'.*allowed: train, test"):
        _open(dataset.name, split="validation")
    for bad in (4, 513):
        with pytest.raises(ConfigError, match=f"image_size {bad} is out of range"):
            _open(dataset.name, image_size=bad)


def test_listing_decodes_nothing_and_load_all_caches(tmp_path: pathlib.Path) -> None:
    # A tree whose only "image" is not an image: building the set must succeed (it only lists),
    # and decoding it must fail with a DataError that names the file.
    bad = tmp_path / "test" / "cat" / "broken.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a png")
    images = load_dataset("imagefolder", root=str(tmp_path))
    assert len(images) == 1 and images.classes == ["cat"]
    with pytest.raises(DataError, match="broken.png"):
        images.load([0])

    digits = load_dataset("digits", image_size=SIZE)
    everything = digits.load_all()
    assert everything.shape == (len(digits), 3, SIZE, SIZE)
    assert digits.load_all() is everything
    assert torch.equal(digits.load([5, 1]), everything[[5, 1]])


# ---------------------------------------------------------------------------------------------- digits


def test_digits_are_real_and_split_80_20() -> None:
    from sklearn.datasets import load_digits

    test = load_dataset("digits", split="test", image_size=8)
    train = load_dataset("digits", split="train", image_size=8)
    assert len(test) + len(train) == 1797 and len(test) == 359
    # Stratified: every class holds about a fifth of its images in test.
    counts = torch.bincount(test.labels, minlength=10) / torch.bincount(
        torch.cat([test.labels, train.labels]), minlength=10
    )
    assert torch.all((counts - 0.2).abs() < 0.01)

    pixels = test.load_all()
    levels = pixels * 16
    assert torch.allclose(levels, levels.round(), atol=1e-5), "8x8 digits are stored in 17 levels (0..16)"
    assert len(torch.unique(levels.round())) >= 15
    assert torch.equal(pixels[:, 0], pixels[:, 1]) and torch.equal(pixels[:, 1], pixels[:, 2])

    # Each test image is one of scikit-learn's, with its label: the split is of the real data set.
    bunch = load_digits()
    real = {
        (tuple(img.flatten().tolist()), int(y)) for img, y in zip(bunch.images, bunch.target, strict=True)
    }
    for i in range(0, len(test), 37):
        key = (tuple((pixels[i, 0] * 16).round().flatten().tolist()), int(test.labels[i]))
        assert key in real


def test_digits_split_is_fixed_and_disjoint() -> None:
    a = load_dataset("digits", split="test", image_size=8).load_all()
    train = load_dataset("digits", split="train", image_size=8).load_all()
    again = load_dataset("digits", split="test", image_size=8).load_all()
    assert torch.equal(a, again)
    # No test image appears in train (digits has a few exact duplicates, so compare a sample loosely).
    flat_train = train[:, 0].flatten(1)
    matches = sum(bool((flat_train == a[i, 0].flatten()).all(1).any()) for i in range(0, len(a), 10))
    assert matches <= 2


# ---------------------------------------------------------------------------------------------- faces


def test_att_faces_split_per_person() -> None:
    train = _open("att_faces", split="train")
    test = _open("att_faces", split="test")
    everything = _open("att_faces", split="all")
    assert train.num_classes == test.num_classes == 40
    assert train.classes[:3] == ["s1", "s2", "s3"] and train.classes[-1] == "s40"
    assert torch.equal(torch.bincount(train.labels, minlength=40), torch.full((40,), 8))
    assert torch.equal(torch.bincount(test.labels, minlength=40), torch.full((40,), 2))
    assert len(everything) == 400
    # Disjoint per person: no test photo equals a train photo of the same identity.
    train_images, test_images = train.load_all(), test.load_all()
    for person in (0, 17, 39):
        tr = train_images[train.labels == person]
        te = test_images[test.labels == person]
        assert tr.shape[0] == 8 and te.shape[0] == 2
        assert not any(torch.equal(x, y) for x in te for y in tr)
    # Together, train and test are exactly `all`, photo for photo.
    all_images = everything.load_all()
    assert torch.equal(torch.cat([train_images[:8], test_images[:2]]), all_images[:10])

    six = _open("att_faces", split="test", train_per_person=6)
    assert len(six) == 160
    with pytest.raises(ConfigError, match="train_per_person 10"):
        _open("att_faces", split="train", train_per_person=10)


def test_identities_split_each_person_at_their_last_photo(tmp_path: pathlib.Path) -> None:
    train, test = _open("identities", split="train"), _open("identities", split="test")
    assert train.classes == test.classes == [f"s{k}" for k in range(1, 41)]  # natural order: s2 before s10
    assert torch.equal(torch.bincount(test.labels, minlength=40), torch.ones(40, dtype=torch.int64))
    assert torch.equal(torch.bincount(train.labels, minlength=40), torch.full((40,), 9))
    # The held-out photo is each person's last in natural order (10.pgm, not 9.pgm): att_faces' last test photo.
    faces = _open("att_faces", split="test")
    assert torch.equal(test.load([0, 39]), faces.load([1, 79]))
    # A person with a single photo can be neither gallery and probe: left out; hidden files are ignored.
    source = DATA_ROOT / "att_faces" if DATA_ROOT else None
    assert source is not None
    for person, count in (("alice", 3), ("bob", 1), ("carol", 2)):
        (tmp_path / person).mkdir()
        for n in range(1, count + 1):
            (tmp_path / person / f"{person}_{n:04d}.pgm").write_bytes((source / "s1" / f"{n}.pgm").read_bytes())
    (tmp_path / "carol" / ".hidden.pgm").write_bytes(b"")
    tree = load_dataset("identities", root=str(tmp_path), split="all", image_size=SIZE)
    assert tree.classes == ["alice", "carol"] and tree.labels.tolist() == [0, 0, 0, 1, 1]
    assert load_dataset("identities", root=str(tmp_path), split="test", image_size=SIZE).labels.tolist() == [0, 1]
    with pytest.raises(DataError, match="no person with two or more photos"):
        load_dataset("identities", root=str(tmp_path / "bob"))


def test_att_faces_rejects_unknown_split_but_allows_all_only_there() -> None:
    with pytest.raises(ConfigError, match="'all'"):
        load_dataset("digits", split="all")
    with pytest.raises(ConfigError, match="allowed: train, test, all"):
        _open("att_faces", split="valid")


# ---------------------------------------------------------------------------------------------- finding data


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_missing_data_names_where_it_looked(name: str, tmp_path: pathlib.Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset(name, root=str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / name / "test") in message
    folder = {"mnist": "MNIST", "cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    assert str(tmp_path / folder) in message
    assert "download: true" in message and "GRNN_DATA_ROOT" in message


def test_cifar100_absent_from_shared_data() -> None:
    if DATA_ROOT is None or (DATA_ROOT / "cifar100").exists() or (DATA_ROOT / "cifar-100-python").exists():
        pytest.skip("needs a data root that holds other sets but not cifar100")
    with pytest.raises(DataError, match=str(DATA_ROOT / "cifar100" / "test")):
        load_dataset("cifar100", root=str(DATA_ROOT))


def test_imagefolder_missing_split_is_a_data_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "train")):
        load_dataset("imagefolder", root=str(tmp_path), split="train")


def _write_idx(path: pathlib.Path, data: torch.Tensor) -> None:
    """MNIST's IDX format: magic (0, 0, ubyte=8, ndim), big-endian dims, then the raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 8, data.dim()) + struct.pack(f">{data.dim()}I", *data.shape)
    path.write_bytes(header + data.to(torch.uint8).numpy().tobytes())


def test_mnist_from_torchvision_files(tmp_path: pathlib.Path) -> None:
    # torchvision's own raw MNIST layout, written from real digits, must be found when no tree is there.
    digits = load_dataset("digits", split="train", image_size=28)
    images = (digits.load(range(12))[:, 0] * 255).round()
    labels = digits.labels[:12]
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    mnist = load_dataset("mnist", root=str(tmp_path), split="test", image_size=28)
    assert len(mnist) == 12 and mnist.num_classes == 10
    assert torch.equal(mnist.labels, labels)
    batch, batch_labels, indices = select_batch(mnist, 3, seed=0)
    assert batch.shape == (3, 3, 28, 28)
    assert torch.allclose(batch[:, 1], images[indices] / 255, atol=1e-6)
    assert torch.equal(batch_labels, labels[indices])


def test_resolve_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("GRNN_DATA_ROOT", str(tmp_path / "env"))
    assert resolve_data_root(str(tmp_path / "given")) == tmp_path / "given"
    assert resolve_data_root(None) == tmp_path / "env"
    monkeypatch.delenv("GRNN_DATA_ROOT")
    assert resolve_data_root(None) == pathlib.Path.home() / ".cache" / "grnn" / "data"


def test_load_dataset_rejects_unknown_names_and_params() -> None:
    with pytest.raises(ConfigError, match="digit"):
        load_dataset("digit")
    with pytest.raises(ConfigError, match="'colour'"):
        load_dataset("digits", colour=True)
