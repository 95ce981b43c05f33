"""Make a run's best model (or the ensemble of several runs' best models) the one bundled with ferkit:
export it to ONNX under src/ferkit/weights/ and record its SHA-256, each run's config and the validation
score in manifest.json.

    python tools/bundle_model.py runs/ferkit-net-s-v1 --val ../shared/data/fer2013/val \
        --recalibrate-bn --int8 --tta flip
    python tools/bundle_model.py runs/a runs/b --name ab --val ... # the mean of both models' probabilities

With --val, the exported ONNX model itself is scored there, as shipped and with a single view; the
scores are recorded and printed as a table for the model card (--report DIR keeps the evaluation's
files). Training-time scores differ: mixed-precision validation, batch-norm statistics from training.
--recalibrate-bn and --int8 calibrate on the (first) run's training data (its config.json names it).
--temperature-data DATA fits the temperature that calibrates the model's confidence on those held-out
labelled faces (not the training data; a FER2013 CSV gives its PublicTest rows) and ships it in the model.
The same faces as --val then score a calibration fitted on them: optimistic; prefer other held-out faces.
The Keras file shipped beside the ONNX one, what `ferkit train --init default` starts from, is the best
single run's model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from ferkit.data import load_dataset
from ferkit.ensemble import ensemble_models
from ferkit.export import export_onnx
from ferkit.runs import RunState
from ferkit.runtime import TTA_CHOICES, read_metadata, sha256_of

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "ferkit" / "weights"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="a run folder, or several to bundle their ensemble")
    parser.add_argument("--name", help="file name without .onnx (default: the run folder's name; needed for several)")
    parser.add_argument("--val", help="validation data to score the exported model on")
    parser.add_argument("--recalibrate-bn", action="store_true",
                        help="re-measure batch-norm statistics on the run's un-augmented training data")
    parser.add_argument("--int8", action="store_true", help="quantize to int8, calibrated on the run's training data")
    parser.add_argument("--tta", choices=TTA_CHOICES, default="none", help="the test-time augmentation to ship with")
    parser.add_argument("--temperature-data",
                        help="held-out labelled faces to fit the confidence-calibrating temperature on")
    parser.add_argument("--report", type=Path, help="with --val: write the evaluation's files (JSON, CSV, PNG, HTML) here")
    args = parser.parse_args()
    if len(args.runs) > 1 and not args.name:
        parser.error("--name is needed to bundle several runs")
    members = [_member(run) for run in args.runs]
    calibration = load_dataset(members[0]["config"]["data"]) if args.int8 or args.recalibrate_bn else None
    held_out = _temperature_data(args.runs[0], args.temperature_data) if args.temperature_data else None
    name = args.name or args.runs[0].name
    target = WEIGHTS / f"{name}.onnx"
    staged = WEIGHTS / f".{name}.staged.onnx"  # the bundled files are replaced only once the export succeeded
    with tempfile.TemporaryDirectory() as scratch:
        source = args.runs[0] if len(args.runs) == 1 else ensemble_models(args.runs, Path(scratch) / f"{name}.keras")
        export_onnx(source, staged, overwrite=True, calibration=calibration, int8=args.int8,
                    recalibrate_bn=args.recalibrate_bn, tta=args.tta, temperature_data=held_out)
    for old in [*WEIGHTS.glob("*.onnx"), *WEIGHTS.glob("*.keras")]:
        if old != staged:
            old.unlink()
    staged.rename(target)
    best = max(members, key=lambda member: member["val_accuracy_during_training"])
    keras_file = WEIGHTS / f"{best['run']}.keras"  # the best single network: what `train --init default` starts from
    shutil.copy(Path(best["path"]) / "best.keras", keras_file)
    meta = read_metadata(target)
    manifest = {
        "file": target.name,
        "sha256": sha256_of(target),
        "keras_file": keras_file.name,
        "keras_sha256": sha256_of(keras_file),
        "keras_file_run": best["run"],
        "model": meta.model,
        "classes": meta.classes,
        "tta": meta.tta,
        "batch_norm_recalibrated": meta.extra.get("batch_norm_recalibrated"),
        "int8": meta.extra.get("int8"),
        "temperature": meta.temperature,
        "temperature_fit": meta.extra.get("temperature"),
        "val_accuracy_during_training": best["val_accuracy_during_training"],  # the best single run's
        **(_score(target, args.val, args.report) if args.val else {}),
        "members": [{key: value for key, value in member.items() if key != "path"} for member in members],
    }
    (WEIGHTS / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"bundled {target} ({target.stat().st_size / 1e6:.1f} MB), sha256 {manifest['sha256'][:16]}...")


def _member(run: Path) -> dict:
    """What the manifest records of one run: its name, length, best epoch and score, and its config."""
    state = RunState.load(run)
    return {"run": run.name, "path": str(run), "epochs": state.epochs_done, "best_epoch": state.best_epoch,
            "val_accuracy_during_training": round(state.best_val_accuracy, 4),
            "config": portable_config(json.loads((run / "config.json").read_text()))}


def portable_config(config: dict) -> dict:
    """A run's config without the paths of the machine it ran on: data folders and files keep their
    last two parts (e.g. fer2013/train), which is what identifies them."""
    paths = ("data", "val", "out", "init", "teacher", "weights")
    return {key: "/".join(Path(value).parts[-2:]) if key in paths and isinstance(value, str) and "/" in value else value
            for key, value in config.items()}


def _temperature_data(run: Path, data: str):
    """The faces to fit the temperature on, with the (first) run's classes and input size."""
    meta = read_metadata(run)
    return load_dataset(data, classes=meta.classes, image_size=tuple(meta.input_size), usage="PublicTest")


def _score(model: Path, val: str, report_folder: Path | None) -> dict:
    from ferkit.evaluate import evaluate

    dataset = load_dataset(val)
    report, single_view = evaluate(model, dataset), evaluate(model, dataset, tta="none")
    if report_folder:
        report.save(report_folder)
    print(f"{report.model_label} on {Path(val).name}: accuracy {report.accuracy:.4f}, macro-F1 {report.macro_f1:.4f}; "
          f"one view {single_view.accuracy:.4f}; {report.ece_summary}")
    print("| class | precision | recall | F1 | support |\n|---|---|---|---|---|")
    for name, scores in report.per_class.items():
        print(f"| {name} | {scores.precision:.3f} | {scores.recall:.3f} | {scores.f1:.3f} | {scores.support} |")
    return {"val_data": Path(val).name, "val_accuracy": report.accuracy, "val_macro_f1": report.macro_f1,
            "val_recall": {name: scores.recall for name, scores in report.per_class.items()},
            "val_accuracy_single_view": single_view.accuracy, "val_ece": report.ece}


if __name__ == "__main__":
    main()
