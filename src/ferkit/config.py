"""Training configuration: defaults here -> CLI flags -> the run folder's config.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ferkit.errors import FerkitError

AUGMENTATIONS = ("flip", "zoom", "shift", "crop", "rotate", "erase", "contrast")
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "plateau", "cosine")
CLASS_WEIGHTS = ("none", "balanced", "sqrt")
PRECISIONS = ("float32", "mixed_bfloat16")


@dataclass
class TrainConfig:
    model: str = "seed-cnn"  # a name from `ferkit models`
    data: str = ""  # training data: class-folder tree or FER2013 CSV (its Training rows)
    val: str | None = None  # validation data; a CSV gives its PublicTest rows. None: split off val_split
    val_split: float = 0.1  # stratified fraction of `data` held out when `val` is None
    classes: list[str] | None = None  # None: the seven EMOTIONS
    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "adam"  # adam, adamw, or sgd (Nesterov momentum 0.9)
    learning_rate: float = 1e-3
    weight_decay: float = 0.0  # decoupled weight decay (adamw, sgd)
    lr_schedule: str = "constant"  # constant; plateau: halve after lr_patience epochs without a val gain; cosine
    lr_patience: int = 5
    warmup_epochs: int = 0  # cosine only: rise linearly from a tenth of learning_rate over these epochs first
    ema: float = 0.0  # keep an exponential moving average of the weights (e.g. 0.999); validated and saved
    label_smoothing: float = 0.0
    mixup: float = 0.0  # mixup's alpha: train on blends of two faces and of their targets; 0 is off
    class_weight: str = "none"  # none; balanced: n / (classes * count); sqrt: its square root (milder)
    augment: list[str] = field(default_factory=list)  # any of AUGMENTATIONS, applied on the fly
    zoom: float = 0.2  # +-fraction for "zoom", as in the study
    shift: float = 0.1  # +-fraction of the side for "shift"
    rotate: float = 10.0  # +-degrees for "rotate"
    precision: str = "float32"  # mixed_bfloat16: bf16 compute, float32 weights; 1.6x faster on AVX512-BF16 CPUs
    seed: int = 0  # seeds weights, shuffling, augmentation and the val split
    out: str = "runs/train"
    init: str | None = None  # start from a trained model: "default" (the bundled one), a run folder or .keras file
    weights: str | None = None  # pretrained backbones only: "imagenet" (their default), a file, or "none"
    cache_features: bool = True  # frozen backbone, no augmentation: compute its features once, train the head
    fine_tune: int = 0  # then unfreeze the backbone's top N layers ...
    fine_tune_epochs: int = 0  # ... and train this many more epochs at a tenth of the learning rate
    teacher: str | None = None  # distil from a trained model (run folder or model file): its probabilities ...
    distill: float = 0.5  # ... make up this share of each training target, the true label the rest

    def __post_init__(self):
        unknown = sorted(set(self.augment) - set(AUGMENTATIONS))
        if unknown:
            raise FerkitError(f"unknown augmentation {', '.join(unknown)} (choose from {', '.join(AUGMENTATIONS)})")
        if self.epochs < 1 or self.batch_size < 1:
            raise FerkitError("epochs and batch size must be at least 1")
        if self.learning_rate <= 0:
            raise FerkitError("the learning rate must be positive")
        for name, value, allowed in (
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("learning-rate schedule", self.lr_schedule, LR_SCHEDULES),
            ("class weight", self.class_weight, CLASS_WEIGHTS),
            ("precision", self.precision, PRECISIONS),
        ):
            if value not in allowed:
                raise FerkitError(f"unknown {name} {value!r} (choose from {', '.join(allowed)})")
        if self.fine_tune < 0 or self.fine_tune_epochs < 0 or (self.fine_tune and not self.fine_tune_epochs):
            raise FerkitError("--fine-tune N needs --fine-tune-epochs E (both positive)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise FerkitError("label smoothing must lie in [0, 1)")
        if self.mixup < 0:
            raise FerkitError("--mixup (the Beta distribution's alpha) must be 0 (off) or positive")
        if not 0.0 <= self.ema < 1.0:
            raise FerkitError("--ema (the moving average's momentum, e.g. 0.999) must lie in [0, 1)")
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs:
            raise FerkitError("--warmup-epochs must be at least 0 and fewer than --epochs")
        if self.warmup_epochs and self.lr_schedule != "cosine":
            raise FerkitError("--warmup-epochs goes with --lr-schedule cosine")
        if not 0.0 < self.distill <= 1.0:
            raise FerkitError("--distill must lie in (0, 1]")

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
