"""Datasets registry (real images only) and deterministic selection of the victim's private batch.

Every dataset is an `ImageSet`: labels are known up front, pixels are decoded lazily per index, because a
trial needs 1-16 images of a split that may hold 10,000 files. Registered factories take the keyword
arguments `root, split, image_size, download` (plus their own) and are built with `load_dataset(...)`.

Where data comes from: the trial's `data.root`, else `$GRNN_DATA_ROOT`, else `~/.cache/grnn/data`.
`digits` (scikit-learn's bundled 8x8 digits) needs no files at all, which makes it the default.
"""

from __future__ import annotations

import functools
import os
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from grnn_engine.errors import ConfigError, DataError
from grnn_engine.registry import Registry

__all__ = [
    "DATASETS",
    "ImageSet",
    "load_dataset",
    "resolve_data_root",
    "select_batch",
]

DATASETS: Registry[ImageSet] = Registry("dataset")

MIN_IMAGE_SIZE = 8  # the smallest real images here (digits) are 8x8; smaller would destroy them
MAX_IMAGE_SIZE = 512  # beyond this the attacks' memory use, not the data, is the limit
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_DATA_ROOT = pathlib.Path("~/.cache/grnn/data")

# Fixed, not the trial seed: a dataset's train/test split must be the same in every trial and process.
_DIGITS_SPLIT_SEED = 0
_DIGITS_TEST_FRACTION = 0.2

# Reads image i at its stored size as float32 (3, h, w) in [0, 1].
Reader = Callable[[int], Tensor]
# A data root as a user gives it: a path, or None for $GRNN_DATA_ROOT / ~/.cache/grnn/data.
Root = str | os.PathLike[str] | None


class ImageSet:
    """A lazily decoded set of labelled images of one split, all served at image_size x image_size.

    `labels` is known without decoding any image; `load(indices)` decodes only what it is asked for;
    `load_all()` decodes everything once and keeps it on the instance.
    """

    def __init__(
        self,
        name: str,
        split: str,
        classes: Sequence[str],
        labels: Tensor,
        image_size: int,
        reader: Reader,
    ) -> None:
        self.name = name
        self.split = split
        self.classes: list[str] = list(classes)
        self.num_classes: int = len(self.classes)
        self.labels: Tensor = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        self.image_size: int = _check_image_size(image_size)
        self._reader = reader
        self._all: Tensor | None = None

    @property
    def description(self) -> str:
        """'name/split', the way error messages name the set."""
        return f"{self.name}/{self.split}"

    def __len__(self) -> int:
        return int(self.labels.numel())

    def __repr__(self) -> str:
        return (
            f"ImageSet({self.description}, {len(self)} images, {self.num_classes} classes, "
            f"{self.image_size}x{self.image_size})"
        )

    def check_indices(self, indices: Sequence[int]) -> list[int]:
        """The indices as plain ints; ConfigError on the first one outside 0..len-1."""
        out: list[int] = []
        for raw in indices:
            i = int(raw)
            if not 0 <= i < len(self):
                raise ConfigError(
                    f"index {raw} is out of range for the {len(self)} images of {self.description} "
                    f"(allowed: 0..{len(self) - 1})"
                )
            out.append(i)
        return out

    def load(self, indices: Sequence[int]) -> Tensor:
        """Images `indices`, in that order, as float32 (n, 3, S, S) in [0, 1]."""
        idx = self.check_indices(indices)
        size = self.image_size
        if self._all is not None:
            return self._all[idx]  # advanced indexing copies, so the cache cannot be edited through it
        if not idx:
            return torch.empty(0, 3, size, size)
        native = [self._reader(i) for i in idx]
        if all(t.shape == native[0].shape for t in native):
            # One batched resize instead of n small ones (the common case: one stored size per set).
            return _resize(torch.stack(native), size)
        return torch.stack([_resize(t, size) for t in native])

    def load_all(self) -> Tensor:
        """Every image of the set (N, 3, S, S), decoded once and cached on this instance."""
        if self._all is None:
            self._all = self.load(range(len(self)))
        return self._all


# ---------------------------------------------------------------------------------------------- checks


def _check_image_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise ConfigError(
            f"image_size {image_size!r} is not an integer; allowed: {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}"
        )
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ConfigError(
            f"image_size {image_size} is out of range; allowed: {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}"
        )
    return image_size


