"""train(config) -> run folder. Reads top to bottom: folder, data, model, fit, record.

A run folder holds everything about one run, and stays usable if the run is stopped at any point:

    config.json      the TrainConfig (plus the classes and dataset sizes it resolved to)
    history.csv      one row per finished epoch: loss, accuracy, val_loss, val_accuracy, lr, seconds
    curves.png       accuracy and loss, train vs val, redrawn after every epoch
    best.keras       the model of the best val_accuracy so far (ferkit metadata inside)
    last.keras       the model after the last finished epoch
    checkpoint.keras the training model with its optimizer state, for --resume
    state.json       epochs done, best epoch and score, status (running / interrupted / finished)
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from ferkit._keras import import_keras
from ferkit.config import TrainConfig
from ferkit.data import FaceDataset, load_dataset, split_dataset
from ferkit.errors import FerkitError
from ferkit.images import faces_to_batch
from ferkit.models import get_model_spec
from ferkit.plots import plot_history
from ferkit.runtime import ModelMetadata, save_keras_model

keras = import_keras()
log = logging.getLogger("ferkit")

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds")
RUN_FILES = ("config.json", "datasets.json", "history.csv", "curves.png", "best.keras", "last.keras", "checkpoint.keras", "state.json")


class TrainingInterrupted(FerkitError):
    exit_code = 130


@dataclass
class RunState:
    epochs_done: int = 0
    best_epoch: int = 0
    best_val_accuracy: float = -1.0
    status: str = "running"

    @classmethod
    def load(cls, run: Path) -> "RunState":
        path = run / "state.json"
        return cls(**json.loads(path.read_text())) if path.exists() else cls()

    def save(self, run: Path) -> None:
        _write_atomic(run / "state.json", json.dumps(self.__dict__, indent=2) + "\n")


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, verbose: int = 2) -> Path:
    """Train `config.model` on `config.data`; returns the run folder. `verbose`: 0 silent, 1 bar, 2 line."""
    run = Path(config.out)
    _prepare_run_folder(run, resume=resume, overwrite=overwrite)
    spec = get_model_spec(config.model)
    train_set, val_set = load_train_val(config, spec.input_size, progress=verbose > 0)
    config.classes = list(train_set.classes)
    _save_run_config(run, config, train_set, val_set)

    state = RunState.load(run) if resume else RunState()
    if state.epochs_done >= config.epochs:
        log.warning("%s already has %d epochs; pass a larger --epochs to train on", run, state.epochs_done)
        return run
    keras.utils.set_random_seed(config.seed + state.epochs_done)
    if resume and (run / "checkpoint.keras").exists():
        training_model = keras.saving.load_model(run / "checkpoint.keras")
    else:
        state = RunState()
        training_model = _build_training_model(config, spec, len(train_set.classes))
    base_model = training_model.layers[-1] if config.augment else training_model
    _trim_history(run / "history.csv", state.epochs_done)

    metadata = ModelMetadata(
        model=config.model, classes=list(train_set.classes), input_size=list(spec.input_size), channels=spec.channels
    )
    recorder = _RunRecorder(run, state, base_model, metadata)
    state.status = "running"
    state.save(run)
    try:
        with _sigterm_as_interrupt():
            training_model.fit(
                faces_to_batch(train_set.images, spec.channels),
                train_set.labels,
                validation_data=(faces_to_batch(val_set.images, spec.channels), val_set.labels),
                epochs=config.epochs,
                initial_epoch=state.epochs_done,
                batch_size=config.batch_size,
                shuffle=True,
                callbacks=[recorder],
                verbose=verbose,
            )
    except KeyboardInterrupt:
        state.status = "interrupted"
        state.save(run)
        raise TrainingInterrupted(
            f"interrupted after {state.epochs_done} of {config.epochs} epochs; {run} is usable, "
            f"continue with: ferkit train --resume {run}"
        ) from None
    state.status = "finished"
    state.save(run)
    return run


def load_train_val(config: TrainConfig, input_size, *, progress: bool = False) -> tuple[FaceDataset, FaceDataset]:
    """The training set and the validation set (its own source, or a stratified split of the data)."""
    if not config.data:
        raise FerkitError("no training data given (--data DIR_OR_CSV)")
    common = {"classes": config.classes, "image_size": tuple(input_size), "progress": progress}
    data = load_dataset(config.data, usage="Training", **common)
    if config.val:
        return data, load_dataset(config.val, usage="PublicTest", **{**common, "classes": data.classes})
    return split_dataset(data, val_fraction=config.val_split, seed=config.seed)


def read_history(path: str | Path) -> dict[str, list[float]]:
    """history.csv as columns of floats (epoch as int)."""
    columns: dict[str, list[float]] = {name: [] for name in HISTORY_COLUMNS}
    path = Path(path)
    if not path.exists():
        return columns
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            for name in HISTORY_COLUMNS:
                value = row.get(name, "")
                columns[name].append(int(value) if name == "epoch" else float(value) if value else float("nan"))
    return columns


def _prepare_run_folder(run: Path, *, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (run / "config.json").exists():
            raise FerkitError(f"cannot resume: {run} is not a ferkit run folder (no config.json)")
        return
    if run.exists() and any(run.iterdir()):
        if not overwrite:
            raise FerkitError(f"{run} already exists; use --resume to continue it, --overwrite to replace it, or another --out")
        if not (run / "config.json").exists():
            raise FerkitError(f"{run} is not a ferkit run folder; refusing to overwrite it, choose another --out")
        for name in RUN_FILES:
            (run / name).unlink(missing_ok=True)
        for folder in run.glob("eval-*"):
            shutil.rmtree(folder)
    run.mkdir(parents=True, exist_ok=True)


def _save_run_config(run: Path, config: TrainConfig, train_set: FaceDataset, val_set: FaceDataset) -> None:
    config.save(run / "config.json")
    sizes = {"train": train_set.class_counts(), "val": val_set.class_counts()}
    _write_atomic(run / "datasets.json", json.dumps(sizes, indent=2) + "\n")


def _build_training_model(config: TrainConfig, spec, num_classes: int):
    """The registered model, behind the augmentation layers when asked (they are off at inference)."""
    base = spec.builder(num_classes=num_classes, input_shape=(*spec.input_size, spec.channels))
    augmenters = []
    if "flip" in config.augment:
        augmenters.append(keras.layers.RandomFlip("horizontal", seed=config.seed))
    if "zoom" in config.augment:
        augmenters.append(keras.layers.RandomZoom(config.zoom, seed=config.seed + 1))
    model = keras.Sequential([keras.Input(base.input_shape[1:]), *augmenters, base], name="train") if augmenters else base
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


class _RunRecorder(keras.callbacks.Callback):
    """Keeps the run folder current after every epoch: checkpoint, models, history, state, curves."""

    def __init__(self, run: Path, state: RunState, base_model, metadata: ModelMetadata):
        super().__init__()
        self.run, self.state, self.base_model, self.metadata = run, state, base_model, metadata
        self._started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        done = epoch + 1
        seconds = time.perf_counter() - self._started
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.model.save(self.run / ".checkpoint.tmp.keras")
        os.replace(self.run / ".checkpoint.tmp.keras", self.run / "checkpoint.keras")
        val_accuracy = float(logs.get("val_accuracy", float("nan")))
        self.metadata.extra = {"run": str(self.run), "epoch": done, "val_accuracy": val_accuracy}
        save_keras_model(self.base_model, self.run / "last.keras", self.metadata)
        if val_accuracy > self.state.best_val_accuracy:
            self.state.best_val_accuracy, self.state.best_epoch = val_accuracy, done
            save_keras_model(self.base_model, self.run / "best.keras", self.metadata)
        row = {"epoch": done, **{k: logs.get(k, "") for k in HISTORY_COLUMNS[1:5]}, "learning_rate": lr, "seconds": round(seconds, 2)}
        _append_history(self.run / "history.csv", row)
        self.state.epochs_done = done
        self.state.save(self.run)
        plot_history(read_history(self.run / "history.csv"), self.run / "curves.png", title=f"{self.metadata.model} — {self.run.name}")


def _append_history(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def _trim_history(path: Path, epochs_done: int) -> None:
    """Drop rows past the checkpoint (an epoch recorded just before a kill is trained again)."""
    if not path.exists():
        return
    with open(path, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if int(r["epoch"]) <= epochs_done]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class _sigterm_as_interrupt:
    """Treat `kill` (SIGTERM) like Ctrl-C while training, so the run is marked interrupted cleanly."""

    def __enter__(self):
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread
            pass

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt
