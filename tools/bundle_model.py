"""Ship a run's best model (or the ensemble of several runs' best models) inside ferkit: export it to
ONNX under src/ferkit/weights/ and record its SHA-256, each run's config, the validation score and the
speed in manifest.json, beside the models already shipped. `--model NAME` then picks it by name and
`ferkit models` lists it; `--default` makes it the model used when none is named.

    python tools/bundle_model.py runs/ferkit-net-s-v1 --val ../shared/data/fer2013/val \
        --recalibrate-bn --int8 --tta flip --speed --default
    python tools/bundle_model.py runs/a runs/b --name ab --val ... # the mean of both models' probabilities
    python tools/bundle_model.py --remove ab                       # ship it no more

With --val, the exported ONNX model itself is scored there, as shipped and with a single view; the
scores are recorded and printed as a table for the model card (--report DIR keeps the evaluation's
files). Training-time scores differ: mixed-precision validation, batch-norm statistics from training.
--speed times it here (faces/s in batches of 256, ms for one face) and records the machine with it.
--recalibrate-bn and --int8 calibrate on the (first) run's training data (its config.json names it).
--temperature-data DATA fits the temperature that calibrates the model's confidence on those held-out
labelled faces (not the training data; a FER2013 CSV gives its PublicTest rows) and ships it in the model.
The same faces as --val then score a calibration fitted on them: optimistic; prefer other held-out faces.
The Keras file shipped beside each ONNX one, what `ferkit train --init NAME` starts from, is the best
single run's model.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

from ferkit.ensemble import ensemble_models
from ferkit.errors import FerkitError
from ferkit.export import calibration_faces, export_onnx, temperature_faces
from ferkit.runs import RunState
from ferkit.runtime import (
    MANIFEST,
    TTA_CHOICES,
    OnnxClassifier,
    classifier_speed,
    read_metadata,
    resolve_model_path,
    sha256_of,
)

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "ferkit" / "weights"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="*", help="a run folder, or several to bundle their ensemble")
    parser.add_argument("--name", help="file name without .onnx (default: the run folder's name; needed for several)")
    parser.add_argument("--default", action="store_true", help="make it the model used when none is named")
    parser.add_argument("--remove", metavar="NAME", help="ship the model NAME no more (not the default one)")
    parser.add_argument("--set-default", metavar="NAME", help="make the shipped model NAME the default")
    parser.add_argument("--val", help="validation data to score the exported model on")
    parser.add_argument("--speed", action="store_true", help="time the exported model here and record it")
    parser.add_argument("--recalibrate-bn", action="store_true",
                        help="re-measure batch-norm statistics on the run's un-augmented training data")
    parser.add_argument("--int8", action="store_true", help="quantize to int8, calibrated on the run's training data")
    parser.add_argument("--tta", choices=TTA_CHOICES, default="none", help="the test-time augmentation to ship with")
    parser.add_argument("--temperature-data",
                        help="held-out labelled faces to fit the confidence-calibrating temperature on")
    parser.add_argument("--report", type=Path, help="with --val: write the evaluation's files (JSON, CSV, PNG, HTML) here")
    parser.add_argument("--replace", action="store_true", help="replace the shipped model of that name")
    parser.add_argument("--weights-dir", type=Path, default=WEIGHTS, help=argparse.SUPPRESS)  # for tests
    args = parser.parse_args()
    manifest = _read_manifest(args.weights_dir)
    if args.remove or args.set_default:
        if args.runs or (args.remove and args.set_default):
            parser.error("--remove and --set-default take one shipped model's name and nothing else")
        name = args.remove or args.set_default
        if name not in manifest["models"]:
            raise SystemExit(f"ferkit ships no model named {name!r} (it ships {', '.join(manifest['models']) or 'none'})")
        return _remove(manifest, name, args.weights_dir) if args.remove else _set_default(manifest, name, args.weights_dir)
    if not args.runs:
        parser.error("give the run folder(s) to bundle, or --remove NAME, or --set-default NAME")
    if len(args.runs) > 1 and not args.name:
        parser.error("--name is needed to bundle several runs")
    name = args.name or args.runs[0].name
    if name == "default" or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.endswith(".onnx"):
        parser.error(f"--name {name!r}: use letters, digits, '-', '_' and '.', not 'default', without .onnx")
    for option, data in (("--val", args.val), ("--temperature-data", args.temperature_data)):
        if data and not Path(data).exists():  # said before minutes of export, not after
            raise FerkitError(f"{option} {data}: no such file or folder")
    if args.report and args.report.exists() and (not args.report.is_dir() or any(args.report.iterdir())):
        raise FerkitError(f"--report {args.report} is not an empty folder: give a new one")
    if name in manifest["models"] and not args.replace:
        runs = ", ".join(member["run"] for member in manifest["models"][name].get("members", []))
        raise FerkitError(f"ferkit ships a model named {name} already (of {runs or 'another run'}): --replace replaces it")
    bundle(args, manifest, name)


def run_main() -> None:
    """main, with ferkit's one-line errors (exit 2) instead of tracebacks."""
    try:
        main()
    except FerkitError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def bundle(args, manifest: dict, name: str) -> None:
    """Export, score and time the model in a staging folder; only then replace the shipped files and
    write the manifest, so a failure leaves every shipped model as it was."""
    members = [_member(run) for run in args.runs]
    best = max(members, key=lambda member: member["val_accuracy_during_training"])
    best_keras = Path(best["path"]) / "best.keras"  # the best single network: what `train --init NAME` starts from
    keras_file, keras_sha256 = f"{best['run']}.keras", sha256_of(best_keras)
    _check_keras_file_free(manifest, name, keras_file, keras_sha256)
    # the first run's own config: the manifest's copy keeps only the last two parts of each path
    calibration = calibration_faces(args.runs[0]) if args.int8 or args.recalibrate_bn else None
    held_out = temperature_faces(args.runs[0], args.temperature_data) if args.temperature_data else None
    val_faces = temperature_faces(args.runs[0], args.val) if args.val else None  # read before minutes of export
    with tempfile.TemporaryDirectory(dir=args.weights_dir, prefix=".staging-") as staging:
        staged = Path(staging) / f"{name}.onnx"
        source = args.runs[0] if len(args.runs) == 1 else ensemble_models(args.runs, Path(staging) / f"{name}.keras")
        export_onnx(source, staged, overwrite=True, calibration=calibration, int8=args.int8,
                    recalibrate_bn=args.recalibrate_bn, tta=args.tta, temperature_data=held_out)
        meta = read_metadata(staged)
        entry = {
            "file": staged.name,
            "sha256": sha256_of(staged),
            "keras_file": keras_file,
            "keras_sha256": keras_sha256,
            "keras_file_run": best["run"],
            "model": meta.model,
            "classes": meta.classes,
            "tta": meta.tta,
            "batch_norm_recalibrated": meta.extra.get("batch_norm_recalibrated"),
            "int8": meta.extra.get("int8"),
            "temperature": meta.temperature,
            "temperature_fit": meta.extra.get("temperature"),
            "val_accuracy_during_training": best["val_accuracy_during_training"],  # the best single run's
            **(_score(staged, val_faces, args.val, args.report) if args.val else {}),
            **({"speed": classifier_speed(OnnxClassifier(staged))} if args.speed else {}),
            "members": [{key: value for key, value in member.items() if key != "path"} for member in members],
        }
        shutil.copy(best_keras, Path(staging) / keras_file)
        old_entry = manifest["models"].pop(name, None)
        staged.replace(args.weights_dir / staged.name)
        (Path(staging) / keras_file).replace(args.weights_dir / keras_file)
    manifest["models"][name] = entry
    if args.default or not manifest.get("default"):
        manifest["default"] = name
    if old_entry:
        _delete_unused_files(manifest, old_entry, args.weights_dir)
    _write_manifest(manifest, args.weights_dir)
    size = (args.weights_dir / entry["file"]).stat().st_size / 1e6
    role = "the default model" if manifest["default"] == name else f"beside the default {manifest['default']}"
    print(f"shipped {name} ({size:.1f} MB, sha256 {entry['sha256'][:16]}...), {role}")
    if entry["temperature_fit"]:
        fit, unseen = entry["temperature_fit"], entry["temperature_fit"]["held_out"]
        print(f"temperature {entry['temperature']:.3f}: ECE {fit['ece_before']:.4f} -> {fit['ece_after']:.4f} on the "
              f"{fit['faces']} faces it was fitted on, {unseen['ece_before']:.4f} -> {unseen['ece_after']:.4f} on "
              f"halves it was not fitted on (lower in {unseen['improved']:.0%} of {2 * unseen['splits']} fits)")


