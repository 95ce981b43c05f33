"""Seconds to load a dataset the first time (decoding every image) and the second (from the cache).

    python benchmarks/load_time.py ../shared/data/fer2013/train
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", default="../shared/data/fer2013/train",
                        help="a class-folder tree or a FER2013 CSV (default: %(default)s)")
    source = parser.parse_args().source
    if not Path(source).exists():
        parser.error(f"no such dataset: {source}")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["FERKIT_CACHE_DIR"] = cache  # a cold cache, removed afterwards
        from ferkit.data import load_dataset

        seconds = []
        for attempt in ("first (decode)", "second (cache)"):
            started = time.perf_counter()
            data = load_dataset(source)
            seconds.append(time.perf_counter() - started)
            print(f"{attempt:<16} {seconds[-1]:6.2f} s  {len(data)} images", flush=True)
        print(f"second / first {seconds[1] / seconds[0]:.3f}")


if __name__ == "__main__":
    main()
