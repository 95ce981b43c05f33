"""Arbitrary bytes, text and shapes: a result or a one-line FerkitError, never another exception."""

import io
import json
import zipfile

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferkit.data import load_fer2013_csv
from ferkit.errors import FerkitError
from ferkit.images import load_image
from ferkit.runtime import METADATA_NAME, read_metadata

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _one_line(err: FerkitError) -> bool:
    return "\n" not in str(err) and str(err).strip() != ""


def _real_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()


@FUZZ
@given(data=st.one_of(st.binary(max_size=600),
                      st.builds(lambda cut, noise: _real_png()[:cut] + noise, st.integers(0, 120), st.binary(max_size=40))),
       suffix=st.sampled_from([".jpg", ".png", ".gif", ".webp", ".bmp", ".tif"]))
def test_any_bytes_as_an_image_file(tmp_path, data, suffix):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(data)
    try:
        image = load_image(path)
    except FerkitError as err:
        assert _one_line(err)
    else:
        assert image.width > 0 and image.height > 0


@FUZZ
@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=4),
       dtype=st.sampled_from([np.uint8, np.float32, np.int16, np.float64, bool]))
def test_any_array_as_an_image(shape, dtype):
    array = np.ones(shape, dtype=dtype)
    try:
        image = load_image(array)
    except FerkitError as err:
        assert _one_line(err)
    else:
        assert image.size == (array.shape[1], array.shape[0])


_csv_line = st.one_of(
    st.text(max_size=80),
    st.builds(lambda code, pixels, usage: f"{code},{' '.join(map(str, pixels))},{usage}",
              st.integers(-2, 9), st.lists(st.integers(-5, 300), max_size=2304 + 2).map(lambda p: p if len(p) != 2304 else p),
              st.sampled_from(["Training", "PublicTest", "PrivateTest", "", "Other"])),
)


@FUZZ
@given(header=st.sampled_from(["emotion,pixels,Usage", "emotion,pixels", "pixels,emotion,Usage", "", "a,b,c"]),
       lines=st.lists(_csv_line, max_size=4))
def test_any_text_as_a_fer2013_csv(tmp_path, header, lines):
    path = tmp_path / "fer.csv"
    path.write_text("\n".join([header, *lines]) + "\n")
    try:
        data = load_fer2013_csv(path, cache=False)
    except FerkitError as err:
        assert _one_line(err)
    else:
        assert data.images.shape[1:] == (48, 48) and len(data.images) == len(data.labels)


_VALID = {"model": "seed-cnn", "classes": ["a", "b"], "input_size": [48, 48], "channels": 1, "tta": "none"}
_ANY = st.one_of(st.none(), st.booleans(), st.integers(-3, 100), st.text(max_size=5),
                 st.lists(st.one_of(st.integers(-1, 60), st.text(max_size=2)), max_size=3), st.floats(allow_nan=True))


@FUZZ
@given(metadata=st.one_of(
    st.builds(lambda key, value: json.dumps({**_VALID, key: value}),
              st.sampled_from([*_VALID, "crop", "temperature", "face_margin", "extra_margins"]), _ANY),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.dictionaries(st.sampled_from(["model", "classes", "input_size", "channels", "tta", "crop", "temperature", "x"]),
                    st.one_of(st.none(), st.integers(-3, 100), st.text(max_size=5), st.lists(st.integers(0, 60), max_size=3),
                              st.floats(allow_nan=True)), max_size=8).map(json.dumps),
))
def test_any_metadata_in_a_model_file(tmp_path, metadata):
    path = tmp_path / "m.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(METADATA_NAME, metadata)
    try:
        meta = read_metadata(path)
    except FerkitError as err:
        assert _one_line(err)
    else:
        assert isinstance(meta.classes, list) and len(meta.input_size) == 2 and meta.channels in (1, 3)
        assert all(isinstance(v, int) and v > 0 for v in meta.input_size)
