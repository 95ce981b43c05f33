"""Photo latency (decode, detect, classify) on a quiet machine and beside a CPU load, per detector
thread count: what a server, or a video decoded beside detection, would see.

    python benchmarks/photo_latency.py --faces ../shared/data/faces

The annotated photos are resized to 640x480. Each setting times every photo `--repeat` times, first
quiet, then while `--load` processes spin on the CPU; median and 95th-percentile milliseconds per
photo, and the loaded median as a multiple of the quiet one, all measured in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import os
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np

from ferkit.faces import YuNetDetector
from ferkit.predict import analyze_images
from ferkit.runtime import OnnxClassifier, load_classifier
from predict_speed import photos_640
from _common import check_photos, run


def _spin() -> None:
    while True:
        pass


def latencies(photos, classifier, detector, repeat: int) -> np.ndarray:
    next(analyze_images([photos[0]], model=classifier, detector=detector))  # warm-up
    times = []
    for _ in range(repeat):
        for photo in photos:
            started = time.perf_counter()
            next(analyze_images([photo], model=classifier, detector=detector))
            times.append((time.perf_counter() - started) * 1e3)
    return np.array(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", default="../shared/data/faces")
    parser.add_argument("--model", default=None, help="an ONNX model, or a run folder exported to one (default: the shipped default)")
    parser.add_argument("--threads", default="1,2", help="detector thread counts to compare")
    parser.add_argument("--classifier-threads", default="0", help="ONNX Runtime thread counts to compare (0: one per core)")
    parser.add_argument("--load", type=int, default=2, help="busy processes beside the loaded measurement")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    check_photos(parser, args.faces)
    classifier = load_classifier(args.model, prefer_export=True)
    if not isinstance(classifier, OnnxClassifier):
        parser.error(f"--model {args.model}: this benchmark times ONNX models; export it first "
                     f"(ferkit export {args.model} --onnx)")
    path = classifier.path
    with tempfile.TemporaryDirectory() as scratch:
        photos = photos_640(Path(args.faces), Path(scratch))
        print(f"{len(photos)} photos 640x480, {args.repeat} passes each; load: {args.load} busy processes")
        print(f"{'classifier threads':>18} {'detector threads':>16} {'quiet median':>13} {'quiet p95':>10} {'loaded median':>14} {'loaded p95':>11} {'ratio':>6}")
        for classifier_threads, threads in itertools.product(args.classifier_threads.split(","), map(int, args.threads.split(","))):
            os.environ["FERKIT_CLASSIFIER_THREADS"] = classifier_threads
            classifier = OnnxClassifier(path)  # a session of its own, with these threads
            detector = YuNetDetector(threads=threads)
            quiet = latencies(photos, classifier, detector, args.repeat)
            busy = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.load)]
            for process in busy:
                process.start()
            try:
                time.sleep(0.5)
                loaded = latencies(photos, classifier, detector, args.repeat)
            finally:
                for process in busy:
                    process.terminate()
                    process.join()
            q, l = np.median(quiet), np.median(loaded)
            print(f"{classifier_threads:>18} {threads:>16} {q:>13.1f} {np.percentile(quiet, 95):>10.1f} {l:>14.1f} "
                  f"{np.percentile(loaded, 95):>11.1f} {l / q:>6.1f}")


if __name__ == "__main__":
    run(main)
