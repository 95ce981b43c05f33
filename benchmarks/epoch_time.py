"""Seconds per training epoch on FER2013-sized data, per model and augmentation, on this machine.

    python benchmarks/epoch_time.py --models seed-cnn,ferkit-net-s --augment none,flip+zoom

Times `--steps` training steps (after `--warmup` steps that pay for graph tracing) on random faces and
scales to one epoch of the 28,709 FER2013 training images. Ratios are against the first model and
augmentation, measured in the same run. `--input arrays,arrays8,batches` compares how the faces reach
the network: one float32 array handed to Keras (ferkit before), one 8-bit array (ferkit now, for
faces in memory), and `ferkit.data.batches.face_batches` over the stored 8-bit faces (ferkit now, for
packed datasets and data-parallel jobs). `--backends tensorflow,jax` runs the whole set once per Keras
backend, each in its own process, with the ratios against the first backend's first row.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

import numpy as np

from ferkit._keras import import_keras
from ferkit.config import TrainConfig
from ferkit.data.batches import face_batches
from ferkit.images import faces_to_batch
from ferkit.models import get_model_spec
from ferkit.training_model import build_training_model
from _common import run

FER2013_TRAIN = 28_709


FEEDS = ("arrays", "arrays8", "batches")


def seconds_per_epoch(model: str, augment: list[str], *, batch_size: int, steps: int, warmup: int,
                      precision: str = "float32", feed: str = "arrays") -> float:
    keras = import_keras()
    keras.mixed_precision.set_global_policy(precision)
    spec = get_model_spec(model)
    config = TrainConfig(model=model, augment=augment, batch_size=batch_size, precision=precision)
    training_model = build_training_model(keras, config, 7, train_size=steps * batch_size)
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 256, (batch_size * (steps + warmup), *spec.input_size), np.uint8)
    labels = rng.integers(0, 7, len(stored))
    warm, timed = slice(0, batch_size * warmup), slice(batch_size * warmup, None)
    if feed in ("arrays", "arrays8"):
        faces = faces_to_batch(stored, spec.channels, np.uint8 if feed == "arrays8" else np.float32)
        training_model.fit(faces[warm], labels[warm], batch_size=batch_size, epochs=1, verbose=0)
        started = time.perf_counter()
        training_model.fit(faces[timed], labels[timed], batch_size=batch_size, epochs=1, verbose=0)
    else:
        to_input = functools.partial(faces_to_batch, channels=spec.channels)
        batches = dict(batch_size=batch_size, to_input=to_input)
        training_model.fit(face_batches(stored[warm], labels[warm], **batches), epochs=1, verbose=0)
        started = time.perf_counter()
        training_model.fit(face_batches(stored[timed], labels[timed], **batches), epochs=1, verbose=0)
    per_step = (time.perf_counter() - started) / steps
    return per_step * FER2013_TRAIN / batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="seed-cnn")
    parser.add_argument("--augment", default="none,flip+zoom", help="comma-separated sets; + joins layers")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--precision", default="float32", help="comma-separated: float32, mixed_bfloat16")
    parser.add_argument("--input", default="arrays", help="comma-separated: arrays (float32), arrays8 (uint8), batches")
    parser.add_argument("--backends", help="comma-separated Keras backends (tensorflow, jax), one process each; "
                                            "default: KERAS_BACKEND's, in this process")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # a child's rows, for --backends
    args = parser.parse_args()
    unknown = set(args.input.split(",")) - set(FEEDS)
    if unknown:
        parser.error(f"--input: no such way to feed faces: {', '.join(sorted(unknown))} (choose from {', '.join(FEEDS)})")

    if args.backends:
        rows = [row for backend in args.backends.split(",") for row in rows_of_backend(backend)]
    else:
        rows = measured_rows(args)
        if args.json:
            print(json.dumps(rows))
            return
    print(f"{'backend':<11} {'model':<14} {'augment':<24} {'precision':<15} {'input':<8} {'s/epoch':>8} {'ratio':>6}")
    for row in rows:
        print(f"{row['backend']:<11} {row['model']:<14} {row['augment']:<24} {row['precision']:<15} {row['input']:<8} "
              f"{row['seconds']:8.1f} {row['seconds'] / rows[0]['seconds']:6.2f}")


def measured_rows(args) -> list[dict]:
    backend = import_keras().backend.backend()
    rows = []
    for model in args.models.split(","):
        for augment in args.augment.split(","):
            for precision in args.precision.split(","):
                for feed in args.input.split(","):
                    layers = [] if augment == "none" else augment.split("+")
                    seconds = seconds_per_epoch(model, layers, batch_size=args.batch_size, steps=args.steps,
                                                warmup=args.warmup, precision=precision, feed=feed)
                    rows.append(dict(backend=backend, model=model, augment=augment, precision=precision, input=feed,
                                     seconds=seconds))
                    if not args.json:
                        print(f"{backend} {model} {augment} {precision} {feed}: {seconds:.1f} s/epoch", flush=True)
    return rows


def rows_of_backend(backend: str) -> list[dict]:
    """This benchmark's rows from a fresh process on another Keras backend (the backend is fixed at import)."""
    argv, given = [], iter(sys.argv[1:])
    for arg in given:
        if arg == "--backends":
            next(given, None)
        elif not arg.startswith("--backends="):
            argv.append(arg)
    env = dict(os.environ, KERAS_BACKEND=backend)
    done = subprocess.run([sys.executable, __file__, *argv, "--json"], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"the {backend} backend failed:\n{done.stderr[-2000:]}")
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    for row in rows:
        print(f"{backend} {row['model']} {row['augment']} {row['precision']} {row['input']}: {row['seconds']:.1f} s/epoch",
              flush=True)
    return rows


if __name__ == "__main__":
    run(main)