def _check_split(name: str, split: str, allowed: Sequence[str] = SPLITS) -> str:
    if split not in allowed:
        raise ConfigError(f"unknown split '{split}' for dataset {name}; allowed: {', '.join(allowed)}")
    return split


# ---------------------------------------------------------------------------------------------- roots


def resolve_data_root(root: Root) -> pathlib.Path:
    """`root` when given, else $GRNN_DATA_ROOT when set, else ~/.cache/grnn/data (user folder expanded)."""
    chosen: str | os.PathLike[str] = root or os.environ.get("GRNN_DATA_ROOT") or DEFAULT_DATA_ROOT
    return pathlib.Path(chosen).expanduser()


# ---------------------------------------------------------------------------------------------- decoding


def _resize(images: Tensor, size: int) -> Tensor:
    """Bilinear resize of (..., 3, h, w) to size x size; antialiased so downsizing does not alias.

    torch's own interpolate, which is what torchvision's resize runs on tensors (bit-identical): importing
    torchvision costs a sweep worker seconds before its first trial (it imports torch._dynamo).
    """
    if images.shape[-2:] == (size, size):
        return images
    batch = images.reshape(-1, *images.shape[-3:])
    out = torch.nn.functional.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.reshape(*images.shape[:-2], size, size).clamp_(0.0, 1.0)


def _pil_to_tensor(image: Any) -> Tensor:
    """A PIL image as float32 (3, h, w) in [0, 1]; grey is replicated to 3 channels, as the GRNN paper does."""
    import numpy as np

    pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8))  # (h, w, 3), a copy torch may own
    return pixels.permute(2, 0, 1).to(torch.float32).div_(255.0)


def _read_file(path: str) -> Tensor:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return _pil_to_tensor(image)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from exc


def _files_reader(paths: Sequence[str]) -> Reader:
    return lambda i: _read_file(paths[i])


# ---------------------------------------------------------------------------------------------- folder trees


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _subdirs(path: str) -> list[str]:
    with os.scandir(path) as it:
        return [e.name for e in it if e.is_dir() and not e.name.startswith(".")]


@functools.cache
def _tree_classes(tree: str) -> tuple[str, ...]:
    """Sorted class folder names over every split present, so label k means one class in train and test."""
    names: set[str] = set()
    for split in SPLITS:
        split_dir = os.path.join(tree, split)
        if os.path.isdir(split_dir):
            names.update(_subdirs(split_dir))
    return tuple(sorted(names))


@functools.cache
def _list_tree_split(tree: str, split: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...]]:
    """(classes, file paths, labels) of `<tree>/<split>/<class>/<image>`; lists files, decodes nothing."""
    classes = _tree_classes(tree)
    paths: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        class_dir = os.path.join(tree, split, cls)
        if not os.path.isdir(class_dir):
            continue
        with os.scandir(class_dir) as it:
            files = sorted(e.name for e in it if e.is_file() and _is_image(e.name))
        paths.extend(os.path.join(class_dir, f) for f in files)
        labels.extend([label] * len(files))
    return classes, tuple(paths), tuple(labels)


def _tree_image_set(name: str, tree: pathlib.Path, split: str, image_size: int) -> ImageSet:
    classes, paths, labels = _list_tree_split(str(tree), split)
    if not paths:
        raise DataError(
            f"no images found in {tree / split}; expected files ({', '.join(IMAGE_EXTENSIONS)}) "
            f"in {tree / split}/<class>/"
        )
    return ImageSet(
        name, split, classes, torch.tensor(labels, dtype=torch.int64), image_size, _files_reader(paths)
    )


