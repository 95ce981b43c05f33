"""Reproduce the founding study on FER2013: seed-cnn for 30 epochs without and with flip+zoom.

    python benchmarks/reproduce_study.py --data ../shared/data/fer2013 --epochs 30

Prints, per run: best and last val accuracy, last train accuracy, the train-val gap and seconds per
epoch; copies the curve plots and the first run's confusion matrix into docs/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from ferkit.config import TrainConfig
from ferkit.data import load_dataset
from ferkit.evaluate import evaluate
from ferkit.runs import RunState, read_history
from ferkit.train import train

RUNS = {"seed-cnn": [], "seed-cnn-flip-zoom": ["flip", "zoom"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/fer2013", help="folder with train/ and val/")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--runs", default="runs/study", help="where the run folders go")
    parser.add_argument("--docs", default="docs", help="where the figures are copied")
    parser.add_argument("--resume", action="store_true", help="continue runs that were stopped")
    args = parser.parse_args()

    data = Path(args.data)
    summary = {}
    for name, augment in RUNS.items():
        run = Path(args.runs) / name
        config = TrainConfig(
            model="seed-cnn", data=str(data / "train"), val=str(data / "val"), epochs=args.epochs,
            augment=augment, out=str(run),
        )
        resume = args.resume and (run / "config.json").exists()
        train(config, resume=resume, overwrite=not resume, verbose=2)
        summary[name] = _summarise(run)
        shutil.copy(run / "curves.png", Path(args.docs) / f"curves-{name}.png")

    first = Path(args.runs) / "seed-cnn"
    val = load_dataset(data / "val")
    report = evaluate(first, val)
    report.save(first / "eval-val")
    shutil.copy(first / "eval-val" / "confusion_matrix.png", Path(args.docs) / "confusion-seed-cnn.png")
    summary["seed-cnn"]["best_model_val"] = {"accuracy": report.accuracy, "macro_f1": report.macro_f1}
    print(json.dumps(summary, indent=2))


def _summarise(run: Path) -> dict:
    history = read_history(run / "history.csv")
    state = RunState.load(run)
    seconds = history["seconds"][1:] or history["seconds"]  # the first epoch includes graph tracing
    return {
        "epochs": state.epochs_done,
        "best_val_accuracy": round(state.best_val_accuracy, 4),
        "best_epoch": state.best_epoch,
        "last_val_accuracy": round(history["val_accuracy"][-1], 4),
        "last_train_accuracy": round(history["accuracy"][-1], 4),
        "last_train_minus_val": round(history["accuracy"][-1] - history["val_accuracy"][-1], 4),
        "median_seconds_per_epoch": round(statistics.median(seconds), 1),
    }


if __name__ == "__main__":
    main()
