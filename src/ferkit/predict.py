"""Image -> faces -> emotions. Every source ends up here as a stream of images; crops from many images
are classified together in real batches."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ferkit.errors import FerkitError
from ferkit.faces import Box, Detection, face_crop, get_detector
from ferkit.images import load_image, to_model_input, to_rgb
from ferkit.results import Face, ImageResult
from ferkit.runtime import Classifier, load_classifier

ImageLike = str | os.PathLike | Image.Image | np.ndarray


def analyze(
    image: ImageLike,
    *,
    model: str | Path | Classifier | None = None,
    detector: str | Callable | None = "auto",
    boxes: Sequence[Box] | None = None,
) -> list[Face]:
    """Every face in `image` (path, PIL image, or RGB array) with its emotion, largest first.

    `model`: a run folder, .keras or .onnx file; None for the bundled model. `detector`: "auto", "yunet",
    "mtcnn", "none" (the whole image is one face) or a callable. `boxes`: (x, y, width, height) faces
    to classify instead of detecting. Raises FerkitError for an unreadable image.
    """
    result = analyze_image(image, model=model, detector=detector, boxes=boxes)
    if result.error:
        raise FerkitError(result.error)
    return result.faces


def analyze_image(image: ImageLike, *, model=None, detector="auto", boxes: Sequence[Box] | None = None) -> ImageResult:
    """Like `analyze`, with the whole ImageResult: source, size, faces, timings (errors in `.error`)."""
    return next(iter(analyze_images([image], model=model, detector=detector, boxes=boxes)))


def predict_image(image: ImageLike, *, model=None, boxes: Sequence[Box] | None = None) -> ImageResult:
    """Classify a photo of one face (the whole image), or the given boxes; no detection."""
    result = analyze_image(image, model=model, detector="none", boxes=boxes)
    if result.error:
        raise FerkitError(result.error)
    return result


def analyze_images(
    images: Iterable[ImageLike | tuple[str, ImageLike]],
    *,
    model=None,
    detector: str | Callable | None = "auto",
    boxes: Sequence[Box] | None = None,
    batch_faces: int = 64,
    batch_images: int = 32,
) -> Iterator[ImageResult]:
    """Yield one ImageResult per image, in order. Items may be (label, image) pairs. A bad image gives
    a result with `.error` set, and the stream goes on. Faces are classified together once
    `batch_faces` faces or `batch_images` images are waiting, so memory stays bounded on long streams."""
    classifier = load_classifier(model)
    find = get_detector(detector) if boxes is None else None
    pending: list[tuple[ImageResult, list[np.ndarray]]] = []
    waiting = 0
    for item in images:
        label, image = item if isinstance(item, tuple) else (_label(item), item)
        result, crops = _find_faces(label, image, classifier, find, boxes)
        pending.append((result, crops))
        waiting += len(crops)
        if waiting >= batch_faces or len(pending) >= batch_images:
            yield from _classify(pending, classifier)
            pending, waiting = [], 0
    yield from _classify(pending, classifier)


def _find_faces(label, image, classifier: Classifier, find, boxes) -> tuple[ImageResult, list[np.ndarray]]:
    result = ImageResult(source=label, image_size=(0, 0), model=classifier.name, model_version=_version(classifier))
    started = time.perf_counter()
    try:
        picture = to_rgb(load_image(image))
    except FerkitError as err:
        result.error = str(err)
        return result, []
    decoded = time.perf_counter()
    result.image_size = picture.size
    if boxes is not None:
        detections, crop = [Detection(tuple(map(int, b)), None) for b in boxes], _exact_crop
        result.detector = "boxes"
    elif find is None:
        detections, crop = [Detection((0, 0, picture.width, picture.height), None)], _exact_crop
        result.detector = "none"
    else:
        detections, crop = find(np.asarray(picture)), face_crop
        result.detector = getattr(find, "name", "custom")
    detections = sorted(detections, key=lambda d: -d.box[2] * d.box[3])
    crops = [to_model_input(crop(picture, d.box), classifier.input_size) for d in detections]
    result.faces = [Face(d.box, "", 0.0, {}, d.score, d.landmarks) for d in detections]
    result.timings_ms = {"decode": (decoded - started) * 1e3, "detect": (time.perf_counter() - decoded) * 1e3}
    return result, crops


def _classify(pending, classifier: Classifier) -> Iterator[ImageResult]:
    crops = [crop for _, image_crops in pending for crop in image_crops]
    started = time.perf_counter()
    probabilities = classifier.predict_proba(np.stack(crops)) if crops else np.zeros((0, len(classifier.classes)))
    per_face_ms = (time.perf_counter() - started) * 1e3 / max(1, len(crops))
    row = 0
    for result, image_crops in pending:
        for face in result.faces:
            p = probabilities[row]
            best = int(np.argmax(p))
            face.emotion, face.score = classifier.classes[best], float(p[best])
            face.probabilities = {name: float(v) for name, v in zip(classifier.classes, p)}
            row += 1
        if result.ok:
            result.timings_ms["classify"] = per_face_ms * len(image_crops)
        yield result


def _exact_crop(picture: Image.Image, box: Box) -> Image.Image:
    x, y, width, height = box
    return picture.crop((x, y, x + width, y + height))


def _label(image) -> str:
    return str(image) if isinstance(image, (str, os.PathLike)) else "<array>"


def _version(classifier: Classifier) -> str:
    meta = classifier.metadata
    return str(meta.extra.get("version") or meta.extra.get("run") or classifier.path.name)
