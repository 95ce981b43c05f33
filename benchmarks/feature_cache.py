"""Seconds per epoch of a frozen-backbone transfer model with and without the feature cache.

    python benchmarks/feature_cache.py --model vgg19-transfer --data examples/fer2013-sample

The backbone is randomly initialised (--weights none): speed does not depend on the weights. Epoch
times come from history.csv; the whole run's wall time includes computing the features once.
"""

from __future__ import annotations

import argparse
import statistics
import time
import tempfile
from pathlib import Path

from ferkit.config import TrainConfig
from ferkit.runs import read_history
from ferkit.training import train
from _common import check_exists, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg19-transfer")
    parser.add_argument("--data", default="examples/fer2013-sample", help="folder with train/ and val/")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    for part in ("train", "val"):
        check_exists(parser, Path(args.data) / part, "--data")
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch (graph tracing, filling the cache) is left out")
    data = Path(args.data)
    seconds, wall = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for cache in (False, True):
            config = TrainConfig(model=args.model, weights="none", data=str(data / "train"), val=str(data / "val"),
                                 epochs=args.epochs, cache_features=cache, out=f"{tmp}/{cache}")
            started = time.perf_counter()
            seconds[cache] = read_history(train(config, verbose=0) / "history.csv")["seconds"]
            wall[cache] = time.perf_counter() - started
    later = {cache: statistics.median(s[1:]) for cache, s in seconds.items()}
    print(f"{args.model}, {args.epochs} epochs: without cache {later[False]:.2f} s/epoch, {wall[False]:.1f} s in all; "
          f"with cache {later[True]:.3f} s/epoch, {wall[True]:.1f} s in all; "
          f"epochs {later[False] / later[True]:.0f}x faster, whole run {wall[False] / wall[True]:.1f}x")


if __name__ == "__main__":
    run(main)
