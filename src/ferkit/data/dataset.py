"""The in-memory dataset every loader returns, and the stratified split."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ferkit.errors import FerkitError
from ferkit.extras import require


@dataclass
class FaceDataset:
    """Faces as a (N, height, width) uint8 grayscale array with integer labels indexing `classes`."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    source: str = ""
    paths: list[str] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of unreadable files
    # Each face's position in the source as loaded (its CSV row among those read, say): kept by `subset`.
    positions: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:  # not the dataclass's, which prints every pixel and path
        height, width = self.images.shape[1:3] if len(self.images.shape) >= 3 else (0, 0)
        return (f"FaceDataset({len(self)} faces of {width}x{height}, classes {list(self.classes)}, "
                f"source={self.source!r}" + (f", {len(self.skipped)} skipped" if self.skipped else "") + ")")

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[1:3])

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, counts)}

    def labels_for(self, classes) -> np.ndarray:
        """The labels as indices into `classes` (a model's), matched by name; a FerkitError names the
        dataset's classes that `classes` lacks."""
        classes = list(classes)
        missing = [name for name in self.classes if name not in classes]
        if missing:
            raise FerkitError(f"the data has classes the model does not know: {', '.join(missing)} "
                              f"(the model's: {', '.join(classes)})")
        return np.array([classes.index(name) for name in self.classes], dtype=np.int64)[self.labels]

    def subset(self, indices: np.ndarray) -> "FaceDataset":
        indices = np.asarray(indices)
        return FaceDataset(
            images=self.images[indices],
            labels=self.labels[indices],
            classes=self.classes,
            source=self.source,
            paths=[self.paths[i] for i in indices] if self.paths is not None else None,
            positions=(self.positions if self.positions is not None else np.arange(len(self)))[indices],
        )


def split_dataset(dataset: FaceDataset, *, val_fraction: float, seed: int = 0) -> tuple[FaceDataset, FaceDataset]:
    """Split off a stratified validation set; the same seed always gives the same split."""
    train_test_split = require("sklearn.model_selection", "splitting off a validation set").train_test_split

    if not 0.0 < val_fraction < 1.0:
        raise FerkitError(f"the validation fraction must be between 0 and 1, got {val_fraction}")
    indices = np.arange(len(dataset))
    counts = np.bincount(dataset.labels)
    single = [dataset.classes[i] for i in np.flatnonzero(counts == 1)]
    if single:  # its one face would go to training or to validation, never to both
        raise FerkitError(f"{', '.join(single)} {'has' if len(single) == 1 else 'have'} one face only, too few to "
                          "split off validation faces; add faces, or give validation faces with --val")
    stratify = dataset.labels
    present = int((counts > 0).sum())
    if math.ceil(val_fraction * len(dataset)) < present:
        least = math.ceil(100 * present / len(dataset)) / 100
        raise FerkitError(
            f"a validation split of {val_fraction:g} of {len(dataset)} faces cannot hold each of their {present} classes; "
            f"give validation faces with --val, or --val-split {least:g} or more"
        )
    try:
        train_idx, val_idx = train_test_split(
            indices, test_size=val_fraction, random_state=seed, stratify=stratify
        )
    except ValueError as err:
        raise FerkitError(f"cannot split {len(dataset)} images with fraction {val_fraction}: {err}") from None
    return dataset.subset(np.sort(train_idx)), dataset.subset(np.sort(val_idx))
