"""Training configuration: defaults here -> CLI flags -> the run folder's config.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ferkit.errors import FerkitError

AUGMENTATIONS = ("flip", "zoom")


@dataclass
class TrainConfig:
    model: str = "seed-cnn"  # a name from `ferkit models`
    data: str = ""  # training data: class-folder tree or FER2013 CSV (its Training rows)
    val: str | None = None  # validation data; a CSV gives its PublicTest rows. None: split off val_split
    val_split: float = 0.1  # stratified fraction of `data` held out when `val` is None
    classes: list[str] | None = None  # None: the seven EMOTIONS
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3  # Adam
    augment: list[str] = field(default_factory=list)  # any of AUGMENTATIONS, applied on the fly
    zoom: float = 0.2  # +-fraction for the "zoom" augmentation, as in the study
    seed: int = 0  # seeds weights, shuffling, augmentation and the val split
    out: str = "runs/train"

    def __post_init__(self):
        unknown = sorted(set(self.augment) - set(AUGMENTATIONS))
        if unknown:
            raise FerkitError(f"unknown augmentation {', '.join(unknown)} (choose from {', '.join(AUGMENTATIONS)})")
        if self.epochs < 1 or self.batch_size < 1:
            raise FerkitError("epochs and batch size must be at least 1")
        if self.learning_rate <= 0:
            raise FerkitError("the learning rate must be positive")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            raise FerkitError(f"cannot read the run config {path}") from None
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
