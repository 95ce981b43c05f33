"""Image -> faces -> classified faces. Today a face is the whole image or a given box; a detector
slots in as another source of boxes."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ferkit.images import load_image, to_model_input
from ferkit.results import Face, ImageResult
from ferkit.runtime import Classifier, load_classifier

Box = tuple[int, int, int, int]


def predict_image(
    image: str | os.PathLike | Image.Image | np.ndarray,
    *,
    model: str | Path | Classifier,
    boxes: Sequence[Box] | None = None,
) -> ImageResult:
    """Classify the faces in `image`. `boxes` = (x, y, width, height) per face; None: the whole image
    is one face (a cropped face photo). Arrays are RGB or grayscale."""
    started = time.perf_counter()
    picture = load_image(image)
    decoded = time.perf_counter()
    classifier = load_classifier(model)
    boxes = [(0, 0, picture.width, picture.height)] if boxes is None else [tuple(map(int, b)) for b in boxes]
    crops = np.stack([to_model_input(_crop(picture, box), classifier.input_size) for box in boxes]) if boxes else None
    probabilities = classifier.predict_proba(crops) if crops is not None else np.zeros((0, len(classifier.classes)))
    done = time.perf_counter()
    return ImageResult(
        source=str(image) if isinstance(image, (str, os.PathLike)) else "<array>",
        image_size=picture.size,
        faces=[_face(box, p, classifier.classes) for box, p in zip(boxes, probabilities)],
        model=classifier.name,
        model_version=str(classifier.metadata.extra.get("run", classifier.path)),
        timings_ms={"decode": (decoded - started) * 1e3, "classify": (done - decoded) * 1e3},
    )


def _crop(picture: Image.Image, box: Box) -> Image.Image:
    x, y, width, height = box
    return picture.crop((x, y, x + width, y + height))


def _face(box: Box, probabilities: np.ndarray, classes: Sequence[str]) -> Face:
    best = int(np.argmax(probabilities))
    return Face(
        box=tuple(int(v) for v in box),
        emotion=classes[best],
        score=float(probabilities[best]),
        probabilities={name: float(p) for name, p in zip(classes, probabilities)},
    )
