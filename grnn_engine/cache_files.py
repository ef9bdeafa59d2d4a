"""Content-addressed cache files of torch state, shared by the FL stage cache and the face-identifier cache.

A cached thing is named by `content_hash` of what determines it; it is written atomically (a reader never
sees half a file) and read back with `torch.load(weights_only=True)`, so a forged file cannot run code; an
unreadable one is reported and computed again, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import pickle
import warnings
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["DEFAULT_CACHE_DIR", "atomic_torch_save", "content_hash", "load_torch_cache", "resolve_cache_dir"]

# Where FL stages and image priors are cached unless cache_dir or $GRNN_CACHE_DIR says otherwise.
DEFAULT_CACHE_DIR = pathlib.Path("~/.cache/grnn/stages")


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """cache_dir, else $GRNN_CACHE_DIR, else ~/.cache/grnn/stages."""
    chosen = cache_dir or os.environ.get("GRNN_CACHE_DIR") or DEFAULT_CACHE_DIR
    return pathlib.Path(chosen).expanduser()



def content_hash(payload: Mapping[str, Any]) -> str:
    """24 hex digits of the sha256 of the payload's canonical JSON (sorted keys): the name of its cache file."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def load_torch_cache(path: pathlib.Path, what: str = "stage") -> dict[str, Any] | None:
    """A cache file written by `atomic_torch_save`, or None when it is missing or unreadable."""
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        # Writes are atomic, so this is disk damage or a foreign file: the caller computes it again.
        warnings.warn(f"ignoring unreadable {what} cache file {path}: {error}", stacklevel=3)
        return None


def atomic_torch_save(path: pathlib.Path, state: dict[str, Any]) -> None:
    """torch.save `state` to `path` so that a reader sees the old file, or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temp file in the same folder + os.replace: a reader never sees a half-written file. Created with
    # mode 0o666 so that the user's umask decides who may read the cache, as for every other file the
    # project writes (tempfile.mkstemp would force 0o600); O_EXCL keeps two writers apart.
    tmp = path.parent / f".{path.stem}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
