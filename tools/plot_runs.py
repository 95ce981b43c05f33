"""Compare training runs: validation accuracy per epoch of each run folder in one plot, and each run's
best and last epoch printed as a Markdown table (what the model card quotes).

    python tools/plot_runs.py training/ferkit-net-l-v1 training/ferkit-resnet18-h-v1 \
        training/ferkit-net-l-distilled-v1 --line "teacher=0.6994" --line "target=0.73" --out docs/campaign.png
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ferkit.errors import FerkitError
from ferkit.plots import _plain_text, _pyplot, _save
from ferkit.results import check_replaceable
from ferkit.runs import read_history as read_run_history


def read_history(run: Path) -> dict[str, list[float]]:
    """The run's history.csv as columns of numbers (epoch, accuracy, val_accuracy, ...; NaN where a cell is empty)."""
    path = run / "history.csv"
    if not path.is_file():
        raise SystemExit(f"error: {run} has no history.csv; give ferkit run folders")
    try:
        history = read_run_history(path)
    except FerkitError as err:
        raise SystemExit(f"error: {err}") from None
    if not _epochs_with(history["val_accuracy"]):
        raise SystemExit(f"error: {path} has no val_accuracy column: the run had no validation data")
    return history


def _epochs_with(values: list[float]) -> list[int]:
    """The indices of the epochs with a value (a cell left empty reads as NaN)."""
    return [i for i, value in enumerate(values) if not math.isnan(value)]


def summary_table(histories: dict[str, dict[str, list[float]]]) -> str:
    lines = ["| run | epochs | best val accuracy (epoch) | last val accuracy |", "|---|---|---|---|"]
    for name, history in histories.items():
        val, scored = history["val_accuracy"], _epochs_with(history["val_accuracy"])
        best = max(scored, key=val.__getitem__)
        lines.append(f"| {name} | {int(history['epoch'][-1])} | {val[best]:.4f} ({int(history['epoch'][best])}) | "
                     f"{val[scored[-1]]:.4f} |")
    return "\n".join(lines)


@_plain_text
def plot_runs(histories: dict[str, dict[str, list[float]]], lines: dict[str, float], path: Path, *,
              ymin: float | None = None) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5), constrained_layout=True)
    for name, history in histories.items():
        ax.plot(history["epoch"], history["val_accuracy"], label=name, linewidth=1.2)
    for name, value in lines.items():
        ax.axhline(value, linestyle="--", linewidth=0.9, color="grey")
        ax.annotate(f"{name} {value:.2%}", (1, value), xycoords=("axes fraction", "data"), ha="right", va="bottom",
                    fontsize=8, color="dimgrey")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (one view)")
    if ymin is not None:  # the first epochs' climb would squeeze the last points' differences flat
        highest = [max(h["val_accuracy"][i] for i in _epochs_with(h["val_accuracy"])) for h in histories.values()]
        ax.set_ylim(bottom=ymin, top=max([*lines.values(), *highest]) + 0.01)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def _line(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    try:
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=ACCURACY (teacher=0.6994), not {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with its history.csv)")
    parser.add_argument("--line", type=_line, action="append", default=[], metavar="NAME=ACCURACY",
                        help="a horizontal reference line, e.g. the teacher's or the target's accuracy")
    parser.add_argument("--ymin", type=float, help="the lowest accuracy shown (e.g. 0.6: the first epochs' climb is cut off)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a PNG there that this tool did not draw")
    args = parser.parse_args(argv)
    if args.out.suffix.lower() != ".png" or not args.out.parent.resolve().is_dir():
        parser.error(f"--out {args.out}: give a .png file in a folder that exists")
    try:
        check_replaceable([args.out], overwrite=args.overwrite)
    except FerkitError as err:
        parser.error(str(err))
    names = [run.resolve().name for run in args.runs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        parser.error(f"two runs of one folder name ({', '.join(twice)}): the plot and table name runs by their folders")
    histories = {name: read_history(run) for name, run in zip(names, args.runs)}
    below = [name for name, history in histories.items()
             if args.ymin is not None and all(history["val_accuracy"][i] < args.ymin for i in _epochs_with(history["val_accuracy"]))]
    if below:
        print(f"warning: --ymin {args.ymin} is above every epoch of {', '.join(below)}: not drawn", file=sys.stderr)
    plot_runs(histories, dict(args.line), args.out, ymin=args.ymin)
    print(summary_table(histories))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
