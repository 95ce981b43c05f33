"""How faces found in photos should be cropped for the classifier, measured.

    python benchmarks/crop_policy.py --val ../shared/data/fer2013/val --faces 700

FER2013 validation faces are placed into larger scenes (upscaled to 64-160 px, at random positions on a
smooth random background, some a quarter outside the border, some turned by up to 15 degrees), found
again by the detector, cropped by each policy and classified. Each policy's accuracy is compared with
the model's accuracy on the very same faces as given (48x48, classified directly); the gap is what the
crop costs. The ideal crop (exactly the square that was pasted, unturned) is shown for reference.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image, ImageFilter

from ferkit.data import load_dataset
from ferkit.faces import box_iou, face_crop, get_detector
from ferkit.images import to_model_input
from ferkit.runtime import load_classifier

MARGINS = (-0.05, 0.0, 0.05, 0.1, 0.2)


def make_scene(face: np.ndarray, rng: np.random.Generator, *, canvas=(400, 320)):
    """An RGB scene holding `face` and the square (x, y, side) it was pasted into, and its turn in degrees."""
    width, height = canvas
    noise = rng.normal(120, 60, (height // 8, width // 8)).clip(0, 255).astype(np.uint8)
    background = Image.fromarray(noise).resize(canvas, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(3))
    side = int(rng.integers(64, 161))
    angle = float(rng.uniform(-15, 15)) if rng.random() < 0.3 else 0.0
    patch = Image.fromarray(face).resize((side, side), Image.Resampling.BICUBIC)
    if angle:
        patch = patch.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=int(np.median(face)))
    if rng.random() < 0.2:  # a quarter of the face outside one border
        x = int(rng.choice([-side // 4, width - 3 * side // 4]))
        y = int(rng.integers(0, height - side))
    else:
        x, y = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
    background.paste(patch, (x, y))
    return background.convert("RGB"), (x, y, side), angle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--val", default="../shared/data/fer2013/val")
    parser.add_argument("--model", default=None, help="model to score with (default: the bundled one)")
    parser.add_argument("--faces", type=int, default=700, help="how many validation faces (a random sample)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    classifier = load_classifier(args.model)
    data = load_dataset(args.val, classes=classifier.classes, image_size=(48, 48))
    rng = np.random.default_rng(args.seed)
    picked = rng.choice(len(data), size=min(args.faces, len(data)), replace=False)
    detector = get_detector("auto")
    found, labels, direct, ideal = [], [], [], []
    crops = {(m, level): [] for m in MARGINS for level in (False, True)}
    started = time.perf_counter()
    for index in picked:
        face = data.images[index]
        scene, (x, y, side), angle = make_scene(face, rng)
        pasted = (x, y, side, side)
        detections = [d for d in detector(np.asarray(scene)) if box_iou(d.box, pasted) > 0.2]
        if not detections:
            continue
        best = max(detections, key=lambda d: box_iou(d.box, pasted))
        found.append(index)
        labels.append(data.labels[index])
        direct.append(face)
        ideal.append(to_model_input(face_crop(scene, pasted, margin=0.0), classifier.input_size))
        for margin, level in crops:
            crop = face_crop(scene, best.box, margin=margin, landmarks=best.landmarks if level else None)
            crops[margin, level].append(to_model_input(crop, classifier.input_size))
    seconds = time.perf_counter() - started
    labels = np.array(labels)

    def accuracy(faces) -> float:
        return float(np.mean(classifier.predict_proba(np.stack(faces)).argmax(1) == labels))

    base = accuracy(direct)
    print(f"{len(found)} of {len(picked)} faces found again by the detector ({seconds:.0f} s)")
    print(f"{'crop':<40} {'accuracy':>8} {'gap (points)':>13}")
    print(f"{'the face as given (48x48)':<40} {base:>8.4f} {0.0:>13.1f}")
    print(f"{'ideal (the pasted square)':<40} {accuracy(ideal):>8.4f} {100 * (accuracy(ideal) - base):>13.1f}")
    for (margin, level), faces in crops.items():
        score = accuracy(faces)
        name = f"detector box, margin {margin:+.2f}" + (", eyes level" if level else "")
        print(f"{name:<40} {score:>8.4f} {100 * (score - base):>13.1f}")


if __name__ == "__main__":
    main()
