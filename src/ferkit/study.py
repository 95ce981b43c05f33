"""study(config) -> report.html: the founding study in one call.

Trains (or reuses finished runs of) the reference CNN, the same with flip and zoom augmentation, an
ImageNet transfer model (frozen, then fine-tuned) and the same network from random weights; evaluates
them and the shipped model on one validation split; writes one self-contained HTML report
(ferkit.study_report) with everything needed to compare and reproduce them.

    study/
      report.html      the report, images inside
      study.json       every figure of the report, for scripts
      runs/<entry>/    one ferkit run folder per trained entry (resumable), its ONNX export, its evaluation
      data/            the training subset, when --subset is given
      .ferkit-study    marks the folder as a study's, finished or not
"""

from __future__ import annotations

import json
import logging
import platform
import shlex
import shutil
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ferkit.config import TrainConfig
from ferkit.data import FaceDataset, load_dataset
from ferkit.data.fer2013_csv import TRAIN_USAGE, VAL_USAGE
from ferkit.errors import FerkitError
from ferkit.images import ImageError, load_image
from ferkit.progress import progress_bar
from ferkit.results import check_out_outside_data
from ferkit.runtime import faces_per_second, machine_description
from ferkit.training import TrainingInterrupted

log = logging.getLogger("ferkit")

# What the founding study published (FER2013, its own test split).
PUBLISHED = {"reference": 0.525, "transfer": 0.633}
TRANSFER_MODEL = "efficientnet-lite0-transfer"
ALL_LAYERS = 10_000  # --fine-tune N: unfreezes the whole backbone (its batch norm stays frozen)
STUDY_MARK = ".ferkit-study"  # written first into a study's folder: the study may continue there
SUBSET_SOURCE = "source.json"  # in a study's copy of its training faces: the data they were taken from
STUDY_REPORT = "study-eval"  # in each run folder: the entry's report on the validation faces
STUDY_EXPORT = "study.onnx"  # in a run folder whose best.onnx is the user's own variant: what the study scores


_LABELS = {
    "reference": "reference CNN (the founding study's)",
    "augmented": "reference CNN + flip and zoom",
    "transfer": "ImageNet transfer, frozen then fine-tuned",
    "transfer-random": "the transfer network from random weights, same recipe",
    "shipped": "ferkit's shipped model (evaluated only)",
}
ENTRIES = tuple(_LABELS)


def entry_label(name: str) -> str:
    return _LABELS[name]


@dataclass
class StudyConfig:
    data: str
    val: str
    out: str = "study"
    models: list[str] = field(default_factory=lambda: list(ENTRIES))
    epochs: int = 30  # reference and augmented
    transfer_epochs: int = 10  # the transfer models' head, backbone frozen
    fine_tune_epochs: int = 10  # then the backbone's top layers, at a tenth of the rate ...
    fine_tune_layers: int = ALL_LAYERS  # ... this many (all by default; batch norm stays frozen)
    transfer_model: str = TRANSFER_MODEL
    transfer_weights: str = "imagenet"
    subset: int | None = None  # training faces per class (the first, in file order)
    photos: list[str] = field(default_factory=list)
    seed: int = 0
    speed_calls: int = 20  # timed calls of 256 faces behind each model's faces/s
    command: str = ""

    def __post_init__(self):
        unknown = sorted(set(self.models) - set(ENTRIES))
        if unknown:
            raise FerkitError(f"unknown study entry {', '.join(unknown)} (choose from {', '.join(ENTRIES)})")
        if not self.models:
            raise FerkitError(f"--models names no entry (choose from {', '.join(ENTRIES)})")
        if "transfer" in self.models and self.transfer_weights == "none":
            raise FerkitError("the transfer entry starts from pretrained weights; transfer-random is the one from random weights")
        if min(self.epochs, self.transfer_epochs, self.fine_tune_epochs) < 1:
            raise FerkitError("every number of epochs must be at least 1")
        if self.fine_tune_layers < 1:
            raise FerkitError("--fine-tune-layers must be at least 1")
        self.models = list(dict.fromkeys(self.models))  # an entry named twice is one entry
        if self.subset is not None and self.subset < 1:
            raise FerkitError("--subset must be at least 1 face per class")
        for photo in self.photos:
            if not Path(photo).is_file():
                raise FerkitError(f"no such photo: {photo}")
            try:
                load_image(photo)
            except ImageError as err:
                raise FerkitError(f"--photo {photo}: {err.reason}") from None

    @classmethod
    def quick(cls, data: str, val: str, **overrides) -> "StudyConfig":
        """A study small enough for a test: 20 faces per class, 2 epochs of each model (the transfer models
        fine-tune their top 10 layers only), and faces/s from 2 timed calls in place of 20."""
        settings = {"epochs": 2, "transfer_epochs": 1, "fine_tune_epochs": 1, "fine_tune_layers": 10, "subset": 20,
                    "speed_calls": 2, **overrides}
        return cls(data=data, val=val, **settings)


