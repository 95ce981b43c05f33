import json

import numpy as np
import pytest
from PIL import Image

from conftest import pattern_face
from ferkit.labels import EMOTIONS
from ferkit.predict import analyze_images, predict_image
from ferkit.runtime import load_classifier


def _one_face(image, **options):
    """The ImageResult for a photo of one face (or the given boxes), with no detection."""
    return next(analyze_images([image], detector="none", **options))


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "CMYK"])
def test_any_face_image_is_classified(trained_run, tmp_path, mode):
    face = Image.fromarray(pattern_face(3, np.random.default_rng(9), size=48)).resize((200, 200))
    path = tmp_path / f"face.{'jpg' if mode in ('CMYK', 'L', 'RGB') else 'png'}"
    face.convert(mode).save(path)
    result = _one_face(path, model=trained_run)
    assert result.image_size == (200, 200)
    [only] = result.faces
    assert only.box == (0, 0, 200, 200)
    assert list(only.probabilities) == list(EMOTIONS)
    assert sum(only.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert only.emotion == "happy"  # the pattern of class 3, which the run learnt
    assert only.score == max(only.probabilities.values())


def test_predict_matches_the_batch_classifier(trained_run):
    faces = np.stack([pattern_face(i, np.random.default_rng(i)) for i in range(7)])
    batch = load_classifier(trained_run).predict_proba(faces)
    for face, expected in zip(faces, batch):
        got = _one_face(face, model=trained_run).faces[0]
        assert np.allclose(list(got.probabilities.values()), expected, atol=1e-6)


def test_boxes_select_faces_in_a_larger_image(trained_run):
    canvas = np.full((100, 200), 90, np.uint8)
    canvas[10:58, 20:68] = pattern_face(0, np.random.default_rng(1))
    canvas[40:88, 130:178] = pattern_face(6, np.random.default_rng(2))
    result = _one_face(canvas, model=trained_run, boxes=[(20, 10, 48, 48), (130, 40, 48, 48)])
    assert [f.emotion for f in result.faces] == ["angry", "surprise"]
    assert _one_face(canvas, model=trained_run, boxes=[]).faces == []


def test_the_json_record_carries_each_face_as_found(trained_run):
    canvas = np.full((100, 200), 90, np.uint8)
    canvas[10:58, 20:68] = pattern_face(0, np.random.default_rng(1))
    canvas[40:88, 130:178] = pattern_face(6, np.random.default_rng(2))
    result = _one_face(canvas, model=trained_run, boxes=[(20, 10, 48, 48), (130, 40, 48, 48)])
    data = json.loads(json.dumps(result.to_dict()))
    assert data["image_size"] == [200, 100] and data["model"] == load_classifier(trained_run).name
    assert len(data["faces"]) == len(result.faces) == 2
    for face, record in zip(result.faces, data["faces"]):
        assert tuple(record["box"]) == face.box
        assert record["emotion"] == face.emotion == max(record["probabilities"], key=record["probabilities"].get)
        assert record["probabilities"] == pytest.approx(face.probabilities, abs=1e-6)
        assert record["score"] == pytest.approx(face.score, abs=1e-6) and record["uncertain"] is face.uncertain
    assert all(ms >= 0 for ms in data["timings_ms"].values()) and data["detector"] == "boxes"


def test_faces_below_the_uncertainty_threshold_are_marked(trained_run):
    from ferkit.errors import FerkitError

    face_image = pattern_face(5, np.random.default_rng(0))
    score = _one_face(face_image, model=trained_run).faces[0].score
    assert 0 < score < 1
    assert not _one_face(face_image, model=trained_run, uncertain_below=score / 2).faces[0].uncertain
    assert _one_face(face_image, model=trained_run, uncertain_below=(score + 1) / 2).faces[0].uncertain
    assert not _one_face(face_image, model=trained_run, uncertain_below=0).faces[0].uncertain
    for bad in (1.0, -0.5):
        with pytest.raises(FerkitError, match="uncertainty threshold"):
            _one_face(face_image, model=trained_run, uncertain_below=bad)


def test_the_deprecated_entry_points_warn_and_still_answer(trained_run):
    import ferkit

    face = pattern_face(2, np.random.default_rng(4))
    expected = ferkit.analyze(face, model=trained_run, detector="none")
    with pytest.warns(FutureWarning, match=r'analyze\(face, detector="none"\)'):
        assert predict_image(face, model=trained_run).faces == expected
    with pytest.warns(FutureWarning, match="analyze_images"):
        assert ferkit.analyze_image(face, model=trained_run, detector="none").faces == expected
