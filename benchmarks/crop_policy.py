"""How faces found in photos should be cropped for the classifier, measured.

    python benchmarks/crop_policy.py --val ../shared/data/fer2013/val --faces 700 --scenes 3

FER2013 validation faces are placed into larger scenes (upscaled to 64-160 px, at random positions on a
smooth random background, some a quarter outside the border, some turned by up to 15 degrees), found
again by the detector, cropped by each policy and classified. Each policy's accuracy is compared with
the model's accuracy on the very same faces as given (48x48, classified directly); the gap is what the
crop costs. With `--scenes N` each face is hidden in N different scenes, and the standard errors treat
a face's scenes as one sample. The ideal crop (exactly the square that was pasted, unturned) is shown for reference.

It also tries squares placed by the five landmarks instead of the detector's box (`landmark_box`):
their two constants are fitted on the scenes of one half of the faces and applied to the other half's,
both ways round, so that every scene is scored and no face helps frame itself. "landmarks where the box is odd" uses them only for boxes far from square or partly
outside the photo, where the detector's box is least trustworthy.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image, ImageFilter

from ferkit.data import load_dataset
from ferkit.data.fer2013_csv import VAL_USAGE
from ferkit.faces import Box, box_iou, face_crop, get_detector
from ferkit.images import to_model_input
from ferkit.predict import UNCERTAIN_BELOW
from ferkit.runtime import load_classifier
from _common import check_exists, run

MARGINS = (-0.05, 0.0, 0.025, 0.05, 0.075, 0.1, 0.2)
SHIFTS = ((-0.05, 0.0), (0.05, 0.0), (0.0, -0.05), (0.0, 0.05))  # of the box's side: right, down


def landmark_frame(landmarks) -> tuple[np.ndarray, np.ndarray, float]:
    """The eyes' midpoint, the mouth corners' midpoint and the distance between them (at least 1 px), from
    five landmarks in YuNet's and MTCNN's order: two eyes, nose tip, two mouth corners."""
    points = np.asarray(landmarks, dtype=float).reshape(-1, 2)
    eyes, mouth = points[:2].mean(axis=0), points[3:5].mean(axis=0)
    return eyes, mouth, max(1.0, float(np.linalg.norm(mouth - eyes)))


def landmark_box(landmarks, side_ratio: float, centre_shift: float) -> Box:
    """The square a face's five landmarks imply: `side_ratio` eye-to-mouth distances wide, centred
    `centre_shift` of that distance from the eyes' midpoint towards the mouth. Unlike a detector's box it
    keeps its shape when the face is cut by the photo's border."""
    eyes, mouth, distance = landmark_frame(landmarks)
    centre = eyes + (mouth - eyes) * centre_shift
    side = side_ratio * distance
    return int(round(centre[0] - side / 2)), int(round(centre[1] - side / 2)), int(round(side)), int(round(side))