@dataclass
class EntryResult:
    """One row of the comparison, with what the report draws for it."""

    name: str
    label: str
    model: str
    run: str | None
    parameters: int
    accuracy: float
    macro_f1: float
    recall: dict[str, float]
    faces_per_second: float
    training_seconds: float | None = None
    seconds_per_epoch: float | None = None
    train_val_gap: float | None = None
    epochs: int | None = None
    published_accuracy: float | None = None
    history: dict[str, list[float]] | None = None
    confusion_matrix: list[list[int]] = field(default_factory=list)
    model_file: str | None = None  # the ONNX file scored (None: the shipped model)
    warnings: list[str] = field(default_factory=list)  # its report's: validation files skipped, ...
    wrong: list[tuple[int, str, str, float]] = field(default_factory=list)  # the most confident mistakes


def study(config: StudyConfig, *, verbose: int = 2) -> Path:
    """Run the study described by `config`; returns the path of report.html."""
    from ferkit.study_report import write_report

    out = Path(config.out)
    for data in (config.data, config.val):  # before any work: its runs and reports would be read as faces
        check_out_outside_data(out, data, "the study's runs and reports")
    val = load_dataset(config.val, usage=VAL_USAGE, progress=True)
    if not Path(config.data).exists():
        raise FerkitError(f"no such dataset: {config.data}")
    _check_transfer_weights(config)
    _check_study_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / STUDY_MARK).touch()
    copied = config.subset is not None and not _subset_folder(config, out).exists()
    train_data = _training_data(config, out)
    results = []
    trained = [name for name in config.models if name != "shipped"]
    for number, name in enumerate(config.models, start=1):
        log.info("[%d/%d] %s", number, len(config.models), _LABELS[name])
        if name == "shipped":
            results.append(_score_entry(name, None, config))
            continue
        try:
            run = _train_or_reuse(_train_config(config, name, train_data, out), verbose)
        except TrainingInterrupted:
            raise TrainingInterrupted(f"the study was interrupted while training {name}; run the same command again "
                                      "to continue where it stopped") from None
        except FerkitError:
            if copied and name == trained[0]:  # refused before any run used the copy just made (another --subset)
                shutil.rmtree(train_data, ignore_errors=True)
            raise
        results.append(_score_entry(name, run, config))
        log.info("%s: val accuracy %.4f (%d of %d trained entries done)", name, results[-1].accuracy,
                 trained.index(name) + 1, len(trained))
    photos = [_analyze_photo(photo, results) for photo in config.photos]
    facts = _reproduction(config, train_data, val)
    (out / "study.json").write_text(json.dumps({
        "config": asdict(config), "entries": [asdict(r) for r in results], "photos": [_photo_answers(p) for p in photos],
        "pretraining_gain": pretraining_gain(results), "reproduction": facts["text"],
    }, indent=2) + "\n")
    return write_report(out / "report.html", config, results, val, photos, facts)