def _read_manifest(weights: Path) -> dict:
    path = weights / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {"default": None, "models": {}}


def _write_manifest(manifest: dict, weights: Path) -> None:
    tmp = weights / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(weights / MANIFEST)


def _remove(manifest: dict, name: str, weights: Path) -> None:
    if manifest["default"] == name:
        raise SystemExit(f"{name} is the default model: make another the default first (--set-default NAME)")
    entry = manifest["models"].pop(name)
    _delete_unused_files(manifest, entry, weights)
    _write_manifest(manifest, weights)
    print(f"removed {name}; ferkit ships {', '.join(manifest['models'])}")


def _set_default(manifest: dict, name: str, weights: Path) -> None:
    manifest["default"] = name
    _write_manifest(manifest, weights)
    print(f"{name} is now the default model")


def _check_keras_file_free(manifest: dict, name: str, keras_file: str, sha256: str) -> None:
    """Two shipped models may share a Keras file only if it is the same network."""
    for other, entry in manifest["models"].items():
        if other != name and entry.get("keras_file") == keras_file and entry.get("keras_sha256") != sha256:
            raise SystemExit(f"{keras_file} is already shipped with {other} and holds another network; "
                             "rename the run folder")


def _delete_unused_files(manifest: dict, entry: dict, weights: Path) -> None:
    """Delete the files of a replaced or removed entry that no shipped model uses any more."""
    in_use = {entry_file for kept in manifest["models"].values() for entry_file in (kept["file"], kept.get("keras_file"))}
    for old in (entry["file"], entry.get("keras_file")):
        if old and old not in in_use:
            (weights / old).unlink(missing_ok=True)


def _member(run: Path) -> dict:
    """What the manifest records of one run: its name, length, best epoch and score, and its config."""
    if not (run / "config.json").is_file() or not (run / "state.json").is_file():
        raise FerkitError(f"{run} is not a run folder of ferkit train (no config.json and state.json)")
    if not (run / "best.keras").is_file():
        resolve_model_path(run)  # says why: a packed run, a run stopped before its first epoch, ...
        raise FerkitError(f"{run} holds no best.keras, the network that is shipped")
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


def _score(model: Path, dataset, val: str, report_folder: Path | None) -> dict:
    """The exported model scored on the --val faces (read at its input size, with its classes; of a
    FER2013 CSV, the PublicTest rows)."""
    from ferkit.evaluation import evaluate

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
    run_main()