# ---------------------------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled digits as float32 (1797, 8, 8) in [0, 1] (stored levels 0..16) and labels.

    Read from the file scikit-learn ships them in (what its load_digits reads), without importing scikit-learn:
    that import costs a sweep worker about a second before its first digits trial. load_digits when the file
    is not where scikit-learn has always kept it.
    """
    import gzip
    import importlib.util

    import numpy as np

    found = importlib.util.find_spec("sklearn")
    path = pathlib.Path(found.origin).parent / "datasets" / "data" / "digits.csv.gz" if found and found.origin else None
    if path is not None and path.is_file():
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",")  # 1797 rows: 64 pixel levels, then the label
        pixels, targets = table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels, targets = bunch.images, bunch.target
    return torch.as_tensor(pixels, dtype=torch.float32).div_(16.0), torch.as_tensor(targets, dtype=torch.int64)


@functools.cache
def _digits_split(split: str) -> Tensor:
    """Indices of `split` in a stratified 80/20 split with a fixed seed: 1438 train, 359 test, sorted."""
    _, targets = _digits_arrays()
    generator = torch.Generator().manual_seed(_DIGITS_SPLIT_SEED)
    test: list[Tensor] = []
    for cls in range(int(targets.max()) + 1):
        members = torch.nonzero(targets == cls).flatten()
        n_test = round(_DIGITS_TEST_FRACTION * members.numel())
        test.append(members[torch.randperm(members.numel(), generator=generator)[:n_test]])
    is_test = torch.zeros(targets.numel(), dtype=torch.bool)
    is_test[torch.cat(test)] = True
    chosen = is_test if split == "test" else ~is_test
    return torch.nonzero(chosen).flatten()


@DATASETS.register("digits")
def digits(
    *, root: Root = None, split: str = "test", image_size: int = 32, download: bool = False
) -> ImageSet:
    """scikit-learn's 1,797 real 8x8 handwritten digits; bundled, so `root` and `download` are unused."""
    _check_split("digits", split)
    _check_image_size(image_size)
    images, targets = _digits_arrays()
    members = _digits_split(split)

    def read(i: int) -> Tensor:
        return images[members[i]].unsqueeze(0).expand(3, -1, -1)

    return ImageSet("digits", split, [str(c) for c in range(10)], targets[members], image_size, read)


# ---------------------------------------------------------------------------------------------- torchvision sets

# name -> (torchvision class, the folder its files live in under root, class names to use).
_TORCHVISION = {
    "mnist": ("MNIST", "MNIST/raw", [str(c) for c in range(10)]),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", None),
    "cifar100": ("CIFAR100", "cifar-100-python", None),
}


@functools.cache
def _torchvision_set(name: str, root: str, split: str, download: bool) -> Any:
    import torchvision.datasets

    cls = getattr(torchvision.datasets, _TORCHVISION[name][0])
    return cls(root, train=(split == "train"), download=download)


def _torchvision_image_set(name: str, dataset: Any, split: str, image_size: int) -> ImageSet:
    classes = _TORCHVISION[name][2] or list(dataset.classes)

    def read(i: int) -> Tensor:
        image, _ = dataset[i]  # a PIL image: the dataset was built without transforms
        return _pil_to_tensor(image)

    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    return ImageSet(name, split, classes, labels, image_size, read)


def _named_set(name: str, root: Root, split: str, image_size: int, download: bool) -> ImageSet:
    """Find `name` as an ImageFolder tree, then as torchvision's files, then (if allowed) download it."""
    _check_split(name, split)
    _check_image_size(image_size)
    base = resolve_data_root(root)
    tree = base / name
    if (tree / split).is_dir():
        return _tree_image_set(name, tree, split, image_size)
    torchvision_dir = base / _TORCHVISION[name][1]
    try:
        dataset = _torchvision_set(name, str(base), split, False)
    except RuntimeError:  # torchvision's "Dataset not found (or corrupted)"
        dataset = None
    except Exception as exc:  # files present but unreadable (truncated, wrong format)
        raise DataError(f"cannot read {name}'s torchvision files in {torchvision_dir}: {exc}") from exc
    if dataset is None and download:
        try:
            dataset = _torchvision_set(name, str(base), split, True)
        except Exception as exc:  # network, disk or checksum: all mean "not downloaded"
            raise DataError(f"could not download {name} into {base}: {exc}") from exc
    if dataset is None:
        raise DataError(
            f"{name} ({split}) not found: looked for an ImageFolder tree at {tree / split} and for "
            f"torchvision's files at {torchvision_dir}; set `download: true` on an online machine, or "
            f"point data.root or GRNN_DATA_ROOT at a folder that holds {name}/{split}/<class>/<image>"
        )
    return _torchvision_image_set(name, dataset, split, image_size)


@DATASETS.register("mnist")
def mnist(
    *, root: Root = None, split: str = "test", image_size: int = 32, download: bool = False
) -> ImageSet:
    """MNIST handwritten digits (28x28 grey)."""
    return _named_set("mnist", root, split, image_size, download)


@DATASETS.register("cifar10")
def cifar10(
    *, root: Root = None, split: str = "test", image_size: int = 32, download: bool = False
) -> ImageSet:
    """CIFAR-10 (32x32 colour, 10 classes)."""
    return _named_set("cifar10", root, split, image_size, download)


