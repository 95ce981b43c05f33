"""evaluate(model, dataset) -> EvaluationReport: accuracy, macro-F1, per-class table, confusion matrix,
and how well the model's confidence matches its accuracy (ECE, reliability diagram; see ferkit.calibration).

Metric names follow scikit-learn, which computes them (per class: precision, recall, f1 and support, as
`precision_recall_fscore_support` returns them). The confusion matrix always covers every class of
the model, so a dataset without any `disgust` still gives a 7x7 matrix.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ferkit.calibration import CONFIDENCE_LEVELS, ECE_BINS, confidence_accuracy_table, expected_calibration_error, reliability_bins
from ferkit.data import FaceDataset
from ferkit.errors import FerkitError
from ferkit.extras import require
from ferkit.runs import run_folder_of
from ferkit.runtime import Classifier, load_classifier, resolve_model_path


REPORT_FILES = ("metrics.json", "per_class.csv", "confusion_matrix.json", "confusion_matrix.png",
                "reliability_diagram.png", "report.html")


@dataclass
class ClassScores:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class EvaluationReport:
    model: str
    data: str
    classes: tuple[str, ...]
    accuracy: float
    macro_f1: float  # over the classes present in y_true or y_pred, as scikit-learn does
    per_class: dict[str, ClassScores]
    confusion_matrix: np.ndarray  # rows: true class, columns: predicted class, counts
    y_true: np.ndarray
    y_pred: np.ndarray
    tta: str = "none"  # the test-time augmentation the model ran with
    model_version: str = ""  # which model of that name: its run and file, or a shipped model's version
    model_epoch: int | None = None  # the training epoch that made the model, where it records one (a run's models)
    model_sha256: str = ""  # of the model file: two files of one name in two folders are two models
    warnings: list[str] = field(default_factory=list)  # what a reader of the saved report should know (skipped files, ...)
    # scikit-learn's other averages, over the same classes as macro_f1: weighted by each class's faces
    macro_precision: float | None = None
    macro_recall: float | None = None
    weighted_f1: float | None = None
    probabilities: np.ndarray | None = None  # (N, classes) as scored, the model's temperature applied
    temperature: float = 1.0  # the model's temperature
    ece_before_temperature: float | None = None  # ECE of the same model at temperature 1, when its own is not 1

    @property
    def ece(self) -> float | None:
        """Expected calibration error (ECE_BINS bins) of the probabilities as scored; None without them."""
        if self.probabilities is None:
            return None
        return expected_calibration_error(self.probabilities, self.y_true, ECE_BINS)

    @property
    def confidence_levels(self) -> list[dict] | None:
        """For each of CONFIDENCE_LEVELS: the share of faces whose top probability reaches it, and their accuracy."""
        if self.probabilities is None:
            return None
        return confidence_accuracy_table(self.probabilities, self.y_true, CONFIDENCE_LEVELS)

    @property
    def ece_summary(self) -> str | None:
        """One line on calibration, e.g. "ECE 0.0310 (15 bins) at temperature 1.4200; 0.0870 before (temperature 1)"."""
        if self.probabilities is None:
            return None
        line = f"ECE {self.ece:.4f} ({ECE_BINS} bins)"
        if self.ece_before_temperature is not None:
            line += f" at temperature {self.temperature:.4f}; {self.ece_before_temperature:.4f} before (temperature 1)"
        return line

    @property
    def model_label(self) -> str:
        """The model's name as --model takes it (a shipped model's, a run folder's, a file's; else the
        network's), with the file of a run other than its best.keras, its training epoch where known and
        its test-time augmentation when it used one."""
        from ferkit.predict import model_named_by

        named = model_named_by(self.model_version) if self.model_version else self.model
        name = Path(named).name
        # a run's other files than the best.keras that its name stands for: last.keras, an epoch's checkpoint
        file = self.model_version[len(named):].strip(" ()").split(",")[0] if self.model_version and named != self.model_version else ""
        details = ([file] if file and file != "best.keras" else []) + (
            [f"epoch {self.model_epoch}"] if self.model_epoch is not None else []) + ([f"{self.tta} TTA"] if self.tta != "none" else [])
        return f"{name} ({', '.join(details)})" if details else name

    @property
    def absent_classes(self) -> list[str]:
        """Classes of the model with no faces in the data (support 0)."""
        return [name for name, scores in self.per_class.items() if scores.support == 0]

    @property
    def never_predicted(self) -> list[str]:
        """Classes of the model it never predicted on the data (precision 0/0)."""
        predicted = self.confusion_matrix.sum(axis=0) > 0
        return [name for name, was in zip(self.classes, predicted) if not was]

    @property
    def absent_classes_note(self) -> str | None:
        """What the scores of classes absent from the data, or never predicted, mean, for the terminal and
        the HTML report; None when every class is in the data and predicted."""
        absent, notes = self.absent_classes, []
        predicted = self.confusion_matrix.sum(axis=0) > 0
        if absent:
            wrongly = [name for name in absent if predicted[self.classes.index(name)]]
            notes.append(f"no faces of {', '.join(absent)} in the data: recall is undefined there (shown as 0.000)")
            notes.append(f"faces wrongly predicted as {', '.join(wrongly)} count in macro-F1 with an F1 of 0" if wrongly
                         else "macro-F1 leaves out classes that are neither in the data nor predicted")
        never = [name for name in self.never_predicted if name not in absent]
        if never:
            notes.append(f"{', '.join(never)} never predicted: precision is undefined there (shown as 0.000)")
        return "; ".join(notes) or None

    @property
    def confusion_matrix_normalized(self) -> np.ndarray:
        """Rows divided by their totals: the diagonal is each class's recall (0 for an absent class)."""
        return normalize_rows(self.confusion_matrix)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "model_version": self.model_version,
            "model_epoch": self.model_epoch,
            "model_sha256": self.model_sha256,
            "tta": self.tta,
            "data": self.data,
            "data_path": _data_key(self.data) if self.data else "",  # as data is written, but from anywhere
            "samples": int(len(self.y_true)),
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "macro_precision": self.macro_precision,
            "macro_recall": self.macro_recall,
            "weighted_f1": self.weighted_f1,
            "per_class": {name: vars(s) for name, s in self.per_class.items()},
            "absent_classes": self.absent_classes,  # recall undefined (no faces), shown as 0
            "never_predicted": self.never_predicted,  # precision undefined, shown as 0
            "warnings": list(self.warnings),
            "classes": list(self.classes),
            "confusion_matrix": self.confusion_matrix.tolist(),
            "confusion_matrix_normalized": np.round(self.confusion_matrix_normalized, 6).tolist(),
            **self._calibration_dict(),
        }

    def _calibration_dict(self) -> dict:
        if self.probabilities is None:
            return {}
        bins = reliability_bins(self.probabilities, self.y_true, ECE_BINS)
        data = {"temperature": self.temperature, "ece": _rounded(self.ece), "ece_bins": ECE_BINS}
        if self.ece_before_temperature is not None:
            data["ece_before_temperature"] = _rounded(self.ece_before_temperature)
        data["confidence_levels"] = [
            {**row, "share": _rounded(row["share"]), "accuracy": _rounded(row["accuracy"])} for row in self.confidence_levels
        ]
        data["reliability"] = {  # per confidence bin; null confidence and accuracy for an empty bin
            "edges": [_rounded(v) for v in bins["edges"]],
            "count": bins["count"].tolist(),
            "confidence": [_rounded(v) for v in bins["confidence"]],
            "accuracy": [_rounded(v) for v in bins["accuracy"]],
        }
        return data

    def save(self, folder: str | Path, *, overwrite: bool = False) -> list[Path]:
        """Write metrics.json, per_class.csv, confusion_matrix.json, confusion_matrix.png,
        reliability_diagram.png (when the report has probabilities) and report.html into `folder`.

        A folder holding the report of another evaluation, or files of those names that no evaluation
        wrote, is refused unless `overwrite`; the report of this same evaluation is replaced."""
        from ferkit.plots import plot_confusion_matrix, plot_reliability_diagram

        if not overwrite or Path(folder).is_file():
            check_report_folder(folder, self.model, self.data, self.tta, self.model_version, self.model_sha256)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        metrics = {k: v for k, v in data.items() if not k.startswith("confusion")}
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        matrix = {k: data[k] for k in ("classes", "confusion_matrix", "confusion_matrix_normalized")}
        (folder / "confusion_matrix.json").write_text(json.dumps(matrix, indent=2) + "\n")
        with open(folder / "per_class.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["class", "precision", "recall", "f1", "support"])
            for name, s in self.per_class.items():
                writer.writerow([name, f"{s.precision:.4f}", f"{s.recall:.4f}", f"{s.f1:.4f}", s.support])
        title = f"{self.model_label} on {self.data}: accuracy {self.accuracy:.3f}"
        plot_confusion_matrix(self.confusion_matrix, self.classes, folder / "confusion_matrix.png", title=title)
        names = ["metrics.json", "per_class.csv", "confusion_matrix.json", "confusion_matrix.png"]
        reliability = None
        if self.probabilities is not None:
            reliability = "reliability_diagram.png"
            plot_reliability_diagram(reliability_bins(self.probabilities, self.y_true, ECE_BINS), folder / reliability,
                                     title=f"{self.model_label} on {self.data}\n{self.ece_summary}")
            names.append(reliability)
        (folder / "report.html").write_text(self.to_html(image=folder / "confusion_matrix.png",
                                                         reliability_image=folder / reliability if reliability else None),
                                             encoding="utf-8")
        names.append("report.html")
        return [folder / n for n in names]

    def to_html(self, *, image: str | Path | None = None, reliability_image: str | Path | None = None) -> str:
        """A one-page report: headline scores, the per-class table, the confusion matrix and, with
        probabilities, calibration: ECE, accuracy above each confidence level, the reliability diagram.
        The pictures (PNG files) are embedded, so the page may be moved or mailed on its own."""
        from html import escape

        rows = "".join(
            f"<tr><td>{escape(name)}</td><td>{s.precision:.3f}</td><td>{s.recall:.3f}</td>"
            f"<td>{s.f1:.3f}</td><td>{s.support}</td></tr>"
            for name, s in self.per_class.items()
        )
        picture = f'<p><img src="{_data_url(image)}" alt="confusion matrix" style="max-width:100%"></p>' if image else ""
        return (
            "<!doctype html><meta charset='utf-8'><title>ferkit evaluation</title>"
            "<style>body{font-family:sans-serif;margin:2em}td,th{padding:.2em .8em;text-align:right}"
            "td:first-child,th:first-child{text-align:left}</style>"
            f"<h1>{escape(self.model_label)} on {escape(self.data)}</h1>"
            f"<p>accuracy <b>{self.accuracy:.4f}</b>, macro-F1 <b>{self.macro_f1:.4f}</b>, {len(self.y_true)} faces</p>"
            + "".join(f"<p><b>Warning:</b> {escape(warning)}</p>" for warning in self.warnings) +
            "<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
            f"{rows}</table>{f'<p>Note: {escape(note)}.</p>' if (note := self.absent_classes_note) else ''}{picture}{self._calibration_html(reliability_image)}\n"
        )

    def _calibration_html(self, image: str | Path | None) -> str:
        from html import escape

        if self.probabilities is None:
            return ""
        rows = "".join(
            f"<tr><td>{row['confidence']:.1f}</td><td>{row['share']:.1%}</td><td>{row['faces']}</td>"
            f"<td>{'—' if row['accuracy'] is None else format(row['accuracy'], '.3f')}</td></tr>"
            for row in self.confidence_levels
        )
        picture = (f'<p><img src="{_data_url(image)}" alt="reliability diagram" style="max-width:100%"></p>'
                   if image else "")
        return (
            f"<h2>Confidence</h2><p>{escape(self.ece_summary)}: the gap between confidence and accuracy, "
            "averaged over the faces (0 is perfectly calibrated)</p>"
            "<table><tr><th>confidence at least</th><th>share of faces</th><th>faces</th><th>their accuracy</th></tr>"
            f"{rows}</table>{picture}"
        )


def _data_url(png: str | Path) -> str:
    """A PNG file as a data: URL, for a page that holds its pictures."""
    import base64

    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode()


def _rounded(value: float | None) -> float | None:
    """`value` rounded to 6 decimals for JSON; None for None or NaN (JSON has no NaN)."""
    return None if value is None or np.isnan(value) else round(float(value), 6)


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its total; rows that sum to zero stay zero."""
    matrix = np.asarray(matrix)
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)


def default_report_folder(model: str | Path | None, data: str | Path, evaluation: tuple[str, ...], *,
                          usage: str | None = "PublicTest", tta: str | None = None) -> Path:
    """Where `ferkit evaluate` puts the reports of `model` (as given: a run folder, model file, shipped
    model's name or None) on `data` without --out: eval-DATA in a run folder, eval-MODEL-DATA beside a model
    file, runs/eval-MODEL-DATA for a shipped model (DATA: the folder's name, or NAME-USAGE for a CSV (NAME for
    one without a Usage column), and
    -TTA when one is asked for); -2, -3, ... when that folder holds another `evaluation`'s reports
    ((model name, data source, tta, model version, model file's SHA-256), as check_report_folder takes them)."""
    model_path, given, data = resolve_model_path(model), Path(model or "."), Path(data)
    named = Path(os.path.realpath(data))  # "." and "/data/" have names too
    name = (named.name if data.is_dir() else named.stem + (f"-{usage}" if usage else "")) + (f"-{tta}" if tta else "")
    stem = f"{model_path.stem}{'-onnx' if model_path.suffix.lower() == '.onnx' else ''}"
    if model_path.parent.name == "weights" and model_path.parent.parent.name == "ferkit":
        folder = Path("runs") / f"eval-{stem}-{name}"  # never write into the installed package
    elif given.is_dir():
        folder = given / f"eval-{name}"
    else:  # a --save-period checkpoint's reports go into its run folder, beside the others
        folder = run_folder_of(model_path) / f"eval-{stem}-{name}"
    candidate, number = folder, 1
    while not report_folder_accepts(candidate, *evaluation):
        number += 1
        candidate = folder.with_name(f"{folder.name}-{number}")
    return candidate


def report_folder_accepts(folder: str | Path, model: str, data: str, tta: str, version: str = "",
                          sha256: str = "") -> bool:
    """Whether `folder` is new, holds no report files, or holds the report of this same evaluation (the
    model's name, version and file, the data's source and the test-time augmentation), which a new one
    may replace. A report without a version or file digest (written by an older ferkit) is matched
    without them."""
    earlier = _earlier_evaluation(folder)
    if Path(folder).is_file() or earlier == "unknown":
        return False
    if earlier is None:
        return True
    name, earlier_data, earlier_tta, earlier_version, earlier_sha256, data_path = earlier
    same_version = not (earlier_version and version) or earlier_version == version
    same_file = not (earlier_sha256 and sha256) or earlier_sha256 == sha256
    return same_version and same_file and (name, data_path or _data_key(earlier_data), earlier_tta) == (
        model, _data_key(data), tta)


def _data_key(data: str) -> str:
    """A dataset's source, the same however its path was written ("val", "./val", "/home/me/val"); a CSV's
    source is "PATH (ROWS)"."""
    path, rows = data.rsplit(" (", 1) if data.endswith(")") and " (" in data else (data, None)
    return os.path.realpath(path) + (f" ({rows}" if rows else "")


def check_report_folder(folder: str | Path, model: str, data: str, tta: str, version: str = "", sha256: str = "") -> None:
    """Refuse (FerkitError) a `folder` that report_folder_accepts does not: a file, the report of another
    evaluation, or files of the report's names that no evaluation wrote."""
    if Path(folder).is_file():
        raise FerkitError(f"{folder} is a file; give a folder for the reports")
    if not report_folder_accepts(folder, model, data, tta, version, sha256):
        raise FerkitError(f"{folder} holds {_describe_report_folder(folder)}; pass --overwrite to replace it "
                          "(in Python, overwrite=True), or choose another --out")


def _earlier_evaluation(folder: str | Path) -> tuple[str, str, str, str, str, str] | str | None:
    """What the report files in `folder` are of: (model, data, tta, version, model file's SHA-256, data's
    real path) from its metrics.json ("" where an older report lacks them); "unknown" when report files
    are there without a readable metrics.json; None when there are none."""
    folder = Path(folder)
    if not any((folder / name).exists() for name in REPORT_FILES):
        return None
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
        return (metrics["model"], metrics["data"], metrics.get("tta", "none"), metrics.get("model_version", ""),
                metrics.get("model_sha256", ""), metrics.get("data_path", ""))
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def _describe_report_folder(folder: str | Path) -> str:
    """For messages: "the evaluation of MODEL on DATA", or that the files are not a ferkit evaluation's."""
    earlier = _earlier_evaluation(folder)
    if isinstance(earlier, tuple):
        model, data, tta, version = earlier[:4]
        which = f" {version}" if version and version != model else ""
        return f"the evaluation of {model}{which}{'' if tta == 'none' else f' ({tta} TTA)'} on {data}"
    return "files that are not a ferkit evaluation"


def evaluate(
    model: str | Path | Classifier | None, dataset: FaceDataset | str | Path, *, batch_size: int = 256,
    tta: str | None = None, progress: Callable[[int, int], None] | None = None,
) -> EvaluationReport:
    """Classify every face of `dataset` with `model` (a run, model file or shipped model's name; None: the
    default shipped model) and score the predictions. `dataset` may be a path, which `load_dataset` reads
    at the model's input size (a FER2013 CSV: its PublicTest rows).

    `tta`: "none", "flip" or "tencrop" overrides the test-time augmentation the model file asks for.
    The probabilities are scored with the model's temperature; a model whose temperature is not 1 is also
    scored at temperature 1 (`ece_before_temperature`), from the same run of the network.
    `progress(faces_classified, faces)` as the faces are classified.
    """
    for module in ("sklearn", "matplotlib"):  # before minutes of inference, not after
        require(module, "ferkit evaluate")
    classifier = load_classifier(model).with_tta(tta)
    if not isinstance(dataset, (str, Path, FaceDataset)):
        raise FerkitError(f"evaluate scores labelled faces: a FaceDataset (ferkit.data.load_dataset) or the path of "
                          f"one, not a {type(dataset).__name__}")
    if isinstance(dataset, (str, Path)):
        from ferkit.data import load_dataset

        dataset = load_dataset(dataset, classes=classifier.classes, image_size=classifier.input_size, usage="PublicTest")
    if len(dataset) == 0:
        raise FerkitError(f"{dataset.source or 'the dataset'} holds no faces to score")
    if tuple(dataset.image_size) != tuple(classifier.input_size):  # load_dataset's 48x48 for a 96x96 network, say
        from ferkit.images import resized_faces

        dataset = dataclasses.replace(dataset, images=resized_faces(dataset.images, classifier.input_size))
    y_true = dataset.labels_for(classifier.classes)  # before minutes of inference, not after
    temperatures = [classifier.temperature] if classifier.temperature == 1.0 else [classifier.temperature, 1.0]
    outputs = classifier.predict_proba_at_temperatures(dataset.images, temperatures, batch_size=batch_size,
                                                       progress=progress)
    probabilities = outputs[0]
    y_pred = probabilities.argmax(axis=1)
    before = expected_calibration_error(outputs[1], y_true, ECE_BINS) if len(outputs) > 1 else None
    report = score_predictions(
        y_true, y_pred, classifier.classes, model=classifier.name, data=dataset.source, tta=classifier.tta,
        probabilities=probabilities, temperature=classifier.temperature, ece_before_temperature=before,
    )
    from ferkit.predict import model_version

    report.model_version = model_version(classifier)
    report.model_sha256 = classifier.sha256
    if dataset.skipped:
        report.warnings.append(f"{len(dataset.skipped)} unreadable file(s) of {dataset.source} were skipped, "
                               f"e.g. {dataset.skipped[0][0]} ({dataset.skipped[0][1]})")
    epoch = classifier.metadata.extra.get("epoch")
    report.model_epoch = int(epoch) if isinstance(epoch, (int, float)) else None
    return report


def score_predictions(
    y_true, y_pred, classes, *, model: str = "", data: str = "", tta: str = "none",
    probabilities: np.ndarray | None = None, temperature: float = 1.0, ece_before_temperature: float | None = None,
) -> EvaluationReport:
    """The report for given true and predicted class indices (both indexing `classes`); with the
    `probabilities` (N, classes) they came from, calibration too (ECE, confidence levels, reliability)."""
    metrics = require("sklearn.metrics", "scoring predictions")
    accuracy_score, confusion_matrix, f1_score = metrics.accuracy_score, metrics.confusion_matrix, metrics.f1_score
    precision_recall_fscore_support = metrics.precision_recall_fscore_support

    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    per_class = {
        name: ClassScores(float(p), float(r), float(f), int(s))
        for name, p, r, f, s in zip(classes, precision, recall, f1, support)
    }
    return EvaluationReport(
        model=model,
        data=data,
        classes=tuple(classes),
        accuracy=float(accuracy_score(y_true, y_pred)),
        macro_f1=float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        macro_precision=float(metrics.precision_score(y_true, y_pred, average="macro", zero_division=0)),
        macro_recall=float(metrics.recall_score(y_true, y_pred, average="macro", zero_division=0)),
        weighted_f1=float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
        per_class=per_class,
        confusion_matrix=confusion_matrix(y_true, y_pred, labels=labels),
        y_true=np.asarray(y_true),
        y_pred=np.asarray(y_pred),
        tta=tta,
        probabilities=None if probabilities is None else np.asarray(probabilities),
        temperature=temperature,
        ece_before_temperature=ece_before_temperature,
    )
