import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import pattern_face
from ferkit.cli import cli
from ferkit.errors import FerkitError
from ferkit.data import load_dataset
from ferkit.export import MIN_INT8_AGREEMENT, TOLERANCE, export_onnx, max_difference, top1_agreement
from ferkit.labels import EMOTIONS
from ferkit.runtime import OnnxClassifier, load_classifier, read_metadata


@pytest.fixture(scope="module")
def onnx_model(trained_run, tmp_path_factory):
    return export_onnx(trained_run, tmp_path_factory.mktemp("onnx") / "model.onnx")


def test_onnx_agrees_with_keras_on_real_inputs(trained_run, onnx_model):
    keras_model, onnx = load_classifier(trained_run), load_classifier(onnx_model)
    assert isinstance(onnx, OnnxClassifier)
    faces = np.stack([pattern_face(i % 7, np.random.default_rng(i)) for i in range(21)])
    assert np.abs(keras_model.predict_proba(faces) - onnx.predict_proba(faces)).max() <= TOLERANCE
    assert max_difference(keras_model, onnx) <= TOLERANCE


def test_onnx_carries_the_metadata(trained_run, onnx_model):
    from ferkit.runtime import EXPORT_SOURCE, sha256_of

    from ferkit.runs import TRAINED_ON, training_faces_origin

    exported = read_metadata(onnx_model)
    assert exported.extra.pop(EXPORT_SOURCE) == sha256_of(trained_run / "best.keras")  # what it was made from
    assert exported.extra.pop(TRAINED_ON) == training_faces_origin(trained_run / "best.keras")  # its run's training faces
    assert exported == read_metadata(trained_run)


def test_export_never_overwrites_silently(trained_run, onnx_model, tmp_path):
    with pytest.raises(FerkitError, match="already exists"):
        export_onnx(trained_run, onnx_model)
    model = trained_run / "best.keras"
    before = model.read_bytes()
    with pytest.raises(FerkitError, match="written as a .onnx file"):
        export_onnx(trained_run, model, overwrite=True)  # not even when asked: it would be ONNX in a .keras file
    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(FerkitError, match="is a folder"):
        export_onnx(trained_run, tmp_path / "folder.onnx", overwrite=True)
    assert model.read_bytes() == before


def emotion_and_imports_of_a_fresh_process(model, tmp_path) -> list:
    """[emotion of a happy face, whether TensorFlow was imported, whether Keras was], predicting with
    `model` in a Python process of its own."""
    face = tmp_path / "face.png"
    from PIL import Image

    Image.fromarray(pattern_face(3, np.random.default_rng(3))).save(face)
    code = (
        "import sys, json, ferkit;"
        f"r = next(ferkit.analyze_images([{str(face)!r}], model={str(model)!r}, detector='none'));"
        "print(json.dumps([r.faces[0].emotion, 'tensorflow' in sys.modules, 'keras' in sys.modules]))"
    )
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_predict_with_onnx_imports_no_tensorflow(onnx_model, tmp_path):
    assert emotion_and_imports_of_a_fresh_process(onnx_model, tmp_path) == ["happy", False, False]