@DATASETS.register("cifar100")
def cifar100(
    *, root: Root = None, split: str = "test", image_size: int = 32, download: bool = False
) -> ImageSet:
    """CIFAR-100 (32x32 colour, 100 classes)."""
    return _named_set("cifar100", root, split, image_size, download)


@DATASETS.register("imagefolder")
def imagefolder(
    *, root: Root = None, split: str = "test", image_size: int = 32, download: bool = False
) -> ImageSet:
    """Any `<root>/<split>/<class>/<image>` tree; `root` is the tree itself; classes are the sorted folder names."""
    _check_split("imagefolder", split)
    _check_image_size(image_size)
    tree = resolve_data_root(root)
    if not (tree / split).is_dir():
        raise DataError(
            f"imagefolder has no folder {tree / split}; point data.root at a tree laid out as "
            f"<root>/<split>/<class>/<image> with split one of {', '.join(SPLITS)}"
        )
    return _tree_image_set("imagefolder", tree, split, image_size)


# ---------------------------------------------------------------------------------------------- faces


def _number(name: str) -> int:
    match = re.search(r"\d+", name)
    return int(match.group()) if match else -1


@functools.cache
def _list_att_faces(folder: str) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """(identities sorted numerically, each identity's photo paths sorted numerically)."""
    people = sorted((d for d in _subdirs(folder) if re.fullmatch(r"s\d+", d)), key=_number)
    photos = []
    for person in people:
        person_dir = os.path.join(folder, person)
        names = sorted((f for f in os.listdir(person_dir) if _is_image(f)), key=_number)
        photos.append(tuple(os.path.join(person_dir, f) for f in names))
    return tuple(people), tuple(photos)


@DATASETS.register("att_faces")
def att_faces(
    *,
    root: Root = None,
    split: str = "test",
    image_size: int = 32,
    download: bool = False,
    train_per_person: int = 8,
) -> ImageSet:
    """AT&T (ORL) faces, `<root>/att_faces/s<k>/<n>.pgm`: 40 people x 10 photos, 92x112 grey.

    The database has no split on disk, so it is split per person: each identity's first
    `train_per_person` photos (by number) are `train`, the rest `test`; `all` keeps every photo.
    Images are resized to a square, so the 92x112 aspect ratio changes (faces get slightly wider).
    """
    _check_split("att_faces", split, (*SPLITS, "all"))
    _check_image_size(image_size)
    if (
        isinstance(train_per_person, bool)
        or not isinstance(train_per_person, int)
        or not 1 <= train_per_person <= 9
    ):
        raise ConfigError(
            f"train_per_person {train_per_person!r} is out of range for att_faces; allowed: 1..9"
        )
    folder = resolve_data_root(root) / "att_faces"
    people, photos = _list_att_faces(str(folder)) if folder.is_dir() else ((), ())
    if not people:
        raise DataError(
            f"att_faces not found: looked for {folder}/s<k>/<n>.pgm; point data.root or GRNN_DATA_ROOT "
            f"at a folder that holds att_faces/ (AT&T Laboratories Cambridge face database)"
        )
    return _split_per_person(
        "att_faces", people, photos, split, image_size, lambda n: train_per_person,
        f"in {folder} with train_per_person {train_per_person}",
    )  # fmt: skip


def _split_per_person(
    name: str,
    people: Sequence[str],
    photos: Sequence[Sequence[str]],
    split: str,
    image_size: int,
    train_count: Callable[[int], int],
    where: str,
) -> ImageSet:
    """A set of identities split per person: each one's first `train_count(n)` of n photos are `train` (the
    gallery a re-identifier learns), the rest `test` (unseen photos of known people); `all` keeps every photo.
    The label is the person's position in `people`, in every split."""
    paths: list[str] = []
    labels: list[int] = []
    for label, person_photos in enumerate(photos):
        cut = train_count(len(person_photos))
        chosen = {"train": person_photos[:cut], "test": person_photos[cut:]}.get(split, person_photos)
        paths.extend(chosen)
        labels.extend([label] * len(chosen))
    if not paths:
        raise DataError(f"{name}/{split} is empty {where}")
    return ImageSet(name, split, list(people), torch.tensor(labels, dtype=torch.int64), image_size, _files_reader(paths))


