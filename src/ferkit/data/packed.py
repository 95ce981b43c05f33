"""Packed datasets: decoded faces in plain .npy shards, memory-mapped, for data larger than memory.

A packed dataset is a folder:

    ferkit-faces.json        {"classes": [...], "image_size": [48, 48], "shards": [["faces-00000.npy", "labels-00000.npy"], ...],
                              "packed_from": {"path": "/data/fer2013.csv", "usage": "Training"}}  (where it was packed from)
    faces-00000.npy          (n, height, width) uint8 grayscale faces
    labels-00000.npy         (n,) integer labels indexing "classes"

`load_dataset` reads it without loading it: the faces stay on disk and training reads one batch at a time
(ferkit.data.batches), so memory stays flat as the dataset grows. `ferkit pack DATA OUT` writes one from
any dataset ferkit reads; `ShardWriter` writes one from faces you make yourself, a chunk at a time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ferkit.data.dataset import FaceDataset
from ferkit.errors import FerkitError
from ferkit.labels import EMOTIONS

INDEX = "ferkit-faces.json"


def is_packed(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


def pack_origin(path: str | Path) -> tuple[Path, str | None] | None:
    """The folder or CSV file the packed dataset at `path` was packed from, and the CSV rows it took
    (None: all of them), where its index records them; None for any other path."""
    if not is_packed(path):
        return None
    try:
        origin = json.loads((Path(path) / INDEX).read_text()).get("packed_from")
        return Path(origin["path"]), origin["usage"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


class ShardedFaces:
    """Several (n, H, W) uint8 shard files read as one array: rows by index, in any order.

    Each file is memory-mapped when a row of it is first read, so a process reads, and needs on its disk,
    only the shards it uses: in a data-parallel job each process trains on its own (ferkit.data.batches)."""

    def __init__(self, paths: Sequence[Path], counts: Sequence[int], image_size: tuple[int, int]):
        self.paths = [Path(p) for p in paths]
        self.offsets = np.cumsum([0, *counts])
        self.shape = (int(self.offsets[-1]), *image_size)
        self.dtype, self.ndim = np.dtype(np.uint8), 3
        self._opened: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def num_shards(self) -> int:
        return len(self.paths)

    def shard_rows(self, shard: int) -> np.ndarray:
        """The rows of the whole that shard `shard` holds."""
        return np.arange(self.offsets[shard], self.offsets[shard + 1])

    def shard(self, shard: int) -> np.ndarray:
        """Shard `shard`'s faces, memory-mapped (opened and checked on first use)."""
        if shard not in self._opened:
            expected = (int(self.offsets[shard + 1] - self.offsets[shard]), *self.shape[1:])
            self._opened[shard] = _open_faces(self.paths[shard], expected)
        return self._opened[shard]

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self[np.array([index])][0]
        rows = np.arange(len(self))[index] if isinstance(index, slice) else self._rows(np.asarray(index))
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        for s in np.unique(shard):
            chosen = shard == s
            out[chosen] = self.shard(s)[rows[chosen] - self.offsets[s]]
        return out

    def _rows(self, index: np.ndarray) -> np.ndarray:
        """Row numbers as numpy reads an index: a boolean mask, or integers counted from the end when negative."""
        if index.dtype == bool:
            if index.shape != (len(self),):
                raise IndexError(f"a boolean index of shape {index.shape} for {len(self)} faces")
            return np.flatnonzero(index)
        rows = index.astype(np.int64)
        if rows.size and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} faces")
        return np.where(rows < 0, rows + len(self), rows)

    def __array__(self, dtype=None, copy=None):
        whole = self[slice(None)]
        return whole if dtype is None else whole.astype(dtype)


