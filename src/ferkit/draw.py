"""Annotated copies: a box and an "emotion NN%" label per face ("emotion? NN%" when uncertain), sized to
stay readable on any photo."""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ferkit import __version__
from ferkit.errors import FerkitError
from ferkit.faces import Box
from ferkit.images import decoded_scale, full_size, load_image, open_without_size_guard, to_rgb
from ferkit.predict import checked_box
from ferkit.results import Face

SOFTWARE = 0x0131  # the EXIF tag naming the program that wrote an image
JPEG_MAX_SIDE = 65_500  # pixels: libjpeg's limit

# One colour per emotion, readable on photos (Okabe-Ito palette, colour-blind safe).
COLOURS = {
    "angry": (213, 94, 0),
    "disgust": (0, 158, 115),
    "fear": (204, 121, 167),
    "happy": (240, 228, 66),
    "neutral": (200, 200, 200),
    "sad": (0, 114, 178),
    "surprise": (230, 159, 0),
}
# Classes beyond the seven (a model trained with --classes): colours of their own, the same in every run.
EXTRA_COLOURS = [(86, 180, 233), (148, 103, 189), (140, 86, 75), (188, 189, 34), (23, 190, 207), (247, 129, 191)]


def colour_of(name: str) -> tuple[int, int, int]:
    """The colour of a class in annotated images and plots."""
    return COLOURS.get(name) or EXTRA_COLOURS[zlib.crc32(name.encode()) % len(EXTRA_COLOURS)]


class SteadyLabels:
    """Label style held across the frames of a video, so that labels do not flicker: the letter size
    changes only when the faces' size does (by a quarter), whole labels and numbers alone switch only
    after `frames_to_switch` frames in a row ask for it, and each face's label stays on its side of
    the box while it is clear there. `reset()` at a scene cut."""

    def __init__(self, frames_to_switch: int = 5):
        self.frames_to_switch = frames_to_switch
        self.reset()

    def reset(self) -> None:
        self.face_side: float | None = None
        self.numbers_only: bool | None = None
        self.streak = 0
        self.sides: dict = {}  # a face's number -> where its label went last (see _label_place)

    def held_face_side(self, face_side: float) -> float:
        if self.face_side is None or abs(face_side - self.face_side) > 0.25 * self.face_side:
            self.face_side = face_side
        return self.face_side

    def held_numbers_only(self, crowded: bool) -> bool:
        self.streak = self.streak + 1 if self.numbers_only is not None and crowded != self.numbers_only else 0
        if self.numbers_only is None or self.streak >= self.frames_to_switch:
            self.numbers_only, self.streak = crowded, 0
        return self.numbers_only