def box_is_odd(box: Box, image_size: tuple[int, int]) -> bool:
    """A detector box least worth trusting: far from a face's usual shape, or partly outside the photo."""
    x, y, width, height = box
    outside = x < 0 or y < 0 or x + width > image_size[0] or y + height > image_size[1]
    return outside or not 0.9 <= height / max(width, 1) <= 1.6


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
    parser.add_argument("--scenes", type=int, default=1, help="scenes each face is hidden in")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", help="write every policy's probabilities, the labels and the faces to this .npz")
    args = parser.parse_args()
    check_exists(parser, args.val, "--val")
    if args.faces < 20:
        parser.error("--faces must be at least 20: each half of the scenes fits the framings the other is scored with")

    classifier = load_classifier(args.model)
    # FER2013's own 48x48 faces are pasted into the scenes (a CSV's PublicTest rows); each crop is then
    # resized to the model's input, as ferkit.predict resizes one
    data = load_dataset(args.val, classes=classifier.classes, image_size=(48, 48), usage=VAL_USAGE)
    rng = np.random.default_rng(args.seed)
    picked = rng.choice(len(data), size=min(args.faces, len(data)), replace=False)
    detector = get_detector("auto")
    found, labels, direct, ideal, detections_kept, scenes, pasted_squares = [], [], [], [], [], [], []
    crops = {(m, level): [] for m in MARGINS for level in (False, True)}
    crops |= {(f"detector box shifted {dx:+.2f}, {dy:+.2f}", False): [] for dx, dy in SHIFTS}
    started = time.perf_counter()
    for index in np.repeat(picked, args.scenes):
        face = data.images[index]
        scene, (x, y, side), angle = make_scene(face, rng)
        pasted = (x, y, side, side)
        detections = [d for d in detector(np.asarray(scene)) if box_iou(d.box, pasted) > 0.2]
        if not detections:
            continue
        best = max(detections, key=lambda d: box_iou(d.box, pasted))
        if not best.landmarks:
            continue
        detections_kept.append(best)
        scenes.append(scene)
        pasted_squares.append(pasted)
        found.append(index)
        labels.append(data.labels[index])
        direct.append(to_model_input(Image.fromarray(face), classifier.input_size))
        ideal.append(to_model_input(face_crop(scene, pasted, margin=0.0), classifier.input_size))
        for margin, level in [key for key in crops if not isinstance(key[0], str)]:
            crop = face_crop(scene, best.box, margin=margin, landmarks=best.landmarks if level else None)
            crops[margin, level].append(to_model_input(crop, classifier.input_size))
        for shift in SHIFTS:
            shifted = shifted_box(best.box, *shift)
            crops[f"detector box shifted {shift[0]:+.2f}, {shift[1]:+.2f}", False].append(
                to_model_input(face_crop(scene, shifted), classifier.input_size))
    seconds = time.perf_counter() - started
    labels, found = np.array(labels), np.array(found)
    # the fitted framings are fitted on the scenes of one half of the faces and applied to the other's,
    # both ways round, so every scene is scored and no face helps frame itself
    first = np.isin(found, picked[: len(picked) // 2])
    fits = [fit_framings([d for d, f in zip(detections_kept, half) if f], [s for s, f in zip(pasted_squares, half) if f])
            for half in (first, ~first)]
    fitted = [fits[1] if in_first else fits[0] for in_first in first]  # the other half's fit

    def model_input(scene, box):
        return to_model_input(face_crop(scene, box), classifier.input_size)

    crops["landmarks", False] = [model_input(scene, landmark_box(d.landmarks, *fit[0]))
                                 for scene, d, fit in zip(scenes, detections_kept, fitted)]
    crops["detector box, framing fitted", False] = [model_input(scene, framed_box(d.box, *fit[1]))
                                                    for scene, d, fit in zip(scenes, detections_kept, fitted)]
    crops["landmarks where the box is odd", False] = [
        model_input(scene, landmark_box(d.landmarks, *fit[0]) if box_is_odd(d.box, scene.size) else d.box)
        for scene, d, fit in zip(scenes, detections_kept, fitted)
    ]
    odd = np.array([box_is_odd(d.box, scene.size) for scene, d in zip(scenes, detections_kept)])
    policies = {"ideal (the pasted square)": ideal} | {_policy_name(*key): faces for key, faces in crops.items()}
    probabilities = {name: classifier.predict_proba(np.stack(faces)) for name, faces in policies.items()}
    mirrored = classifier.predict_proba(np.stack(crops[0.0, False])[:, :, ::-1])
    box = _policy_name(0.0, False)
    probabilities["margins -0.05, 0, +0.05 averaged"] = np.mean(
        [probabilities[_policy_name(m, False)] for m in (-0.05, 0.0, 0.05)], axis=0)
    probabilities["margin 0, with and without eyes level"] = (probabilities[box] + probabilities[_policy_name(0.0, True)]) / 2
    probabilities["margin 0 and its mirror image"] = (probabilities[box] + mirrored) / 2
    direct_probabilities = classifier.predict_proba(np.stack(direct))
    direct_correct = direct_probabilities.argmax(1) == labels
    # what averaging with the mirror image gains on the faces as given, to compare with the crop's gain
    probabilities["the face as given and its mirror image"] = (
        direct_probabilities + classifier.predict_proba(np.stack(direct)[:, :, ::-1])) / 2
    base, base_odd = float(direct_correct.mean()), float(direct_correct[odd].mean())
    print(f"{len(found)} of {len(picked) * args.scenes} scenes' faces found again by the detector ({seconds:.0f} s), "
          f"{len(np.unique(found))} faces; {int(odd.sum())} odd boxes (far from square or partly outside)")
    for (side_ratio, centre_shift), framing in fits:
        print(f"fitted on one half: landmark box side {side_ratio:.3f} x eye-to-mouth distance, centre {centre_shift:+.3f} "
              f"of it below the eyes' midpoint; box framing side {framing[0]:.3f} x box height, centre moved "
              f"{framing[1]:+.3f}, {framing[2]:+.3f} box heights (right, down)")
    print("gap: points against the faces as given, with the standard error of that paired difference")
    print(f"{'crop':<44} {'accuracy':>8} {'gap (points)':>13} {'odd boxes':>10} {'gap':>6}")
    print(f"{'the face as given (48x48)':<44} {base:>8.4f} {0.0:>13.1f} {base_odd:>10.4f} {0.0:>6.1f}")
    if args.save:
        np.savez_compressed(args.save, labels=labels, faces=found, odd=odd, direct=direct_probabilities,
                            names=np.array(list(probabilities)), probabilities=np.stack(list(probabilities.values())))
    for name, policy in probabilities.items():
        policy_correct = policy.argmax(1) == labels
        gap, error = paired_gap(policy_correct, direct_correct, found)
        score_odd = float(policy_correct[odd].mean())
        print(f"{name:<44} {policy_correct.mean():>8.4f} {gap:>+7.1f} ±{error:>4.1f} {score_odd:>10.4f} "
              f"{100 * (score_odd - base_odd):>+6.1f}")
    scales = probabilities["margins -0.05, 0, +0.05 averaged"]
    gain, error = paired_gap(scales.argmax(1) == labels, probabilities[box].argmax(1) == labels, found)
    print(f"three scales averaged against the box's one crop: {gain:+.2f} ± {error:.2f} points")
    uncertain = scales.max(1) < UNCERTAIN_BELOW
    right = scales.argmax(1) == labels
    print(f"three scales averaged, top probability under {UNCERTAIN_BELOW}: {uncertain.mean():.1%} of the faces, "
          f"{right[uncertain].mean():.1%} of those right, {right[~uncertain].mean():.1%} of the others")


def paired_gap(correct: np.ndarray, reference: np.ndarray, faces: np.ndarray) -> tuple[float, float]:
    """The accuracy difference of two scorings of the same scenes, in points, and its standard error, with
    the scenes of one face (`faces` names each scene's face) taken as one sample: the faces both get right
    or both get wrong carry no information about which is better."""
    differences = correct.astype(float) - reference.astype(float)
    _, face_of_scene = np.unique(faces, return_inverse=True)
    per_face = np.bincount(face_of_scene, differences) / np.bincount(face_of_scene)
    scenes_per_face = np.bincount(face_of_scene)
    # the mean over scenes, and its error from the faces' (weighted) means
    weights = scenes_per_face / scenes_per_face.sum()
    error = np.sqrt(np.sum(weights ** 2 * (per_face - differences.mean()) ** 2) * len(per_face) / max(1, len(per_face) - 1))
    return 100 * float(differences.mean()), 100 * float(error)


def _policy_name(margin, level) -> str:
    if isinstance(margin, str):
        return margin
    return f"detector box, margin {margin:+.3g}" + (", eyes level" if level else "")


def shifted_box(box: Box, right: float, down: float) -> Box:
    """The box moved `right` and `down` fractions of its side."""
    x, y, width, height = box
    return int(round(x + right * width)), int(round(y + down * height)), width, height


def framed_box(box: Box, side: float, right: float, down: float) -> Box:
    """A square `side` box heights wide, centred `right` and `down` box heights from the box's centre."""
    x, y, width, height = box
    centre_x, centre_y = x + width / 2 + right * height, y + height / 2 + down * height
    size = side * height
    return int(round(centre_x - size / 2)), int(round(centre_y - size / 2)), int(round(size)), int(round(size))


def fit_box_framing(boxes, squares) -> tuple[float, float, float]:
    """framed_box's constants that best turn detector boxes into the squares the faces were pasted in:
    medians of the side and the centre's offsets, in box heights."""
    sides, rights, downs = [], [], []
    for (x, y, width, height), (px, py, side, _) in zip(boxes, squares):
        sides.append(side / height)
        rights.append((px + side / 2 - x - width / 2) / height)
        downs.append((py + side / 2 - y - height / 2) / height)
    return float(np.median(sides)), float(np.median(rights)), float(np.median(downs))


def fit_framings(detections, squares):
    """fit_landmark_box's and fit_box_framing's constants, fitted on the same scenes."""
    return fit_landmark_box(detections, squares), fit_box_framing([d.box for d in detections], squares)


def fit_landmark_box(detections, squares) -> tuple[float, float]:
    """The side (as a multiple of the eye-to-mouth distance) and the centre's shift below the eyes'
    midpoint (same unit) that best reproduce the squares the faces were pasted in: medians."""
    ratios, shifts = [], []
    for detection, (x, y, side, _) in zip(detections, squares):
        eyes, mouth, distance = landmark_frame(detection.landmarks)
        ratios.append(side / distance)
        centre = np.array([x + side / 2, y + side / 2])
        shifts.append(float(np.dot(centre - eyes, (mouth - eyes) / distance)) / distance)
    return float(np.median(ratios)), float(np.median(shifts))


if __name__ == "__main__":
    run(main)
