"""End-to-end speed of `analyze` on this machine: photos (decode, detect, classify) and a video.

    python benchmarks/predict_speed.py --model runs/NAME/best.onnx --faces ../shared/data/faces

Photos: the annotated photos resized to 640x480 JPEGs (1-7 faces each), median ms per photo over
`--repeat` passes after a warm-up. Video: a 640x480 25 fps MJPEG video panning over those photos (7.2 s),
analysed at every frame and at the default sampling (about 5 frames a second); frames analysed per
second, and how many times faster than real time the whole video went. The classifier alone (batch of
256 faces and one face) is timed too, as shipped (with its test-time augmentation) and with a single
view. With `--baseline` (e.g. seed-cnn exported to ONNX), the baseline runs every measurement in the
same run, and each is given as a ratio to it.
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
from _common import check_photos, run


def photos_640(folder: Path, out: Path) -> list[Path]:
    paths = []
    for photo in sorted(folder.glob("*.jpg")):
        target = out / photo.name
        Image.open(photo).convert("RGB").resize((640, 480), Image.Resampling.BILINEAR).save(target, quality=90)
        paths.append(target)
    return paths


VIDEO_FPS, FRAMES_PER_PHOTO = 25.0, 20


def pan_video(photos: list[Path], out: Path) -> Path:
    import cv2

    path = out / "pan.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), VIDEO_FPS, (640, 480))
    for photo in photos:
        big = np.asarray(Image.open(photo).resize((704, 528)))
        for i in range(FRAMES_PER_PHOTO):
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
    check_photos(parser, args.faces)

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
    if baseline:
        pipelines["baseline"] = baseline
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
        medians = {label: statistics.median(times) for label, times in per_photo.items()}
        for label, times in per_photo.items():
            print(f"photos 640x480 ({min(faces)}-{max(faces)} faces, detector {detector.name}), {label}: "
                  f"median {medians[label]:.1f} ms per photo end to end "
                  f"(range {min(times):.1f}-{max(times):.1f}){_ratio(medians, label, 'ms per photo')}")
        video, duration = pan_video(photos, Path(tmp)), len(photos) * FRAMES_PER_PHOTO / VIDEO_FPS
        for every, sampling in ((1, "every frame analysed"), (None, "default sampling")):
            seconds, found = {label: [] for label in pipelines}, {}
            for _ in range(max(1, args.repeat // 2)):  # alternating, as the photos are, so drift hits every pipeline
                for label, model in pipelines.items():
                    started = time.perf_counter()
                    timeline = analyze_video(video, model=model, detector=detector, every=every)
                    seconds[label].append(time.perf_counter() - started)
                    found[label] = (timeline.frames_analysed, len(timeline.rows), len(timeline.tracks))
            medians = {label: statistics.median(times) for label, times in seconds.items()}
            rates = {label: found[label][0] / median for label, median in medians.items()}
            for label in pipelines:  # once all are timed, so that each line can give its ratio to the baseline
                frames, faces_found, tracks = found[label]
                print(f"video 640x480 {VIDEO_FPS:.0f} fps ({duration:.1f} s), {sampling} ({frames} frames), {label}: "
                      f"{rates[label]:.1f} frames analysed/s, {duration / medians[label]:.1f}x real time, "
                      f"{faces_found} faces, {tracks} tracks{_ratio(rates, label, 'frames/s')}")


def _ratio(figures: dict[str, float], label: str, unit: str) -> str:
    if label == "baseline" or "baseline" not in figures:
        return ""
    return f"; ratio to the baseline {figures[label] / figures['baseline']:.3f} ({unit})"


def one_crop_per_face(classifier):
    """The same model, classifying one crop of each face found in a photo instead of one per margin."""
    single = copy.copy(classifier)
    single.metadata = dataclasses.replace(classifier.metadata, extra_margins=[])
    return single


if __name__ == "__main__":
    run(main)
