"""On-disk cache of decoded datasets, keyed by what was read and how it was converted."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import zipfile
from pathlib import Path

import numpy as np

CACHE_VERSION = 2  # 2: pictures that are not square are made square by repeating edges, not stretched
KEY_LENGTH = 32
PARTIAL = (".partial-", ".tmp")  # a cache file being written: its name's start and end
OLDER_PARTIAL = re.compile(r"tmp\w{8}\.tmp")  # as earlier versions of ferkit named a file being written
# which cached file holds the latest copy of each dataset (by where it lies and how it is read): a copy
# made before its files changed is removed when the new one is saved, rather than kept for ever
LATEST = "latest.json"


def cache_dir() -> Path:
    """`$FERKIT_CACHE_DIR`, else `$XDG_CACHE_HOME/ferkit`, else `~/.cache/ferkit`."""
    if os.environ.get("FERKIT_CACHE_DIR"):
        return Path(os.environ["FERKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ferkit"


def cache_key(**parts) -> str:
    text = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def load_cached(key: str) -> dict[str, np.ndarray] | None:
    path = cache_dir() / "datasets" / f"{key}.npz"
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        path.unlink(missing_ok=True)  # a damaged cache file (truncated, overwritten) is simply rebuilt
        return None


def save_cached(key: str, arrays: dict[str, np.ndarray], *, dataset: str | None = None) -> None:
    """Write atomically, so an interrupted write never leaves a half file that later loads. `dataset`
    (a cache_key of where the data lies and how it is read, not of its files' sizes and times): the
    copy cached of the same dataset before is removed, its files having changed since."""
    folder = cache_dir() / "datasets"
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=PARTIAL[0], suffix=PARTIAL[1])
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, folder / f"{key}.npz")
        tmp = None
        if dataset:
            _remember_latest(folder, dataset, key)
    except OSError:
        if tmp is not None:  # a read-only or full cache folder only costs speed, and leaves nothing behind
            Path(tmp).unlink(missing_ok=True)


def _remember_latest(folder: Path, dataset: str, key: str) -> None:
    try:
        latest = json.loads((folder / LATEST).read_text())
        latest = latest if isinstance(latest, dict) else {}
    except (OSError, ValueError):
        latest = {}
    earlier = latest.get(dataset)
    if isinstance(earlier, str) and earlier != key and re.fullmatch(f"[0-9a-f]{{{KEY_LENGTH}}}", earlier):
        (folder / f"{earlier}.npz").unlink(missing_ok=True)
    latest[dataset] = key
    fd, written = tempfile.mkstemp(dir=folder, prefix=PARTIAL[0], suffix=PARTIAL[1])
    with os.fdopen(fd, "w") as handle:
        json.dump(latest, handle)
    os.replace(written, folder / LATEST)


def cache_files() -> list[Path]:
    """The cached datasets, oldest first: ferkit's files only, named by their key, never another's."""
    named = re.compile(f"[0-9a-f]{{{KEY_LENGTH}}}\\.npz")
    found = {path: _stat(path) for path in _files(lambda name: named.fullmatch(name))}
    return sorted((path for path, stat in found.items() if stat), key=lambda path: found[path].st_mtime)


def files_size(paths: list[Path]) -> int:
    """Bytes of the files still there (another ferkit may be clearing the cache meanwhile)."""
    return sum(stat.st_size for stat in map(_stat, paths) if stat)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def clear_cache() -> tuple[int, int]:
    """Delete every cached dataset (and any half-written one); returns (datasets, bytes) removed."""
    datasets = cache_files()
    partial = [*_files(lambda name: name.startswith(PARTIAL[0]) and name.endswith(PARTIAL[1])),
               *_files(OLDER_PARTIAL.fullmatch)]
    sizes = [_removed_size(dataset) for dataset in datasets]  # None: removed meanwhile by another ferkit
    (cache_dir() / "datasets" / LATEST).unlink(missing_ok=True)
    size = sum(s for s in sizes if s is not None) + sum(_removed_size(path) or 0 for path in partial)
    return sum(s is not None for s in sizes), size


def _removed_size(path: Path) -> int | None:
    """The size of the file at `path`, now removed; None if it was gone (another ferkit clearing the cache)."""
    stat = _stat(path)
    try:
        path.unlink()
    except FileNotFoundError:
        return None
    return stat.st_size if stat else 0


def _files(chosen) -> list[Path]:
    folder = cache_dir() / "datasets"
    return [path for path in folder.iterdir() if chosen(path.name)] if folder.is_dir() else []
