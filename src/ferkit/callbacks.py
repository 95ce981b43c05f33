"""The Keras callbacks of a training run. Keras' own keep the run's training checkpoint
(BackupAndRestore) and its history (CSVLogger); ferkit's add what is its own: the network saved with
ferkit's metadata, the run's state and curves, validation of averaged weights, and stopping on signals.
run_callbacks puts them in order."""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import time
from pathlib import Path

from ferkit._keras import import_keras
from ferkit.checkpoints import COMPACT_CHECKPOINT, WHOLE_MODEL_CHECKPOINT, remove_checkpoints
from ferkit.plots import plot_history
from ferkit.runs import EPOCHS_FOLDER, HISTORY_COLUMNS, RunState, read_history
from ferkit.runtime import ModelMetadata, save_keras_model

keras = import_keras()


def run_callbacks(run: Path, state: RunState, network, metadata: ModelMetadata, *, backup: Path, stop: "StopOnSignal",
                  saved_model=None, averaged: "AveragedWeightsValidation | None" = None,
                  unpadded: "UnpaddedValidation | None" = None, save_period: int = 0, schedule: list = ()) -> list:
    """The callbacks that keep the run folder current, in the order their files are written after each
    epoch: history row, training checkpoint, then ferkit's models and state (which a resume trusts last).
    `schedule` (a PlateauSchedule) acts on the epoch's validation scores as they are final, and before the
    checkpoint keeps the optimizer's learning rate."""
    return [
        stop,
        *([unpadded] if unpadded is not None else []),
        EpochProgress(stop),
        *([averaged] if averaged is not None else []),
        *schedule,
        HistoryLogger(run / "history.csv", stop),
        Backup(backup, stop, run=run),
        RunRecord(run, state, network, metadata, saved_model=saved_model, averaged=averaged, stop=stop,
                  save_period=save_period),
    ]


class EpochProgress(keras.callbacks.ProgbarLogger):
    """Keras' progress display (which `fit` then uses instead of its own), without the closing line of an
    epoch that `stop` cut short: that epoch is dropped, and its line would read like a finished one."""

    def __init__(self, stop: "StopOnSignal"):
        super().__init__()
        self.stop = stop

    def on_epoch_end(self, epoch, logs=None):
        if not self.stop.cut_short:
            super().on_epoch_end(epoch, logs)
        elif self.verbose == 1:  # end the bar's line, left open
            print(flush=True)


class PlateauSchedule(keras.callbacks.ReduceLROnPlateau):
    """Halve the learning rate after `patience` epochs without a val accuracy gain (Keras'
    ReduceLROnPlateau), going on where a resumed run stopped: the epochs done, as `history` (the run's
    history.csv) records them, are replayed, so that its best score, its count of epochs without a gain
    and the learning rate are an unbroken run's."""

    def __init__(self, patience: int, history: dict[str, list[float]]):
        super().__init__("val_accuracy", mode="max", factor=0.5, patience=patience)
        self.history = history
        self._resumed_rate = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._resumed_rate = self._replay()

    def on_epoch_begin(self, epoch, logs=None):
        if self._resumed_rate is not None:  # after every callback's on_train_begin, the checkpoint's restore too
            self.model.optimizer.learning_rate = self._resumed_rate
            self._resumed_rate = None

    def _replay(self) -> float | None:
        """Best and wait as after the recorded epochs; the rate the next epoch trains at (None: no epoch yet)."""
        rates = self.history.get("learning_rate", [])
        if not rates or math.isnan(rates[-1]):
            return None
        reduced = False
        for value in self.history["val_accuracy"]:
            reduced = False
            if self.best is None or value - self.min_delta > self.best:
                self.best, self.wait = value, 0
            else:
                self.wait += 1
                if self.wait >= self.patience:
                    reduced, self.wait = True, 0
        return rates[-1] * self.factor if reduced else rates[-1]


class HistoryLogger(keras.callbacks.CSVLogger):
    """history.csv, written by Keras' CSVLogger with epochs counted from 1, each epoch's learning rate and
    seconds, and always the columns of ferkit.runs.HISTORY_COLUMNS. An epoch cut short by `stop` is left out."""

    def __init__(self, path: Path, stop: "StopOnSignal"):
        super().__init__(str(path), append=True)
        self.stop = stop
        self._started = 0.0

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.keys = list(HISTORY_COLUMNS[1:])

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if self.stop.cut_short:
            return
        logs = logs or {}
        # the rate the epoch trained at: as the plateau schedule saw it before it halved it (the optimizer's now)
        learning_rate = logs.get("learning_rate", float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))
        seconds = round(time.perf_counter() - self._started, 2)
        super().on_epoch_end(epoch + 1, {**logs, "learning_rate": learning_rate, "seconds": seconds})


