"""The run folder: what one training run leaves on disk, readable without Keras.

    config.json      the TrainConfig (with the classes it resolved to)
    datasets.json    images per class in the training and validation sets
    history.csv      one row per finished epoch: loss, accuracy, val_loss, val_accuracy, lr, seconds
    curves.png       accuracy and loss, train vs val, redrawn after every epoch
    best.keras       the model of the best val_accuracy so far (ferkit metadata inside)
    last.keras       the model after the last finished epoch
    checkpoint.keras the training model with its optimizer state, for --resume
    checkpoint.npz   instead of checkpoint.keras in a packed copy of a run in flight (ferkit.train.save_compact_checkpoint)
    state.json       epochs done, best epoch and score, status (running / interrupted / finished)

Every file is replaced atomically, so a run killed at any moment leaves a usable folder.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds")
RUN_FILES = (
    "config.json", "datasets.json", "history.csv", "curves.png",
    "best.keras", "last.keras", "checkpoint.keras", "state.json",
)


@dataclass
class RunState:
    epochs_done: int = 0
    best_epoch: int = 0
    best_val_accuracy: float = -1.0
    status: str = "running"

    @classmethod
    def load(cls, run: str | Path) -> "RunState":
        path = Path(run) / "state.json"
        return cls(**json.loads(path.read_text())) if path.exists() else cls()

    def save(self, run: str | Path) -> None:
        write_atomic(Path(run) / "state.json", json.dumps(self.__dict__, indent=2) + "\n")


def read_history(path: str | Path) -> dict[str, list[float]]:
    """history.csv as columns of floats (epoch as int); empty columns when there is no file yet."""
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


def append_history(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def trim_history(path: Path, epochs_done: int) -> None:
    """Drop rows past the checkpoint (an epoch recorded just before a kill is trained again)."""
    if not path.exists():
        return
    with open(path, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if int(r["epoch"]) <= epochs_done]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
