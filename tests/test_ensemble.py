import dataclasses

import numpy as np
import pytest
from click.testing import CliRunner

from ferkit.cli import cli
from ferkit.data import load_dataset
from ferkit.ensemble import ensemble_models
from ferkit.errors import FerkitError
from ferkit.export import TOLERANCE, export_onnx
from ferkit.runtime import KerasClassifier, load_classifier, read_metadata, save_keras_model


@pytest.fixture(scope="module")
def second_run(pattern_data, tmp_path_factory):
    """Another seed-cnn trained on the pattern data, from another seed: different weights."""
    from ferkit.config import TrainConfig
    from ferkit.training import train

    out = tmp_path_factory.mktemp("runs") / "second"
    return train(TrainConfig(data=str(pattern_data / "train"), val=str(pattern_data / "val"), epochs=3, seed=1,
                             out=str(out)), verbose=0)


@pytest.fixture(scope="module")
def ensemble(trained_run, second_run, tmp_path_factory):
    return ensemble_models([trained_run, second_run], tmp_path_factory.mktemp("ensemble") / "pair.keras")


def test_the_ensemble_gives_the_mean_of_its_members_probabilities(trained_run, second_run, ensemble, pattern_data):
    faces = load_dataset(pattern_data / "val").images
    first, second = load_classifier(trained_run).predict_proba(faces), load_classifier(second_run).predict_proba(faces)
    assert np.abs(first - second).max() > 0.01  # two different models, or the test proves nothing
    assert np.allclose(load_classifier(ensemble).predict_proba(faces), (first + second) / 2, atol=1e-5)


def test_the_ensemble_records_its_members(trained_run, second_run, ensemble):
    metadata = read_metadata(ensemble)
    assert metadata.model == "ensemble(seed-cnn x2)"
    assert [member["run"] for member in metadata.extra["members"]] == [str(trained_run), str(second_run)]
    assert metadata.classes == read_metadata(trained_run).classes


def test_the_ensemble_exports_to_onnx_like_one_model(ensemble, pattern_data, tmp_path):
    onnx = export_onnx(ensemble, tmp_path / "pair.onnx", tta="flip")
    faces = load_dataset(pattern_data / "val").images
    keras_probabilities = load_classifier(ensemble).with_tta("flip").predict_proba(faces)
    assert np.abs(load_classifier(onnx).predict_proba(faces) - keras_probabilities).max() <= TOLERANCE


def test_an_int8_ensemble_keeps_its_averaged_probabilities_in_float(ensemble, pattern_data, tmp_path):
    train = load_dataset(pattern_data / "train")
    onnx = export_onnx(ensemble, tmp_path / "pair-int8.onnx", int8=True, calibration=train)
    probabilities = load_classifier(onnx).predict_proba(load_dataset(pattern_data / "val").images)
    assert np.diff(np.unique(probabilities)).min() < 1e-4  # no steps: quantized, they would differ by 0.002 at least
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)


def test_members_must_agree_on_the_classes(trained_run, second_run, tmp_path):
    other = KerasClassifier(read_metadata(second_run), second_run / "best.keras")
    metadata = dataclasses.replace(other.metadata, classes=[*other.metadata.classes[:-1], "contempt"])
    renamed = save_keras_model(other.model, tmp_path / "contempt.keras", metadata)
    with pytest.raises(FerkitError, match="classes"):
        ensemble_models([trained_run, renamed], tmp_path / "bad.keras")
    assert not (tmp_path / "bad.keras").exists()


def test_ensemble_command(trained_run, second_run, tmp_path):
    out = tmp_path / "pair.keras"
    result = CliRunner().invoke(cli, ["ensemble", str(trained_run), str(second_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert read_metadata(out).model == "ensemble(seed-cnn x2)"
    again = CliRunner().invoke(cli, ["ensemble", str(trained_run), str(second_run), "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    single = CliRunner().invoke(cli, ["ensemble", str(trained_run), "--out", str(tmp_path / "one.keras")])
    assert single.exit_code == 2 and "at least two" in single.output
    # the same model named twice, once as its run folder and once as its file
    twice = CliRunner().invoke(cli, ["ensemble", str(trained_run), str(trained_run / "best.keras"), "--out", str(tmp_path / "two.keras")])
    assert twice.exit_code == 2 and "given twice" in twice.output and not (tmp_path / "two.keras").exists()
    import shutil

    copy = shutil.copytree(trained_run, tmp_path / "copy")
    before = (copy / "best.keras").read_bytes()
    for out in (copy / "best.keras", second_run / "last.keras"):  # a member itself; another run's own model
        over = CliRunner().invoke(cli, ["ensemble", str(copy), str(second_run), "--out", str(out), "--overwrite"])
        assert over.exit_code == 2 and "write it elsewhere" in over.output, over.output
    assert (copy / "best.keras").read_bytes() == before
    damaged = tmp_path / "damaged.keras"  # the archive and its metadata whole, the weights cut short
    import zipfile

    with zipfile.ZipFile(trained_run / "best.keras") as source, zipfile.ZipFile(damaged, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            target.writestr(item, data[: len(data) // 2] if item.filename.endswith(".h5") else data)
    broken = CliRunner().invoke(cli, ["ensemble", str(damaged), str(second_run), "--out", str(tmp_path / "b.keras")])
    assert broken.exit_code == 2 and f"{damaged} could not be loaded as a Keras model" in broken.output, broken.output


def test_the_training_faces_of_its_members_are_known_to_the_ensemble(trained_run, second_run, ensemble, pattern_data, tmp_path):
    train = str(pattern_data / "train")
    result = CliRunner().invoke(cli, ["export", str(ensemble), "--onnx", "--out", str(tmp_path / "pair.onnx"),
                                      "--calibrate-temperature", train])
    assert result.exit_code == 2, result.output
    assert f"error: {train} is the data the ensemble's seed-cnn, seed-cnn member(s) were trained on" in result.output
    assert not (tmp_path / "pair.onnx").exists()
    result = CliRunner().invoke(cli, ["evaluate", str(ensemble), "--data", train, "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert f"{train} is the data the ensemble's seed-cnn, seed-cnn member(s) were trained on" in result.output
    result = CliRunner().invoke(cli, ["evaluate", str(ensemble), "--data", str(pattern_data / "val"), "--out", str(tmp_path / "val")])
    assert result.exit_code == 0 and "were trained on" not in result.output


def test_an_ensemble_of_ensembles_knows_the_training_faces_of_its_members_members(second_run, ensemble, pattern_data, tmp_path):
    loose = KerasClassifier(read_metadata(second_run), second_run / "best.keras")
    copied = save_keras_model(loose.model, tmp_path / "loose.keras", loose.metadata)  # outside a run: no faces known
    nested = ensemble_models([ensemble, copied], tmp_path / "nested.keras")
    train = str(pattern_data / "train")
    result = CliRunner().invoke(cli, ["export", str(nested), "--onnx", "--out", str(tmp_path / "nested.onnx"),
                                      "--calibrate-temperature", train])
    assert result.exit_code == 2, result.output
    assert f"error: {train} is the data the ensemble's ensemble(seed-cnn x2) member(s) were trained on" in result.output
    result = CliRunner().invoke(cli, ["evaluate", str(nested), "--data", train, "--out", str(tmp_path / "report")])
    assert result.exit_code == 0 and "member(s) were trained on" in result.output, result.output
