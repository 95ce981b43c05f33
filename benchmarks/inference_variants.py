"""What batch-norm recalibration, int8 quantization and flip test-time averaging do to a trained
model's accuracy and speed.

    python benchmarks/inference_variants.py runs/ferkit-net-s-v1 --val ../shared/data/fer2013/val \
        --baseline runs/study/seed-cnn
    python benchmarks/inference_variants.py runs/ferkit-net-s-v1 runs/ferkit-net-s-v2 --val ...

Exports RUN (or the ensemble of several runs, as `ferkit ensemble` makes it) to ONNX as float32, as
float32 with batch-norm statistics re-measured on the (first) run's un-augmented training data, and as
that quantized to int8 (calibrated on the same data); scores each with one view and with flip averaging
on --val, and times each on this machine (batch of 256 and one face). The baseline (a run or model,
e.g. the study's seed-cnn) is timed in the same run, one view, for ratios.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ferkit.ensemble import ensemble_models
from ferkit.evaluation import evaluate
from ferkit.export import calibration_faces, export_onnx, temperature_faces
from ferkit.runtime import classifier_speed, load_classifier
from _common import check_exists, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+",
                        help="a run folder (its config.json names the training data), or several: their ensemble")
    parser.add_argument("--val", required=True, help="labelled faces to score on")
    parser.add_argument("--baseline", help="a run or model timed the same way (float32 ONNX), for ratios")
    args = parser.parse_args()
    for path in args.runs:
        check_exists(parser, path, "run")
    check_exists(parser, args.val, "--val")

    with tempfile.TemporaryDirectory() as tmp:
        model = args.runs[0] if len(args.runs) == 1 else ensemble_models(args.runs, Path(tmp) / "ensemble.keras")
        # the run's training faces calibrate (a CSV's Training rows), --val's score (its PublicTest rows),
        # both at the model's input size and classes
        val = temperature_faces(model, args.val)
        training = calibration_faces(args.runs[0])
        models = {
            "float32": export_onnx(model, Path(tmp) / "float32.onnx"),
            "float32+bn": export_onnx(model, Path(tmp) / "bn.onnx", calibration=training, recalibrate_bn=True),
            "int8+bn": export_onnx(model, Path(tmp) / "int8.onnx", calibration=training, recalibrate_bn=True, int8=True),
        }
        baseline = load_classifier(_as_onnx(args.baseline, Path(tmp))) if args.baseline else None
        base_rate = classifier_speed(baseline)["faces_per_second"] if baseline else None
        print(f"{'variant':<18} {'val accuracy':>12} {'macro-F1':>9} {'faces/s':>9} {'ms/face':>8}"
              + (f" {'ratio':>6}" if baseline else ""))
        for precision, path in models.items():
            for tta in ("none", "flip"):
                classifier = load_classifier(path).with_tta(tta)
                report = evaluate(classifier, val)
                speed = classifier_speed(classifier)
                rate, one = speed["faces_per_second"], speed["ms_per_face"]
                ratio = f" {rate / base_rate:>6.3f}" if baseline else ""
                print(f"{precision + ' ' + tta:<18} {report.accuracy:>12.4f} {report.macro_f1:>9.4f} "
                      f"{rate:>9,.0f} {one:>8.2f}{ratio}")
        if baseline:
            print(f"baseline {baseline.name}: {base_rate:,.0f} faces/s (float32, one view)")


def _as_onnx(model: str, folder: Path) -> Path:
    path = Path(model)
    if path.suffix == ".onnx":
        return path
    return export_onnx(path, folder / "baseline.onnx")


if __name__ == "__main__":
    run(main)
