"""One entry point for any dataset source: a class-folder tree, a FER2013 CSV or a packed dataset."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from ferkit.data.dataset import FaceDataset
from ferkit.data.fer2013_csv import load_fer2013_csv
from ferkit.data.folder import load_folder
from ferkit.data.packed import is_packed, is_unfinished_pack, load_packed
from ferkit.errors import FerkitError
from ferkit.labels import aliases_taken, canonical_labels, repeated

log = logging.getLogger("ferkit")


def load_dataset(
    source: str | Path,
    *,
    classes: Sequence[str] | None = None,
    image_size: tuple[int, int] = (48, 48),
    usage: str | Sequence[str] | None = None,
    cache: bool = True,
    progress: bool = False,
) -> FaceDataset:
    """Load a folder tree (`root/<class>/*`), a FER2013 CSV or a packed dataset (ferkit.data.packed, read
    memory-mapped); `usage` selects CSV rows only."""
    if classes is not None:
        if renamed := aliases_taken(classes):  # an alias alone stands for its class: calm for neutral
            log.info("classes taken by their usual names: %s (an alias named beside its class stays a class of its "
                     "own)", ", ".join(f"{name} as {label}" for name, label in renamed))
        classes = canonical_labels(classes)  # as folder names match: Happy, happiness are happy
        twice = repeated(classes)
        if twice:
            raise FerkitError(f"the classes name {', '.join(twice)} more than once")
    path = Path(source)
    if not path.exists():
        raise FerkitError(f"no such dataset: {path}")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise FerkitError(f"{path} is neither a dataset folder nor a FER2013 .csv file")
        kwargs = {"classes": classes} if classes else {}
        return load_fer2013_csv(path, usage=usage, image_size=image_size, cache=cache, progress=progress, **kwargs)
    if is_packed(path):
        return load_packed(path, classes=classes, image_size=image_size)
    if is_unfinished_pack(path):
        raise FerkitError(f"{path} holds a packed dataset stopped before its end: pack it again (ferkit pack ... --overwrite)")
    return load_folder(path, classes=classes, image_size=image_size, cache=cache, progress=progress)
