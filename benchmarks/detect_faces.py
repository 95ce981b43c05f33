"""Face detectors on the annotated photos: recall at IoU >= 0.5, false positives, ms per photo.

    python benchmarks/detect_faces.py --faces ../shared/data/faces

Each detection is matched greedily (highest score first) to the unmatched true box of highest IoU.
Timing is the median of `--repeat` runs per photo, after one warm-up run, on this machine.

Then two scenes made of the same photos, where one detection scale misses faces, for YuNet as it
runs (with its second looks) against one look at 960 px: a group photo (the photos tiled into one
4000x3000 picture, faces of 37-109 px) and selfies (each face with half a face around it, enlarged
until the face is 600 px). There, a false positive is a box that matches no annotated face, a real face
among them: a neighbour's face cut by a selfie's edge, or a small face boxed loosely.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from PIL import Image

from ferkit.errors import FerkitError
from ferkit.faces import MtcnnDetector, YuNetDetector, box_iou
from ferkit.images import load_image, to_rgb
from _common import run


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


def group_photo(photos: dict, truth: dict, size=(4000, 3000), cell=500) -> tuple[dict, dict]:
    """The photos, each shrunk to fit `cell` px, tiled into one picture of `size`, in turn while they fit."""
    picture, boxes, names = Image.new("RGB", size, (100, 100, 100)), [], sorted(photos)
    cells = [(left, top) for top in range(0, size[1], cell) for left in range(0, size[0], cell)]
    for k, (left, top) in enumerate(cells):
        name = names[k % len(names)]
        tile = Image.fromarray(photos[name])
        tile.thumbnail((cell, cell))
        if top + tile.height > size[1] or left + tile.width > size[0]:
            continue
        scale = tile.width / photos[name].shape[1]
        picture.paste(tile, (left, top))
        boxes += [(round(x * scale) + left, round(y * scale) + top, round(w * scale), round(h * scale)) for x, y, w, h in truth[name]]
    return {"group": np.asarray(picture)}, {"group": boxes}


def selfies(photos: dict, truth: dict, face_side=600) -> tuple[dict, dict]:
    """Each face with half a face around it (where the photo holds that much), enlarged to `face_side` px."""
    scenes, boxes = {}, {}
    for name, rgb in photos.items():
        photo = Image.fromarray(rgb)
        for k, (x, y, w, h) in enumerate(truth[name]):
            left, top, right, bottom = int(x - w / 2), int(y - h / 2), int(x + 1.5 * w), int(y + 1.5 * h)
            if left < 0 or top < 0 or right > photo.width or bottom > photo.height:
                continue
            scale = face_side / w
            crop = photo.crop((left, top, right, bottom))
            scenes[f"{name}#{k}"] = np.asarray(crop.resize((round(crop.width * scale), round(crop.height * scale)),
                                                           Image.Resampling.BICUBIC))
            boxes[f"{name}#{k}"] = [tuple(round(v * scale) for v in (x - left, y - top, w, h))]
    return scenes, boxes


def print_row(label: str, result: dict, baseline_ms: float | None = None, baseline: str = "") -> None:
    ms = result["median_ms_per_photo"]
    ratio = f"  time / {baseline} {ms / baseline_ms:.2f}" if baseline_ms else ""
    print(f"{label:<32} recall {result['recall']:.3f} ({result['found']}/{result['faces']})  "
          f"false positives {result['false_positives']}  {ms:.1f} ms/photo{ratio}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", default="../shared/data/faces", help="A folder of photos with boxes.json.")
    parser.add_argument("--repeat", type=int, choices=range(1, 101), metavar="1-100", default=5)
    args = parser.parse_args()
    folder = Path(args.faces)
    if not (folder / "boxes.json").is_file():
        parser.error(f"no annotated photos at {folder} (a folder of photos with boxes.json)")
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
        try:
            detector = make()
        except FerkitError as err:
            print(f"{label:<32} left out: {err}", flush=True)
            continue
        result = measure(detector, photos, truth, args.repeat)
        print_row(label, result, default_ms, "yunet default")
        default_ms = default_ms or result["median_ms_per_photo"]
    try:
        YuNetDetector()
    except FerkitError as err:
        print(f"group photo and selfies (YuNet's second looks): left out: {err}")
        return
    for scene, (scenes, boxes) in {"group photo": group_photo(photos, truth), "selfies": selfies(photos, truth)}.items():
        print(f"{scene}: {len(scenes)} picture(s), {sum(map(len, boxes.values()))} faces")
        one_look = measure(YuNetDetector(coarse_side=None, fine_side=None), scenes, boxes, args.repeat)
        print_row("  yunet, one look at 960 px", one_look)
        print_row("  yunet (default)", measure(YuNetDetector(), scenes, boxes, args.repeat), one_look["median_ms_per_photo"],
                  "one look")


if __name__ == "__main__":
    run(main)