def _natural(name: str) -> list[str | int]:
    """Sort key that orders embedded numbers by value: s2 before s10, img_9 before img_10."""
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name))]


@functools.cache
def _list_identities(tree: str) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """(people with at least two photos, and each one's photo paths, both in natural order)."""
    people, photos = [], []
    for person in sorted(_subdirs(tree), key=_natural):
        person_dir = os.path.join(tree, person)
        names = sorted((f for f in os.listdir(person_dir) if _is_image(f)), key=_natural)
        if len(names) >= 2:
            people.append(person)
            photos.append(tuple(os.path.join(person_dir, f) for f in names))
    return tuple(people), tuple(photos)


@DATASETS.register("identities")
def identities(
    *, root: Root = None, split: str = "test", image_size: int = 32, download: bool = False
) -> ImageSet:
    """Any tree of identities, `<root>/<person>/<image>` (LFW as torchvision lays it out: lfw-deepfunneled/),
    split per person: each person's last photo (in natural order) is `test`, the others `train`; `all` keeps
    every photo. People with a single photo are left out: they could be neither re-identified nor held out."""
    _check_split("identities", split, (*SPLITS, "all"))
    _check_image_size(image_size)
    tree = resolve_data_root(root)
    people, photos = _list_identities(str(tree)) if tree.is_dir() else ((), ())
    if not people:
        raise DataError(
            f"identities found no person with two or more photos in {tree}; point data.root at a tree laid "
            f"out as <root>/<person>/<image>"
        )
    return _split_per_person("identities", people, photos, split, image_size, lambda n: n - 1, f"in {tree}")


# ---------------------------------------------------------------------------------------------- entry points


def load_dataset(
    name: str,
    *,
    root: Root = None,
    split: str = "test",
    image_size: int = 32,
    download: bool = False,
    **params: Any,
) -> ImageSet:
    """Build dataset `name` (see DATASETS.names()) after checking the name, split and image size."""
    DATASETS.check(name)
    _check_image_size(image_size)
    return DATASETS.create(name, root=root, split=split, image_size=image_size, download=download, **params)


def select_batch(
    images: ImageSet,
    batch_size: int,
    seed: int,
    *,
    indices: Sequence[int] | None = None,
    distinct_labels: bool = False,
) -> tuple[Tensor, Tensor, list[int]]:
    """The victim's private batch: (images (B, 3, S, S), labels (B,), indices).

    `indices` given: exactly those, in that order. Otherwise a choice without replacement drawn from
    its own `torch.Generator` seeded with `seed` (the global RNG is untouched), so the same seed picks
    the same batch in any process. `distinct_labels` picks B images with B different labels.
    """
    n = len(images)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size {batch_size!r} is invalid; allowed: 1..{n} for {images.description}")
    if batch_size > n:
        raise ConfigError(f"batch size {batch_size} is larger than the {n} images of {images.description}")
    if distinct_labels and batch_size > images.num_classes:
        raise ConfigError(
            f"batch size {batch_size} with distinct_labels needs more than the {images.num_classes} "
            f"classes of {images.description}; allowed: 1..{images.num_classes}"
        )

    if indices is not None:
        chosen = images.check_indices(indices)
        if len(chosen) != batch_size:
            raise ConfigError(f"batch size {batch_size} does not match the {len(chosen)} indices given")
        if len(set(chosen)) != len(chosen):
            repeated = next(i for i in chosen if chosen.count(i) > 1)
            raise ConfigError(
                f"index {repeated} appears more than once in the indices given; each must be unique"
            )
        if distinct_labels and len(set(images.labels[chosen].tolist())) != len(chosen):
            raise ConfigError(f"indices {chosen} repeat a label, but distinct_labels is set")
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
        if distinct_labels:
            # First image of each label in the seeded order: deterministic, and every label can win.
            chosen = []
            seen: set[int] = set()
            labels = images.labels.tolist()
            for i in order:
                if labels[i] not in seen:
                    seen.add(labels[i])
                    chosen.append(i)
                    if len(chosen) == batch_size:
                        break
            if len(chosen) < batch_size:
                raise ConfigError(
                    f"batch size {batch_size} with distinct_labels needs more than the {len(seen)} labels "
                    f"present in {images.description}; allowed: 1..{len(seen)}"
                )
        else:
            chosen = order[:batch_size]

    return images.load(chosen), images.labels[chosen].clone(), chosen
