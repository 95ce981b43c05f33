import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ferkit import images
from ferkit.errors import FerkitError
from ferkit.images import faces_to_batch, load_image, to_model_input

PEOPLE = Path(__file__).resolve().parents[1] / "examples" / "people.jpg"


def _gradient(width=64, height=40) -> np.ndarray:
    return np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P", "CMYK", "1", "I;16", "I", "F"])
def test_every_mode_becomes_a_48x48_uint8_face(tmp_path, mode):
    gray = Image.fromarray(_gradient())
    if mode == "I;16":
        image = Image.fromarray(np.asarray(gray, np.uint16) * 257)
    elif mode == "F":
        image = Image.fromarray(np.asarray(gray, np.float32) / 255.0)
    else:
        image = gray.convert(mode)
    face = to_model_input(image, (48, 48))
    assert face.shape == (48, 48) and face.dtype == np.uint8
    if mode not in ("1", "P"):
        # the left-to-right gradient survives the conversion in every lossless mode
        assert face[:, 0].mean() < 40 and face[:, -1].mean() > 215


@pytest.mark.parametrize("values", [lambda g: g.astype(np.float32) * 4, lambda g: g.astype(np.int32) * 1000,
                                    lambda g: g.astype(np.float32) / 127.5 - 1], ids=["float-0-1020", "int-0-255000", "float-minus-1-1"])
def test_a_32_bit_image_in_no_usual_range_is_stretched_as_viewers_show_it(tmp_path, values):
    path = tmp_path / "scientific.tiff"
    Image.fromarray(values(_gradient())).save(path)
    assert np.array_equal(np.asarray(images.to_grayscale(load_image(path))), _gradient())


def test_sixteen_bit_png_keeps_its_range(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.asarray(_gradient(), np.uint16) * 257).save(path)
    face = to_model_input(load_image(path), (48, 48))
    assert face.max() > 240 and face.min() < 10


def test_cmyk_jpeg_loads(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(_gradient()).convert("CMYK").save(path)
    assert load_image(path).mode == "CMYK"
    assert to_model_input(load_image(path), (48, 48)).shape == (48, 48)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    image = Image.fromarray(_gradient(64, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    image.save(path, exif=exif.tobytes())
    upright = load_image(path)
    assert upright.size == (40, 64)


def test_a_pil_image_turned_upright_by_its_user_is_not_turned_again(tmp_path):
    """As a camera writes it: orientation 6 and the stored pixels' width and height."""
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x8769] = {0xA002: 64, 0xA003: 40}  # its Exif block: the stored pixels' width and height
    Image.fromarray(_gradient(64, 40)).save(path, exif=exif.tobytes())
    opened = Image.open(path)
    assert load_image(opened).size == (40, 64) == load_image(opened.convert("RGB")).size
    turned = opened.rotate(-90, expand=True)  # by hand; Pillow keeps the EXIF block
    assert turned.getexif()[0x0112] == 6 and load_image(turned).size == (40, 64)
    assert np.array_equal(np.asarray(load_image(turned)), np.asarray(load_image(path)))


def test_animated_gif_gives_its_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("L", (20, 20), 10), Image.new("L", (20, 20), 240)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    assert np.asarray(to_model_input(load_image(path), (48, 48))).mean() < 50


def test_transparent_pixels_become_white_not_black():
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert to_model_input(rgba, (10, 10)).min() == 255


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty"), (b"this is text, not a picture", "not an image"), ("truncated", "could not be decoded")],
)
def test_bad_files_raise_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.jpg"
    if content == "truncated":
        buffer = io.BytesIO()
        Image.fromarray(_gradient(200, 200)).save(buffer, format="PNG")
        content = buffer.getvalue()[:200]
    path.write_bytes(content)
    with pytest.raises(FerkitError, match=message) as info:
        load_image(path)
    assert "\n" not in str(info.value)


def test_postscript_is_never_handed_to_ghostscript_whatever_its_name(tmp_path):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n"
    (tmp_path / "drawing.jpg").write_bytes(eps)
    for source in (tmp_path / "drawing.jpg", eps):
        with pytest.raises(FerkitError, match="is not an image ferkit can read$"):
            load_image(source)
    ppm = tmp_path / "people.ppm"  # other formats Pillow decodes itself still read
    Image.open(PEOPLE).save(ppm)
    assert load_image(ppm).size == Image.open(PEOPLE).size


def test_missing_file_and_folder_are_named(tmp_path):
    with pytest.raises(FerkitError, match="no such file"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(FerkitError, match="is a folder"):
        load_image(tmp_path)


def test_images_over_the_pixel_limit_are_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (400, 300)).save(path)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100_000)
    with pytest.raises(FerkitError, match="over the limit"):
        load_image(path)


