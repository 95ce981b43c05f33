"""The data stage of training: the training and validation faces, their targets (class indices, or
probability rows for label smoothing, distillation and mixup), class weights, and how they reach
`Model.fit`: whole arrays, or batches made one at a time (ferkit.data.batches: packed data, data-parallel
jobs, mixup)."""

from __future__ import annotations

import difflib
import functools
import hashlib
import logging
from pathlib import Path

import numpy as np

from ferkit.config import TrainConfig
from ferkit.data import FaceDataset, load_dataset, split_dataset
from ferkit.data.fer2013_csv import TRAIN_USAGE, VAL_USAGE, NoRowsOfUsage
from ferkit.data.folder import UnknownClassFolders
from ferkit.data.batches import face_batches, faces_per_epoch, shard_groups
from ferkit.distributed import Topology
from ferkit.errors import FerkitError
from ferkit.images import faces_to_batch
from ferkit.labels import EMOTIONS
from ferkit.models import get_model_spec
from ferkit.training_model import needs_one_hot

log = logging.getLogger("ferkit")


def load_train_val(config: TrainConfig, input_size, *, progress: bool = False) -> tuple[FaceDataset, FaceDataset]:
    """The training set and the validation set (its own source, or a stratified split of the data)."""
    if not config.data:
        raise FerkitError("no training data given (--data DIR_OR_CSV)")
    for option, source in (("--data", config.data), ("--val", config.val)):
        if source and not Path(source).exists():  # said before the minutes of reading the other
            raise FerkitError(f"{option} {source}: no such file or folder")
    common = {"classes": config.classes, "image_size": tuple(input_size), "progress": progress}
    try:
        data = load_dataset(config.data, usage=TRAIN_USAGE, **common)
    except UnknownClassFolders as err:
        raise _unknown_folders_error(config, err) from None
    except NoRowsOfUsage as err:
        raise _no_rows_error("--data", err) from None
    check_classes_present(data, known=_init_classes(config))
    if config.val:
        try:
            val = load_dataset(config.val, usage=VAL_USAGE, **{**common, "classes": data.classes})
        except NoRowsOfUsage as err:
            raise _no_rows_error("--val", err) from None
        _warn_of_classes_missing_from_val(data, val)
    else:
        data, val = split_dataset(data, val_fraction=config.val_split, seed=config.seed)
    return data, val


FEW_FACES = 10  # training faces of a class below which its scores say little


def warn_of_classes_with_few_faces(data: FaceDataset) -> None:
    few = {name: count for name, count in data.class_counts().items() if 0 < count < FEW_FACES}
    if few:
        listed = ", ".join(f"{name} ({count})" for name, count in few.items())
        log.warning("few training faces of %s: the model will learn %s poorly; a few dozen faces of each class "
                    "are a sensible least", listed, "it" if len(few) == 1 else "them")


FEW_VAL_FACES = 50  # validation faces below which one face moves the accuracy by 2 points or more
COPIED_VAL = 0.9  # the share of validation faces identical to training faces that makes --val a copy of --data


def faces_seen_in_training(data: FaceDataset, val: FaceDataset) -> np.ndarray:
    """Which of `val`'s faces are, pixel for pixel, one of `data`'s (FER2013 has 280 such among PublicTest's
    3,589): a model may have learnt them by heart. For each, the index of the first such training face;
    -1 for the others."""
    first: dict[bytes, int] = {}
    for index, digest in enumerate(_face_digests(data.images)):
        first.setdefault(digest, index)
    return np.array([first.get(digest, -1) for digest in _face_digests(val.images)], dtype=np.int64)


def _face_digests(images, chunk: int = 4096):
    for start in range(0, len(images), chunk):  # a chunk at a time: packed data is read from disk
        for face in np.ascontiguousarray(images[start:start + chunk]):
            yield hashlib.blake2b(face.tobytes(), digest_size=8).digest()