def _open_faces(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    try:
        faces = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise FerkitError(f"cannot read the shard {path} ({type(err).__name__})") from None
    if faces.shape != shape or faces.dtype != np.uint8:
        raise FerkitError(f"{path}: its faces do not match {INDEX} ({faces.shape} {faces.dtype}, expected {shape} uint8)")
    return faces


class ShardWriter:
    """Write a packed dataset a chunk at a time: `add(faces, labels)` as often as you like, then `close()`.
    Memory holds one chunk; a shard is closed every `shard_size` faces. With `overwrite`, a packed dataset
    already at `out` is replaced (other files there are kept)."""

    def __init__(self, out: str | Path, classes: Sequence[str], image_size: tuple[int, int], *, shard_size: int = 100_000,
                 overwrite: bool = False, packed_from: tuple[str | Path, str | None] | None = None,
                 shuffle_seed: int | None = None):
        self.out, self.classes, self.image_size, self.shard_size = Path(out), list(classes), tuple(image_size), shard_size
        # recorded so that evaluating or calibrating on a packed copy of a model's training faces is noticed;
        # a pack of a pack records what the first was packed from
        origin = None if packed_from is None else pack_origin(packed_from[0]) or (Path(packed_from[0]).resolve(), packed_from[1])
        self.packed_from = None if origin is None else {"path": str(origin[0]), "usage": origin[1]}
        self.shuffle_seed = shuffle_seed  # recorded: the order of the faces is the seed's, not their source's
        if shard_size < 1:
            raise FerkitError(f"a shard holds at least 1 face, not {shard_size}")
        check_pack_folder(self.out, overwrite=overwrite)
        _remove_packed(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.shards: list[list[str]] = []
        self._faces, self._labels, self._count = [], [], 0

    def add(self, faces: np.ndarray, labels: np.ndarray) -> None:
        faces, labels = np.asarray(faces, np.uint8), np.asarray(labels, np.int64)
        if faces.shape[1:] != self.image_size or len(faces) != len(labels):
            raise FerkitError(f"faces must be (n, {self.image_size[0]}, {self.image_size[1]}) with one label each")
        while len(faces):
            room = self.shard_size - self._count
            self._faces.append(faces[:room])
            self._labels.append(labels[:room])
            self._count += len(faces[:room])
            faces, labels = faces[room:], labels[room:]
            if self._count == self.shard_size:
                self._flush()

    def close(self) -> Path:
        if self._count or not self.shards:
            self._flush()
        index = {"classes": self.classes, "image_size": list(self.image_size), "shards": self.shards}
        if self.packed_from:
            index["packed_from"] = self.packed_from
        if self.shuffle_seed is not None:
            index["shuffled"] = {"seed": self.shuffle_seed}
        (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return self.out

    def _flush(self) -> None:
        number = len(self.shards)
        names = [f"faces-{number:05d}.npy", f"labels-{number:05d}.npy"]
        np.save(self.out / names[0], np.concatenate(self._faces) if self._faces else np.zeros((0, *self.image_size), np.uint8))
        np.save(self.out / names[1], np.concatenate(self._labels) if self._labels else np.zeros(0, np.int64))
        self.shards.append(names)
        self._faces, self._labels, self._count = [], [], 0


def pack_dataset(dataset: FaceDataset | str | Path, out: str | Path, *, shard_size: int = 100_000, chunk: int = 10_000,
                 overwrite: bool = False, packed_from: tuple[str | Path, str | None] | None = None,
                 shuffle_seed: int | None = None) -> Path:
    """Write `dataset` (or the dataset at that path, as `load_dataset` reads it) as a packed dataset in
    the new folder `out`; with `overwrite`, in place of a packed dataset there. `packed_from`: the folder
    or CSV file a FaceDataset was read from, and the CSV rows taken (None: all), to record in the index.
    With `shuffle_seed`, the faces are written in that seed's random order (else in the data's, class by
    class), so that every shard holds faces of every class: what processes that each read their own shards need."""
    check_pack_folder(out, overwrite=overwrite)
    if not isinstance(dataset, FaceDataset):
        from ferkit.data import load_dataset

        packed_from = packed_from or (dataset, None)
        dataset = load_dataset(dataset)
    elif packed_from is None and dataset.source and Path(dataset.source).is_dir():  # a folder's or a pack's faces
        packed_from = (dataset.source, None)
    if dataset.source and Path(out).resolve() == Path(dataset.source).resolve():
        raise FerkitError(f"{out} is the packed dataset being read; pack it into another folder")
    writer = ShardWriter(out, dataset.classes, dataset.image_size, shard_size=shard_size, overwrite=overwrite,
                         packed_from=packed_from, shuffle_seed=shuffle_seed)
    order = np.arange(len(dataset)) if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(len(dataset))
    for start in range(0, len(dataset), chunk):
        rows = order[start : start + chunk]
        writer.add(dataset.images[rows], dataset.labels[rows])
    return writer.close()


def check_pack_folder(out: str | Path, *, overwrite: bool = False) -> None:
    """Refuse, before any work, to write a packed dataset where something else is (or, without
    `overwrite`, where anything is)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FerkitError(f"{out} is a file; give a new folder for the packed dataset")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            what = "holds a packed dataset stopped before its end" if is_unfinished_pack(out) else "already exists and is not empty"
            raise FerkitError(f"{out} {what}; choose a new folder (or --overwrite to replace a packed dataset there)")
        if not is_packed(out) and not is_unfinished_pack(out):
            raise FerkitError(f"{out} is not a packed dataset; refusing to overwrite it, choose another folder")


_SHARD_FILE = re.compile(r"(faces|labels)-\d{5}\.npy")


def is_unfinished_pack(folder: Path) -> bool:
    """Whether `folder` holds shard files only, without their index: a pack that was stopped before its end."""
    names = [path.name for path in folder.iterdir()]
    return bool(names) and all(_SHARD_FILE.fullmatch(name) for name in names)


def _remove_packed(folder: Path) -> None:
    """The files of the packed dataset in `folder`, finished or not, if there is one, removed."""
    if not folder.is_dir() or not (is_packed(folder) or is_unfinished_pack(folder)):
        return
    for path in folder.iterdir():
        if _SHARD_FILE.fullmatch(path.name) or path.name == INDEX:
            path.unlink()


def _pack_again(index: dict, side: int) -> str:
    """How to pack the faces a pack was made from again at another size: its rows and classes kept."""
    origin = index.get("packed_from")
    if not isinstance(origin, dict) or "path" not in origin:
        return f"pack the faces it was packed from again with --image-size {side}"
    usage = f" --usage {origin.get('usage') or 'all'}" if str(origin["path"]).lower().endswith(".csv") else ""
    classes = f" --classes {','.join(index['classes'])}" if list(index["classes"]) != list(EMOTIONS) else ""
    return f"ferkit pack {origin['path']} NEW_FOLDER --image-size {side}{usage}{classes}"


def load_packed(path: str | Path, *, classes: Sequence[str] | None = None, image_size: tuple[int, int] = (48, 48)) -> FaceDataset:
    """The packed dataset at `path`, its faces memory-mapped; `classes` reorders (and may extend) its classes."""
    path = Path(path)
    try:
        index = json.loads((path / INDEX).read_text())
        stored_classes, size, shards = list(index["classes"]), tuple(index["image_size"]), index["shards"]
        shard_labels = [np.load(path / l) for _, l in shards]
        labels = np.concatenate(shard_labels).astype(np.int64)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FerkitError(f"{path} is not a readable packed dataset ({type(err).__name__})") from None
    if size != tuple(image_size):
        raise FerkitError(f"{path} holds {size[0]}x{size[1]} faces; this needs {image_size[0]}x{image_size[1]} "
                          f"({_pack_again(index, image_size[0])})")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(stored_classes)):
        raise FerkitError(f"{path}: a label outside its {len(stored_classes)} classes")
    if classes is not None and list(classes) != stored_classes:
        missing = sorted(set(stored_classes) - set(classes))
        if missing:
            raise FerkitError(f"{path} has classes the model does not know: {', '.join(missing)}")
        labels = np.array([list(classes).index(name) for name in stored_classes])[labels]
        stored_classes = list(classes)
    counts = [len(shard) for shard in shard_labels]
    if len(shards) == 1:  # one file: checked now, and handed on as a plain memory-mapped array
        images = _open_faces(path / shards[0][0], (counts[0], *size))
    else:  # each file checked when first read (ShardedFaces): a process may hold only its own shards
        images = ShardedFaces([path / f for f, _ in shards], counts, size)
    return FaceDataset(images=images, labels=labels, classes=tuple(stored_classes), source=str(path))
