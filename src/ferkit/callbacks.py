"""The Keras callback that keeps a run folder current after every epoch."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from ferkit._keras import import_keras
from ferkit.plots import plot_history
from ferkit.runs import HISTORY_COLUMNS, RunState, append_history, read_history
from ferkit.runtime import ModelMetadata, save_keras_model

keras = import_keras()


class RunRecorder(keras.callbacks.Callback):
    """Saves, in this order: checkpoint, last (and best) model, history row, state, curves plot."""

    def __init__(self, run: Path, state: RunState, base_model, metadata: ModelMetadata, *, saved_model=None,
                 averaged=None, stop: "StopOnSignal | None" = None):
        """`base_model` is trained; `saved_model` (default: the same) is what best/last.keras hold, e.g. a
        float32 twin of a mixed-precision network, which receives its weights before each save; with
        `averaged` (an AveragedWeightsValidation), the weights it validated are saved. An epoch that `stop`
        cut short is not recorded."""
        super().__init__()
        self.run, self.state, self.base_model, self.metadata = run, state, base_model, metadata
        self.saved_model = saved_model if saved_model is not None else base_model
        self.averaged, self.stop = averaged, stop
        self._started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if self.stop is not None and self.stop.requested:
            return
        logs = logs or {}
        done = epoch + 1
        seconds = time.perf_counter() - self._started
        self.model.save(self.run / ".checkpoint.tmp.keras")  # the raw weights, with their averages in the optimizer
        os.replace(self.run / ".checkpoint.tmp.keras", self.run / "checkpoint.keras")

        val_accuracy = float(logs.get("val_accuracy", float("nan")))
        self.metadata.extra = {"run": str(self.run), "epoch": done, "val_accuracy": val_accuracy}
        if self.averaged is not None and self.averaged.weights is not None:
            self.saved_model.set_weights(self.averaged.weights)
        elif self.saved_model is not self.base_model:
            self.saved_model.set_weights(self.base_model.get_weights())
        save_keras_model(self.saved_model, self.run / "last.keras", self.metadata)
        if val_accuracy > self.state.best_val_accuracy:
            self.state.best_val_accuracy, self.state.best_epoch = val_accuracy, done
            save_keras_model(self.saved_model, self.run / "best.keras", self.metadata)

        learning_rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        row = {"epoch": done, **{k: logs.get(k, "") for k in HISTORY_COLUMNS[1:5]}}
        append_history(self.run / "history.csv", {**row, "learning_rate": learning_rate, "seconds": round(seconds, 2)})
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
        averages = _moving_averages(self.model.optimizer)
        for variable in variables:
            if id(variable) in averages:
                variable.assign(averages[id(variable)])
        batches = (self.faces[i : i + self.batch_size] for i in range(0, len(self.faces), self.batch_size))
        recalibrate_batch_norm(self.base_model, batches)
        self.weights = [keras.ops.convert_to_numpy(v) for v in variables]

    def on_test_end(self, logs=None):
        for variable, value in zip(self.base_model.weights, self._raw):
            variable.assign(value)
        self._raw = None


def _moving_averages(optimizer) -> dict:
    """{id(weight variable): its moving average} when the optimizer keeps one (use_ema), else {}."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    if not getattr(optimizer, "use_ema", False):
        return {}
    return {id(v): average for v, average in zip(optimizer._trainable_variables, optimizer._model_variables_moving_average)}


class StopOnSignal(keras.callbacks.Callback):
    """Turns `kill` (SIGTERM) and Ctrl-C into `model.stop_training` at the end of the current batch, so a
    stop never lands halfway through RunRecorder's saves. A second Ctrl-C raises KeyboardInterrupt at once."""

    def __init__(self):
        super().__init__()
        self.requested = False

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

    def _request(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if self.model is not None:
            self.model.stop_training = True

    def on_train_batch_end(self, batch, logs=None):
        if self.requested:
            self.model.stop_training = True

    def on_test_batch_end(self, batch, logs=None):
        if self.requested:  # the epoch cut short is dropped: no need to validate it
            self.model.stop_evaluating = True
