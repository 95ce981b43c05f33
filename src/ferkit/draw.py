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
from ferkit.faces import Box
from ferkit.images import decoded_scale, full_size, load_image, to_rgb
from ferkit.predict import checked_box
from ferkit.results import Face

SOFTWARE = 0x0131  # the EXIF tag naming the program that wrote an image

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


def draw_faces(image: Image.Image | np.ndarray | str | os.PathLike, faces: Sequence[Face | Box], *,
               channels: str = "rgb", numbers: Sequence[int] | None = None) -> Image.Image:
    """A copy of `image` (RGB) with every face's box, number and top emotion drawn on it. `image` is what
    `ferkit.analyze` takes: a PIL image, a path, or an array (`channels="bgr"` for OpenCV's); `faces` are
    Faces, or plain (x, y, width, height) boxes, drawn numbered without an emotion. Boxes are in the
    photo's pixels, also where load_image decoded a very large JPEG at a reduced scale. `numbers`: the
    faces' numbers (a video's track ids, say) instead of 1, 2, ..."""
    if not isinstance(image, Image.Image):
        image = load_image(image, channels=channels)
    across, down = decoded_scale(image)
    canvas = to_rgb(image).copy()
    draw = ImageDraw.Draw(canvas)
    scale = max(canvas.size) / 640
    line = max(2, round(3 * scale))
    font = ImageFont.load_default(size=max(11, round(16 * scale)))
    for number, face in zip(numbers if numbers is not None else range(1, len(faces) + 1), faces):
        x, y, w, h = face.box if isinstance(face, Face) else checked_box(face, full_size(image))
        x, y, w, h = round(x / across), round(y / down), round(w / across), round(h / down)
        colour = colour_of(face.emotion) if isinstance(face, Face) else (255, 255, 255)
        draw.rectangle((x, y, x + w, y + h), outline=colour, width=line)
        label = f"{number} {face.emotion}{'?' if face.uncertain else ''} {face.score:.0%}" if isinstance(face, Face) else str(number)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        text_w, text_h = right - left, bottom - top
        pad = max(2, line)
        above = y - text_h - 2 * pad >= 0
        ty = y - text_h - 2 * pad if above else y + h
        draw.rectangle((x - line // 2, ty, x + text_w + 2 * pad, ty + text_h + 2 * pad), fill=colour)
        draw.text((x + pad - left, ty + pad - top), label, fill=(0, 0, 0), font=font)
    return canvas


def save_annotated(image: Image.Image, path: str | Path) -> Path:
    """Save an annotated copy as JPEG, marked as ferkit's in its EXIF data (so that a later run knows it
    may replace it: see `ferkit.results.check_replaceable`)."""
    exif = Image.Exif()
    exif[SOFTWARE] = f"ferkit {__version__}"
    image.save(path, format="JPEG", quality=92, exif=exif)
    return Path(path)


def written_by_ferkit(path: str | Path) -> bool:
    """Whether the image at `path` is one that ferkit saved: an annotated copy (`save_annotated`, EXIF) or a
    plot (ferkit.plots, a PNG text chunk)."""
    try:
        with Image.open(path) as image:
            software = image.getexif().get(SOFTWARE) or image.info.get("Software", "")
            return str(software).startswith("ferkit")
    except (OSError, ValueError):
        return False
