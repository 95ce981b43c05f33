"""The run folder: what one training run leaves on disk, readable without Keras.

    config.json      the TrainConfig (with the classes it resolved to)
    datasets.json    images per class in the training and validation sets
    history.csv      one row per finished epoch: accuracy, learning rate, loss, seconds, val accuracy and loss
    curves.png       accuracy and loss, train vs val, redrawn after every epoch
    best.keras       the model of the best val_accuracy so far (ferkit metadata inside)
    last.keras       the model after the last finished epoch
    backup/          the training checkpoint for --resume: weights, optimizer state, epoch (ferkit.checkpoints)
    state.json       epochs done, best epoch and score, status (running / interrupted / diverged / finished)

A kill (SIGTERM) or Ctrl-C waits for the end of a batch and never lands halfway through an epoch's saves,
so the folder holds complete epochs only; ferkit's own files are replaced atomically.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ferkit.errors import FerkitError, first_line
from ferkit.results import hold_folder, release_folder

log = logging.getLogger("ferkit")

# Keras' CSVLogger writes the columns after "epoch" in sorted order; older runs had another order
HISTORY_COLUMNS = ("epoch", "accuracy", "learning_rate", "loss", "seconds", "val_accuracy", "val_loss")
RUN_FILES = ("config.json", "datasets.json", "history.csv", "curves.png", "best.keras", "last.keras", "state.json")
EPOCHS_FOLDER = "epochs"  # the models that --save-period keeps, epoch-NNN.keras
EXPORTED_FILES = ("best.onnx", "last.onnx")  # where `ferkit export RUN` writes by default: stale once the run is replaced
# what `ferkit evaluate` writes into a run's eval-* folders (ferkit.evaluation.EvaluationReport.save)
REPORT_FILES = ("metrics.json", "per_class.csv", "confusion_matrix.json", "confusion_matrix.png",
                "reliability_diagram.png", "report.html")
SAVED_EPOCH = re.compile(r"epoch-\d{3,}\.keras")  # a model --save-period kept, in EPOCHS_FOLDER



@dataclass
class RunState:
    epochs_done: int = 0
    best_epoch: int = 0
    best_val_accuracy: float = -1.0
    status: str = "running"
    # with --init: the best score on the validation faces before training, and of what (the figure to beat)
    start_val_accuracy: float | None = None
    start_model: str | None = None

    @classmethod
    def load(cls, run: str | Path) -> "RunState":
        path = Path(run) / "state.json"
        if not path.exists():
            return cls()
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError, UnicodeDecodeError) as err:  # not JSON, or not a state's fields
            raise FerkitError(f"{path} is damaged ({first_line(err)}); it records how far the run got: restore it "
                              "from a copy, or start the run again (--overwrite)") from None

    def save(self, run: str | Path) -> None:
        write_atomic(Path(run) / "state.json", json.dumps(self.__dict__, indent=2) + "\n")


def read_history(path: str | Path) -> dict[str, list[float]]:
    """history.csv as columns of floats (epoch as int); empty columns when there is no file yet."""
    columns: dict[str, list[float]] = {name: [] for name in HISTORY_COLUMNS}
    path = Path(path)
    if not path.exists():
        return columns
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # a spreadsheet's "CSV UTF-8" starts with a BOM
            for row in csv.DictReader(handle):
                for name in HISTORY_COLUMNS:
                    value = row.get(name) or ""
                    columns[name].append(int(value) if name == "epoch" else float(value) if value not in ("", "NA") else float("nan"))
    except (ValueError, UnicodeDecodeError) as err:
        raise _damaged_history(path, err) from None
    return columns


def _damaged_history(path: Path, err: Exception) -> FerkitError:
    return FerkitError(f"{path} is damaged ({first_line(err)}); it holds one row per epoch done: restore it from a copy, "
                       "or start the run again (--overwrite)")


def rewrite_history(path: Path, epochs_done: int) -> None:
    """Keep the rows of the epochs done (an epoch recorded just before a kill is trained again), in the
    columns of HISTORY_COLUMNS, which the history of older runs is converted to."""
    if not path.exists():
        return
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = [r for r in csv.DictReader(handle) if int(r["epoch"]) <= epochs_done]
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as err:
        raise _damaged_history(path, err if not isinstance(err, KeyError) else ValueError(f"no column {err}")) from None
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def check_run_folder(run: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse, before any work, to resume what is not a run or to replace anything silently."""
    if run.is_file():
        raise FerkitError(f"{run} is a file, not a run folder")
    a_file = next((parent for parent in run.parents if parent.exists() and not parent.is_dir()), None)
    if a_file is not None:
        raise FerkitError(f"{run} cannot be a run folder: {a_file} is a file")
    is_run = (run / "config.json").exists()
    if resume:
        if not is_run:
            raise FerkitError(f"cannot resume: {run} is not a ferkit run folder (no config.json)")
        return
    if run.exists() and any(run.iterdir()):
        if not is_run:
            raise FerkitError(f"{run} holds files and is not a ferkit run folder; choose another --out")
        if not overwrite:
            raise FerkitError(f"{run} already exists; use --resume to continue it, --overwrite to replace it, or another --out")