def faces_this_process_reads(data: FaceDataset, topology) -> FaceDataset:
    """The training faces this process reads: all of them, except in a data-parallel job on a packed
    dataset of enough shards, where each process reads its own shards only (another machine may hold the others)."""
    groups = shard_groups(data.images, topology.num_processes) if topology.coordinator else None
    return data if groups is None else data.subset(groups[topology.process_id])


def check_validation_faces_unseen(data: FaceDataset, val: FaceDataset, *, given: str | None) -> None:
    """Refuse validation faces given (--val `given`) that are copies of the training faces; warn of those
    that are identical to training faces, naming the first."""
    twins = faces_seen_in_training(data, val)
    seen = np.flatnonzero(twins >= 0)
    if given and len(val) and len(seen) >= COPIED_VAL * len(val):
        raise FerkitError(f"{len(seen)} of the {len(val)} faces of --val {given} are copies of training faces: "
                          "validation faces must be others")
    if len(seen):
        pairs = [f"{_name_of(val, i)} = {_name_of(data, twins[i])}" for i in seen[:3]]
        log.warning("%d of the %d validation faces (%.1f%%) are identical to training faces (%s%s): a model may know "
                    "them by heart, so they raise its val accuracy", len(seen), len(val), 100 * len(seen) / len(val),
                    ", ".join(pairs), ", ..." if len(seen) > 3 else "")


def _name_of(dataset: FaceDataset, index: int) -> str:
    return Path(dataset.paths[index]).name if dataset.paths else f"face {index + 1} of {dataset.source or 'the data'}"


def warn_of_a_small_validation_set(val: FaceDataset) -> None:
    if 0 < len(val) < FEW_VAL_FACES:
        log.warning("only %d validation faces: one face moves the val accuracy by %.1f points, so the best epoch is "
                    "picked by chance as much as by skill; give --val a folder of more faces, or --val-split a larger "
                    "share", len(val), 100 / len(val))


def _warn_of_classes_missing_from_val(data: FaceDataset, val: FaceDataset) -> None:
    trained = data.class_counts()
    missing = [name for name, count in val.class_counts().items() if not count and trained[name]]
    if missing:
        log.warning("the validation faces (--val) hold none of %s: the best epoch is picked without %s",
                    ", ".join(missing), "it" if len(missing) == 1 else "them")


def check_classes_present(data: FaceDataset, known=()) -> None:
    """A FerkitError when the training faces are of fewer than two classes, or of none of a class beyond
    the seven emotions that the model does not `known` already (a misspelt --classes name, say); a
    warning naming the other classes without any, which the model will then hardly ever predict."""
    counts = data.class_counts()
    present = [name for name, count in counts.items() if count]
    if len(present) < 2:
        raise FerkitError(f"{data.source} holds faces of {present[0] if present else 'no class'} only; "
                          "training needs faces of at least two classes")
    # a class of its own (not one of the seven) without faces, which the model does not know either: a typo, say
    unlearnable = [name for name, count in counts.items() if not count and name not in known and name not in EMOTIONS]
    if unlearnable:
        guesses = [f"{name}: did you mean {close[0]}?" for name in unlearnable
                   for close in [difflib.get_close_matches(name, present, n=1, cutoff=0.6)] if close]
        raise FerkitError(f"{data.source} holds no faces of {', '.join(unlearnable)}, so the model cannot learn "
                          f"{'it' if len(unlearnable) == 1 else 'them'}" + (f" ({'; '.join(guesses)})" if guesses else ""))
    missing = [name for name, count in counts.items() if not count]
    if missing:
        log.warning("no training faces of %s: the model will hardly ever predict %s", ", ".join(missing),
                    "it" if len(missing) == 1 else "them")


def _init_classes(config: TrainConfig) -> tuple[str, ...]:
    """The classes the --init model knows already (none without --init). A resumed run whose --init model
    is no longer there (it starts from its checkpoint) counts all its classes as known."""
    from ferkit.training_model import check_init_model

    if not config.init:
        return ()
    try:
        return tuple(check_init_model(config.init).classes)
    except FerkitError:
        return tuple(config.classes or ())


