import zipfile

import pytest

from ferkit.errors import FerkitError
from ferkit.runtime import load_classifier, read_metadata


def test_metadata_travels_inside_the_model_file(trained_run):
    meta = read_metadata(trained_run / "best.keras")
    assert meta.model == "seed-cnn" and meta.input_size == [48, 48] and meta.channels == 3
    assert meta.extra["epoch"] >= 1 and 0 <= meta.extra["val_accuracy"] <= 1


def test_a_run_folder_resolves_to_its_best_model(trained_run):
    assert load_classifier(trained_run).path.name == "best.keras"


@pytest.mark.parametrize("kind", ["text", "zip-without-metadata", "missing", "empty-folder"])
def test_things_that_are_not_models_are_refused(tmp_path, kind):
    path = tmp_path / "model.keras"
    if kind == "text":
        path.write_text("hello")
    elif kind == "zip-without-metadata":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("config.json", "{}")
    elif kind == "empty-folder":
        path = tmp_path
    with pytest.raises(FerkitError):
        load_classifier(path)


def test_flip_tta_averages_each_face_with_its_mirror_image(trained_run):
    import numpy as np

    from conftest import pattern_face

    plain = load_classifier(trained_run).with_tta("none")
    flipped = plain.with_tta("flip")
    assert flipped.tta == "flip" and plain.tta == "none" and flipped.model is plain.model
    faces = np.stack([pattern_face(i % 7, np.random.default_rng(i)) for i in range(9)])
    expected = (plain.predict_proba(faces) + plain.predict_proba(faces[:, :, ::-1])) / 2
    # batch sizes that split the faces unevenly must not pair a face with another face's mirror
    for batch_size in (1, 4, 256):
        assert np.allclose(flipped.predict_proba(faces, batch_size=batch_size), expected, atol=1e-5)


def test_an_unknown_tta_is_refused(trained_run):
    with pytest.raises(FerkitError, match="unknown test-time augmentation"):
        load_classifier(trained_run).with_tta("ten-crop")