class Backup(keras.callbacks.BackupAndRestore):
    """Keras' BackupAndRestore, which keeps the training model's weights, the optimizer's state and the
    epoch in `folder` after every epoch (the last two, in case one is damaged) and restores them when
    `fit` starts. An epoch cut short by `stop` is not backed up. Once a backup exists, the older forms
    of a checkpoint in `run` (ferkit.checkpoints) are superseded and removed."""

    def __init__(self, folder: Path, stop: "StopOnSignal", *, run: Path):
        super().__init__(str(folder), double_checkpoint=True, delete_checkpoint=False)
        self.stop, self.run = stop, run

    def on_epoch_end(self, epoch, logs=None):
        if self.stop.cut_short:
            return
        super().on_epoch_end(epoch, logs)
        remove_checkpoints(self.run, (WHOLE_MODEL_CHECKPOINT, COMPACT_CHECKPOINT))

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        # BackupAndRestore leaves its restored epoch on the model (Keras 3.15), where a later fit of the
        # same model (the fine-tuning phase) would start from it
        self.model._initial_epoch = None


class RunRecord(keras.callbacks.Callback):
    """ferkit's record of each epoch: the network saved with ferkit's metadata (last.keras; best.keras at
    a new best val_accuracy; a copy in epochs/ every `save_period` epochs), then state.json and the curves
    plot."""

    def __init__(self, run: Path, state: RunState, network, metadata: ModelMetadata, *, saved_model=None,
                 averaged=None, stop: "StopOnSignal | None" = None, save_period: int = 0):
        """`network` is trained; `saved_model` (default: the same) is what best/last.keras hold, e.g. a
        float32 twin of a mixed-precision network, which receives its weights before each save; with
        `averaged` (an AveragedWeightsValidation), the weights it validated are saved. An epoch that `stop`
        cut short is not recorded."""
        super().__init__()
        self.run, self.state, self.network, self.metadata = run, state, network, metadata
        self.saved_model = saved_model if saved_model is not None else network
        self.averaged, self.stop, self.save_period = averaged, stop, save_period

    def on_epoch_end(self, epoch, logs=None):
        if self.stop is not None and self.stop.cut_short:
            return
        done = epoch + 1
        val_accuracy = float((logs or {}).get("val_accuracy", float("nan")))
        self.metadata.extra = {"run": str(self.run), "epoch": done, "val_accuracy": val_accuracy}
        if self.averaged is not None and self.averaged.weights is not None:
            self.saved_model.set_weights(self.averaged.weights)
        elif self.saved_model is not self.network:
            self.saved_model.set_weights(self.network.get_weights())
        save_keras_model(self.saved_model, self.run / "last.keras", self.metadata)
        if self.save_period and done % self.save_period == 0:
            kept = self.run / EPOCHS_FOLDER / f"epoch-{done:03d}.keras"
            kept.parent.mkdir(exist_ok=True)
            shutil.copyfile(self.run / "last.keras", kept)
        if val_accuracy > self.state.best_val_accuracy:
            self.state.best_val_accuracy, self.state.best_epoch = val_accuracy, done
            save_keras_model(self.saved_model, self.run / "best.keras", self.metadata)
        self.state.epochs_done = done
        self.state.save(self.run)
        title = f"{self.metadata.model} — {self.run.name}"
        plot_history(read_history(self.run / "history.csv"), self.run / "curves.png", title=title)