def _no_rows_error(option: str, err: NoRowsOfUsage) -> FerkitError:
    """`err`, with what training reads of a FER2013 CSV and how to train on other rows."""
    return FerkitError(f"{err.path} has no rows with usage {', '.join(err.usages)}: training reads the {TRAIN_USAGE} rows "
                       f"of a FER2013 CSV given as --data and the {VAL_USAGE} rows of one given as --val; to train on "
                       f"other rows, pack them first (ferkit pack {err.path} FOLDER --usage all) and give {option} FOLDER")


def _unknown_folders_error(config: TrainConfig, err: UnknownClassFolders) -> FerkitError:
    """`err`, with what to do about it: a folder that is a listed class misspelt, the folder of one class
    given as the data, or --classes that trains the folders' classes too (with --init)."""
    from ferkit.labels import canonical_label

    classes = list(config.classes or EMOTIONS)
    root = Path(config.data)
    if err.datasets:
        train = next((name for name in err.folders if name.lower().startswith("train")), err.folders[0])
        others = [name for name in err.folders if name != train]
        # a validation split by its usual names first; a test split only where nothing else is there
        val = next((name for name in others if name.lower() in ("val", "valid", "validation", "dev")),
                   next((name for name in others if not name.lower().startswith("test")), None))
        also = f" --val {root / val}" if val and not config.val else ""
        return FerkitError(f"the folders in {root} ({', '.join(err.folders)}) are datasets of their own, holding class "
                           f"folders: train with --data {root / train}{also}")
    if root.is_dir() and canonical_label(root.name) in classes:
        return FerkitError(f"{err}; {root} looks like the folder of one class ({canonical_label(root.name)}): "
                           f"give the folder that holds the class folders, {root.parent}")
    for folder in err.folders:
        close = difflib.get_close_matches(canonical_label(folder), classes, n=1, cutoff=0.6)
        if close:
            return FerkitError(f"{err}; the folder {folder} is close to the class {close[0]}: is one of them misspelt? "
                               "Rename the folder or mend --classes")
    if not config.init:
        return err
    known = _init_classes(config)
    more = ",".join([*classes, *err.folders])
    new = [f for f in err.folders if canonical_label(f) not in known]
    fresh = f" ({', '.join(new)} new to the model, from fresh weights)" if new else ""
    return FerkitError(f"{err}; --classes {more} trains {', '.join(err.folders)} too{fresh}")


def trains_on_cached_features(config: TrainConfig) -> bool:
    """A frozen pretrained backbone without augmentation or mixup: its features are computed once."""
    return get_model_spec(config.model).pretrained and config.cache_features and not (config.augment or config.mixup)


def train_size(config: TrainConfig, train_set: FaceDataset, topology: Topology) -> int:
    """The faces one epoch trains on: a data-parallel job drops each epoch's last incomplete batch (and,
    where each process reads its own shards, what the smallest group of shards lacks)."""
    if topology.coordinator:
        size = faces_per_epoch(train_set.images, config.batch_size, topology.num_processes)
        if topology.is_chief:
            _warn_of_uneven_shard_groups(train_set, topology.num_processes, size, config.batch_size)
        return size
    return len(train_set)


def _warn_of_uneven_shard_groups(train_set: FaceDataset, num_processes: int, size: int, batch_size: int) -> None:
    """Where each process reads its own shards: a warning when a process's shards lack classes the others have
    (`ferkit pack` keeps the data's order, class by class), or when uneven groups leave faces out of every epoch."""
    groups = shard_groups(train_set.images, num_processes)
    if groups is None:
        return
    every = set(np.unique(train_set.labels))
    for process, rows in enumerate(groups):
        lacking = sorted(every - set(np.unique(train_set.labels[rows])))
        if lacking:
            log.warning("process %d of the job reads no faces of %s in its shards (shards p, p + %d, ... of %d): pack "
                        "the faces again with `ferkit pack --shuffle`, which puts faces of every class in every shard", process,
                        ", ".join(train_set.classes[k] for k in lacking), num_processes, train_set.images.num_shards)
    if size < len(train_set) - batch_size:
        log.warning("each epoch trains on %d of the %d faces: the processes' groups of shards are uneven (the smallest "
                    "sets the pace); pack into a number of equal shards that %d divides", size, len(train_set), num_processes)


