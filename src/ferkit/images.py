"""Reading any image the way training saw its faces: EXIF-upright, grayscale, resized.

Every path into a model (datasets, `predict`, later detectors) goes through `to_model_input`, so the
preprocessing at predict time cannot drift from the one used in training.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from ferkit.errors import FerkitError, first_line

# HEIC/HEIF (iPhones' photos) need the heic extra; AVIF needs Pillow 11.3 or later.
HEIF_SUFFIXES = (".heic", ".heif", ".hif")  # .hif: Canon and Fujifilm cameras
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".avif",
                  ".pgm", ".ppm", ".pbm", ".pnm",  # Netpbm: the faces of older datasets (AT&T's, Yale's)
                  ".tga", ".qoi", ".jp2", ".j2k") + HEIF_SUFFIXES

# ferkit's own size limit, applied after a reduced-scale decode; it stands in for Pillow's bomb guard,
# which load_image turns off while opening (it would refuse a 108 Mpx phone photo outright).
MAX_IMAGE_PIXELS = 64_000_000

# Pillow decoders that run another program on the file (PostScript: Ghostscript); never used, whatever
# the file's name, since a photo may come from anywhere.
EXTERNAL_DECODERS = ("EPS",)

# What decoders raise for a damaged file (pillow-heif: EOFError and RuntimeError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, RuntimeError)

# Where load_image records the (width, height) of a JPEG it decoded at a reduced scale.
FULL_SIZE = "ferkit.full_size"


class ImageError(FerkitError):
    """An unreadable image file; `reason` is the short cause ("empty file"), the message names the path."""

    def __init__(self, path: Path, reason: str, message: str):
        super().__init__(message)
        self.path, self.reason = path, reason


# Why a file could not be read now, though the same file may be read later, unchanged.
PASSING_REASONS = ("permission denied", "cannot be read", "missing")


CHANNEL_ORDERS = ("rgb", "bgr")


def load_image(source: str | os.PathLike | Image.Image | np.ndarray | bytes, *, channels: str = "rgb") -> Image.Image:
    """Open an image upright (EXIF orientation applied), first frame of an animation, fully decoded:
    a path, a PIL image, an array, or an image file's bytes (or a binary file object).

    `channels` says how a colour array's channels are ordered: "rgb" (Pillow, imageio, matplotlib) or
    "bgr" (OpenCV's `cv2.imread` and video frames); files and PIL images carry their own.
    Raises FerkitError with a one-line reason for a missing, empty, truncated or non-image file.
    """
    if channels not in CHANNEL_ORDERS:
        raise FerkitError(f"channels must be 'rgb' or 'bgr', not {channels!r}")
    if isinstance(source, Image.Image):
        if 0 in source.size:
            raise FerkitError(f"an image needs at least one pixel, got a PIL image of {source.size[0]}x{source.size[1]}")
        try:
            source.load()
        except (OSError, ValueError) as err:  # a closed image, a file cut short
            raise FerkitError(f"the PIL image cannot be read: {first_line(err)}") from None
        return source if _turned_upright_already(source) else _upright(source)
    if isinstance(source, np.ndarray):
        if channels == "bgr" and source.ndim == 3 and source.shape[2] in (3, 4):
            source = np.concatenate([source[:, :, 2::-1], source[:, :, 3:]], axis=2)
        return _array_to_image(source)
    if isinstance(source, (bytes, bytearray, memoryview)) or hasattr(source, "read"):
        try:
            return _decode(io.BytesIO(source) if not hasattr(source, "read") else source, Path(_BYTES))
        except ImageError:
            if _names_a_file(source):
                raise FerkitError(f"bytes are read as an image file's content, and {bytes(source)!r} is a file's name: "
                                  "give the name as a str (os.fsdecode(name))") from None
            raise
    if not isinstance(source, (str, os.PathLike)):
        raise FerkitError(f"an image is a path, a PIL image, an array or an image file's bytes, not {type(source).__name__}")
    if "://" in str(source):
        raise ImageError(Path(str(source)), "a URL",
                         f"{source}: URLs are not fetched (ferkit works offline); download the file first")
    if not str(source).strip():
        raise ImageError(Path(str(source)), "missing", "an empty name is no image file")
    path = Path(source)
    if not path.exists():
        raise ImageError(path, "missing", f"no such file: {path}")
    if path.is_dir():
        raise ImageError(path, "a folder", f"{path} is a folder, not an image")
    if not path.is_file():  # a pipe (/dev/stdin, say): ferkit reads a photo more than once
        raise ImageError(path, "not a file", f"{path} is not a file (a pipe?); save the image to a file first")
    if path.stat().st_size == 0:
        raise ImageError(path, "empty file", f"{path} is an empty file")
    _check_decoder_for(path)
    return _decode(path, path)


_BYTES = "<bytes>"  # how an image given as bytes is named in messages


def _names_a_file(source) -> bool:
    """Whether bytes given as an image are rather a file's name (b"photo.jpg")."""
    return (isinstance(source, (bytes, bytearray)) and 0 < len(source) < 4096 and b"\0" not in source
            and os.path.isfile(os.fsdecode(bytes(source))))


def decode_image_bytes(data: bytes, *, max_pixels: int | None = None, formats: Sequence[str] | None = None,
                       name: str = _BYTES) -> Image.Image:
    """The image in `data`, upright, as `load_image` decodes it (a JPEG over `max_pixels` at a reduced
    scale), with a pixel limit of one's own (default MAX_IMAGE_PIXELS); an ImageError whose `reason` is "over the pixel limit" for an
    image larger still, or says why the bytes are no image. `formats`: the only ones tried; `name`: the
    image's name in messages."""
    return _decode(io.BytesIO(data), Path(name), max_pixels=max_pixels, formats=formats)


def _decode(file, path: Path, *, max_pixels: int | None = None, formats: Sequence[str] | None = None) -> Image.Image:
    """The image in `file` (a path or a binary file object), upright; `path` names it in errors."""
    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels  # read at each call: the limit may be set at run time
    photo_size = None
    try:
        image = _open(file, formats)
        # MPO: a phone's JPEG that carries a second picture (a gain or depth map), decoded as JPEG is
        if image.format in ("JPEG", "MPO") and image.width * image.height > max_pixels:
            photo_size = image.size
            _decode_smaller(image, max_pixels)
        if image.width * image.height > max_pixels:
            raise ImageError(
                path, "over the pixel limit", f"{path} is {image.width}x{image.height} pixels, over the "
                f"limit of {max_pixels:,}; resize it first"
            )
        image.seek(0)
        image.load()
    except FerkitError:
        raise
    except UnidentifiedImageError:
        from ferkit.sources import VIDEO_SUFFIXES  # sources imports this module

        hint = " (a video: ferkit.video.analyze_video reads it)" if path.suffix.lower() in VIDEO_SUFFIXES else ""
        raise ImageError(path, "not an image", f"{path} is not an image ferkit can read{hint}") from None
    except PermissionError:
        raise ImageError(path, "permission denied", f"{path} cannot be read: permission denied") from None
    except OSError as err:
        if err.errno is not None:  # the system's own error (a failing disk, a network share gone), not the file's content
            raise ImageError(path, "cannot be read", f"{path} cannot be read ({first_line(err)})") from None
        raise ImageError(path, first_line(err), f"{path} could not be decoded ({first_line(err)})") from None
    except DECODE_ERRORS as err:
        raise ImageError(path, first_line(err), f"{path} could not be decoded ({first_line(err)})") from None
    if image.mode in ("I", "F"):
        image = _in_usual_range(image)
    upright = _upright(image)
    if photo_size:
        upright.info[FULL_SIZE] = photo_size if upright.size == image.size else photo_size[::-1]
    return upright


def _upright(image: Image.Image) -> Image.Image:
    """`image` turned as its EXIF orientation says; as it is where its EXIF block is damaged (Pillow then
    raises SyntaxError, struct.error, ... as it parses it): the pixels themselves are fine."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - any error of the EXIF parser
        return image


def _turned_upright_already(image: Image.Image) -> bool:
    """Whether a PIL image that says it lies on its side (EXIF orientation 5-8) was turned already: its
    width and height are the EXIF block's swapped (Image.rotate and transpose keep the EXIF block, and
    turning it again would put it on its side)."""
    try:
        exif = image.getexif()
        width, height = (exif.get_ifd(0x8769).get(tag) for tag in (0xA002, 0xA003))  # PixelXDimension, PixelYDimension
        return exif.get(0x0112) in (5, 6, 7, 8) and bool(width and height) and image.size == (height, width) != (width, height)
    except Exception:  # noqa: BLE001 - any error of the EXIF parser
        return False


def _check_decoder_for(path: Path) -> None:
    """A one-line error for a photo whose format needs what is not installed."""
    suffix = path.suffix.lower()
    if suffix in HEIF_SUFFIXES and not enable_heif():
        raise ImageError(path, "needs the heic extra", f"{path} is a HEIC/HEIF photo; reading it needs ferkit's "
                         "'heic' extra: pip install 'ferkit[heic]'")
    if suffix == ".avif" and "AVIF" not in image_decoders():
        raise ImageError(path, "needs Pillow 11.3", f"{path} is an AVIF photo; reading it needs Pillow 11.3 or "
                         "later: pip install -U pillow")


def enable_heif() -> bool:
    """Let Pillow open HEIC/HEIF images where pillow-heif (the heic extra) is installed; whether it can."""
    global _HEIF
    if _HEIF is None:
        try:
            from pillow_heif import register_heif_opener
        except ImportError:
            _HEIF = False
        else:
            register_heif_opener()
            _HEIF = True
    return _HEIF


_HEIF: bool | None = None  # not looked for yet


def image_decoders() -> tuple[str, ...]:
    """The image formats this installation decodes (Pillow's, and HEIF with the heic extra)."""
    enable_heif()
    Image.init()
    return tuple(sorted(Image.OPEN))


def _open(file, formats: Sequence[str] | None = None) -> Image.Image:
    """Image.open of a path or file object, HEIC/HEIF included where the heic extra is installed
    (pillow-heif is imported only for a file Pillow cannot identify: a HEIC under any name, at no cost to JPEGs).
    `formats`: the only ones tried (default: all but those of EXTERNAL_DECODERS)."""
    try:
        return open_without_size_guard(file, formats)
    except UnidentifiedImageError:
        if _HEIF is None and enable_heif():
            if hasattr(file, "seek"):
                file.seek(0)
            return open_without_size_guard(file, formats)
        raise


_SIZE_GUARD = threading.Lock()


def open_without_size_guard(file, formats: Sequence[str] | None = None) -> Image.Image:
    """Image.open (the header only) without Pillow's decompression-bomb check, which refuses a 108 Mpx
    phone photo outright: ferkit decodes a JPEG that large at a reduced scale, then applies its own
    limit. The check is a global setting, so it is off for the shortest time, one caller at a time."""
    Image.init()
    if formats is None:
        formats = [name for name in Image.OPEN if name not in EXTERNAL_DECODERS]
    with _SIZE_GUARD:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(file, formats=formats)
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def full_size(image: Image.Image) -> tuple[int, int]:
    """The (width, height) of the photo `image` was decoded from: its own size unless load_image
    decoded a very large JPEG at a reduced scale."""
    return tuple(image.info.get(FULL_SIZE, image.size))


def decoded_scale(image: Image.Image) -> tuple[float, float]:
    """How many of the photo's pixels one of `image`'s pixels stands for, across and down (1, 1 unless
    load_image decoded it at a reduced scale): photo coordinates = image coordinates x this."""
    width, height = full_size(image)
    return width / image.width, height / image.height


def _decode_smaller(jpeg: Image.Image, max_pixels: int) -> None:
    """Make a JPEG over the pixel limit decode at 1/2, 1/4 or 1/8 scale (Pillow's draft mode: the
    decoder skips the detail, so a 108 Mpx phone photo costs what a 27 or 7 Mpx one does). Results are
    still given in the photo's own pixels (`decoded_scale`)."""
    for factor in (2, 4, 8):
        if jpeg.width * jpeg.height / factor**2 <= max_pixels:
            break
    jpeg.draft(jpeg.mode, (jpeg.width // factor, jpeg.height // factor))


def to_grayscale(image: Image.Image) -> Image.Image:
    """8-bit grayscale from any mode: L, RGB(A), P, CMYK, 1, and 16/32-bit integer or float images."""
    image = _unpremultiplied(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image)
        scale = _to_8bit_scale(values)  # as for arrays: 16-bit once past 255, floats up to 1 are 0-1, -1..1 refused
        return Image.fromarray(np.clip(values.astype(np.float64) * scale + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Flatten transparency onto white, the way viewers show it, instead of onto black.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("L")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode (what detectors and annotated copies use); gray modes stay gray-looking."""
    image = _unpremultiplied(image)
    if image.mode == "RGB":
        return image
    if image.mode == "1":  # dithered black and white: detectors find faces in its gray tones, not its dots
        return image.convert("L").filter(ImageFilter.GaussianBlur(DITHER_BLUR)).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F", "RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    ):
        if image.mode in ("RGBA", "PA") or image.mode == "P":
            rgba = image.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return to_grayscale(image).convert("RGB")
    return image.convert("RGB")


# Pixels of blur that turn a 1-bit photo's dots back into tones for a detector: on the 9 annotated photos
# made 1-bit, YuNet finds 9 of 43 faces at 0.8, all at 1.2, all and a false one at 1.5.
DITHER_BLUR = 1.2


def _unpremultiplied(image: Image.Image) -> Image.Image:
    """La and RGBa (alpha premultiplied, which Pillow converts to little else) as LA and RGBA."""
    return image.convert(image.mode.upper()) if image.mode in ("La", "RGBa") else image


def to_model_input(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """The face as a `size` = (height, width) uint8 grayscale array, resized with area averaging."""
    gray = to_grayscale(image)
    height, width = size
    if gray.size != (width, height):
        gray = gray.resize((width, height), Image.Resampling.BOX if gray.width > width else Image.Resampling.BILINEAR)
    return np.asarray(gray, dtype=np.uint8)


def resized_faces(faces: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, H, W) uint8 faces at a model's (height, width), resized as faces are at inference."""
    if tuple(faces.shape[1:3]) == tuple(size):
        return faces
    return np.stack([to_model_input(Image.fromarray(face), size) for face in faces])


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise FerkitError(f"an image array must be HxW, HxWx3 or HxWx4, got shape {array.shape}")
    if array.size == 0:
        raise FerkitError(f"an image array needs at least one pixel, got shape {array.shape}")
    if array.dtype != np.uint8:
        scale = _to_8bit_scale(array)
        array = np.clip(array.astype(np.float64) * scale + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def _in_usual_range(image: Image.Image) -> Image.Image:
    """A 32-bit image file as it is where its values lie in a usual range (0-1 or 0-255 for floats, up to
    65535 for integers); else (a scientific TIFF's) stretched onto 8-bit gray, as image viewers show it."""
    values = np.asarray(image)
    try:
        _to_8bit_scale(values)
    except FerkitError:
        stretched = Image.fromarray(_stretched(values.astype(np.float64)), "L")
        stretched.info.update(image.info)
        return stretched
    return image


def _stretched(values: np.ndarray) -> np.ndarray:
    """`values` mapped linearly onto 0-255, their least to 0 and their most to 255 (NaN and infinities to 0)."""
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    low, high = values[finite].min(), values[finite].max()
    spread = (values - low) * (255.0 / (high - low)) if high > low else np.zeros(values.shape)
    return np.clip(np.where(finite, spread, 0) + 0.5, 0, 255).astype(np.uint8)


def _to_8bit_scale(array: np.ndarray) -> float:
    """What brings `array`'s values to 0-255: floats up to 1 and booleans are 0-1, other floats 0-255;
    integers past 255 span 0-65535 (16-bit), the rest 0-255. Values outside these, NaN and infinities are
    a FerkitError rather than guessed at (a -1..1 normalised array, say)."""
    if array.dtype == bool:
        return 255.0
    if array.dtype.kind not in "uif":
        raise FerkitError(f"an image array holds numbers, not {array.dtype}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise FerkitError("an image array must not hold NaN or infinite values")
    low, high = array.min(), array.max()
    top = 255 if array.dtype.kind == "f" else 65535
    if low < 0 or high > top:
        ranges = "0-1 or 0-255" if array.dtype.kind == "f" else "0-255 or 0-65535"
        raise FerkitError(f"an image array of {array.dtype} holds {low:g} to {high:g}; give values in {ranges}")
    if array.dtype.kind == "f":
        return 255.0 if high <= 1.0 else 1.0
    return 255.0 / 65535.0 if high > 255 else 1.0


def faces_to_batch(faces: np.ndarray, channels: int, dtype=np.float32) -> np.ndarray:
    """(N, H, W) uint8 faces -> (N, H, W, channels) in 0-255 (float32 unless `dtype` says otherwise),
    gray repeated: the model's input."""
    batch = np.asarray(faces, dtype=dtype)[..., None]
    return np.repeat(batch, channels, axis=-1) if channels > 1 else batch