def test_arrays_are_accepted_as_images():
    assert load_image(np.zeros((30, 20, 3), np.uint8)).size == (20, 30)
    with pytest.raises(FerkitError, match="shape"):
        load_image(np.zeros((3, 3, 3, 3)))


@pytest.mark.parametrize("kind", ["uint16", "float 0-1", "float 0-255", "int64", "bool"])
def test_arrays_of_every_dtype_read_like_the_same_image_as_a_file(tmp_path, kind):
    gradient = _gradient()
    array = {
        "uint16": gradient.astype(np.uint16) * 257,  # what a 16-bit PNG holds
        "float 0-1": gradient / 255.0,
        "float 0-255": gradient.astype(np.float32),
        "int64": gradient.astype(np.int64),
        "bool": gradient > 127,
    }[kind]
    expected = np.where(gradient > 127, 255, 0) if kind == "bool" else gradient
    for channels in (None, 3):
        given = array if channels is None else np.repeat(array[..., None], channels, axis=2)
        read = np.asarray(load_image(given).convert("L"), dtype=int)
        assert np.abs(read - expected).max() <= 1, kind
    Image.fromarray(gradient.astype(np.uint16) * 257).save(tmp_path / "16bit.png")
    from_file = np.asarray(to_model_input(load_image(tmp_path / "16bit.png"), (48, 48)), dtype=int)
    from_array = np.asarray(to_model_input(load_image(gradient.astype(np.uint16) * 257), (48, 48)), dtype=int)
    assert np.abs(from_file - from_array).max() <= 1


def test_faces_to_batch_repeats_gray_to_the_model_channels():
    faces = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    batch = faces_to_batch(faces, 3)
    assert batch.shape == (2, 4, 4, 3) and batch.dtype == np.float32
    assert np.array_equal(batch[..., 2], faces)


def test_a_jpeg_over_the_pixel_limit_decodes_at_a_smaller_scale(tmp_path, monkeypatch):
    path = tmp_path / "big.jpg"
    gradient = np.tile(np.linspace(0, 255, 800, dtype=np.uint8), (600, 1))
    Image.fromarray(gradient).convert("RGB").save(path, quality=95)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100_000)  # 480,000 pixels: a quarter is still over
    image = load_image(path)
    assert image.size == (200, 150)  # decoded at 1/4
    small = np.asarray(image.convert("L"), float)
    assert abs(small[:, 0].mean() - gradient[:, :4].mean()) < 8 and abs(small[:, -1].mean() - gradient[:, -4:].mean()) < 8


def test_a_real_108_megapixel_jpeg_is_read_at_a_smaller_scale_not_refused(tmp_path):
    """Pillow itself refuses images this large (its decompression-bomb guard); ferkit's guard comes after
    the reduced decode."""
    path = tmp_path / "phone.jpg"
    Image.new("L", (12000, 9000), 128).save(path, quality=50)
    image = load_image(path)
    assert image.size == (6000, 4500) and images.full_size(image) == (12000, 9000)
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own guard is back for everyone else


def _heic_of_people(path):
    from ferkit.images import enable_heif

    if not enable_heif():
        pytest.skip("ferkit[heic] (pillow-heif) is not installed")
    Image.open(PEOPLE).save(path, format="HEIF")
    return path


def test_a_damaged_heic_is_a_one_line_error_or_a_picture_never_a_crash(tmp_path):
    path = _heic_of_people(tmp_path / "damaged.heic")
    data = bytearray(path.read_bytes())
    data[382] ^= 0xFF  # pillow-heif 1.x's decoder raises EOFError for this one; 0.16's decodes it
    path.write_bytes(bytes(data))
    try:
        assert load_image(path).size == (920, 360)
    except FerkitError as err:
        assert "could not be decoded" in str(err) and "\n" not in str(err)


def test_a_heic_named_jpg_reads_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    path = _heic_of_people(tmp_path / "renamed.jpg")
    code = f"from ferkit.images import load_image; print(load_image({str(path)!r}).size)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "(920, 360)", result.stderr


@pytest.mark.skipif("AVIF" in images.image_decoders(), reason="this Pillow reads AVIF")
def test_an_avif_photo_on_a_pillow_without_avif_says_to_upgrade(tmp_path):
    path = tmp_path / "photo.avif"
    path.write_bytes(b"\x00\x00\x00\x1cftypavif")
    with pytest.raises(FerkitError, match="needs Pillow 11.3 or later"):
        load_image(path)


@pytest.mark.parametrize("array, words", [
    (np.full((4, 4, 3), -0.5), "-0.5 to -0.5; give values in 0-1 or 0-255"),
    (np.full((4, 4), 300.0), "0-1 or 0-255"),
    (np.full((4, 4), np.nan), "NaN"),
    (np.full((4, 4), -3, np.int32), "0-255 or 0-65535"),
    (np.full((4, 4), "a"), "numbers"),
])
def test_arrays_with_values_no_image_holds_are_refused_in_one_line(array, words):
    with pytest.raises(FerkitError, match=words):
        load_image(array)


def test_small_integers_in_a_wide_type_are_8_bit_values():
    gradient = _gradient()
    for dtype in (np.int16, np.uint16, np.int32):  # arithmetic on an 8-bit photo gives such arrays
        assert np.array_equal(np.asarray(load_image(gradient.astype(dtype)).convert("L")), gradient)


DAMAGED_EXIF = b"Exif\x00\x00" + b"\x13\x37" * 20  # not a TIFF block: Pillow's parser raises SyntaxError


def test_a_photo_with_a_damaged_exif_block_is_read_as_it_is(tmp_path):
    import ferkit

    picture = Image.open(PEOPLE).convert("RGB")
    for suffix in (".png", ".webp"):
        picture.save(tmp_path / f"bad{suffix}", exif=DAMAGED_EXIF)
        loaded = load_image(tmp_path / f"bad{suffix}")
        assert loaded.size == picture.size
        assert len(ferkit.analyze(tmp_path / f"bad{suffix}")) == 3
    with Image.open(tmp_path / "bad.png") as opened:  # the Python API's PIL images too
        assert load_image(opened).size == picture.size


def test_a_multi_picture_jpeg_over_the_pixel_limit_decodes_at_a_smaller_scale(tmp_path, monkeypatch):
    """Phones save JPEGs with a gain or depth map as a second picture, which Pillow opens as MPO."""
    path = tmp_path / "phone.jpg"
    picture = Image.fromarray(_gradient(800, 600)).convert("RGB")
    picture.save(path, format="MPO", save_all=True, append_images=[picture.resize((80, 60))])
    assert Image.open(path).format == "MPO"
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100_000)
    image = load_image(path)
    assert image.size == (200, 150) and images.full_size(image) == (800, 600)


def test_black_and_white_and_premultiplied_and_16_bit_photos_show_their_faces(tmp_path):
    import ferkit

    people = Image.open(PEOPLE)
    people.convert("1").save(tmp_path / "dithered.png")  # 1 bit per pixel: dots, not tones
    gray16 = np.asarray(people.convert("L")).astype(np.uint16)  # 16-bit PNG of 8-bit values, as the array is read
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    for given in (tmp_path / "dithered.png", tmp_path / "gray16.png", people.convert("LA").convert("La"),
                  people.convert("RGBA").convert("RGBa")):
        assert len(ferkit.analyze(given)) == 3, given
    from_file = to_model_input(load_image(tmp_path / "gray16.png"), (48, 48))
    assert np.array_equal(from_file, to_model_input(load_image(gray16), (48, 48)))


def test_names_that_are_no_file_are_said_to_be(tmp_path):
    from click.testing import CliRunner

    from ferkit.cli import cli

    with pytest.raises(FerkitError, match="an empty name is no image file"):
        load_image("")
    for given, message in (("", "error: an empty name is no file or folder"),
                           ("-", "error: - (standard input) is not read: give the image's file name")):
        result = CliRunner().invoke(cli, ["predict", given, "--out", str(tmp_path / "out")])
        assert result.exit_code == 2 and result.output.strip() == message
    read, write = os.pipe()
    os.close(write)
    with pytest.raises(FerkitError, match=r"is not a file \(a pipe\?\); save the image to a file first"):
        load_image(f"/proc/self/fd/{read}")
    os.close(read)
