"""Seconds per epoch of whole `ferkit train` runs, this checkout against another revision, in one run.

    python benchmarks/pipeline_time.py --before b4b2661 --models seed-cnn,ferkit-net-s \
        --data ../shared/data/fer2013/train --val ../shared/data/fer2013/val

The revision is checked out into a temporary git worktree and run with this environment's packages.
Runs alternate (before, after, after, before, ...) so that drift in the machine's speed falls on both;
each trains `--epochs` epochs and the seconds of the epochs after the first (which pays for graph
tracing) are read from its history.csv. Prints the median per model and version and the ratio
after / before.

`--side-by-side` runs each pair at once instead, each version pinned to its own core (`taskset`), and
swaps the cores for the next pair: both versions then see the same machine at the same moments, which
on a machine whose speed drifts by a quarter between runs is the only fair comparison.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_process(source: Path, model: str, data: str, val: str, epochs: int, out: Path,
                  core: int | None = None) -> subprocess.Popen:
    """`ferkit train` from the source tree `source`, started; pinned to one core if `core` is given."""
    env = {**os.environ, "PYTHONPATH": str(source / "src")}
    command = [sys.executable, "-m", "ferkit.cli", "train", "--model", model, "--data", data, "--val", val,
               "--epochs", str(epochs), "--out", str(out)]
    if core is not None:
        command = ["taskset", "-c", str(core), *command]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finished_epoch_seconds(process: subprocess.Popen, out: Path) -> list[float]:
    """Wait for a `train_process`; the seconds of its epochs after the first."""
    _, errors = process.communicate()
    if process.returncode:
        raise SystemExit(f"ferkit train failed:\n{errors.decode(errors='replace')}")
    with open(out / "history.csv", newline="") as handle:
        return [float(row["seconds"]) for row in csv.DictReader(handle)][1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the git revision to compare against")
    parser.add_argument("--models", default="seed-cnn,ferkit-net-s")
    parser.add_argument("--data", required=True)
    parser.add_argument("--val", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--pairs", default="2,1", help="before/after pairs per model, in the order of --models")
    parser.add_argument("--side-by-side", action="store_true",
                        help="run each pair at once, one version per core, swapping cores between pairs")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch (graph tracing) is left out")
    models = args.models.split(",")
    pairs = [int(n) for n in args.pairs.split(",")] + [1] * len(models)
    with tempfile.TemporaryDirectory(prefix="ferkit-before-") as scratch:
        before = Path(scratch) / "tree"
        added = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before],
                               capture_output=True, text=True)
        if added.returncode:
            raise SystemExit(f"error: --before {args.before}: {added.stderr.strip().splitlines()[-1]}")
        try:
            for model, count in zip(models, pairs):
                seconds = {"before": [], "after": []}
                order = [("before", "after") if i % 2 == 0 else ("after", "before") for i in range(count)]
                for i, versions in enumerate(order):
                    runs = [(v, Path(scratch) / f"{model}-{v}-{i}") for v in versions]
                    started = []
                    for core, (version, out) in enumerate(runs):
                        tree = before if version == "before" else ROOT
                        process = train_process(tree, model, args.data, args.val, args.epochs, out,
                                                core if args.side_by_side else None)
                        if not args.side_by_side:
                            seconds[version] += finished_epoch_seconds(process, out)
                            print(f"{model:14s} {version:6s} {seconds[version][-args.epochs + 1:]}", flush=True)
                        else:
                            started.append((version, out, process, core))
                    for version, out, process, core in started:
                        seconds[version] += finished_epoch_seconds(process, out)
                        print(f"{model:14s} {version:6s} core {core} {seconds[version][-args.epochs + 1:]}", flush=True)
                b, a = statistics.median(seconds["before"]), statistics.median(seconds["after"])
                print(f"{model:14s} median s/epoch: before {b:.1f}, after {a:.1f}, after/before {a / b:.3f}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], capture_output=True)


if __name__ == "__main__":
    main()
