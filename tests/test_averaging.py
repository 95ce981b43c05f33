"""Averaging checkpoints of one network into one model: ferkit.averaging and tools/average_checkpoints.py."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ferkit.averaging import average_checkpoints
from ferkit.checkpoints import save_compact_checkpoint
from ferkit.config import TrainConfig
from ferkit.data import load_dataset
from ferkit.errors import FerkitError
from ferkit.images import faces_to_batch
from ferkit.runtime import load_classifier, read_metadata
from ferkit.training import train

TOOL = Path(__file__).resolve().parents[1] / "tools" / "average_checkpoints.py"


@pytest.fixture(scope="module")
def two_runs(pattern_data, tmp_path_factory) -> list[Path]:
    """Two ferkit-net-s runs (a network with batch norm) of one epoch each, from different seeds."""
    root = tmp_path_factory.mktemp("averaging")
    return [train(TrainConfig(model="ferkit-net-s", data=str(pattern_data / "train"), val=str(pattern_data / "val"),
                              epochs=1, seed=seed, out=str(root / f"seed-{seed}")), verbose=0) for seed in (1, 2)]


def _weights(path: Path) -> list[np.ndarray]:
    import keras

    return keras.saving.load_model(path, compile=False).get_weights()


def test_the_average_holds_the_mean_of_the_checkpoints_weights(two_runs, pattern_data, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="ferkit"):
        out = average_checkpoints([run / "last.keras" for run in two_runs], tmp_path / "mean.keras")
    # two seeds: runs trained apart, whose weights do not average well
    assert "come from runs of other settings (seed)" in caplog.text
    assert "ferkit-net-s has batch norm" in caplog.text and "--calibration" in caplog.text  # none given
    first, second = (_weights(run / "last.keras") for run in two_runs)
    assert not np.allclose(first[0], second[0])
    for got, a, b in zip(_weights(out), first, second):
        assert np.allclose(got, (a + b) / 2, atol=1e-6)
    metadata = read_metadata(out)
    assert metadata.model == "ferkit-net-s" and metadata.classes == read_metadata(two_runs[0] / "last.keras").classes
    assert metadata.extra["averaged"]["sources"] == [str(run / "last.keras") for run in two_runs]
    # evaluated on the faces its checkpoints were trained on: said so, as of any model
    from click.testing import CliRunner

    from ferkit.cli import cli

    result = CliRunner().invoke(cli, ["evaluate", str(out), "--data", str(pattern_data / "train"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0 and "is the data the averaged checkpoints were trained on" in result.output
    result = CliRunner().invoke(cli, ["export", str(out), "--onnx", "--calibrate-temperature", str(pattern_data / "train")])
    assert result.exit_code == 2 and "is the data the averaged checkpoints were trained on" in result.output, result.output


def test_a_packed_run_averages_as_the_model_it_was_packed_from(two_runs, tmp_path):
    packed = save_compact_checkpoint(two_runs[0], tmp_path / "packed")  # float16 weights
    out = average_checkpoints([packed, two_runs[0] / "last.keras"], tmp_path / "mean.keras")
    for got, expected in zip(_weights(out), _weights(two_runs[0] / "last.keras")):
        assert np.allclose(got, expected, rtol=1e-3, atol=1e-3)


def test_batch_norm_statistics_are_measured_on_the_calibration_faces(two_runs, pattern_data, tmp_path):
    import keras

    faces = load_dataset(pattern_data / "train")
    plain = average_checkpoints(two_runs, tmp_path / "plain.keras")
    measured = average_checkpoints(two_runs, tmp_path / "measured.keras", calibration=faces)
    assert read_metadata(measured).extra["averaged"]["batch_norm_faces"] == len(faces)
    network = keras.saving.load_model(measured, compile=False)
    first_norm = next(layer for layer in network.layers if isinstance(layer, keras.layers.BatchNormalization))
    inputs = keras.Model(network.inputs, first_norm.input).predict(faces_to_batch(faces.images, 1), verbose=0)
    assert np.allclose(first_norm.moving_mean.numpy(), inputs.mean(axis=(0, 1, 2)), atol=1e-4)
    val = load_dataset(pattern_data / "val").images
    assert not np.allclose(load_classifier(plain).predict_proba(val), load_classifier(measured).predict_proba(val), atol=1e-3)


def test_checkpoints_that_do_not_average_are_refused(two_runs, trained_run, tmp_path):
    with pytest.raises(FerkitError, match="only checkpoints of one network average"):
        average_checkpoints([two_runs[0], trained_run], tmp_path / "mixed.keras")  # ferkit-net-s and seed-cnn
    with pytest.raises(FerkitError, match="two checkpoints or more"):
        average_checkpoints([two_runs[0]], tmp_path / "one.keras")
    (tmp_path / "mine.keras").write_bytes(b"mine")
    with pytest.raises(FerkitError, match="already exists"):
        average_checkpoints(two_runs, tmp_path / "mine.keras")
    assert (tmp_path / "mine.keras").read_bytes() == b"mine"
    assert not (tmp_path / "mixed.keras").exists() and not (tmp_path / "one.keras").exists()


def test_the_tool_writes_the_average_and_says_what_is_wrong_in_one_line(two_runs, pattern_data, tmp_path):
    command = [sys.executable, str(TOOL), *map(str, two_runs), "--calibration", str(pattern_data / "train"),
               "--out", str(tmp_path / "mean.keras")]
    written = subprocess.run(command, capture_output=True, text=True)
    assert written.returncode == 0, written.stderr
    assert "the mean of 2 checkpoints" in written.stdout and (tmp_path / "mean.keras").exists()
    refused = subprocess.run(command, capture_output=True, text=True)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "already exists" in refused.stderr and "Traceback" not in refused.stderr


def test_epoch_checkpoints_of_two_runs_are_warned_of_and_one_model_given_twice_is_refused(two_runs, tmp_path, caplog):
    import shutil

    kept = []
    for run in two_runs:  # as --save-period keeps them: RUN/epochs/epoch-NNN.keras
        copy = shutil.copytree(run, tmp_path / run.name)
        (copy / "epochs").mkdir(exist_ok=True)
        kept.append(shutil.copy(copy / "last.keras", copy / "epochs" / "epoch-001.keras"))
    with caplog.at_level("WARNING", logger="ferkit"):
        average_checkpoints(kept, tmp_path / "cross.keras")
    assert "come from runs of other settings (seed)" in caplog.text
    for twice in ([two_runs[0], two_runs[0] / "best.keras"], [kept[0], kept[0]]):
        with pytest.raises(FerkitError, match="are the same checkpoint: its weights would count twice"):
            average_checkpoints(twice, tmp_path / "twice.keras")
    assert not (tmp_path / "twice.keras").exists()