def draw_faces(image: Image.Image | np.ndarray | str | os.PathLike, faces: Sequence[Face | Box], *,
               channels: str = "rgb", numbers: Sequence[int] | None = None, enlarge_tiny: bool = True,
               steady: SteadyLabels | None = None) -> Image.Image:
    """A copy of `image` (RGB) with every face's box, number and top emotion drawn on it. `image` is what
    `ferkit.analyze` takes: a PIL image, a path, or an array (`channels="bgr"` for OpenCV's); `faces` are
    Faces, or plain (x, y, width, height) boxes, drawn numbered without an emotion. Boxes are in the
    photo's pixels, also where load_image decoded a very large JPEG at a reduced scale. `numbers`: the
    faces' numbers (a video's track ids, say) instead of 1, 2, ... Labels stay inside the picture and
    clear of each other where they can; a tiny picture (a face crop) is enlarged so that they can be read,
    unless not `enlarge_tiny` (a video's frames keep their size). `steady`: the style held from the
    frames drawn before (a video's)."""
    if isinstance(faces, Face):
        raise FerkitError("draw_faces takes a list of faces: draw_faces(image, [face])")
    image = load_image(image, channels=channels)  # upright, as ferkit.analyze saw it (a PIL image too)
    across, down = decoded_scale(image)
    canvas = to_rgb(image).copy()
    enlarge = -(-TINY_SIDE // max(canvas.size)) if enlarge_tiny and max(canvas.size) < TINY_SIDE else 1
    if enlarge > 1:
        canvas = canvas.resize((canvas.width * enlarge, canvas.height * enlarge), Image.Resampling.LANCZOS)
        across, down = across / enlarge, down / enlarge
    draw = ImageDraw.Draw(canvas)
    numbers = numbers if numbers is not None else range(1, len(faces) + 1)
    boxes = []
    for face in faces:
        x, y, w, h = face.box if isinstance(face, Face) else checked_box(face, full_size(image))
        boxes.append((round(x / across), round(y / down), round(w / across), round(h / down)))
    line, font = _line_and_font(canvas.size, boxes, steady)
    drawn = []  # every box first, then every label, so that no box line runs through a label
    for number, face, box in zip(numbers, faces, boxes):
        colour = colour_of(face.emotion) if isinstance(face, Face) else (255, 255, 255)
        # the last pixel inside the box is x + w - 1: the outline covers the box's own pixels, no more
        draw.rectangle((box[0], box[1], box[0] + max(box[2], 1) - 1, box[1] + max(box[3], 1) - 1), outline=colour, width=line)
        label = f"{number} {face.emotion}{'?' if face.uncertain else ''} {face.score:.0%}" if isinstance(face, Face) else str(number)
        drawn.append((colour, label, str(number)))
    # labels that would cover each other or their faces (a crowded group photo: a quarter of them or
    # more): the faces' numbers alone, where those cover fewer (the table and JSON carry the emotions)
    sides = steady.sides if steady else None
    labels = _placed_labels(draw, font, line, boxes, [label for _, label, _ in drawn], canvas.size, numbers, sides)
    clashes = _clashes(labels, boxes)
    crowded = len(boxes) > 1 and clashes >= max(2, len(boxes) / 4)
    if steady.held_numbers_only(crowded) if steady else crowded:  # the numbers alone, placed only then
        short = _placed_labels(draw, font, line, boxes, [number for *_, number in drawn], canvas.size, numbers, sides)
        labels = short if steady or _clashes(short, boxes) < clashes else labels
    for (colour, _, _), (text, area, at) in zip(drawn, labels):
        draw.rectangle(area, fill=colour)
        draw.text(at, text, fill=_text_colour(colour), font=font)
    return canvas


def _line_and_font(canvas_size: tuple[int, int], boxes: list, steady: SteadyLabels | None = None) -> tuple[int, ImageFont.ImageFont]:
    """Outline width and label font for a picture: growing with the picture, so that they can be seen
    in a large one, but no larger than its faces allow (in a group photo, an outline a twelfth of a
    face's side, letters under half its height)."""
    scale = min(max(canvas_size) / 640, min(canvas_size) / 360)  # a panorama's strip is no taller for its width
    line, letters = round(3 * scale), round(16 * scale)
    if boxes:
        face = float(np.median([min(w, h) for _, _, w, h in boxes]))
        face = steady.held_face_side(face) if steady else face
        line, letters = min(line, round(face / 12)), min(letters, round(face * 0.45))
    return max(2, line), ImageFont.load_default(size=max(11, letters))


def _placed_labels(draw, font, line: int, boxes: list, texts: list[str], canvas_size, numbers=None, sides=None) -> list[tuple]:
    """(text, its area, where its text starts) for each face's label, placed one after another; with
    `sides` (a face's number -> its label's side last time, updated), each kept where it is clear."""
    pad, placed, labels = max(2, line), [], []
    _, top, _, bottom = draw.textbbox((0, 0), "0 Ag%", font=font)  # one height for every label, digits or words
    for box, text, number in zip(boxes, texts, numbers if numbers is not None else range(len(boxes))):
        left, _, right, _ = draw.textbbox((0, 0), text, font=font)
        size = (right - left + 2 * pad, bottom - top + 2 * pad)
        others = [b for b in boxes if b is not box]
        if sides is None:
            tx, ty = _label_place(box, size, canvas_size, placed, others, line)
        else:
            tx, ty, sides[number] = _label_place(box, size, canvas_size, placed, others, line, sides.get(number), side=True)
        placed.append((tx, ty, tx + size[0], ty + size[1]))
        labels.append((text, placed[-1], (tx + pad - left, ty + pad - top)))
    return labels


def _clashes(labels: list[tuple], boxes: list) -> int:
    """How many labels cover a label placed before them, or their own face."""
    areas = [area for _, area, _ in labels]
    return sum(any(_overlap(area, other) for other in areas[:k]) or _overlap(area, (x, y, x + w, y + h))
               for k, (area, (x, y, w, h)) in enumerate(zip(areas, boxes)))


def _overlap(a, b) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def _text_colour(background) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with the label's colour (WCAG 2's contrast ratio): white on
    angry's orange and disgust's green was under 4:1."""
    linear = [c / 255 / 12.92 if c / 255 <= 0.03928 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in background]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    return (0, 0, 0) if (luminance + 0.05) / 0.05 >= 1.05 / (luminance + 0.05) else (255, 255, 255)


TINY_SIDE = 240  # pictures smaller than this are enlarged for drawing: labels of a readable size fit


def _label_place(box, size, canvas_size, placed, others, line, preferred: int | None = None, side: bool = False) -> tuple:
    """Where a label of `size` goes: above the box, else below it, else inside its top or bottom edge,
    moved into the picture; first of all clear of the labels already `placed`, then whole where it was
    meant to be, then covering as little of the `others` faces' boxes as it can. The `preferred` side
    (an index of those four) wins where it is clear on all three counts; `side`: the index is returned too."""
    x, y, w, h = box
    width, height = size
    left = min(max(0, x - line // 2), max(0, canvas_size[0] - width))
    tops = (y - height, y + h, y, y + h - height)

    def inside(top):
        return 0 <= top and top + height <= canvas_size[1]

    def cover(top, rects):
        area = (left, top, left + width, top + height)
        return sum(max(0, min(area[2], r[2]) - max(area[0], r[0])) * max(0, min(area[3], r[3]) - max(area[1], r[1]))
                   for r in rects)

    faces = [(ox, oy, ox + ow, oy + oh) for ox, oy, ow, oh in others]
    candidates = [min(max(0, top), max(0, canvas_size[1] - height)) for top in tops]
    best = min(range(len(tops)), key=lambda i: (cover(candidates[i], placed) > 0, not inside(tops[i]),
                                                 cover(candidates[i], faces), i))
    if preferred is not None and inside(tops[preferred]) and not cover(candidates[preferred], placed + faces):
        best = preferred
    return (left, candidates[best], best) if side else (left, candidates[best])


def save_annotated(image: Image.Image, path: str | Path) -> Path:
    """Save an annotated copy as JPEG, marked as ferkit's in its EXIF data (so that a later run knows it
    may replace it: see `ferkit.results.check_replaceable`); one wider or taller than JPEG allows, scaled down."""
    exif = Image.Exif()
    exif[SOFTWARE] = f"ferkit {__version__}"
    if max(image.size) > JPEG_MAX_SIDE:  # a panorama: JPEG cannot hold it whole
        image = image.copy()
        image.thumbnail((JPEG_MAX_SIDE, JPEG_MAX_SIDE))
    image.save(path, format="JPEG", quality=92, exif=exif)
    return Path(path)


MP4_MARK = b"free" + b"ferkit"  # an MP4 box players skip ("free" space), holding ferkit's name


def mark_video(path: str | Path) -> None:
    """Mark an annotated MP4 video as ferkit's: a `free` box after its others, which players skip."""
    box = MP4_MARK + f" {__version__}".encode()
    with open(path, "ab") as video:
        video.write((4 + len(box)).to_bytes(4, "big") + box)


def written_by_ferkit(path: str | Path) -> bool:
    """Whether the image at `path` is one that ferkit saved: an annotated copy (`save_annotated`, EXIF), a
    plot (ferkit.plots, a PNG text chunk) or an annotated video (`mark_video`)."""
    if str(path).lower().endswith(".mp4"):
        try:
            with open(path, "rb") as video:
                video.seek(max(0, Path(path).stat().st_size - 64))
                return MP4_MARK in video.read()
        except OSError:
            return False
    try:
        with open_without_size_guard(path) as image:  # a very large photo is still a photo, not an error here
            # a PNG's text chunks are read on opening; its EXIF would be looked for by decoding every pixel
            software = image.info.get("Software") or (image.getexif().get(SOFTWARE) if image.format != "PNG" else "")
            return str(software).startswith("ferkit")
    except (OSError, ValueError):
        return False
