"""End-to-end speed of `analyze` on this machine: photos (decode, detect, classify) and a video.

    python benchmarks/predict_speed.py --model runs/NAME/best.onnx --faces ../shared/data/faces

Photos: the annotated photos resized to 640x480 JPEGs (1-7 faces each), median ms per photo over
`--repeat` passes after a warm-up. Video: a 640x480 MJPEG video panning over those photos, every
frame analysed; frames per second overall. The classifier alone (batch of 256 faces and one face)
is timed too, as shipped (with its test-time augmentation) and with a single view, against a baseline
(e.g. seed-cnn exported to ONNX) timed in the same run when `--baseline` is given.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ferkit.faces import get_detector
from ferkit.predict import analyze_images
from ferkit.runtime import classifier_speed, load_classifier
from ferkit.video import analyze_video


def photos_640(folder: Path, out: Path) -> list[Path]:
    paths = []
    for photo in sorted(folder.glob("*.jpg")):
        target = out / photo.name
        Image.open(photo).convert("RGB").resize((640, 480), Image.Resampling.BILINEAR).save(target, quality=90)
        paths.append(target)
    return paths


def pan_video(photos: list[Path], out: Path, frames_per_photo: int = 20) -> Path:
    import cv2

    path = out / "pan.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (640, 480))
    for photo in photos:
        big = np.asarray(Image.open(photo).resize((704, 528)))
        for i in range(frames_per_photo):
            writer.write(np.ascontiguousarray(big[i * 2 : i * 2 + 480, i * 3 : i * 3 + 640, ::-1]))
    writer.release()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model to time (default: the bundled one)")
    parser.add_argument("--baseline", help="a second model timed the same way, for ratios (e.g. seed-cnn as ONNX)")
    parser.add_argument("--faces", default="../shared/data/faces")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    classifier, detector = load_classifier(args.model), get_detector("auto")
    baseline = load_classifier(args.baseline).with_tta("none") if args.baseline else None
    timed = [("model as shipped", classifier)]
    if classifier.tta != "none":
        timed.append(("model single view", classifier.with_tta("none")))
    rates = {}
    for label, model in [*timed, *([("baseline", baseline)] if baseline else [])]:
        speed = classifier_speed(model)
        rates[label] = speed["faces_per_second"]
        print(f"{label} {model.name} (tta {model.tta}): {speed['faces_per_second']:,} faces/s batched (256), "
              f"{speed['ms_per_face']:.2f} ms for one face")
    if baseline:
        for label, _ in timed:
            print(f"ratio {label} / baseline: {rates[label] / rates['baseline']:.3f} (faces/s)")
    # end to end, as shipped and with one crop per face (no extra margins), alternating so drift hits both
    pipelines = {"as shipped": classifier, "one crop per face": one_crop_per_face(classifier)}
    if not classifier.metadata.extra_margins:
        del pipelines["one crop per face"]
    with tempfile.TemporaryDirectory() as tmp:
        photos = photos_640(Path(args.faces), Path(tmp))
        for photo in photos:
            for model in pipelines.values():
                next(analyze_images([photo], model=model, detector=detector))  # warm-up
        per_photo = {label: [] for label in pipelines}
        faces = []
        for photo in photos:
            runs = {label: [] for label in pipelines}
            for _ in range(args.repeat):
                for label, model in pipelines.items():
                    started = time.perf_counter()
                    result = next(analyze_images([photo], model=model, detector=detector))
                    runs[label].append((time.perf_counter() - started) * 1e3)
            for label in pipelines:
                per_photo[label].append(statistics.median(runs[label]))
            faces.append(len(result.faces))
        for label, times in per_photo.items():
            print(f"photos 640x480 ({min(faces)}-{max(faces)} faces, detector {detector.name}), {label}: "
                  f"median {statistics.median(times):.1f} ms per photo end to end "
                  f"(range {min(times):.1f}-{max(times):.1f})")
        video = pan_video(photos, Path(tmp))
        for label, model in pipelines.items():
            started = time.perf_counter()
            timeline = analyze_video(video, model=model, detector=detector)
            seconds = time.perf_counter() - started
            print(f"video 640x480, {timeline.frames_analysed} frames, every frame analysed, {label}: "
                  f"{timeline.frames_analysed / seconds:.1f} frames/s, {len(timeline.rows)} faces, {len(timeline.tracks)} tracks")


def one_crop_per_face(classifier):
    """The same model, classifying one crop of each face found in a photo instead of one per margin."""
    single = copy.copy(classifier)
    single.metadata = dataclasses.replace(classifier.metadata, extra_margins=[])
    return single


if __name__ == "__main__":
    main()
