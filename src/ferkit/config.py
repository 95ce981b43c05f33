"""Training configuration: defaults here -> CLI flags -> the run folder's config.json."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ferkit.errors import FerkitError
from ferkit.labels import canonical_labels, repeated

AUGMENTATIONS = ("flip", "zoom", "shift", "crop", "rotate", "erase", "contrast")
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "plateau", "cosine")
CLASS_WEIGHTS = ("none", "balanced", "sqrt")
SEEDS = 2**32  # seeds run from 0 to SEEDS - 1, as NumPy and TensorFlow take them
PRECISIONS = ("float32", "mixed_bfloat16")


def setting(default, help: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None,
            default_text: str | None = None):
    """A TrainConfig field with what `ferkit train --help` says of it: the CLI's options are made from these
    (ferkit.cli.config_options), so names, help and defaults cannot drift apart."""
    metadata = {"help": help, "flag": flag, "choices": choices, "default_text": default_text}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# Fine-tuning a trained network (--init) with Adam at the from-scratch rate undoes much of what it knew: on 175
# PublicTest faces, 15 epochs, scored on 631 others, its member of the default model went from 0.658 to 0.580
# at 1e-3, 0.605 at 3e-4, 0.643 at 1e-4 and 0.661 at 3e-5 (benchmarks/finetune_vs_scratch.py's split).
LEARNING_RATE, INIT_LEARNING_RATE = 1e-3, 1e-4

# What may differ when a run resumes: a longer or shorter schedule (fine-tuning phase included), and where
# its data is now; the run folder itself; the classes, which training reads from the data; the precision of
# the arithmetic (the weights stay float32), which pays on one machine and not another; which epochs' models
# are kept, which changes no weight.
RESUMABLE = ("epochs", "fine_tune", "fine_tune_epochs", "data", "val", "teacher", "out", "classes", "precision",
             "save_period")


@dataclass
class TrainConfig:
    model: str = setting("seed-cnn", "Model name from `ferkit models`.")
    data: str = setting("", "Training data: a class-folder tree, FER2013 CSV (its Training rows) or packed dataset.")
    val: str | None = setting(None, "Validation data (a CSV gives its PublicTest rows); none: split off --val-split.")
    val_split: float = setting(0.1, "Stratified fraction of --data held out when --val is absent.")
    classes: list[str] | None = setting(None, "Comma-separated class list, to keep classes beyond the seven emotions (none: the seven).")
    epochs: int = setting(30, "Epochs to train in all (with --fine-tune: before fine-tuning's); with --resume, the new number.")
    batch_size: int = setting(64, "Faces per training step.")
    optimizer: str = setting("adam", "adam, adamw, or sgd (Nesterov momentum 0.9).", choices=OPTIMIZERS)
    # None becomes one of the two rates when the config is made: dataclasses.replace(config, init=...) keeps it
    learning_rate: float | None = setting(None, "Learning rate.", flag="--lr",
                                          default_text=f"{LEARNING_RATE:g}; {INIT_LEARNING_RATE:g} with --init")
    weight_decay: float = setting(0.0, "Decoupled weight decay for adamw and sgd.")
    lr_schedule: str = setting("constant", "constant; plateau: halve after --lr-patience epochs without a val gain; cosine.",
                               choices=LR_SCHEDULES)
    lr_patience: int = setting(5, "Epochs without a val gain before plateau halves the rate.")
    warmup_epochs: int = setting(0, "With cosine: rise linearly from a tenth of --lr over these epochs first.")
    ema: float = setting(0.0, "Validate and save a moving average of the weights with this momentum, e.g. 0.999; 0 is off.")
    label_smoothing: float = setting(0.0, "Label smoothing.")
    mixup: float = setting(0.0, "Mixup alpha, e.g. 0.2: train on blends of two faces and their labels; 0 is off.")
    class_weight: str = setting("none", "Loss weights per class: none; balanced: n / (classes x count); sqrt: its square root.",
                                choices=CLASS_WEIGHTS)
    augment: list[str] = setting([], f"Comma-separated augmentations, applied on the fly: {', '.join(AUGMENTATIONS)}.")
    zoom: float = setting(0.2, "Plus or minus this fraction for the zoom augmentation, as in the study.")
    shift: float = setting(0.1, "Plus or minus this fraction of the side for the shift augmentation.")
    rotate: float = setting(10.0, "Plus or minus this many degrees for the rotate augmentation.")
    precision: str = setting("float32", "mixed_bfloat16: bf16 compute, float32 weights (faster only on CPUs with bf16); may change on --resume.",
                             choices=PRECISIONS)
    seed: int = setting(0, "Seeds weights, shuffling, augmentation and the val split. A run resumed after epoch N "
                           "draws its shuffles and augmentations from seed + N, so it does not repeat an uninterrupted "
                           "run exactly.")
    out: str = setting("runs/train", "Run folder.")
    save_period: int = setting(0, "Also keep the saved model of every Nth epoch, as epochs/epoch-NNN.keras in the run folder "
                                  "(e.g. to average the last few: tools/average_checkpoints.py); 0: best and last only; "
                                  "may change on --resume.")
    init: str | None = setting(None, "Start from a trained model: 'default' or another shipped model by name, a run folder or .keras file.")
    weights: str | None = setting(None, "Pretrained backbones: imagenet, a local weights file, or none.",
                                  default_text="the backbone's own, imagenet")
    cache_features: bool = setting(True, "Frozen backbones without augmentation: compute their features once, train the head.")
    fine_tune: int = setting(0, "After --epochs, unfreeze the backbone's top N layers ...")
    fine_tune_epochs: int = setting(0, "... and train this many more epochs at a tenth of --lr.")
    teacher: str | None = setting(None, "Distil from a trained model (run folder or model file) or from probabilities "
                                        "saved by `ferkit teacher` (.npz) ...")
    distill: float = setting(0.5, "... with this share of each target, the true label the rest.")

    def __post_init__(self):
        for name in ("data", "val", "out", "init", "weights", "teacher"):  # a pathlib.Path serves as well as a str
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        self.augment = _names(self.augment)
        self.classes = _names(self.classes) if self.classes is not None else None
        if self.learning_rate is None:
            self.learning_rate = INIT_LEARNING_RATE if self.init else LEARNING_RATE
        self._check_numbers()
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
        if self.lr_patience < 1:
            raise FerkitError("--lr-patience (epochs without a val gain before the rate halves) must be at least 1")
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs:
            raise FerkitError("--warmup-epochs must be at least 0 and fewer than --epochs")
        if self.warmup_epochs and self.lr_schedule != "cosine":
            raise FerkitError("--warmup-epochs goes with --lr-schedule cosine")
        if not 0.0 < self.distill <= 1.0:
            raise FerkitError("--distill must lie in (0, 1]")
        if self.classes is not None and not self.classes:
            raise FerkitError("--classes names no class: give them comma-separated, e.g. happy,sad,neutral")
        classes = canonical_labels(self.classes or [])  # Happiness is happy, as in folder names
        for flag, names in (("--classes", classes), ("--augment", self.augment)):
            twice = repeated(names)
            if twice:
                raise FerkitError(f"{flag} names {', '.join(twice)} more than once")

    def check_every_setting_applies(self) -> None:
        """Refuse (FerkitError) a setting that would be recorded in the run's config.json but have no effect:
        --val-split beside --val, --distill without --teacher, an augmentation's amount without the
        augmentation, and the like. Checked when a run starts, not when a recorded config is read."""
        default = {item.name: item.default for item in fields(self)}

        def given(name: str) -> bool:
            return getattr(self, name) != default[name]

        unused = [
            ("val_split", self.val is not None, "applies without --val (which gives the validation faces)"),
            ("distill", self.teacher is None, "goes with --teacher"),
            ("fine_tune_epochs", not self.fine_tune, "goes with --fine-tune N"),
            ("weights", bool(self.init), "chooses a new network's starting weights; with --init they come from that model"),
            ("lr_patience", self.lr_schedule != "plateau", "goes with --lr-schedule plateau"),
            ("weight_decay", self.optimizer == "adam", "is decoupled weight decay, for --optimizer adamw or sgd"),
            *((name, name not in self.augment, f"goes with --augment {name}") for name in ("zoom", "shift", "rotate")),
            ("cache_features", not _has_pretrained_backbone(self.model) or bool(self.augment or self.mixup),
             "applies to a frozen pretrained backbone trained without --augment or --mixup (whose features are "
             "computed once)"),
        ]
        for name, unused_here, why in unused:
            if given(name) and unused_here:
                flag = option_flag(_field(name))
                if getattr(self, name) is False:  # a switch turned off: --no-cache-features
                    flag = flag.replace("--", "--no-", 1)
                raise FerkitError(f"{flag} {why}; as given it would change nothing")
        one_csv = str(self.data).lower().endswith(".csv")  # its Training rows train, its PublicTest rows validate
        if self.val is not None and self.data and not one_csv and os.path.realpath(self.val) == os.path.realpath(self.data):
            raise FerkitError("--val is the training data itself: validation faces must be others (or leave --val "
                              "out to split some off)")

    def _check_numbers(self) -> None:
        """Every number a real one (no NaN or infinity, which would train a network of NaN) in its range."""
        for item in fields(self):
            value = getattr(self, item.name)
            number = item.type in ("int", "float", "float | None")
            if number and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise FerkitError(f"{option_flag(item)} must be a number, not {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise FerkitError(f"{option_flag(item)} must be a finite number, not {value}")
        for name, within, meaning in (
            ("weight_decay", self.weight_decay >= 0, "0 (off) or positive"),
            ("zoom", 0 <= self.zoom < 1, "a fraction in [0, 1), e.g. 0.2"),
            ("shift", 0 <= self.shift < 1, "a fraction of the side in [0, 1), e.g. 0.1"),
            ("rotate", 0 <= self.rotate <= 180, "degrees from 0 to 180"),
            ("val_split", 0 < self.val_split < 1, "a fraction in (0, 1), e.g. 0.1"),
            ("seed", 0 <= self.seed < SEEDS, f"a whole number from 0 to {SEEDS - 1}"),
            ("save_period", self.save_period >= 0, "0 (off) or a number of epochs"),
        ):
            if not within:
                value = getattr(self, name)
                raise FerkitError(f"{option_flag(_field(name))} must be {meaning}, not {value if isinstance(value, int) else f'{value:g}'}")

    @property
    def total_epochs(self) -> int:
        """The main phase's epochs, and fine-tuning's when there is one."""
        return self.epochs + self.fine_tune_epochs if self.fine_tune else self.epochs

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    def settings_changed_from(self, recorded: "TrainConfig") -> list[str]:
        """The settings in which this config, asked to resume a run, differs from the run's `recorded`
        config: all but RESUMABLE (and the model, which `init` chose, when the run started from one)."""
        free = set(RESUMABLE) | ({"model", "weights"} if self.init and self.init == recorded.init else set())
        mine, theirs = asdict(self), asdict(recorded)
        return [name for name in mine if name not in free and mine[name] != theirs.get(name)]

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            raise FerkitError(f"cannot read the run config {path}") from None
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict):
            raise FerkitError(f"the run config {path} is damaged (not a JSON object)")
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except FerkitError as err:  # its settings are checked as the flags they came from are
            raise FerkitError(f"the run config {path} holds a setting this ferkit refuses: {err}") from None


def _names(value) -> list[str]:
    """A list of names from a list or a comma-separated string ("flip,crop")."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return list(value)


def _field(name: str):
    return next(item for item in fields(TrainConfig) if item.name == name)


def option_flag(item) -> str:
    """The `ferkit train` option of a TrainConfig field."""
    return item.metadata.get("flag") or f"--{item.name.replace('_', '-')}"


def _has_pretrained_backbone(model: str) -> bool:
    from ferkit.models import get_model_spec

    try:
        return get_model_spec(model).pretrained
    except FerkitError:
        return True  # an unknown model is named by its own check
