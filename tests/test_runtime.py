import json
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


def _untrained_cropping_model(path):
    from ferkit.models import create_model, get_model_spec
    from ferkit.runtime import ModelMetadata, save_keras_model

    spec = get_model_spec("ferkit-net-l")
    metadata = ModelMetadata(model=spec.name, classes=["a", "b", "c"], input_size=list(spec.input_size),
                             channels=spec.channels, crop=spec.crop)
    return save_keras_model(create_model(spec.name, num_classes=3), path, metadata)


def test_tencrop_averages_the_centre_and_corner_crops_and_their_mirrors(tmp_path):
    import numpy as np

    plain = load_classifier(_untrained_cropping_model(tmp_path / "l.keras")).with_tta("none")
    crop, side = plain.metadata.crop, plain.input_size[0]
    faces = np.random.default_rng(0).integers(0, 256, (5, side, side), dtype=np.uint8)
    # each crop cut out explicitly and centred on a blank face: the model only sees the central crop
    corners = [((side - crop) // 2,) * 2, (0, 0), (0, side - crop), (side - crop, 0), (side - crop, side - crop)]
    expected = []
    for view in (faces, faces[:, :, ::-1]):
        for top, left in corners:
            padded = np.zeros_like(view)
            start = (side - crop) // 2
            padded[:, start:start + crop, start:start + crop] = view[:, top:top + crop, left:left + crop]
            expected.append(plain.predict_proba(padded))
    expected = np.mean(expected, axis=0)
    for batch_size in (1, 7, 256):
        assert np.allclose(plain.with_tta("tencrop").predict_proba(faces, batch_size=batch_size), expected, atol=1e-5)
    assert not np.allclose(plain.predict_proba(faces), expected, atol=1e-5)  # the views do differ


def test_tencrop_is_refused_for_a_model_that_does_not_crop(trained_run):
    with pytest.raises(FerkitError, match="tencrop needs a model that crops"):
        load_classifier(trained_run).with_tta("tencrop")


def test_the_classifier_thread_count_comes_from_the_environment(monkeypatch):
    from ferkit.runtime import classifier_threads

    monkeypatch.setenv("FERKIT_CLASSIFIER_THREADS", "1")
    assert classifier_threads() == 1
    monkeypatch.delenv("FERKIT_CLASSIFIER_THREADS")
    assert classifier_threads() == 0
    monkeypatch.setenv("FERKIT_CLASSIFIER_THREADS", "two")
    with pytest.raises(FerkitError, match="whole number"):
        classifier_threads()


def test_a_model_behind_a_link_or_with_an_upper_case_suffix_loads(tmp_path):
    """Model caches keep files under hashes and link them by name (as Hugging Face's does)."""
    import shutil

    from ferkit.runtime import resolve_model_path

    shipped = resolve_model_path(None)
    (tmp_path / "blobs").mkdir()
    shutil.copy(shipped, tmp_path / "blobs" / "a62b3ef6")
    (tmp_path / "snapshot").mkdir()
    (tmp_path / "snapshot" / "model.onnx").symlink_to(tmp_path / "blobs" / "a62b3ef6")
    shutil.copy(shipped, tmp_path / "MODEL.ONNX")
    expected = load_classifier(shipped).classes
    for path in (tmp_path / "snapshot" / "model.onnx", tmp_path / "MODEL.ONNX"):
        assert load_classifier(path).classes == expected
        assert list(read_metadata(path).classes) == list(expected)


def test_a_model_saved_before_extra_margins_loads_whatever_its_face_margin():
    """Files without extra_margins get the default scales, which must not make a valid face_margin invalid."""
    from ferkit.runtime import EXTRA_MARGINS, ModelMetadata

    for margin in (0.0, 0.5, 1.0):
        meta = ModelMetadata.from_dict({"model": "seed-cnn", "classes": ["a", "b"], "input_size": [48, 48],
                                        "channels": 1, "face_margin": margin})
        assert meta.extra_margins == list(EXTRA_MARGINS)
    with pytest.raises(ValueError, match="extra_margins"):
        ModelMetadata.from_dict({"model": "seed-cnn", "classes": ["a"], "input_size": [48, 48], "channels": 1,
                                 "extra_margins": [0.5]})


def test_a_run_folder_without_its_models_says_whether_it_trained(tmp_path):
    from ferkit.runtime import resolve_model_path

    for done, message in ((0, "holds no model yet: its run stopped before the first epoch ended"),
                          (3, "holds no model: its run trained 3 epoch(s), and its model files")):
        run = tmp_path / f"run{done}"
        run.mkdir()
        (run / "config.json").write_text("{}")
        (run / "state.json").write_text(json.dumps({"epochs_done": done, "status": "finished" if done else "interrupted"}))
        with pytest.raises(FerkitError) as raised:
            resolve_model_path(run)
        assert message in str(raised.value)


def test_a_damaged_export_of_a_run_gives_way_to_its_keras_model(trained_run, tmp_path):
    import shutil

    from ferkit.runtime import load_classifier

    copy = shutil.copytree(trained_run, tmp_path / "run")
    (copy / "best.onnx").write_bytes(b"\x08\x07 not a whole ONNX model")
    classifier = load_classifier(copy, prefer_export=True)
    assert classifier.path == copy / "best.keras"
