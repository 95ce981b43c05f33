"""Datasets laid out as `root/<class>/*.jpg` (any common image format, folders named loosely)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ferkit.data.cache import cache_key, load_cached, save_cached
from ferkit.data.dataset import FaceDataset
from ferkit.errors import FerkitError
from ferkit.faces import CROPPED_FACE_SIDE, get_detector, whole_image_face
from ferkit import images as image_files
from ferkit.images import IMAGE_SUFFIXES, PASSING_REASONS, ImageError, image_decoders, load_image, to_model_input, to_rgb
from ferkit.labels import EMOTIONS, canonical_labels, class_of
from ferkit.progress import track
from ferkit.sources import files_under

log = logging.getLogger("ferkit")


def load_folder(
    root: str | Path,
    *,
    classes: Sequence[str] | None = None,
    image_size: tuple[int, int] = (48, 48),
    cache: bool = True,
    progress: bool = False,
) -> FaceDataset:
    """Load every image under `root/<class>/`, grayscale and resized to `image_size` (height, width).

    Class folders match case-insensitively and through aliases ("Happiness" -> happy). With
    `classes=None` the seven EMOTIONS are used, in that order, and a folder matching none of them is an
    error; pass an explicit list (e.g. EMOTIONS + ("contempt",)) to keep other classes. Files that cannot
    be decoded are skipped and reported in one warning; they are listed in `dataset.skipped`.
    """
    root = Path(root)
    if not root.is_dir():
        raise FerkitError(f"no such dataset folder: {root}" if not root.exists() else f"{root} is not a folder")
    chosen = classes is not None
    classes = tuple(canonical_labels(classes or EMOTIONS))
    files, labels, broken_links = _list_class_files(root, classes, chosen=chosen)
    if not files:
        broken = f" (only {len(broken_links)} link(s) to files that do not exist)" if broken_links else ""
        raise FerkitError(f"{root} holds no image files in its class folders{broken}")

    stats = [_stat(f, root) for f in files]
    # the decoders and the pixel limit too: installing the heic extra, a newer Pillow or a higher limit
    # changes which files can be read
    key = cache_key(kind="folder", root=str(root.resolve()), size=image_size, classes=classes, files=stats,
                    decoders=image_decoders(), max_pixels=image_files.MAX_IMAGE_PIXELS)
    dataset = cache_key(kind="folder", root=str(root.resolve()), size=image_size, classes=classes)  # whatever its files
    cached = load_cached(key) if cache else None
    if cached is None:
        cached = _decode_files(files, labels, root, image_size, progress)
        if cache:
            save_cached(key, cached, dataset=dataset)
    elif np.isin(cached["skipped_reasons"], PASSING_REASONS).any():
        cached = _read_passing_skips_again(cached, files, labels, root, image_size)
        if cache:
            save_cached(key, cached, dataset=dataset)

    skipped = [(str(root / p), r) for p, r in zip(cached["skipped_paths"], cached["skipped_reasons"])]
    skipped = sorted(skipped + [(str(link), "a link to a file that does not exist") for link in broken_links])
    if skipped:
        shown = ", ".join(f"{p} ({r})" for p, r in skipped[:10])
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        log.warning("skipped %d unreadable file(s) in %s: %s%s", len(skipped), root, shown, more)
    if len(cached["labels"]) == 0:
        raise FerkitError(f"none of the {len(files)} files under {root} is a readable image")
    _warn_if_photos(root, [root / p for p in cached["paths"]])
    return FaceDataset(
        images=cached["images"],
        labels=cached["labels"].astype(np.int64),
        classes=classes,
        source=str(root),
        paths=[str(root / p) for p in cached["paths"]],
        skipped=skipped,
    )


class UnknownClassFolders(FerkitError):
    """Class folders whose names are none of the classes asked for (`folders`)."""

    def __init__(self, message: str, folders: list[str], *, datasets: bool = False):
        super().__init__(message)
        self.folders = folders
        self.datasets = datasets  # the folders hold class folders of their own: train/ and val/, say


def _stat(file: Path, root: Path) -> tuple:
    """What the cache knows a file by: its path, size and times. The change time too: files of one size (BMP,
    PGM) swapped or rewritten with their times set back (an archive's extraction, rsync -t) keep the rest."""
    stat = file.stat()
    return str(file.relative_to(root)), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _list_class_files(root: Path, classes: tuple[str, ...], *, chosen: bool) -> tuple[list[Path], list[int], list[Path]]:
    """The files of each class folder, their labels, and the links in them to files that do not exist.
    `chosen`: the classes were given (a model's own, say), so a folder of another class cannot be kept by
    asking for it."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise FerkitError(f"{root} has no class folders (expected {root}/<class>/<image>)")
    loose = sorted(p.name for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if loose:
        log.warning("%d image(s) at the top of %s, in no class folder, are left out (e.g. %s)", len(loose), root, loose[0])
    unknown = [p.name for p in folders if class_of(p.name, classes) not in classes]
    if unknown and all(_holds_class_folders(root / name, classes) for name in unknown):
        raise UnknownClassFolders(f"the folders in {root} ({', '.join(unknown)}) hold class folders of their own: "
                                  f"give one of them as the dataset, e.g. {root / unknown[0]}", unknown,
                                  datasets=True)
    if unknown:
        keep = "" if chosen else "; --classes keeps others, in train and pack"
        raise UnknownClassFolders(f"folder(s) in {root} match no class: {', '.join(unknown)} (classes: {', '.join(classes)}{keep})",
                                  unknown)
    _warn_of_merged_folders(root, folders, classes)
    files: list[Path] = []
    labels: list[int] = []
    broken_links: list[Path] = []
    unreadable: list[str] = []
    for folder in folders:
        label = classes.index(class_of(folder.name, classes))
        for path in files_under(folder, unreadable=unreadable):
            if path.is_file():
                files.append(path)
                labels.append(label)
            elif path.is_symlink() and not path.exists():
                broken_links.append(path)
    if unreadable:
        log.warning("cannot read %d folder(s) in %s, their images left out: %s", len(unreadable), root,
                    ", ".join(unreadable[:3]) + (f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""))
    return files, labels, broken_links


def _holds_class_folders(folder: Path, classes: tuple[str, ...]) -> bool:
    """Whether `folder` is a dataset of its own (train/ beside val/), holding a folder of one of `classes`."""
    try:
        return any(p.is_dir() and class_of(p.name, classes) in classes for p in folder.iterdir())
    except OSError:
        return False


def _warn_of_merged_folders(root: Path, folders: list[Path], classes: tuple[str, ...]) -> None:
    """Folders named for one class ("happy" and "Happiness") are read as one: say so, as a typo may be behind it."""
    by_class: dict[str, list[str]] = {}
    for folder in folders:
        by_class.setdefault(class_of(folder.name, classes), []).append(folder.name)
    for label, names in by_class.items():
        if len(names) > 1:
            log.warning("folders %s in %s all hold the class %s: their faces are read as one class",
                        ", ".join(names), root, label)


PHOTOS_CHECKED = 8  # images, spread over the dataset, that a detector looks at for photos among face crops
FACE_SHARE_OF_A_CROP = 0.25  # a face crop's face fills more of it than this; a photo's face, less


def _warn_if_photos(root: Path, paths: list[Path]) -> None:
    """Say so when a dataset's images look like photos, not face crops: each image is taken whole as one
    face, so a group photo or a face small in its picture trains and scores as nothing like a face."""
    from ferkit.predict import detected_faces

    sample = paths[:: max(1, len(paths) // PHOTOS_CHECKED)][:PHOTOS_CHECKED]
    find, photos = None, []
    for path in sample:
        try:
            picture = to_rgb(load_image(path))
        except ImageError:  # changed since it was read into the cache: its next load says so
            continue
        if max(picture.size) <= CROPPED_FACE_SIDE:
            continue
        try:
            find = find or get_detector("auto")
        except FerkitError:
            return  # no detector installed: nothing to look with
        faces = detected_faces(find, picture)
        if len(faces) > 1 or (faces and faces[0].box[2] * faces[0].box[3] < FACE_SHARE_OF_A_CROP * picture.width * picture.height):
            photos.append((path, len(faces)))
    if photos and len(photos) * 2 >= len(sample):
        path, count = photos[0]
        what = f"{count} faces" if count > 1 else "a face small in the picture"
        log.warning("%d of %d images checked in %s look like photos, not face crops (%s: %s); each image is taken "
                    "whole as one face: `ferkit crop %s --out FACES` crops the faces into the same class folders",
                    len(photos), len(sample), root, path.relative_to(root), what, root)


def _read_passing_skips_again(cached: dict[str, np.ndarray], files, labels, root, image_size) -> dict[str, np.ndarray]:
    """The cached faces, with the files skipped for a reason of the moment (their permissions, say) tried
    again: those now readable join the faces, in their places among them."""
    again = set(cached["skipped_paths"][np.isin(cached["skipped_reasons"], PASSING_REASONS)])
    retried = [(path, label) for path, label in zip(files, labels) if str(path.relative_to(root)) in again]
    fresh = _decode_files([p for p, _ in retried], [label for _, label in retried], root, image_size, progress=False)
    kept = ~np.isin(cached["skipped_paths"], list(again))
    paths = np.concatenate([cached["paths"], fresh["paths"]])
    place = {str(path.relative_to(root)): i for i, path in enumerate(files)}
    order = np.argsort([place[p] for p in paths], kind="stable")
    return {
        "images": np.concatenate([cached["images"], fresh["images"]])[order],
        "labels": np.concatenate([cached["labels"], fresh["labels"]])[order],
        "paths": paths[order],
        "skipped_paths": np.concatenate([cached["skipped_paths"][kept], fresh["skipped_paths"]]),
        "skipped_reasons": np.concatenate([cached["skipped_reasons"][kept], fresh["skipped_reasons"]]),
    }


def _decode_files(files, labels, root, image_size, progress) -> dict[str, np.ndarray]:
    images, kept_labels, kept_paths, skipped_paths, skipped_reasons = [], [], [], [], []
    for path, label in track(list(zip(files, labels)), description=f"reading {root}", enabled=progress):
        try:
            images.append(to_model_input(whole_image_face(to_rgb(load_image(path))), image_size))  # as predict does
        except ImageError as err:
            skipped_paths.append(str(path.relative_to(root)))
            skipped_reasons.append(err.reason)
            continue
        kept_labels.append(label)
        kept_paths.append(str(path.relative_to(root)))
    return {
        "images": np.stack(images) if images else np.zeros((0, *image_size), np.uint8),
        "labels": np.asarray(kept_labels, dtype=np.int64),
        "paths": np.asarray(kept_paths, dtype=str),
        "skipped_paths": np.asarray(skipped_paths, dtype=str),
        "skipped_reasons": np.asarray(skipped_reasons, dtype=str),
    }