def _check_study_folder(out: Path) -> None:
    """`out` is new, empty or an earlier study's folder (which the study continues); never a folder of the
    user's own, whose report.html and study.json the study would replace."""
    if out.exists() and not out.is_dir():
        raise FerkitError(f"--out {out} is a file; give a folder for the study")
    if out.is_dir() and any(out.iterdir()) and not _is_study_folder(out):
        raise FerkitError(f"{out} holds files that are not a ferkit study; choose a new or empty --out")


def _is_study_folder(out: Path) -> bool:
    """Marked as a study's, finished (study.json) or not; or, made before studies were marked, holding
    nothing but the runs of study entries and no report yet."""
    if (out / STUDY_MARK).exists() or (out / "study.json").exists():
        return True
    runs = out / "runs"
    return runs.is_dir() and not (out / "report.html").exists() and all(run.name in ENTRIES for run in runs.iterdir())


def _check_transfer_weights(config: StudyConfig) -> None:
    """Before anything trains: the transfer network is one with a pretrained backbone, and the transfer
    entry's pretrained weights are here (building it finds them)."""
    from ferkit._keras import check_keras_installed, import_keras
    from ferkit.models import create_model
    from ferkit.training_model import check_fine_tuning

    if any(name != "shipped" for name in config.models):
        check_keras_installed()
    for name in ("transfer", "transfer-random"):
        if name in config.models:
            check_fine_tuning(_train_config(config, name, config.data, Path(config.out)))
    if "transfer" not in config.models:
        return
    try:
        create_model(config.transfer_model, weights=config.transfer_weights)
    except FerkitError as err:
        others = ",".join(name for name in config.models if name != "transfer")
        raise FerkitError(f"{err}; or leave the transfer entry out: --models {others}" if others else str(err)) from None
    import_keras().backend.clear_session()


def _train_config(config: StudyConfig, name: str, data: str, out: Path) -> TrainConfig:
    common = {"data": data, "val": config.val, "seed": config.seed, "out": str(out / "runs" / name)}
    if name == "reference":
        return TrainConfig(model="seed-cnn", epochs=config.epochs, **common)
    if name == "augmented":
        return TrainConfig(model="seed-cnn", epochs=config.epochs, augment=["flip", "zoom"], **common)
    weights = config.transfer_weights if name == "transfer" else "none"
    return TrainConfig(model=config.transfer_model, weights=weights, epochs=config.transfer_epochs,
                       fine_tune=config.fine_tune_layers, fine_tune_epochs=config.fine_tune_epochs, **common)


def _train_or_reuse(config: TrainConfig, verbose: int) -> Path:
    """Train; or resume an interrupted run of the same settings; or reuse a finished one."""
    from ferkit._keras import import_keras
    from ferkit.runs import RunState
    from ferkit.training import check_same_faces, train

    run = Path(config.out)
    if (run / "config.json").exists():
        earlier = _settings(TrainConfig.load(run / "config.json"))
        changed = [name for name, value in _settings(config).items() if earlier.get(name) != value]
        longer = changed == ["epochs"] and config.epochs > earlier["epochs"]
        if changed and not longer:
            more = f" (it has {earlier['epochs']} epochs: a study extends a run, never shortens it)" if changed == ["epochs"] else ""
            raise FerkitError(f"{run} holds a run with other settings ({', '.join(changed)}){more}; remove it or choose "
                              "another --out")
        if longer:
            log.info("extending %s from %d to %d epochs", run, earlier["epochs"], config.epochs)
        elif RunState.load(run).status == "finished":
            check_same_faces(run, load_dataset(config.data, usage=TRAIN_USAGE), load_dataset(config.val, usage=VAL_USAGE),
                             reused=True)
            log.info("reusing the finished run %s", run)
            return run
        log.info("resuming %s", run)
        train(config, resume=True, verbose=verbose)
    else:
        train(config, verbose=verbose)
    import_keras().backend.clear_session()
    return run


def _settings(config: TrainConfig) -> dict:
    """How a run trains, less where it and its data are (a study folder renamed, or paths spelled another
    way, is the same study: the faces themselves are checked) and what training fills in."""
    settings = asdict(config)
    for name in ("out", "data", "val", "classes"):
        settings.pop(name)
    return settings


