"""Face detectors on the annotated photos: recall at IoU >= 0.5, false positives, ms per photo.

    python benchmarks/detect_faces.py --faces ../shared/data/faces

Each detection is matched greedily (highest score first) to the unmatched true box of highest IoU.
Timing is the median of `--repeat` runs per photo, after one warm-up run, on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from ferkit.faces import MtcnnDetector, YuNetDetector, box_iou
from ferkit.images import load_image, to_rgb


def match(detections, truth, threshold=0.5) -> tuple[int, int]:
    """(true positives, false positives)."""
    used: set[int] = set()
    hits = 0
    for det in sorted(detections, key=lambda d: -d.score):
        candidates = [(box_iou(det.box, box), i) for i, box in enumerate(truth) if i not in used]
        best = max(candidates, default=(0.0, -1))
        if best[0] >= threshold:
            used.add(best[1])
            hits += 1
    return hits, len(detections) - hits


def measure(detector, photos, truth, repeat: int) -> dict:
    hits = false = total = 0
    times = []
    for name, rgb in photos.items():
        detector(rgb)  # warm-up
        runs = []
        for _ in range(repeat):
            started = time.perf_counter()
            found = detector(rgb)
            runs.append((time.perf_counter() - started) * 1e3)
        times.append(statistics.median(runs))
        h, f = match(found, truth[name])
        hits, false, total = hits + h, false + f, total + len(truth[name])
    return {"recall": hits / total, "found": hits, "faces": total, "false_positives": false,
            "median_ms_per_photo": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", default="../shared/data/faces")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    folder = Path(args.faces)
    truth = json.loads((folder / "boxes.json").read_text())["images"]
    photos = {name: np.asarray(to_rgb(load_image(folder / name))) for name in truth}
    sizes = sorted(max(p.shape[:2]) for p in photos.values())
    print(f"{len(photos)} photos ({sizes[0]}-{sizes[-1]} px), {sum(map(len, truth.values()))} faces")
    candidates = {
        "yunet (threshold 0.7, default)": lambda: YuNetDetector(threshold=0.7),  # first: the others' baseline
        "yunet (threshold 0.5)": lambda: YuNetDetector(threshold=0.5),
        "mtcnn (threshold 0.9, default)": lambda: MtcnnDetector(threshold=0.9),
    }
    default_ms = None
    for label, make in candidates.items():
        result = measure(make(), photos, truth, args.repeat)
        ms = result["median_ms_per_photo"]
        default_ms = default_ms or (ms if "default" in label else None)
        ratio = f"  time / yunet default {ms / default_ms:.2f}" if default_ms else ""
        print(f"{label:<32} recall {result['recall']:.3f} ({result['found']}/{result['faces']})  "
              f"false positives {result['false_positives']}  {ms:.1f} ms/photo{ratio}", flush=True)


if __name__ == "__main__":
    main()
