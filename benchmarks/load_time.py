"""Seconds to load a dataset the first time (decoding every image) and the second (from the cache).

    python benchmarks/load_time.py ../shared/data/fer2013/train
"""

from __future__ import annotations

import os
import sys
import tempfile
import time


def main() -> None:
    source = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/fer2013/train"
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