def test_export_command(trained_run, tmp_path):
    result = CliRunner().invoke(cli, ["export", str(trained_run), "--onnx", "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.onnx").exists()


def test_a_damaged_onnx_file_is_refused(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x01garbage")
    with pytest.raises(FerkitError, match="not a valid ONNX"):
        load_classifier(tmp_path / "bad.onnx")


@pytest.fixture(scope="module")
def int8_model(trained_run, pattern_data, tmp_path_factory):
    calibration = load_dataset(pattern_data / "train")
    return export_onnx(trained_run, tmp_path_factory.mktemp("int8") / "model.onnx", calibration=calibration, int8=True, tta="flip")


def test_int8_export_keeps_the_predictions_and_records_the_check(trained_run, onnx_model, int8_model, pattern_data):
    import onnx

    meta = read_metadata(int8_model)
    assert meta.tta == "flip" and meta.classes == read_metadata(trained_run).classes
    assert meta.extra["int8"]["top1_agreement_with_float"] >= MIN_INT8_AGREEMENT
    assert any(node.op_type == "QuantizeLinear" for node in onnx.load(str(int8_model)).graph.node)
    val = load_dataset(pattern_data / "val")
    assert top1_agreement(load_classifier(onnx_model), load_classifier(int8_model).with_tta("none"), val.images) >= 0.95
    assert int8_model.stat().st_size < onnx_model.stat().st_size / 2


def test_export_command_int8_calibrates_on_the_runs_training_data(trained_run, tmp_path):
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(cli, ["export", str(trained_run), "--onnx", "--int8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "held-out faces" in result.output and read_metadata(out).extra["int8"]["calibration_faces"] > 0
    calibrated = read_metadata(out).extra["int8"]["calibration_faces"]
    assert f"quantizing to int8: calibrating on {calibrated} faces" in result.output  # minutes of work, said as it begins
    # in Python too, by default; or on the faces of a folder given by its path
    from ferkit.config import TrainConfig

    for calibration, name in ((None, "default.onnx"), (TrainConfig.load(trained_run / "config.json").data, "folder.onnx")):
        exported = export_onnx(trained_run, tmp_path / name, int8=True, calibration=calibration)
        assert read_metadata(exported).extra["int8"]["calibration_faces"] == read_metadata(out).extra["int8"]["calibration_faces"]


def test_calibration_faces_come_from_the_run_of_a_model_file_and_never_from_test_rows(trained_run, tmp_path):
    from ferkit.export import calibration_faces

    assert len(calibration_faces(trained_run / "best.keras")) == len(calibration_faces(trained_run)) > 0
    rng = np.random.default_rng(0)
    rows = ["emotion,pixels,Usage"] + [f"{code},{' '.join(map(str, rng.integers(0, 256, 2304)))},{usage}"
                                       for code in range(7) for usage in ("Training", "PublicTest", "PrivateTest")]
    (tmp_path / "fer.csv").write_text("\n".join(rows) + "\n")
    assert len(calibration_faces(trained_run, tmp_path / "fer.csv")) == 7  # the Training rows alone


def test_an_export_that_would_replace_a_file_is_refused_before_any_faces_are_loaded(trained_run, tmp_path):
    (tmp_path / "mine.onnx").write_bytes(b"mine")
    result = CliRunner().invoke(cli, ["export", str(trained_run), "--onnx", "--int8", "--calibration",
                                      str(tmp_path / "faces-not-made-yet"), "--out", str(tmp_path / "mine.onnx")])
    assert result.exit_code == 2 and "already exists" in result.output
    assert (tmp_path / "mine.onnx").read_bytes() == b"mine"


def test_exporting_an_onnx_model_says_only_keras_models_export_even_where_its_output_exists(onnx_model):
    # its default output is the file itself: what to fix is the model given, not --overwrite
    result = CliRunner().invoke(cli, ["export", str(onnx_model), "--onnx"])
    assert result.exit_code != 0 and "is not a Keras model; only .keras models (or run folders) are exported" in result.output
    assert "--overwrite" not in result.output


def test_export_command_refuses_calibration_without_int8(trained_run, tmp_path):
    result = CliRunner().invoke(cli, ["export", str(trained_run), "--onnx", "--calibration", str(tmp_path), "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "--int8" in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_batch_norm_recalibration_measures_the_statistics_of_the_given_faces(trained_run, tmp_path):
    """A model with batch norm, its statistics re-measured on a constant face: each BN layer's moving
    mean must become the mean of its (dropout-free) inputs on that face, which the exported model uses."""
    import keras

    from ferkit.batch_norm import recalibrate_batch_norm

    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(3, 3), keras.layers.BatchNormalization(),
                              keras.layers.Dropout(0.5), keras.layers.Flatten(), keras.layers.Dense(4),
                              keras.layers.BatchNormalization(momentum=0.9)])
    faces = np.random.default_rng(0).uniform(0, 1, (300, 8, 8, 1)).astype("float32")
    assert recalibrate_batch_norm(model, (faces[i : i + 64] for i in range(0, 300, 64))) == 2
    conv_out = np.asarray(model.layers[0](faces))
    assert np.allclose(model.layers[1].moving_mean.numpy(), conv_out.mean(axis=(0, 1, 2)), atol=1e-4)
    assert model.layers[2].rate == 0.5 and model.layers[5].momentum == 0.9  # restored afterwards


def test_export_with_recalibrated_batch_norm_records_it(tmp_path, pattern_data):
    from ferkit.config import TrainConfig
    from ferkit.training import train

    run = train(TrainConfig(model="ferkit-net-s", data=str(pattern_data / "train"), val=str(pattern_data / "val"),
                            epochs=1, augment=["erase"], out=str(tmp_path / "run")), verbose=0)
    out = tmp_path / "bn.onnx"
    result = CliRunner().invoke(cli, ["export", str(run), "--onnx", "--recalibrate-bn", "--out", str(out)])
    assert result.exit_code == 0, result.output
    recorded = read_metadata(out).extra["batch_norm_recalibrated"]
    assert recorded == {"faces": len(load_dataset(pattern_data / "train")), "layers": 8}
    plain = export_onnx(run, tmp_path / "plain.onnx")
    assert max_difference(load_classifier(plain), load_classifier(out)) > TOLERANCE  # the statistics changed


def test_recalibrating_a_model_without_batch_norm_says_it_changes_nothing(trained_run, pattern_data, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="ferkit"):
        out = export_onnx(trained_run, tmp_path / "no-bn.onnx", recalibrate_bn=True,
                          calibration=load_dataset(pattern_data / "train"))
    assert "no batch-norm layers that train" in caplog.text
    assert "batch_norm_recalibrated" not in read_metadata(out).extra


def test_int8_probabilities_are_not_quantized(int8_model, pattern_data):
    probabilities = load_classifier(int8_model).with_tta("none").predict_proba(load_dataset(pattern_data / "val").images)
    steps = probabilities * 255
    assert np.abs(steps - np.round(steps)).max() > 0.01  # not multiples of 1/255
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)


@pytest.fixture(scope="module")
def calibrated_model(trained_run, pattern_data, tmp_path_factory):
    val = load_dataset(pattern_data / "val")
    return export_onnx(trained_run, tmp_path_factory.mktemp("calibrated") / "model.onnx", temperature_data=val)


def _test_faces(pattern_data):
    """The val faces, blends of two classes' faces and noise: confident and unsure predictions alike."""
    rng = np.random.default_rng(5)
    val = load_dataset(pattern_data / "val").images
    blends = np.stack([(pattern_face(i % 7, rng) * 0.5 + pattern_face((i + 2) % 7, rng) * 0.5).astype(np.uint8)
                       for i in range(14)])
    return np.concatenate([val, blends, rng.integers(0, 256, (6, 48, 48), dtype=np.uint8)])


def test_a_stored_temperature_turns_p_into_softmax_of_log_p_over_t(onnx_model, calibrated_model, pattern_data):
    from ferkit.calibration import TEMPERATURE_BOUNDS

    meta = read_metadata(calibrated_model)
    temperature = meta.temperature
    assert temperature != 1.0 and TEMPERATURE_BOUNDS[0] <= temperature <= TEMPERATURE_BOUNDS[1]
    fit = meta.extra["temperature"]
    assert fit["faces"] == 7 * 8 and fit["data"] == "val"
    assert fit["nll_after"] <= fit["nll_before"] and 0 <= fit["ece_after"] and 0 <= fit["ece_before"]

    faces = _test_faces(pattern_data)
    calibrated = load_classifier(calibrated_model)
    assert calibrated.temperature == temperature
    raw = calibrated.with_temperature(1.0).predict_proba(faces)
    assert np.abs(raw - load_classifier(onnx_model).predict_proba(faces)).max() <= 1e-6  # same network
    logits = np.log(np.clip(raw.astype(np.float64), 1e-12, None)) / temperature
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    probabilities = calibrated.predict_proba(faces)
    assert probabilities.dtype == np.float32
    assert np.abs(probabilities - expected).max() <= 1e-6
    assert (probabilities.argmax(axis=1) == raw.argmax(axis=1)).all()
    assert not np.allclose(probabilities, raw, atol=1e-3)  # it did change them


def test_temperature_one_leaves_the_network_output_bit_identical(onnx_model, pattern_data):
    from ferkit.images import faces_to_batch

    classifier = load_classifier(onnx_model)
    assert classifier.temperature == 1.0
    faces = _test_faces(pattern_data)
    direct = classifier.session.run(None, {classifier.session.get_inputs()[0].name: faces_to_batch(faces, classifier.metadata.channels)})[0]
    assert np.array_equal(classifier.predict_proba(faces), direct)


def test_the_temperature_calibrates_each_view_before_tta_averages_them(calibrated_model, pattern_data):
    from ferkit.calibration import apply_temperature

    calibrated = load_classifier(calibrated_model)
    faces = _test_faces(pattern_data)
    one_view = calibrated.with_temperature(1.0).with_tta("none")
    views = [one_view.predict_proba(faces), one_view.predict_proba(np.ascontiguousarray(faces[:, :, ::-1]))]
    expected = np.mean([apply_temperature(v, calibrated.temperature) for v in views], axis=0)
    assert np.abs(calibrated.with_tta("flip").predict_proba(faces) - expected).max() <= 1e-6


def test_a_temperature_exported_with_tta_is_fitted_to_and_scored_on_the_model_as_it_runs(trained_run, pattern_data, tmp_path):
    from ferkit.calibration import expected_calibration_error, negative_log_likelihood

    val = load_dataset(pattern_data / "val")
    flip = export_onnx(trained_run, tmp_path / "flip.onnx", tta="flip", temperature_data=val)
    fit = read_metadata(flip).extra["temperature"]
    assert fit["tta"] == "flip"
    model = load_classifier(flip)
    labels = val.labels_for(model.classes)
    # the figures recorded are those of the model as it runs (flip, the temperature on each view), which evaluate shows
    for temperature, key in ((1.0, "ece_before"), (model.temperature, "ece_after")):
        output = model.with_temperature(temperature).predict_proba(val.images)
        assert expected_calibration_error(output, labels) == pytest.approx(fit[key], abs=1e-5)
    output = model.predict_proba(val.images)
    nll = -np.mean(np.log(np.clip(output[np.arange(len(labels)), labels].astype(np.float64), 1e-12, None)))
    assert nll == pytest.approx(fit["nll_after"], abs=1e-4)
    one_view = model.with_tta("none").with_temperature(1.0).predict_proba(val.images)
    assert negative_log_likelihood(one_view, labels, model.temperature) != pytest.approx(fit["nll_after"], abs=1e-4)
    # evaluated on the faces the temperature was fitted on: said so, in the terminal and the report
    result = CliRunner().invoke(cli, ["evaluate", str(flip), "--data", str(pattern_data / "val"), "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    caution = f"the model's temperature was fitted on these {len(val)} faces (val): its calibration error here flatters it"
    assert caution in " ".join(result.output.split())
    assert caution in json.loads((tmp_path / "e" / "metrics.json").read_text())["warnings"][0]


def test_a_temperature_fitted_at_the_top_of_its_range_is_refused(trained_run, pattern_data, tmp_path):
    import shutil

    from ferkit.labels import EMOTIONS

    rng = np.random.default_rng(0)  # labels drawn at random: the model, sure of each face, is wrong on most
    for n, face in enumerate(sorted((pattern_data / "val").glob("*/*"))):
        folder = tmp_path / "wrong" / EMOTIONS[rng.integers(len(EMOTIONS))]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(face, folder / f"{n}{face.suffix}")
    result = CliRunner().invoke(cli, ["export", str(trained_run), "--onnx", "--out", str(tmp_path / "m.onnx"),
                                      "--calibrate-temperature", str(tmp_path / "wrong")])
    assert result.exit_code == 2, result.output
    assert "lies at the top of the range searched (20): the model is wrong on most of these faces" in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_evaluate_reports_the_calibration_error_before_and_after_the_temperature(calibrated_model, pattern_data, tmp_path):
    from ferkit.calibration import expected_calibration_error
    from ferkit.evaluation import evaluate

    val = load_dataset(pattern_data / "val")
    report = evaluate(calibrated_model, val)
    calibrated = load_classifier(calibrated_model)
    assert report.temperature == calibrated.temperature
    assert report.ece == pytest.approx(expected_calibration_error(calibrated.predict_proba(val.images), val.labels), abs=1e-9)
    before = calibrated.with_temperature(1.0).predict_proba(val.images)
    assert report.ece_before_temperature == pytest.approx(expected_calibration_error(before, val.labels), abs=1e-9)
    assert report.ece_before_temperature == pytest.approx(read_metadata(calibrated_model).extra["temperature"]["ece_before"], abs=1e-5)
    report.save(tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["temperature"] == calibrated.temperature
    assert metrics["ece_before_temperature"] == pytest.approx(report.ece_before_temperature, abs=1e-6)
    assert f"at temperature {calibrated.temperature:.4f}; " in (tmp_path / "report.html").read_text()
    assert "before (temperature 1)" in (tmp_path / "report.html").read_text()


def test_export_command_int8_then_temperature(trained_run, pattern_data, tmp_path):
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(cli, ["export", str(trained_run), "--onnx", "--int8", "--out", str(out),
                                      "--calibrate-temperature", str(pattern_data / "val")])
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    assert f"temperature {meta.temperature:.3f} fitted on 56 faces" in result.output
    assert meta.temperature != 1.0 and meta.extra["int8"]["calibration_faces"] > 0  # both records kept
    assert meta.extra["temperature"]["faces"] == 56


def test_a_temperature_is_not_fitted_on_the_faces_the_model_was_trained_on(trained_run, pattern_data, tmp_path):
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(cli, ["export", str(trained_run), "--onnx", "--out", str(out),
                                      "--calibrate-temperature", str(pattern_data / "train")])
    assert result.exit_code == 2 and not out.exists()
    assert result.output.strip() == (f"error: {pattern_data / 'train'} is the data the model was trained on; "
                                     f"fit the temperature on held-out faces (its validation data: {pattern_data / 'val'})")
    from ferkit.data.packed import pack_dataset

    copy = pack_dataset(pattern_data / "train", tmp_path / "packed-train")  # the same faces, packed elsewhere
    result = CliRunner().invoke(cli, ["export", str(trained_run), "--onnx", "--out", str(out),
                                      "--calibrate-temperature", str(copy)])
    assert result.exit_code == 2 and "is the data the model was trained on" in result.output and not out.exists()


def test_a_temperature_that_raises_the_faces_ece_is_exported_with_a_warning(tmp_path):
    """The temperature minimises log loss, which can raise the ECE of a few faces: the default network on
    the sample's disgust and sad faces (60) is such a case; the warning follows the recorded figures."""
    import shutil
    from pathlib import Path

    from ferkit.training_model import init_model_path

    root = Path(__file__).resolve().parents[1]
    sample = root / "examples" / "fer2013-sample" / "val"
    for name in ("disgust", "sad"):
        shutil.copytree(sample / name, tmp_path / "held" / name)
    model = init_model_path("default")  # the default's Keras twin
    warned = []
    for data in (tmp_path / "held", sample):
        out = tmp_path / f"{data.name}.onnx"
        result = CliRunner().invoke(cli, ["export", str(model), "--onnx", "--out", str(out),
                                          "--calibrate-temperature", str(data)])
        assert result.exit_code == 0, result.output
        fitted = read_metadata(out).extra["temperature"]
        warning = "warning: the temperature lowers the faces' log loss but raises their ECE" in result.output
        assert warning == (fitted["ece_after"] > fitted["ece_before"])
        unseen = fitted["held_out"]  # fitted on half the faces, scored on the other, 2 x 20 times
        assert f"{unseen['ece_before']:.4f} -> {unseen['ece_after']:.4f} on the halves it was not fitted on" in result.output
        assert unseen["splits"] == 20 and 0 <= unseen["improved"] <= 1
        no_help = "warning: the temperature does not lower the ECE of faces it was not fitted on" in result.output
        assert no_help == (not warning and unseen["ece_after"] >= unseen["ece_before"])
        warned.append(warning)
    assert warned[0]


def test_an_unexpected_failure_is_one_line_and_exit_code_3(onnx_model, pattern_data, tmp_path, monkeypatch):
    """A failure inside ONNX Runtime, which ferkit's checks did not foresee (here made to happen: the
    runtime's session refuses to run): the CLI still answers in one line, with its own exit code."""
    def fails(self, batch):
        raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input")

    monkeypatch.setattr(OnnxClassifier, "_run", fails)
    result = CliRunner().invoke(cli, ["evaluate", str(onnx_model), "--data", str(pattern_data / "val"), "--out", str(tmp_path / "e")])
    assert result.exit_code == 3
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("internal error: ") and "--debug" in lines[-1]
    assert "Traceback" not in result.output


def test_results_name_the_model_file_they_came_from(trained_run, onnx_model):
    from ferkit.predict import model_version

    run_version = model_version(load_classifier(trained_run))
    epochs = {name: read_metadata(trained_run / name).extra["epoch"] for name in ("best.keras", "last.keras")}
    assert run_version.endswith(f" (best.keras, epoch {epochs['best.keras']})") and str(trained_run.name) in run_version
    assert model_version(load_classifier(onnx_model)) == run_version.replace("best.keras", onnx_model.name)
    assert model_version(load_classifier(trained_run / "last.keras")).endswith(f" (last.keras, epoch {epochs['last.keras']})")


def test_a_run_folder_moved_since_it_trained_is_named_where_it_lies_now(trained_run, tmp_path, monkeypatch):
    import shutil

    from ferkit.predict import model_version

    shutil.copytree(trained_run, tmp_path / "renamed")
    monkeypatch.chdir(tmp_path)
    classifier = load_classifier(tmp_path / "renamed")
    assert model_version(classifier).startswith("renamed (best.keras, epoch ")
    assert model_version(classifier, public=True).startswith("renamed (best.keras")


def test_a_run_folder_predicts_with_its_onnx_export_while_that_is_current(trained_run, pattern_data, tmp_path, caplog):
    import shutil

    import keras

    from ferkit.runtime import KerasClassifier, exported_model_path, save_keras_model

    run = shutil.copytree(trained_run, tmp_path / "run")
    assert export_onnx(run) == run / "best.onnx"  # where `ferkit export RUN` writes
    assert exported_model_path(run) == run / "best.onnx"
    assert emotion_and_imports_of_a_fresh_process(run, tmp_path) == ["happy", False, False]
    assert isinstance(load_classifier(run), KerasClassifier)  # evaluation and teachers keep to the model itself

    # a best model saved again (as a resumed run does) makes the export out of date: the model itself predicts
    save_keras_model(keras.saving.load_model(run / "best.keras"), run / "best.keras", read_metadata(run / "best.keras"))
    with caplog.at_level("WARNING", logger="ferkit"):
        assert exported_model_path(run) == run / "best.keras"
    assert "was exported from another best.keras" in caplog.text
    assert isinstance(load_classifier(run, prefer_export=True), KerasClassifier)

    # a run folder holding only its export serves, for prediction and evaluation alike
    for name in ("best.keras", "last.keras"):
        (run / name).unlink()
    assert isinstance(load_classifier(run), OnnxClassifier)
    result = CliRunner().invoke(cli, ["evaluate", str(run), "--data", str(pattern_data / "val"), "--json"])
    assert result.exit_code == 0, result.output
    assert "(best.onnx, epoch " in json.loads(result.output)["model_version"]


def test_a_temperature_or_an_int8_check_on_a_handful_of_faces_is_refused(trained_run, pattern_data, tmp_path):
    import shutil

    few = tmp_path / "few"
    for name in ("happy", "sad"):  # 16 faces
        shutil.copytree(pattern_data / "val" / name, few / name)
    for options in (["--calibrate-temperature", str(few)], ["--int8", "--calibration", str(few)]):
        out = tmp_path / "m.onnx"
        result = CliRunner().invoke(cli, ["export", str(trained_run), "--onnx", "--out", str(out), *options])
        assert result.exit_code != 0 and not out.exists(), result.output
        assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
        assert "at least" in result.output and "16" in result.output
        assert "--int8" not in options or "pass --calibration DATA with more faces" in result.output


def test_the_founding_studys_vgg19_transfer_model_exports(tmp_path):
    from ferkit.models import create_model
    from ferkit.runtime import save_keras_model
    from ferkit.training_model import network_metadata

    network = create_model("vgg19-transfer", weights="none")
    save_keras_model(network, tmp_path / "vgg.keras", network_metadata("vgg19-transfer", EMOTIONS))
    out = export_onnx(tmp_path / "vgg.keras", tmp_path / "vgg.onnx")
    assert max_difference(load_classifier(tmp_path / "vgg.keras"), load_classifier(out)) <= TOLERANCE


@pytest.mark.parametrize("edit, said", [(lambda m: {"input_size": [64, 64]}, "its metadata says faces of (64, 64, "),
                                        (lambda m: {"channels": 4 - m.channels}, "its metadata says faces of (48, 48, "),
                                        (lambda m: {"classes": ["a", "b", "c"]}, "its graph gives 7 probabilities, its metadata names 3")])
def test_an_onnx_file_whose_metadata_does_not_fit_its_graph_is_refused_on_loading(onnx_model, tmp_path, edit, said):
    import dataclasses

    from ferkit.export import _set_metadata

    edited = tmp_path / "edited.onnx"
    edited.write_bytes(onnx_model.read_bytes())
    metadata = read_metadata(onnx_model)
    _set_metadata(edited, dataclasses.replace(metadata, **edit(metadata)))
    with pytest.raises(FerkitError, match=said.replace("(", r"\(")):
        load_classifier(edited)


def test_a_runs_data_path_read_from_another_folder_is_checked_against_the_faces_it_trained_on(pattern_data, tmp_path,
                                                                                                monkeypatch):
    import shutil

    from conftest import write_pattern_dataset
    from ferkit.config import TrainConfig
    from ferkit.training import train

    shutil.copytree(pattern_data, tmp_path / "work" / "data")
    monkeypatch.chdir(tmp_path / "work")
    run = train(TrainConfig(data="data/train", val="data/val", epochs=1, out="run"), verbose=0)  # paths kept as given
    write_pattern_dataset(tmp_path / "elsewhere" / "data" / "train", 3, seed=5)  # another data/train
    monkeypatch.chdir(tmp_path / "elsewhere")
    int8 = CliRunner().invoke(cli, ["export", "../work/run", "--onnx", "--int8", "--out", "m.onnx"])
    assert int8.exit_code == 2 and "data/train, read from here, holds other faces than the run's training data" in int8.output
    monkeypatch.chdir(tmp_path)
    temperature = CliRunner().invoke(cli, ["export", "work/run", "--onnx", "--out", "t.onnx",
                                           "--calibrate-temperature", "work/data/train"])
    assert temperature.exit_code == 2 and "is the data the model was trained on" in temperature.output
    assert not (tmp_path / "t.onnx").exists() and (tmp_path / "work" / run / "best.keras").exists()
    scored = CliRunner().invoke(cli, ["evaluate", "work/run", "--data", "work/data/train", "--out", "e"])
    assert scored.exit_code == 0 and f"is the data {tmp_path / 'work' / 'run'} was trained on" in scored.output


def test_calibration_faces_are_read_at_the_models_input_size(pattern_data, tmp_path):
    import keras

    from ferkit.export import calibration_faces
    from ferkit.labels import EMOTIONS
    from ferkit.runtime import ModelMetadata, save_keras_model

    inputs = keras.Input((64, 64, 1))
    network = keras.Model(inputs, keras.layers.Dense(7, activation="softmax")(keras.layers.Flatten()(inputs)))
    path = save_keras_model(network, tmp_path / "wide.keras",
                            ModelMetadata(model="custom", classes=list(EMOTIONS), input_size=[64, 64], channels=1))
    faces = calibration_faces(path, pattern_data / "train")
    assert faces.images.shape[1:] == (64, 64)  # read at 64x64, as training read them, not 48x48 enlarged


def test_int8_calibration_faces_may_come_in_class_folders_the_model_does_not_know(trained_run, pattern_data, tmp_path):
    """Their labels are not used: a folder of another class (contempt, say) is read like the others."""
    import shutil

    data = shutil.copytree(pattern_data / "train", tmp_path / "faces")
    shutil.copytree(data / "happy", data / "contempt")
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(cli, ["export", str(trained_run), "--onnx", "--int8", "--calibration", str(data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    int8 = read_metadata(out).extra["int8"]
    assert int8["calibration_faces"] + int8["agreement_faces"] == len(list(data.rglob("*.png")))  # contempt's too
    assert "contempt" not in read_metadata(out).classes  # the model's own classes, as before


def test_export_takes_temperature_data_by_path_and_refuses_tencrop_for_a_model_without_crops_at_once(trained_run, pattern_data, tmp_path):
    val = load_dataset(pattern_data / "val")
    by_path = export_onnx(trained_run, tmp_path / "path.onnx", temperature_data=pattern_data / "val")
    by_faces = export_onnx(trained_run, tmp_path / "faces.onnx", temperature_data=val)
    assert read_metadata(by_path).temperature == read_metadata(by_faces).temperature
    # refused before the calibration faces are read: here they are not even there
    result = CliRunner().invoke(cli, ["export", str(trained_run), "--onnx", "--out", str(tmp_path / "t.onnx"), "--int8",
                                      "--calibration", str(tmp_path / "missing"), "--tta", "tencrop"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: tencrop needs a model that crops its input (such as ferkit-net-l); seed-cnn does not"


def test_a_csv_without_publictest_rows_for_the_temperature_is_a_one_line_error_naming_no_missing_option(trained_run, tmp_path):
    rows = ["emotion,pixels,Usage"] + [f"{k % 7},{' '.join(['128'] * 48 * 48)},Training" for k in range(14)]
    (tmp_path / "train-only.csv").write_text("\n".join(rows) + "\n")
    result = CliRunner().invoke(cli, ["export", str(trained_run), "--onnx", "--out", str(tmp_path / "m.onnx"),
                                      "--calibrate-temperature", str(tmp_path / "train-only.csv")])
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: {tmp_path / 'train-only.csv'} has no PublicTest rows, the held-out faces a "
                                     "FER2013 CSV gives to fit a temperature on: give a folder or CSV of held-out labelled faces")


def test_a_val_split_runs_temperature_is_fitted_on_the_faces_it_held_out_of_its_data(pattern_data, tmp_path):
    from ferkit.config import TrainConfig
    from ferkit.data import split_dataset
    from ferkit.training import train

    config = TrainConfig(data=str(pattern_data / "train"), val_split=0.4, epochs=2, out=str(tmp_path / "run"))
    run = train(config, verbose=0)
    result = CliRunner().invoke(cli, ["export", str(run), "--onnx", "--calibrate-temperature", str(pattern_data / "train")])
    assert result.exit_code == 0, result.output
    _, held = split_dataset(load_dataset(pattern_data / "train"), val_fraction=0.4, seed=config.seed)
    fit = read_metadata(run / "best.onnx").extra["temperature"]
    assert fit["faces"] == len(held) and "the faces its run held out: --val-split 0.4" in fit["data"]
