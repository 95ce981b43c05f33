"""Image -> faces -> emotions. Every source ends up here as a stream of images; crops from many images
are classified together in real batches."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ferkit.errors import FerkitError
from ferkit.faces import Box, Detection, crops_for_model, get_detector, whole_image_face
from ferkit.images import CHANNEL_ORDERS, decoded_scale, full_size, load_image, to_model_input, to_rgb
from ferkit.results import Face, ImageResult
from ferkit.runtime import Classifier, is_shipped_file, load_classifier

log = logging.getLogger("ferkit")

ImageLike = str | os.PathLike | Image.Image | np.ndarray

# Faces whose top probability is below this are marked `uncertain`: the highest level under which the
# default model is right less than 40% of the time. Measured for it on FER2013 PublicTest (`ferkit
# evaluate`'s confidence levels, its temperature applied): the 18.0% of faces under 0.5 are right 38.9% of
# the time, those at or above it 76.4%; under 0.6, 29.5% of faces, right 41.9%; under 0.4, 7.8%, right 34.5%.
UNCERTAIN_BELOW = 0.5
RESULTS_WITHIN_S = 1.0  # analyze_images: an image waits about this long at most for its faces to be classified


def analyze(
    image: ImageLike,
    *,
    model: str | Path | Classifier | None = None,
    detector: str | Callable | None = "auto",
    boxes: Sequence[Box] | None = None,
    uncertain_below: float = UNCERTAIN_BELOW,
    channels: str = "rgb",
    tta: str | None = None,
) -> list[Face]:
    """Every face in `image` (path, PIL image, RGB array, or an image file's bytes) with its emotion,
    largest first (given `boxes`: in their order). A face cut by the picture's border keeps its whole box,
    reaching past the edge (see Face): clip it before slicing the picture's array with it.

    `model`: a run folder, .keras or .onnx file, or a shipped model's name; None for the default one.
    `detector`: "auto", "yunet", "mtcnn", "none" (the whole image is one face, made square by repeating
    its edges rather than stretched) or a callable. `boxes`:
    (x, y, width, height) faces to classify instead of detecting (or Faces and Detections: their boxes). `uncertain_below`: faces whose top
    probability is below it are marked `uncertain` (0: none are). `channels`: "bgr" for arrays in
    OpenCV's channel order (what `cv2.imread` returns), "rgb" otherwise. `tta`: test-time augmentation,
    "none", "flip" or "tencrop" (models that crop their input); None keeps the model's own.
    Raises FerkitError for an unreadable image.
    """
    result = next(iter(analyze_images([image], model=model, detector=detector, boxes=boxes,
                                      uncertain_below=uncertain_below, channels=channels, tta=tta)))
    if result.error:
        raise FerkitError(result.error) from result.failure  # a detector's own error keeps its traceback
    return result.faces


def analyze_image(image: ImageLike, *, model=None, detector="auto", boxes: Sequence[Box] | None = None,
                  uncertain_below: float = UNCERTAIN_BELOW, channels: str = "rgb") -> ImageResult:
    """Deprecated: `next(analyze_images([image]))` gives the same ImageResult (or `analyze(image)` the faces)."""
    _deprecated("analyze_image(image)", "next(ferkit.analyze_images([image])) or ferkit.analyze(image)")
    return next(iter(analyze_images([image], model=model, detector=detector, boxes=boxes,
                                    uncertain_below=uncertain_below, channels=channels)))


def predict_image(image: ImageLike, *, model=None, boxes: Sequence[Box] | None = None,
                  uncertain_below: float = UNCERTAIN_BELOW) -> ImageResult:
    """Deprecated: `analyze(face, detector="none")` classifies a photo of one face."""
    _deprecated("predict_image(face)", 'ferkit.analyze(face, detector="none")')
    result = next(iter(analyze_images([image], model=model, detector="none", boxes=boxes, uncertain_below=uncertain_below)))
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
    uncertain_below: float = UNCERTAIN_BELOW,
    channels: str = "rgb",
    tta: str | None = None,
) -> Iterator[ImageResult]:
    """Yield one ImageResult per image, in order. `images` is a list of paths, PIL images or arrays (items
    may be (label, image) pairs), or one path of a folder or glob, whose images are listed. A bad image gives
    a result with `.error` set, and the stream goes on. Faces are classified together once
    `batch_faces` faces or `batch_images` images are waiting, so memory stays bounded on long streams, or
    once the first of them has waited RESULTS_WITHIN_S (large photos: a progress bar still moves).
    Faces whose top probability is below `uncertain_below` are marked `uncertain` (0: none are).
    `channels` and `tta` as in `analyze`."""
    check_uncertain_below(uncertain_below)
    if channels not in CHANNEL_ORDERS:
        raise FerkitError(f"channels must be 'rgb' or 'bgr', not {channels!r}")
    for name, value in (("batch_faces", batch_faces), ("batch_images", batch_images)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise FerkitError(f"{name} is a whole number of at least 1, not {value!r}")
    if isinstance(boxes, (str, bytes)):
        raise FerkitError(f"boxes is a list of (x, y, width, height) boxes, not text: e.g. [(10, 20, 64, 64)], not {boxes!r}")
    if boxes is not None:
        boxes = _box_list(boxes)
    if boxes is not None and isinstance(detector, str) and detector not in ("auto", "none"):
        raise FerkitError(f"boxes are the faces, so no detector looks for them: give boxes or detector={detector!r}")
    if boxes is not None and len(boxes) == 4 and all(isinstance(v, (int, float, np.number)) for v in boxes):
        raise FerkitError(f"boxes is a list of (x, y, width, height) boxes; for one box give [{tuple(boxes)}]")
    if isinstance(images, (str, os.PathLike)):
        images = _images_of(images)
    elif images is None or not isinstance(images, Iterable):
        raise FerkitError(f"analyze_images takes a list of images (paths, PIL images, arrays), or a folder, not {images!r}")
    elif isinstance(images, (np.ndarray, Image.Image, bytes, bytearray)):
        raise FerkitError(f"analyze_images takes a list of images, not one {type(images).__name__}: "
                          "analyze_images([image]), or analyze(image) for its faces")
    classifier = load_classifier(model, prefer_export=True).with_tta(tta)
    find = get_detector(detector) if boxes is None else None
    pending: list[tuple[ImageResult, list[np.ndarray]]] = []
    waiting, since = 0, time.perf_counter()
    for item in images:
        if isinstance(item, tuple) and len(item) != 2:
            raise FerkitError(f"an item of analyze_images is an image or a (label, image) pair, not a {len(item)}-tuple")
        label, image = item if isinstance(item, tuple) else (_label(item), item)
        since = since if pending else time.perf_counter()
        result, crops = _find_faces(label, image, classifier, find, boxes, channels)
        pending.append((result, crops))
        waiting += len(crops)
        if waiting >= batch_faces or len(pending) >= batch_images or time.perf_counter() - since >= RESULTS_WITHIN_S:
            yield from _classify(pending, classifier, uncertain_below)
            pending, waiting = [], 0
    yield from _classify(pending, classifier, uncertain_below)


def _box_list(boxes) -> list:
    """`boxes` as a list (a generator of them too; Faces and Detections give their boxes), or a FerkitError
    for what holds no boxes."""
    try:
        return [getattr(box, "box", box) for box in boxes]
    except TypeError:
        raise FerkitError(f"boxes is a list of (x, y, width, height) boxes, not {boxes!r}") from None


def _images_of(source: str | os.PathLike) -> list[str]:
    """The image files of one source: a folder or glob listed (as `ferkit predict` lists them), a file as it is."""
    from ferkit.sources import list_images, source_kind

    return [str(source)] if source_kind(str(source)) in ("image", "video") else [str(p) for p in list_images(str(source))]


def _deprecated(old: str, new: str) -> None:
    import warnings

    warnings.warn(f"{old} is deprecated and will be removed; use {new}", FutureWarning, stacklevel=3)


def check_uncertain_below(value: float) -> float:
    """`value` if it can be an uncertainty threshold (0 <= value < 1), else FerkitError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not 0.0 <= value < 1.0:
        raise FerkitError(f"the uncertainty threshold must be a number at least 0 and below 1, not {value!r}")
    return value


def _find_faces(label, image, classifier: Classifier, find, boxes, channels: str = "rgb") -> tuple[ImageResult, list[np.ndarray]]:
    detector = "boxes" if boxes is not None else "none" if find is None else getattr(find, "name", "custom")
    result = ImageResult(source=label, image_size=None, model=classifier.name, model_version=model_version(classifier),
                         detector=detector, channels=channels, in_memory=_in_memory(image))  # said also of an unreadable image
    started = time.perf_counter()
    try:
        loaded = load_image(image, channels=channels)
        result.image_size = full_size(loaded)
        given = None if boxes is None else [checked_box(b, result.image_size) for b in boxes]
        picture = to_rgb(loaded)
    except FerkitError as err:
        result.error = str(err)
        return result, []
    # Boxes are reported in the photo's pixels, and crops cut from the picture as decoded: the same
    # unless a very large JPEG was decoded at a reduced scale.
    across, down = decoded_scale(loaded)
    decoded = time.perf_counter()
    whole_image = boxes is None and find is None
    if given is not None:
        detections = [Detection(_scaled_box(b, 1 / across, 1 / down), None) for b in given]
    elif whole_image:
        detections = [Detection((0, 0, picture.width, picture.height), None)]
    else:
        try:
            detections = detected_faces(find, picture)
        except Exception as err:  # any detector, ours or the user's: report this image, go on with the rest
            log.debug("face detection failed on %s", label, exc_info=True)  # --debug shows where
            result.failure = err
            result.error = f"face detection failed on {label}: {type(err).__name__}: {err}".splitlines()[0]
            return result, []
    crops = [_face_views(picture, d, classifier, whole_image) for d in detections]
    reported = given or [_scaled_box(d.box, across, down) for d in detections]
    result.faces = [Face(box, "", 0.0, {}, d.score, _scaled_points(d.landmarks, across, down))
                    for box, d in zip(reported, detections)]
    result.timings_ms = {"decode": (decoded - started) * 1e3, "detect": (time.perf_counter() - decoded) * 1e3}
    return result, crops


def _in_memory(image) -> str | None:
    """What an image given in memory is, in words; None for a file."""
    if isinstance(image, np.ndarray):
        return "an array"
    if isinstance(image, Image.Image):
        return "a PIL image"
    return "bytes" if isinstance(image, (bytes, bytearray)) else None


def detected_faces(find: Callable, picture: Image.Image) -> list[Detection]:
    """What the detector `find` finds in the RGB `picture`, largest first, less a custom detector's empty
    or stray boxes."""
    detections = [_as_detection(found) for found in find(np.asarray(picture))]
    detections = [d for d in detections if _on_picture(d.box, picture.size)]
    return sorted(detections, key=lambda d: -d.box[2] * d.box[3])


def _as_detection(found) -> Detection:
    """A detector's answer for one face, a Detection or a bare (x, y, width, height) box, as a Detection
    of whole pixels and plain numbers (numpy's or floats would reach the JSON)."""
    box, score, landmarks = (found.box, found.score, found.landmarks) if isinstance(found, Detection) else (found, None, None)
    try:
        x, y, width, height = (int(round(float(v))) for v in box)
        score = None if score is None else float(score)
        landmarks = None if landmarks is None else [(int(round(float(px))), int(round(float(py)))) for px, py in landmarks]
    except (TypeError, ValueError):
        raise TypeError(f"a detector must return Detections or (x, y, width, height) boxes, not {found!r}") from None
    return Detection((x, y, width, height), score, landmarks)


def _on_picture(box: Box, size: tuple[int, int]) -> bool:
    try:
        checked_box(box, size)
    except FerkitError:
        return False
    return True


def _scaled_box(box: Box, across: float, down: float) -> Box:
    if across == down == 1:
        return tuple(box)
    x, y, width, height = box
    return round(x * across), round(y * down), round(width * across), round(height * down)


def _scaled_points(points, across: float, down: float):
    if points is None or across == down == 1:
        return points
    return [(round(px * across), round(py * down)) for px, py in points]


def _face_views(picture: Image.Image, detection: Detection, classifier: Classifier, whole_image: bool) -> np.ndarray:
    """The model inputs a face is classified on, averaged by _classify: the crops at the model's margins
    (crops_for_model), or, for a picture taken as one face, framed already as training faces are, one view."""
    views = [whole_image_face(picture)] if whole_image else crops_for_model(picture, detection, classifier.metadata)
    return np.stack([to_model_input(view, classifier.input_size) for view in views])


def _classify(pending, classifier: Classifier, uncertain_below: float = UNCERTAIN_BELOW) -> Iterator[ImageResult]:
    crops = [views for _, image_crops in pending for views in image_crops]  # each face's views
    started = time.perf_counter()
    probabilities = _averaged_over_views(classifier, crops)
    per_face_ms = (time.perf_counter() - started) * 1e3 / max(1, len(crops))
    row = 0
    for result, image_crops in pending:
        for face in result.faces:
            p = probabilities[row]
            best = int(np.argmax(p))
            face.emotion, face.score = classifier.classes[best], float(p[best])
            face.uncertain = bool(face.score < uncertain_below)
            face.probabilities = {name: float(v) for name, v in zip(classifier.classes, p)}
            row += 1
        if result.ok:
            result.timings_ms["classify"] = per_face_ms * len(image_crops)
        yield result


def _averaged_over_views(classifier: Classifier, faces: list[np.ndarray]) -> np.ndarray:
    """Each face's probabilities: the mean over its views (crops_for_model), all classified in one batch."""
    if not faces:
        return np.zeros((0, len(classifier.classes)))
    probabilities = classifier.predict_proba(np.concatenate(faces))
    starts = np.cumsum([0] + [len(views) for views in faces[:-1]])
    return np.add.reduceat(probabilities, starts, axis=0) / np.array([len(views) for views in faces])[:, None]


def checked_box(box, image_size: tuple[int, int]) -> Box:
    """`box` as four ints, or a FerkitError if it is empty or lies wholly outside the (width, height) image."""
    try:
        x, y, width, height = (int(round(float(v))) for v in box)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite number
        raise FerkitError(f"a box is four numbers (x, y, width, height), not {box!r}") from None
    if width <= 0 or height <= 0:
        raise FerkitError(f"the box {(x, y, width, height)} is empty: width and height must be positive")
    if x >= image_size[0] or y >= image_size[1] or x + width <= 0 or y + height <= 0:
        raise FerkitError(f"the box {(x, y, width, height)} lies outside the {image_size[0]}x{image_size[1]} image")
    inside = (min(x + width, image_size[0]) - max(x, 0)) * (min(y + height, image_size[1]) - max(y, 0)) / (width * height)
    if inside < 0.5:  # a face at the photo's edge is cut off a little; this much is more likely a mistaken box
        log.warning("the box %s lies mostly outside the %dx%d image (%.0f%% inside): the rest is filled with the "
                    "edge's pixels, so its emotion says little", (x, y, width, height), *image_size, 100 * inside)
    return x, y, width, height


def _label(image) -> str:
    """How a result names its image: the path, else what it was given as ("<array>", "<image>", "<bytes>")."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, np.ndarray):
        return "<array>"
    if isinstance(image, Image.Image):
        return "<image>"
    return "<bytes>" if isinstance(image, (bytes, bytearray, memoryview)) or hasattr(image, "read") else f"<{type(image).__name__}>"


def _as_given(folder: Path) -> str:
    """A folder as a user would type it here: relative to the working folder when it lies below it."""
    try:
        relative = os.path.relpath(folder.resolve())
    except ValueError:  # another drive (Windows)
        return str(folder.resolve())
    return str(folder.resolve()) if relative.startswith("..") else relative


def model_named_by(version: str) -> str:
    """The shipped model, run folder or file that a model_version names, without the file and epoch in
    its last parenthesis (a run folder's own name may hold one: "m7 (copy) (best.keras, epoch 3)")."""
    return version.rsplit(" (", 1)[0] if version.endswith(")") and " (" in version else version


def model_version(classifier: Classifier, *, public: bool = False) -> str:
    """The model's version as results report it: a shipped model's recorded version; else the run it came from,
    its file and its epoch (a run's best.keras, last.keras and exports differ, and so does its best.keras
    once the run trains on), or its file name. public: the run folder's name only, not where it lies on
    this machine (what a server tells its clients); always so for a shipped model, whose run lay on the
    machine that trained it."""
    meta = classifier.metadata
    if meta.extra.get("version"):
        return str(meta.extra["version"])
    run = meta.extra.get("run")
    folder = classifier.path.parent
    if run and Path(run).resolve() != folder.resolve() and (folder / "config.json").is_file():
        run = _as_given(folder)  # the run folder was moved or renamed since it trained
    if run and (public or is_shipped_file(classifier.path)):
        run = Path(run).name
    if not run:
        return classifier.path.name
    epoch = f", epoch {meta.extra['epoch']}" if meta.extra.get("epoch") is not None else ""
    return f"{run} ({classifier.path.name}{epoch})"