def validation_size(config: TrainConfig, val_set: FaceDataset, topology: Topology) -> int:
    """The faces one validation pass reads: a data-parallel job pads the last batch to full size (with
    faces of weight 0) so that every process gets its share."""
    if topology.coordinator:
        return -(-len(val_set) // config.batch_size) * config.batch_size
    return len(val_set)


def fit_data(config: TrainConfig, train_set: FaceDataset, val_set: FaceDataset, *, topology: Topology,
             first_epoch: int, teacher: np.ndarray | None = None) -> dict:
    """The data arguments of `Model.fit`: x, y and validation_data, with batch size and class weights."""
    channels = get_model_spec(config.model).channels
    to_input = functools.partial(faces_to_batch, channels=channels)
    num_classes = len(train_set.classes)
    train_y = targets(train_set.labels, num_classes, config, teacher)
    val_y = targets(val_set.labels, num_classes, config)
    class_weight = class_weights(config, train_set.labels, num_classes)
    face_weight = None if class_weight is None else np.array([class_weight[c] for c in train_set.labels], np.float32)
    if trains_on_cached_features(config):  # whole arrays: the backbone's features are computed once
        return dict(x=to_input(train_set.images), y=train_y, batch_size=config.batch_size, shuffle=True,
                    class_weight=class_weight, validation_data=(to_input(val_set.images), val_y))
    # Memory-mapped (packed) datasets, data-parallel jobs and mixup read one batch at a time
    # (ferkit.data.batches); faces in memory go to Keras whole, whose pipeline was measured faster on small networks.
    in_memory = isinstance(train_set.images, np.ndarray) and not isinstance(train_set.images, np.memmap)
    if in_memory and not topology.coordinator and not config.mixup:  # 8-bit faces: the network casts them
        return dict(x=faces_to_batch(train_set.images, channels, np.uint8), y=train_y, batch_size=config.batch_size,
                    shuffle=True, class_weight=class_weight, validation_data=(to_input(val_set.images), val_y))
    common = dict(batch_size=config.batch_size, to_input=to_input, seed=config.seed,
                  num_processes=topology.num_processes, process_id=topology.process_id)
    x = face_batches(train_set.images, train_y, sample_weight=face_weight, first_epoch=first_epoch,
                     drop_remainder=bool(topology.coordinator), own_shards=bool(topology.coordinator),
                     mixup=config.mixup, **common)
    return dict(x=x, validation_data=face_batches(val_set.images, val_y, shuffle=False, pad=bool(topology.coordinator), **common))


def class_weights(config: TrainConfig, labels: np.ndarray, num_classes: int) -> dict[int, float] | None:
    if config.class_weight == "none":
        return None
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    weights = len(labels) / (num_classes * np.maximum(counts, 1))
    if config.class_weight == "sqrt":
        weights = np.sqrt(weights)
    return {i: float(w) for i, w in enumerate(weights)}


def targets(labels: np.ndarray, num_classes: int, config: TrainConfig, teacher: np.ndarray | None = None) -> np.ndarray:
    """Class indices; one-hot rows when label smoothing or distillation needs them; with a teacher,
    each row mixes its probabilities (share `config.distill`) with the true label."""
    if not needs_one_hot(config):
        return labels
    one_hot = np.eye(num_classes, dtype=np.float32)[labels]
    if teacher is None:
        return one_hot
    return ((1.0 - config.distill) * one_hot + config.distill * teacher).astype(np.float32)