def _training_data(config: StudyConfig, out: Path) -> str:
    """`config.data`, or a class-folder copy of its first `subset` faces per class (PNG files, which every
    model reads at its own input size)."""
    if config.subset is None:
        return config.data
    from PIL import Image

    folder = _subset_folder(config, out)
    source = str(Path(config.data).resolve())
    if folder.exists():
        recorded = json.loads((folder / SUBSET_SOURCE).read_text())["data"] if (folder / SUBSET_SOURCE).exists() else None
        if recorded not in (None, source):
            raise FerkitError(f"{out} holds a study of {recorded}; choose another --out for {config.data}")
        return str(folder)
    full = load_dataset(config.data, usage=TRAIN_USAGE)
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted study, perhaps of other data
    for k, name in enumerate(full.classes):
        (partial / name).mkdir(parents=True, exist_ok=True)
        for n, i in enumerate(np.flatnonzero(full.labels == k)[: config.subset]):
            Image.fromarray(full.images[i]).save(partial / name / f"{n:06d}.png")
    (partial / SUBSET_SOURCE).write_text(json.dumps({"data": source}) + "\n")
    partial.rename(folder)
    return str(folder)


def _subset_folder(config: StudyConfig, out: Path) -> Path:
    return out / "data" / f"train-{config.subset}-per-class"


def _score_entry(name: str, run: Path | None, config: StudyConfig) -> EntryResult:
    from ferkit.evaluation import evaluate
    from ferkit.runtime import load_classifier

    model = _deployable(run)
    classifier = load_classifier(model)
    val = load_dataset(config.val, classes=classifier.classes, image_size=classifier.input_size, usage=VAL_USAGE,
                       progress=True)
    with progress_bar(len(val), f"scoring {name}") as advance:
        report = evaluate(classifier, val, progress=advance)
    if run is not None:  # the study's own run folder, its own name there (`ferkit evaluate RUN` writes eval-DATA)
        report.save(run / STUDY_REPORT, overwrite=True)
    log.info("timing %s: %d calls of 256 faces", name, config.speed_calls)
    speed = faces_per_second(classifier, repeat=config.speed_calls)
    result = EntryResult(
        name=name, label=entry_label(name), model=classifier.name, run=str(run) if run else None,
        model_file=str(model) if model else None,
        parameters=_parameters(classifier), accuracy=report.accuracy, macro_f1=report.macro_f1,
        recall={c: s.recall for c, s in report.per_class.items()}, faces_per_second=speed,
        published_accuracy=PUBLISHED.get(name), confusion_matrix=report.confusion_matrix.tolist(),
        wrong=_confidently_wrong(report), warnings=list(report.warnings),
    )
    if run is not None:
        _add_training_figures(result, run)
    return result


def _deployable(run: Path | None):
    """What the report scores: the run's best model exported to ONNX, plainly (what a user would deploy,
    and the same runtime as the shipped model), or the shipped model for None. The run's best.onnx where it
    is that, or where there is none yet (`ferkit predict RUN` then uses it); else the study's own export: an
    export of the user's (with TTA, int8, a temperature, or of an earlier best.keras) is neither scored nor
    replaced."""
    if run is None:
        return None
    from ferkit.export import export_onnx
    from ferkit.runtime import sha256_of

    source, best = run / "best.keras", run / "best.onnx"
    if not best.exists():
        export_onnx(source, best)
        return best
    digest = sha256_of(source)
    if _plain_export_of(best, digest):
        return best
    own = run / STUDY_EXPORT
    if not _plain_export_of(own, digest):
        export_onnx(source, own, overwrite=True)
    return own


def _plain_export_of(onnx: Path, source_sha256: str) -> bool:
    """Whether `onnx` is an export of the .keras file of that SHA-256 as it is: no TTA, int8, temperature or
    batch-norm recalibration."""
    from ferkit.runtime import EXPORT_SOURCE, read_metadata

    try:
        metadata = read_metadata(onnx)
    except (FerkitError, OSError):
        return False
    changed = {"int8", "batch_norm_recalibrated"} & metadata.extra.keys()
    return (metadata.extra.get(EXPORT_SOURCE) == source_sha256 and metadata.tta == "none"
            and metadata.temperature == 1.0 and not changed)


