"""Saved teacher probabilities for distillation: a strong but slow model (an ensemble, ten-crop
averaging) is run once over the training faces, and any number of students train on the file.

    ferkit teacher RUN_A RUN_B --data fer2013/train --tta tencrop --out teacher.npz
    ferkit train --model ferkit-net-l --data fer2013/train --teacher teacher.npz --distill 0.7 ...

A slow teacher can be made one model at a time: each member's file, then their average.

    ferkit teacher RUN_A --data fer2013/train --tta tencrop --out a.npz
    ferkit teacher a.npz RUN_B --data fer2013/train --tta tencrop --out ab.npz

The file holds one probability row per training face, keyed by the face's class folder and file name
(or by its row, for a CSV), with the classes, the models and the test-time augmentation that made it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from ferkit.data import FaceDataset
from ferkit.errors import FerkitError
from ferkit.results import check_output_file
from ferkit.runtime import load_classifier, resolve_model_path

TEACHER_SUFFIX = ".npz"
log = logging.getLogger("ferkit")


def save_teacher_probabilities(models, dataset: FaceDataset | str | Path, out: str | Path, *, tta: str | None = None,
                               batch_size: int = 256, overwrite: bool = False, progress: bool = False) -> Path:
    """Average the probabilities of `models` (run folders or model files; each with `tta`, default its
    own) over every face of `dataset` and save them at `out` (.npz), written atomically; an existing
    file is replaced only with `overwrite`. `dataset` may be a path (a CSV gives its Training rows).

    A member that is itself a saved file (.npz) joins the average as one member without running its
    models again, so a slow teacher can be made one model at a time, each step kept on disk."""
    out = check_teacher_output(out, overwrite=overwrite)
    members = [str(model) for model in models]
    for member in members:
        check_teacher(member)
    classifiers = {member: load_classifier(member).with_tta(tta) for member in members if not _is_saved(member)}
    if tta is not None and not classifiers:
        raise FerkitError("every member is saved probabilities, scored with the views they were made with: "
                          "a test-time augmentation applies to models only")
    _check_same_classes(classifiers)
    sizes = {tuple(c.input_size) for c in classifiers.values()}
    if len(sizes) > 1:
        shown = ", ".join(f"{m} {c.input_size[0]}x{c.input_size[1]}" for m, c in classifiers.items())
        raise FerkitError(f"the models take faces of other sizes ({shown}): save each one's probabilities "
                          "(ferkit teacher MODEL --out MODEL.npz), then average the files (ferkit teacher A.npz B.npz --out ...)")
    if not isinstance(dataset, FaceDataset):
        dataset = _load_training_faces(dataset, classifiers, members, progress=progress)
    for model, classifier in classifiers.items():
        if tuple(classifier.input_size) != tuple(dataset.image_size):
            raise FerkitError(f"{model} takes {classifier.input_size[0]}x{classifier.input_size[1]} faces, the data "
                              f"is {dataset.image_size[0]}x{dataset.image_size[1]}: average models of one input size")
        if classifier.classes != dataset.classes:
            raise FerkitError(f"{model} knows the classes {', '.join(classifier.classes)}, the data {', '.join(dataset.classes)}")
    # the saved members read (and checked against the faces) first: before the hours a model may take
    saved = {member: load_teacher_probabilities(member, dataset) for member in members if _is_saved(member)}
    probabilities = np.mean([saved[member] if member in saved
                             else _predict_with_progress(classifiers[member], member, dataset, batch_size, progress)
                             for member in members], axis=0)
    about = {"models": members, "tta": [classifiers[m].tta if m in classifiers else "saved" for m in members],
             "source": dataset.source}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{TEACHER_SUFFIX}")
    np.savez_compressed(tmp, probabilities=probabilities.astype(np.float32), labels=dataset.labels,
                        classes=np.array(dataset.classes), keys=np.array(_face_keys(dataset)),
                        thumbnails=_thumbnails(dataset), about=np.array(json.dumps(about)))
    tmp.replace(out)
    return out


def _check_same_classes(classifiers: dict) -> None:
    """Models average only over the same classes, in the same order."""
    members = list(classifiers.items())
    for model, classifier in members[1:]:
        first, reference = members[0]
        if classifier.classes != reference.classes:
            raise FerkitError(f"{model} knows the classes {', '.join(classifier.classes)}, {first} "
                              f"{', '.join(reference.classes)}: average models of the same classes")


def _is_saved(member: str) -> bool:
    return Path(member).suffix == TEACHER_SUFFIX


def _load_training_faces(source: str | Path, classifiers: dict, members: list[str], *, progress: bool) -> FaceDataset:
    """The training faces at the first model's input size and classes (a saved file's classes if every
    member is one: its faces are matched by name and thumbnail, at any size)."""
    from ferkit.data import load_dataset
    from ferkit.data.fer2013_csv import TRAIN_USAGE

    first = next(iter(classifiers.values()), None)
    if first is not None:
        classes, image_size = first.classes, first.input_size
    else:
        classes, image_size = _saved_classes(members[0]), (48, 48)
    return load_dataset(source, classes=classes, image_size=tuple(image_size), usage=TRAIN_USAGE, progress=progress)


def _saved_classes(path: str) -> list[str]:
    try:
        with np.load(path) as stored:
            return [str(name) for name in stored["classes"]]
    except (OSError, ValueError, KeyError):
        raise FerkitError(f"{path} is not a file of teacher probabilities (made by `ferkit teacher`)") from None


def _predict_with_progress(classifier, name: str, dataset: FaceDataset, batch_size: int, progress: bool) -> np.ndarray:
    """The model's probabilities for every face, a chunk at a time under a progress bar; a log line when done."""
    from ferkit.progress import progress_bar

    started, chunk, rows = time.monotonic(), max(batch_size, 2048), []
    with progress_bar(len(dataset), f"teacher {Path(name).name} ({classifier.tta})", enabled=progress) as advance:
        for start in range(0, len(dataset), chunk):
            rows.append(classifier.predict_proba(dataset.images[start:start + chunk], batch_size=batch_size))
            advance(min(start + chunk, len(dataset)), len(dataset))
    log.info("teacher %s (%s): %d faces in %.0f s", name, classifier.tta, len(dataset), time.monotonic() - started)
    return np.concatenate(rows) if rows else np.zeros((0, len(classifier.classes)), np.float32)


