"""Peak memory of `ferkit train` against the size of the dataset, on packed (memory-mapped) datasets.

    python benchmarks/train_memory.py --sizes 1,3,10 --steps 150

Writes synthetic packed datasets of 1x, 3x, 10x ... the 28,709 FER2013 training faces (random 48x48
faces, seven classes) into a temporary folder, trains seed-cnn on each for `--steps` steps of 128 faces
in a fresh process, and reports that process's peak anonymous memory (its own arrays and the
framework's; memory-mapped faces read from disk are page cache the system can drop, and are left out)
and its peak resident set (which counts them).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ferkit.data.packed import ShardWriter
from ferkit.labels import EMOTIONS

FER2013_TRAIN = 28_709

TRAIN_A_LITTLE = """
import json, sys
import keras
from ferkit.config import TrainConfig
from ferkit.training import train

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
    return 0

class Watch(keras.callbacks.Callback):
    peak = 0
    def on_train_batch_end(self, batch, logs=None):
        Watch.peak = max(Watch.peak, status("RssAnon"))
        if batch + 1 >= {steps}:
            self.model.stop_training = True

config = TrainConfig(model="seed-cnn", data={train!r}, val={val!r}, epochs=1, batch_size=128, out={out!r})
train(config, verbose=0, callbacks=[Watch()])
print(json.dumps({{"anon_mb": Watch.peak, "hwm_mb": status("VmHWM")}}))
"""


def write_synthetic(out: Path, faces: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    writer = ShardWriter(out, EMOTIONS, (48, 48), shard_size=100_000)
    for start in range(0, faces, 20_000):
        n = min(20_000, faces - start)
        writer.add(rng.integers(0, 256, (n, 48, 48), np.uint8), rng.integers(0, len(EMOTIONS), n))
    return writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,3,10", help="dataset sizes as multiples of FER2013's training set")
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    import json

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        val = write_synthetic(tmp / "val", 2_000, seed=1)
        print(f"{'faces':>9} {'on disk MB':>11} {'peak anon MB':>13} {'ratio':>6} {'peak RSS MB':>12}")
        first = None
        for multiple in map(float, args.sizes.split(",")):
            faces = int(FER2013_TRAIN * multiple)
            train = write_synthetic(tmp / f"train-{multiple}", faces, seed=0)
            disk = sum(p.stat().st_size for p in train.iterdir()) / 1e6
            code = TRAIN_A_LITTLE.format(steps=args.steps, train=str(train), val=str(val), out=str(tmp / f"run-{multiple}"))
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            peak = json.loads(done.stdout.strip().splitlines()[-1])
            first = first or peak["anon_mb"]
            print(f"{faces:>9} {disk:>11.0f} {peak['anon_mb']:>13} {peak['anon_mb'] / first:>6.2f} {peak['hwm_mb']:>12}", flush=True)


if __name__ == "__main__":
    main()