def hold_run_folder(run: Path) -> None:
    """Lock `run` (a folder) for this process's training until release_run_folder: a second `ferkit train` of
    it, which would rewrite its history and state under the first, is a one-line FerkitError instead."""
    hold_folder(run, f"{run} is being trained by another process; let it finish, or stop it (Ctrl-C, kill) and "
                     "then resume")


release_run_folder = release_folder


def clear_run_folder(run: Path) -> list[str]:
    """Remove what an earlier run wrote (only ferkit's own files), ready for a fresh run; the names of
    what is kept (the user's own files, such as an export under a name of their choosing)."""
    from ferkit.checkpoints import remove_checkpoints

    for name in (*RUN_FILES, *EXPORTED_FILES):
        (run / name).unlink(missing_ok=True)
    remove_checkpoints(run)
    for folder in [path for path in run.glob("eval-*") if path.is_dir()]:
        _remove_files_and_empty_folder(folder, lambda name: name in REPORT_FILES)
    if (run / EPOCHS_FOLDER).is_dir():
        _remove_files_and_empty_folder(run / EPOCHS_FOLDER, SAVED_EPOCH.fullmatch)
    run.mkdir(parents=True, exist_ok=True)
    return sorted(path.name for path in run.iterdir() if not path.name.startswith("."))


def _remove_files_and_empty_folder(folder: Path, ours) -> None:
    """The files of `folder` whose names `ours` says ferkit wrote removed, and the folder if that empties it."""
    for path in folder.iterdir():
        if path.is_file() and ours(path.name):
            path.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()


def save_run_config(run: Path, config, train_set, val_set, *, digests: bool = True, teacher: str | None = None) -> None:
    """config.json (the TrainConfig) and datasets.json (faces per class in each set, and which faces: a
    digest of each set, as a resumed run and `held_out_faces` check; none with `digests` False; and the
    SHA-256 of the `teacher`'s file, where the run distils)."""
    config.save(run / "config.json")
    sizes = {"train": train_set.class_counts(), "val": val_set.class_counts(), **({TEACHER_DIGEST: teacher} if teacher else {})}
    if digests:
        sizes.update({TRAIN_DIGEST: faces_digest(train_set.images), HELD_OUT_DIGEST: faces_digest(val_set.images)})
    write_atomic(run / "datasets.json", json.dumps(sizes, indent=2) + "\n")


RESUMES = "resumes.csv"  # a line per resume: config.json holds only the latest settings


def record_resume(run: Path, recorded, config, epochs_done: int, processes: int) -> list[str]:
    """Append to RUN/resumes.csv the resume about to train: after which epoch, when, in how many processes,
    and each setting that changed from the run's `recorded` config (as "name: old -> new"), which it returns."""
    import datetime
    from dataclasses import asdict

    old, new = asdict(recorded), asdict(config)
    changed = [f"{name}: {old.get(name)} -> {value}" for name, value in new.items() if old.get(name) != value]
    path = run / RESUMES
    new_file = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        if new_file:
            writer.writerow(["after_epoch", "started", "processes", "changed"])
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        writer.writerow([epochs_done, started, processes, "; ".join(changed)])
    return changed