def check_teacher_output(out: str | Path, *, overwrite: bool = False) -> Path:
    """`out` if teacher probabilities may be written there, else a FerkitError saying why."""
    return check_output_file(out, TEACHER_SUFFIX, "teacher probabilities", overwrite=overwrite)


def check_teacher(teacher: str) -> None:
    """A FerkitError, before any data is loaded, when `teacher` is neither saved probabilities nor a model."""
    if _is_saved(teacher):
        if not Path(teacher).is_file():
            raise FerkitError(f"no such file of teacher probabilities: {teacher}")
    else:
        resolve_model_path(teacher)


def teacher_file(teacher: str) -> Path:
    """The file a teacher's probabilities come from: the saved probabilities, or the model (a run folder's best)."""
    return Path(teacher) if _is_saved(teacher) else resolve_model_path(teacher)


def teacher_digest(teacher: str) -> str:
    """The SHA-256 of the teacher's file: a run resumed with another teacher (or with its teacher's run
    trained on since) would learn other targets in its later epochs."""
    path = teacher_file(teacher).resolve()
    stat = path.stat()
    return _sha256_of(path, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


@functools.lru_cache(maxsize=8)
def _sha256_of(path: Path, size: int, mtime_ns: int, ctime_ns: int) -> str:
    """Read once per version of the file: a resume checks the teacher, then records it."""
    from ferkit.runtime import sha256_of

    return sha256_of(path)


def load_teacher_probabilities(path: str | Path, dataset: FaceDataset) -> np.ndarray:
    """The saved probabilities for the faces of `dataset`, row for row; a FerkitError if the file does
    not cover every face, was made for other classes, or for other faces under the same names (their
    labels or 8x8 thumbnails differ)."""
    try:
        with np.load(path) as stored:
            probabilities, classes, keys = stored["probabilities"], tuple(stored["classes"]), list(stored["keys"])
            labels = stored["labels"]
            thumbnails = stored["thumbnails"] if "thumbnails" in stored else None  # files made before they were kept
    except (OSError, ValueError, KeyError):
        raise FerkitError(f"{path} is not a file of teacher probabilities (made by `ferkit teacher`)") from None
    if classes != tuple(dataset.classes):
        raise FerkitError(f"{path} holds probabilities for the classes {', '.join(classes)}, the data has {', '.join(dataset.classes)}")
    row = {key: i for i, key in enumerate(keys)}
    wanted = _face_keys(dataset)
    missing = [key for key in wanted if key not in row]
    if missing:
        named = lambda key: "by their rows (a CSV or a packed dataset)" if key.startswith("row ") else "by their files (a folder)"  # noqa: E731
        other_naming = f": it names faces {named(keys[0])}, this data {named(wanted[0])}" if keys and \
            keys[0].startswith("row ") != wanted[0].startswith("row ") else ""
        raise FerkitError(f"{path} has no probabilities for {len(missing)} of the {len(wanted)} training faces (e.g. "
                          f"{missing[0]}){other_naming}; make the teacher on the data it teaches on")
    rows = [row[key] for key in wanted]
    other = labels[rows] != dataset.labels
    if thumbnails is not None:
        difference = np.abs(thumbnails[rows].astype(np.float32) - _thumbnails(dataset)).reshape(len(rows), -1).mean(axis=1)
        other |= difference > THUMBNAIL_TOLERANCE
    if other.any():
        first = wanted[int(np.argmax(other))]
        raise FerkitError(f"{path} was saved for other faces: {int(other.sum())} of the {len(wanted)} training faces "
                          f"differ from the faces of the same names it was made from (e.g. {first}); make it again "
                          "from this data with `ferkit teacher`")
    return probabilities[rows]


# Mean grey-level difference of two faces' thumbnails beyond which they are other faces. On FER2013's
# PublicTest, the same faces decoded at 40x40 and 48x48 differ by 7.3 at most; two different faces by 27.6 at least.
THUMBNAIL_TOLERANCE = 15.0
THUMBNAIL_CHUNK = 4096


def _thumbnails(dataset: FaceDataset) -> np.ndarray:
    """Each face shrunk to 8x8 grey levels (box filter): a fingerprint that tells another photo under the
    same name, and holds whatever size the faces were decoded at."""
    from PIL import Image

    thumbnails = [np.zeros((0, 8, 8), np.uint8)]
    for start in range(0, len(dataset), THUMBNAIL_CHUNK):  # a packed dataset's faces are read a chunk at a time
        faces = np.asarray(dataset.images[start:start + THUMBNAIL_CHUNK])
        faces = faces.reshape(len(faces), *dataset.image_size, -1)[..., 0]
        thumbnails.append(np.stack([np.asarray(Image.fromarray(face).resize((8, 8), Image.Resampling.BOX)) for face in faces]))
    return np.concatenate(thumbnails)


def _face_keys(dataset: FaceDataset) -> list[str]:
    """Per face, its file's path inside the data folder ('happy/123.jpg', stable wherever the folder
    lies), or 'row N', its position in the source as loaded (a CSV's rows), for data without files.
    Both survive splitting off a validation set."""
    if dataset.paths is None:
        positions = dataset.positions if dataset.positions is not None else range(len(dataset))
        return [f"row {int(i)}" for i in positions]
    if not dataset.source:
        return ["/".join(Path(p).parts[-2:]) for p in dataset.paths]
    return [Path(os.path.relpath(p, dataset.source)).as_posix() for p in dataset.paths]


def teacher_probabilities(teacher: str, train_set: FaceDataset) -> np.ndarray:
    """The teacher model's class probabilities for every training face, averaged over the face and its
    mirror image: the soft targets of distillation. A .npz `teacher` holds them already.

    They are computed once, on the un-augmented faces, and serve for every augmented view of a face:
    the augmentations are mild enough (small shifts, zoom, rotation, erased patches) that the teacher's
    opinion of the face carries over, and training costs nothing more per step.
    """
    if _is_saved(teacher):
        log.info("distilling from the probabilities saved in %s", teacher)
        return load_teacher_probabilities(teacher, train_set)
    classifier = load_classifier(teacher).with_tta("flip")
    if classifier.classes != train_set.classes:
        raise FerkitError(
            f"the teacher {teacher} knows the classes {', '.join(classifier.classes)}, "
            f"the training data {', '.join(train_set.classes)}"
        )
    if classifier.input_size != train_set.image_size:
        raise FerkitError(f"the teacher {teacher} takes {classifier.input_size} faces, the model {train_set.image_size}")
    log.info("distilling from %s: its probabilities for %d training faces", teacher, len(train_set))
    return _predict_with_progress(classifier, teacher, train_set, batch_size=256, progress=True)
