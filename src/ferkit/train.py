"""train(config) -> run folder. Reads top to bottom: folder, data, model, fit, record.

What the run folder holds is described in ferkit.runs; Keras is imported only when training starts.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
from pathlib import Path

from ferkit._keras import import_keras
from ferkit.config import TrainConfig
from ferkit.data import FaceDataset, load_dataset, split_dataset
from ferkit.errors import FerkitError
from ferkit.images import faces_to_batch
from ferkit.models import get_model_spec
from ferkit.runs import RUN_FILES, RunState, trim_history, write_atomic
from ferkit.runtime import ModelMetadata

log = logging.getLogger("ferkit")


class TrainingInterrupted(FerkitError):
    exit_code = 130


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, verbose: int = 2) -> Path:
    """Train `config.model` on `config.data`; returns the run folder. `verbose`: 0 silent, 1 bar, 2 line."""
    run = Path(config.out)
    if resume and not (run / "config.json").exists():
        raise FerkitError(f"cannot resume: {run} is not a ferkit run folder (no config.json)")
    spec = get_model_spec(config.model)
    train_set, val_set = load_train_val(config, spec.input_size, progress=verbose > 0)
    config.classes = list(train_set.classes)
    _prepare_run_folder(run, resume=resume, overwrite=overwrite)
    _save_run_config(run, config, train_set, val_set)
    keras = import_keras()
    from ferkit.callbacks import RunRecorder

    state = RunState.load(run) if resume else RunState()
    if state.epochs_done >= config.epochs:
        log.warning("%s already has %d epochs; pass a larger --epochs to train on", run, state.epochs_done)
        return run
    keras.utils.set_random_seed(config.seed + state.epochs_done)
    if resume and (run / "checkpoint.keras").exists():
        training_model = keras.saving.load_model(run / "checkpoint.keras")
    else:
        state = RunState()
        training_model = _build_training_model(keras, config, spec, len(train_set.classes))
    base_model = training_model.layers[-1] if config.augment else training_model
    trim_history(run / "history.csv", state.epochs_done)

    metadata = ModelMetadata(
        model=config.model, classes=list(train_set.classes), input_size=list(spec.input_size), channels=spec.channels
    )
    recorder = RunRecorder(run, state, base_model, metadata)
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


def _prepare_run_folder(run: Path, *, resume: bool, overwrite: bool) -> None:
    if resume:
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
    write_atomic(run / "datasets.json", json.dumps(sizes, indent=2) + "\n")


def _build_training_model(keras, config: TrainConfig, spec, num_classes: int):
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