TRAIN_DIGEST = "train_faces_sha256"  # in datasets.json: the faces a run trained on
TEACHER_DIGEST = "teacher_sha256"  # in datasets.json: the file a distilling run's teacher's probabilities came from
HELD_OUT_DIGEST = "val_faces_sha256"  # and those it validated on (split off its data, or given)


def faces_digest(images, chunk: int = 4096) -> str:
    """The SHA-256 of faces' pixels, in order (read a chunk at a time: a packed dataset stays on disk)."""
    import hashlib

    digest = hashlib.sha256()
    for start in range(0, len(images), chunk):
        digest.update(memoryview(np.ascontiguousarray(images[start : start + chunk])))
    return digest.hexdigest()


def held_out_faces(run_folder: Path, run, dataset):
    """The faces that the run `run` (its config, with no --val) held out of its data for validation, if
    `dataset` is that data: the same stratified split, checked against the class counts and faces the run
    recorded in its datasets.json (other data, or the data changed since: None)."""
    from ferkit.data import split_dataset

    recorded = _recorded_datasets(run_folder)
    whole = whole_counts(recorded.get("train", {}), recorded.get("val", {}))
    if not whole or {name: n for name, n in dataset.class_counts().items() if n or name in whole} != whole:
        return None  # not the run's data: told before splitting it
    try:
        trained, held = split_dataset(dataset, val_fraction=run.val_split, seed=run.seed)
    except (ValueError, FerkitError):
        return None
    if trained.class_counts() != recorded.get("train") or held.class_counts() != recorded.get("val"):
        return None
    if HELD_OUT_DIGEST in recorded and faces_digest(held.images) != recorded[HELD_OUT_DIGEST]:
        return None  # the same counts, other faces: files renamed or replaced since, which reorders the split
    return held


def trained_on(model: Path, source, usage: str | None = None):
    """The config of the run that trained `model` (a file in its run folder) if `source` (with `usage`,
    the rows of a FER2013 CSV; None: all) holds that run's training faces, else None. A packed dataset
    counts as the data it was packed from."""
    origin = training_faces_origin(model)
    if origin is None or not source or not Path(source).exists():
        return None
    return run_config_of(model, warn=False) if _holds(origin, source, usage) else None


def export_trained_on(model: Path, source, usage: str | None = None) -> bool:
    """Whether `source` holds the training faces of the run that a model outside its run folder (an export,
    moved) came from, as the model recorded them (see trained_on)."""
    origin = None if training_faces_origin(model) else _recorded_origin(model)
    return bool(origin and source and Path(source).exists() and _holds(origin, source, usage))


def _recorded_origin(model: Path) -> dict | None:
    """Where the run that trained `model` took its training faces, as the model file records it (exports)."""
    from ferkit.runtime import read_metadata

    try:
        return read_metadata(model).extra.get(TRAINED_ON)
    except (FerkitError, OSError):
        return None


def run_folder_of(model: Path) -> Path:
    """The run folder of a model file in it: its folder, or the one above a --save-period checkpoint's."""
    folder = Path(model).parent
    return folder.parent if folder.name == EPOCHS_FOLDER else folder


def run_config_of(model: Path, warn: bool = True):
    """The TrainConfig of the run that trained `model` (a file in its run folder); None where no run
    folder says, or its config.json cannot be read (then with a warning, unless not `warn`: the model file
    stands alone)."""
    from ferkit.config import TrainConfig

    path = run_folder_of(model) / "config.json"
    if not path.is_file():
        return None
    try:
        return TrainConfig.load(path)
    except FerkitError as err:
        if warn:
            log.warning("%s; whether data holds the faces it trained on is not checked", err)
        return None


def whole_counts(*counts: dict) -> dict:
    """Faces per class of datasets taken together (a run's training and validation faces: its data, whole)."""
    return {name: sum(count.get(name, 0) for count in counts) for name in dict.fromkeys(k for count in counts for k in count)}


def holds_its_training_faces(model: Path, dataset) -> bool:
    """Whether `dataset` is the training set of the run that trained `model` (a file in its run folder),
    wherever it was read from (config.json keeps data paths as given, relative to where the run trained):
    the faces per class it recorded in datasets.json and, where it recorded them, the same faces."""
    recorded = _recorded_datasets(run_folder_of(model))
    if not recorded.get("train") or dataset.class_counts() != recorded["train"]:
        return False
    return TRAIN_DIGEST not in recorded or faces_digest(dataset.images) == recorded[TRAIN_DIGEST]


def recorded_teacher(run: Path) -> str | None:
    """The SHA-256 of the teacher's file the run distils from, as its datasets.json says (runs of earlier
    versions, and runs without a teacher: None)."""
    return _recorded_datasets(run).get(TEACHER_DIGEST)


def recorded_training_faces(model: Path) -> dict | None:
    """Faces per class of the training set of the run that trained `model`, as its datasets.json says."""
    return _recorded_datasets(run_folder_of(model)).get("train")


def _recorded_datasets(run_folder: Path) -> dict:
    try:
        recorded = json.loads((Path(run_folder) / "datasets.json").read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def members_trained_on(metadata, source, usage: str | None = None) -> list[str]:
    """The networks among an ensemble's members (its `metadata`) whose runs trained on faces that `source`
    (with `usage`, as for trained_on) holds, as the ensemble recorded where each member's faces came from."""
    if not source or not Path(source).exists():
        return []
    return _members_holding(metadata.extra.get("members", []), source, usage)


def members_in_words(metadata, members: list[str]) -> str:
    """Who learned the faces, as a message names them: an averaged model's checkpoints, or an ensemble's members."""
    return "averaged checkpoints" if "averaged" in metadata.extra else f"ensemble's {', '.join(members)} member(s)"


def held_out_in_words(config) -> str:
    """How a run (its config, with no --val) split its validation faces off its data, as a dataset's source says it."""
    return f" (the faces its run held out: --val-split {config.val_split:g}, seed {config.seed})"


def _members_holding(members: list, source, usage: str | None) -> list[str]:
    """The members trained on `source`'s faces, themselves or through their own members (an ensemble of
    ensembles, or of averaged checkpoints)."""
    return [member["model"] for member in members
            if (member.get(TRAINED_ON) and _holds(member[TRAINED_ON], source, usage))
            or _members_holding(member.get("members", []), source, usage)]


TRAINED_ON = "trained_on"  # an ensemble member's entry: where its run's training faces came from


def training_faces_origin(model: Path) -> dict | None:
    """Where the run that trained `model` (a file in its run folder) took its training faces: {"data": the
    folder or CSV file, "rows": a CSV's usage, None for all}; None where no run folder says."""
    from ferkit.data.fer2013_csv import TRAIN_USAGE

    run = run_config_of(model, warn=False)
    if run is None or not run.data or not Path(run.data).exists():
        return None
    data, rows = _faces_origin(run.data, TRAIN_USAGE if run.data.lower().endswith(".csv") else None)
    return {"data": str(data), "rows": rows}


def _holds(origin: dict, source, usage: str | None) -> bool:
    """Whether `source` (with `usage`) holds the faces of a run's training `origin`."""
    given, given_rows = _faces_origin(source, usage)
    trained_rows = origin["rows"]
    same_rows = trained_rows is None or given_rows is None or trained_rows.lower() == given_rows.lower()
    return Path(origin["data"]) == given and same_rows


def _faces_origin(source, usage: str | None) -> tuple[Path, str | None]:
    """The folder or CSV file whose faces `source` holds, and which of a CSV's rows (None: all)."""
    from ferkit.data.fer2013_csv import has_usage_column
    from ferkit.data.packed import pack_origin

    if Path(source).is_file() and not has_usage_column(source):
        usage = None  # every row is read, whatever the usage asked
    return pack_origin(source) or (Path(source).resolve(), usage)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
