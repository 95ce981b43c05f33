"""Whole-photo analysis: detection -> crops -> batched classification, on real and generated images."""

import numpy as np
import pytest
from PIL import Image

from conftest import pattern_face
from ferkit import analyze
from ferkit.errors import FerkitError
from ferkit.faces import Detection
from ferkit.predict import analyze_images
from test_faces import FACES, needs_faces


def _canvas_with_faces(boxes, labels):
    canvas = np.full((200, 300), 90, np.uint8)
    for (x, y, w, h), label in zip(boxes, labels):
        canvas[y : y + h, x : x + w] = pattern_face(label, np.random.default_rng(label), size=w)
    return np.stack([canvas] * 3, axis=-1)


def test_a_detector_callable_drives_the_crops(trained_run):
    boxes = [(10, 20, 48, 48), (200, 100, 60, 60)]
    picture = _canvas_with_faces(boxes, [5, 3])

    def detector(rgb):
        return [Detection(b, 0.9, [(b[0], b[1])]) for b in boxes]

    faces = analyze(picture, model=trained_run, detector=detector)
    assert [f.box for f in faces] == [boxes[1], boxes[0]]  # largest first
    assert all(f.detector_score == 0.9 and f.landmarks for f in faces)
    assert faces[0].to_dict()["detector_score"] == 0.9


def test_a_photo_without_faces_gives_an_empty_list(trained_run):
    noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    assert analyze(noise, model=trained_run) == []


def test_a_bad_image_in_a_stream_is_reported_and_the_rest_goes_on(trained_run, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(pattern_face(2, np.random.default_rng(0))).save(good)
    (tmp_path / "bad.jpg").write_text("not an image")
    results = list(analyze_images([good, tmp_path / "bad.jpg", good], model=trained_run, detector="none"))
    assert [r.ok for r in results] == [True, False, True]
    assert "not an image" in results[1].error and results[1].faces == []
    assert results[0].faces[0].probabilities == results[2].faces[0].probabilities
    with pytest.raises(FerkitError):
        analyze(tmp_path / "bad.jpg", model=trained_run)


def test_batching_does_not_change_the_results(trained_run):
    images = [_canvas_with_faces([(10, 10, 48, 48), (120, 60, 48, 48)], [i % 7, (i + 3) % 7]) for i in range(9)]
    boxes = [(10, 10, 48, 48), (120, 60, 48, 48)]
    one = [r.faces for r in analyze_images(images, model=trained_run, boxes=boxes, batch_faces=1)]
    many = [r.faces for r in analyze_images(images, model=trained_run, boxes=boxes, batch_faces=64)]
    for a, b in zip(one, many):
        assert [f.emotion for f in a] == [f.emotion for f in b]
        assert np.allclose([list(f.probabilities.values()) for f in a], [list(f.probabilities.values()) for f in b], atol=1e-6)


@pytest.mark.parametrize("mode", ["RGBA", "P", "CMYK", "I;16", "L"])
def test_any_image_mode_goes_through_detection(trained_run, tmp_path, mode):
    image = Image.fromarray(_canvas_with_faces([(10, 10, 48, 48)], [1]))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image.convert("L"), np.uint16) * 257)
    else:
        image = image.convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.save(path)
    [result] = analyze_images([path], model=trained_run, detector="auto")
    assert result.ok and result.image_size == (300, 200)


@needs_faces
def test_real_photo_gives_one_result_per_detected_face(trained_run):
    import json

    name, truth = next(iter(json.loads((FACES / "boxes.json").read_text())["images"].items()))
    faces = analyze(FACES / name, model=trained_run)
    assert len(faces) == len(truth)
    for face in faces:
        assert abs(sum(face.probabilities.values()) - 1) < 1e-4 and len(face.landmarks) == 5