class AveragedWeightsValidation(keras.callbacks.Callback):
    """Validates the optimizer's moving average of the weights (use_ema) instead of the weights.

    Keras keeps no average of batch-norm statistics, and those of the raw weights do not fit the averaged
    ones (at first a network of mostly initial weights: it predicted one class for every face). So before
    each validation the averaged weights go in, their batch-norm statistics are measured afresh on
    `faces` (un-augmented training faces), and after it the raw weights and statistics come back.
    `weights` then holds what was validated, for saving.
    """

    def __init__(self, base_model, faces, *, batch_size: int = 128):
        super().__init__()
        self.base_model, self.faces, self.batch_size = base_model, faces, batch_size
        self.weights = None
        self._raw = None

    def on_test_begin(self, logs=None):
        from ferkit.batch_norm import recalibrate_batch_norm

        variables = self.base_model.weights
        self._raw = [keras.ops.convert_to_numpy(v) for v in variables]
        averages = moving_averages(self.model.optimizer)
        for variable in variables:
            if id(variable) in averages:
                # a copy: on JAX, evaluate() donates the weights' buffers, which would delete the average's own
                variable.assign(keras.ops.convert_to_numpy(averages[id(variable)]))
        batches = (self.faces[i : i + self.batch_size] for i in range(0, len(self.faces), self.batch_size))
        recalibrate_batch_norm(self.base_model, batches)
        self.weights = [keras.ops.convert_to_numpy(v) for v in variables]

    def on_test_end(self, logs=None):
        for variable, value in zip(self.base_model.weights, self._raw):
            variable.assign(value)
        self._raw = None


def moving_averages(optimizer) -> dict:
    """{id(weight variable): its moving average} when the optimizer keeps one (use_ema), else {}.

    Keras keeps no public handle on the averages: `BaseOptimizer.build` (Keras 3) makes them in
    `_model_variables_moving_average`, in the order of `_trainable_variables`. A Keras that renames either
    fails here, loudly (tests/test_train.py checks both exist), rather than validating the raw weights."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    if not getattr(optimizer, "use_ema", False):
        return {}
    return {id(v): average for v, average in zip(optimizer._trainable_variables, optimizer._model_variables_moving_average)}


class UnpaddedValidation(keras.callbacks.Callback):
    """The validation scores of the faces themselves in a data-parallel job, whose last validation batch
    is padded to full size with faces of weight 0. Accuracy comes from the weighted metric (compiled
    beside the plain one there), and the loss, which Keras divides by every face including the padding,
    is scaled back to the real faces. Runs before the callbacks that show or record the scores."""

    def __init__(self, faces: int, padded: int):
        super().__init__()
        self.faces, self.padded = faces, padded

    def on_train_batch_end(self, batch, logs=None):
        (logs or {}).pop("weighted_accuracy", None)  # the training faces' own accuracy is the plain one

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        logs.pop("weighted_accuracy", None)
        if "val_weighted_accuracy" in logs:
            logs["val_accuracy"] = logs.pop("val_weighted_accuracy")
        if "val_loss" in logs:
            logs["val_loss"] = float(logs["val_loss"]) * self.padded / self.faces


class StopOnSignal(keras.callbacks.Callback):
    """Turns `kill` (SIGTERM) and Ctrl-C into `model.stop_training` at the end of the current batch, so a
    stop never lands halfway through the saves of an epoch. A second Ctrl-C raises KeyboardInterrupt at once.
    A training loss that becomes NaN or infinite stops the run the same way (`diverged_in` says in which
    epoch), so that no epoch of NaN weights is recorded."""

    def __init__(self):
        super().__init__()
        self.requested = False
        self.cut_short = False  # whether the epoch that just ended is dropped (see on_epoch_end)
        self.diverged_in: int | None = None  # the epoch (from 1) whose training loss stopped being finite
        self._epoch = 0

    @contextlib.contextmanager
    def listening(self):
        """Listen for the signals while the block runs (main thread only; elsewhere signals keep their handlers)."""
        try:
            previous = {sig: signal.signal(sig, self._request) for sig in (signal.SIGTERM, signal.SIGINT)}
        except ValueError:  # not the main thread
            previous = {}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @property
    def stopping(self) -> bool:
        return self.requested or self.diverged_in is not None

    def _request(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if self.model is not None:
            self.model.stop_training = True

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)) and self.diverged_in is None:
            self.diverged_in = self._epoch + 1
        if self.stopping:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        # Decided once, before the other callbacks write anything: a signal that arrives while they save
        # the epoch lets every one of them finish it (the run stops after it), so the records always agree.
        self.cut_short = self.stopping

    def on_test_batch_end(self, batch, logs=None):
        if self.stopping:  # the epoch cut short is dropped: no need to validate it
            self.model.stop_evaluating = True

    def on_predict_batch_end(self, batch, logs=None):
        if self.stopping:  # a frozen backbone's features, computed before the first epoch
            self.model.stop_predicting = True