def _parameters(classifier) -> int:
    """The network's parameters; for an ensemble, those of all its members."""
    from ferkit.models import create_model, get_model_spec

    members = classifier.metadata.extra.get("members") or [{"model": classifier.name}]
    total = 0
    for member in members:
        name = member.get("model") or member["config"]["model"]
        total += create_model(name, weights="none" if get_model_spec(name).pretrained else None).count_params()
    return total


def _add_training_figures(result: EntryResult, run: Path) -> None:
    from ferkit.runs import read_history

    history = read_history(run / "history.csv")
    seconds = history["seconds"]
    result.history = history
    result.epochs = len(seconds)
    result.training_seconds = float(sum(seconds))
    config = TrainConfig.load(run / "config.json")
    if config.fine_tune_epochs:  # the epochs that cost: fine-tuning, not the head on cached features
        seconds = seconds[config.epochs:]
    result.seconds_per_epoch = statistics.median(seconds[1:] or seconds)  # the first includes graph tracing
    result.train_val_gap = history["accuracy"][-1] - history["val_accuracy"][-1]


def _confidently_wrong(report, count: int = 12) -> list[tuple[int, str, str, float]]:
    """(val index, true class, predicted class, its probability) of the most confident mistakes."""
    wrong = np.flatnonzero(report.y_pred != report.y_true)
    confidence = report.probabilities[wrong].max(axis=1)
    order = wrong[np.argsort(-confidence)][:count]
    return [(int(i), report.classes[report.y_true[i]], report.classes[report.y_pred[i]],
             float(report.probabilities[i].max())) for i in order]


def pretraining_gain(results: list[EntryResult]) -> float | None:
    """Val accuracy of the ImageNet-initialised transfer model minus that of the same network from random
    weights on the same epochs; None unless both ran."""
    by_name = {r.name: r for r in results}
    if "transfer" in by_name and "transfer-random" in by_name:
        return by_name["transfer"].accuracy - by_name["transfer-random"].accuracy
    return None


def _analyze_photo(photo: str, results: list[EntryResult]) -> dict:
    """The faces of one photo as each model sees them (the same detected boxes for all)."""
    from ferkit.predict import analyze

    path = Path(photo)
    models = {r.name: r.model_file for r in results}
    boxes = [face.box for face in analyze(path)]  # detected once; every model classifies the same faces
    faces = {name: analyze(path, model=model, boxes=boxes) if boxes else [] for name, model in models.items()}
    return {"path": str(path), "boxes": boxes, "faces": faces}


def _reproduction(config: StudyConfig, train_data: str, val: FaceDataset) -> dict:
    import ferkit

    train = load_dataset(train_data, usage=TRAIN_USAGE)
    versions = {"ferkit": ferkit.__version__, "python": platform.python_version()}
    for module in ("keras", "tensorflow", "onnxruntime", "numpy"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            pass
    text = {
        "command": config.command or "ferkit.study(...)",
        "versions": versions,
        "machine": machine_description(),
        "seed": config.seed,
        "train": {"source": train_data, "faces": len(train), "per_class": train.class_counts(),
                  "subset_of": config.data if config.subset else None},
        "val": {"source": config.val, "faces": len(val), "per_class": val.class_counts()},
    }
    return {"text": text, "train": train}


def _photo_answers(photo: dict) -> dict:
    """A photo's faces as each model answered (see _analyze_photo), as JSON."""
    return {"path": photo["path"], "boxes": [list(box) for box in photo["boxes"]],
            "faces": {name: [face.to_dict() for face in faces] for name, faces in photo["faces"].items()}}


def command_line() -> str:
    """The command as typed, for the report's reproduction section."""
    return shlex.join(["ferkit", *sys.argv[1:]])
