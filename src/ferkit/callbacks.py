"""The Keras callback that keeps a run folder current after every epoch."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ferkit._keras import import_keras
from ferkit.plots import plot_history
from ferkit.runs import HISTORY_COLUMNS, RunState, append_history, read_history
from ferkit.runtime import ModelMetadata, save_keras_model

keras = import_keras()


class RunRecorder(keras.callbacks.Callback):
    """Saves, in this order: checkpoint, last (and best) model, history row, state, curves plot."""

    def __init__(self, run: Path, state: RunState, base_model, metadata: ModelMetadata, *, saved_model=None):
        """`base_model` is trained; `saved_model` (default: the same) is what best/last.keras hold, e.g. a
        float32 twin of a mixed-precision network, which receives its weights before each save."""
        super().__init__()
        self.run, self.state, self.base_model, self.metadata = run, state, base_model, metadata
        self.saved_model = saved_model if saved_model is not None else base_model
        self._started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        done = epoch + 1
        seconds = time.perf_counter() - self._started
        self.model.save(self.run / ".checkpoint.tmp.keras")  # the raw weights, with their averages in the optimizer
        os.replace(self.run / ".checkpoint.tmp.keras", self.run / "checkpoint.keras")

        val_accuracy = float(logs.get("val_accuracy", float("nan")))
        self.metadata.extra = {"run": str(self.run), "epoch": done, "val_accuracy": val_accuracy}
        averaged = _moving_averages(self.model.optimizer)
        if averaged or self.saved_model is not self.base_model:
            self.saved_model.set_weights([keras.ops.convert_to_numpy(averaged.get(id(v), v)) for v in self.base_model.weights])
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


def _moving_averages(optimizer) -> dict:
    """{id(weight variable): its moving average} when the optimizer keeps one (use_ema), else {}."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    if not getattr(optimizer, "use_ema", False):
        return {}
    return {id(v): average for v, average in zip(optimizer._trainable_variables, optimizer._model_variables_moving_average)}
