"""Models shipped inside ferkit, chosen by name: tools/bundle_model.py adds, replaces and removes them,
`ferkit models` lists them with their scores and speed, and every --model / --init takes their names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from ferkit.cli import cli
from ferkit.data import load_dataset
from ferkit.predict import model_version
from ferkit.runtime import (OnnxClassifier, default_model_path, files_path, load_classifier, resolve_model_path,
                            sha256_of, shipped_model, shipped_models)
from ferkit.training_model import init_model_path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "people.jpg"


def bundle(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "bundle_model.py"), *map(str, args)],
                          capture_output=True, text=True)


def test_the_bundle_tool_adds_replaces_and_removes_shipped_models(trained_run, pattern_data, tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    weights.mkdir()
    first = bundle(trained_run, "--name", "small", "--val", pattern_data / "val", "--speed", "--weights-dir", weights)
    assert first.returncode == 0, first.stderr
    manifest = json.loads((weights / "manifest.json").read_text())
    assert manifest["default"] == "small"  # the first model shipped is the default
    entry = manifest["models"]["small"]
    assert sha256_of(weights / "small.onnx") == entry["sha256"]
    assert sha256_of(weights / entry["keras_file"]) == entry["keras_sha256"]
    assert entry["speed"]["faces_per_second"] > 0 and entry["speed"]["ms_per_face"] > 0
    # the recorded score is the shipped file's own on that data
    classifier = OnnxClassifier(weights / "small.onnx")
    val = load_dataset(pattern_data / "val", classes=classifier.classes)
    accuracy = float(np.mean(classifier.predict_proba(val.images).argmax(axis=1) == val.labels))
    assert abs(entry["val_accuracy"] - accuracy) < 1e-9

    second = bundle(trained_run, "--name", "flipped", "--tta", "flip", "--default", "--weights-dir", weights)
    assert second.returncode == 0, second.stderr
    manifest = json.loads((weights / "manifest.json").read_text())
    assert manifest["default"] == "flipped" and set(manifest["models"]) == {"small", "flipped"}
    assert manifest["models"]["flipped"]["tta"] == "flip" and "speed" not in manifest["models"]["flipped"]
    assert sha256_of(weights / "small.onnx") == manifest["models"]["small"]["sha256"]  # left as it was

    # ferkit, reading this folder, picks each by name and lists the default first
    monkeypatch.setattr("ferkit.runtime.files_path", lambda *parts: weights.joinpath(*parts[1:]))
    assert resolve_model_path("small") == weights / "small.onnx"
    assert resolve_model_path(None) == resolve_model_path("flipped") == weights / "flipped.onnx"
    assert load_classifier("flipped").tta == "flip" and load_classifier("small").tta == "none"
    listing = CliRunner().invoke(cli, ["models", "list", "*"], env={"COLUMNS": "200"})
    rows = [line for line in listing.output.splitlines() if " small " in line or " flipped " in line]
    assert [row.split()[1] for row in rows] == ["flipped", "small"]
    assert " tta " in listing.output and [row.split()[7] for row in rows] == ["flip", "none"]

    assert bundle("--set-default", "small", "--weights-dir", weights).returncode == 0
    assert json.loads((weights / "manifest.json").read_text())["default"] == "small"
    refused = bundle("--remove", "small", "--weights-dir", weights)
    assert refused.returncode != 0 and refused.stderr.strip().splitlines() == [
        "small is the default model: make another the default first (--set-default NAME)"]
    removed = bundle("--remove", "flipped", "--weights-dir", weights)
    assert removed.returncode == 0, removed.stderr
    manifest = json.loads((weights / "manifest.json").read_text())
    assert set(manifest["models"]) == {"small"} and not (weights / "flipped.onnx").exists()
    # the Keras file both were made from is still shipped with the one left; no staging files stay
    assert sorted(p.name for p in weights.iterdir()) == sorted(["manifest.json", "small.onnx",
                                                                manifest["models"]["small"]["keras_file"]])


def test_the_shipped_models_fit_an_80_column_terminal_unfolded():
    listing = CliRunner().invoke(cli, ["models"], env={"COLUMNS": "80"})
    assert listing.exit_code == 0, listing.output
    shipped = listing.output.split("Networks to train")[0]
    assert max(map(len, shipped.splitlines())) <= 80
    for name in shipped_models():  # each model's row holds its whole name
        assert any(line.split()[1:2] == [name] for line in shipped.splitlines())
    if all(entry["tta"] == "none" for entry in shipped_models().values()):
        assert " tta " not in shipped  # no column that says nothing


def test_the_bundle_tool_calibrates_int8_on_the_runs_own_training_data(trained_run, pattern_data, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    shipped = bundle(trained_run, "--name", "small", "--int8", "--temperature-data", pattern_data / "val",
                     "--weights-dir", weights)
    assert shipped.returncode == 0, shipped.stderr
    entry = json.loads((weights / "manifest.json").read_text())["models"]["small"]
    faces = len(load_dataset(pattern_data / "train"))  # found where the run's config.json says, on any machine
    assert entry["int8"]["calibration_faces"] + entry["int8"]["agreement_faces"] == faces  # split between the two
    assert entry["int8"]["top1_agreement_with_float"] >= 0.95
    assert entry["members"][0]["config"]["data"] == "/".join((pattern_data / "train").parts[-2:])  # the manifest's copy
    assert entry["temperature_fit"]["faces"] == len(load_dataset(pattern_data / "val"))
    unseen = entry["temperature_fit"]["held_out"]
    assert f"{unseen['ece_before']:.4f} -> {unseen['ece_after']:.4f} on halves it was not fitted on" in shipped.stdout


def test_the_bundle_tool_refuses_bad_names_and_leaves_the_shipped_files_on_failure(trained_run, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    assert bundle(trained_run, "--name", "small", "--weights-dir", weights).returncode == 0
    before = {p.name: sha256_of(p) for p in weights.iterdir()}
    for name in ("default", "a/b", "small.onnx"):
        refused = bundle(trained_run, "--name", name, "--weights-dir", weights)
        assert refused.returncode == 2 and "--name" in refused.stderr
    missing = bundle(trained_run, "--name", "small", "--tta", "flip", "--val", tmp_path / "missing", "--weights-dir", weights)
    assert missing.returncode == 2 and missing.stderr.splitlines() == [f"error: --val {tmp_path / 'missing'}: no such file or folder"]
    # data that is no dataset is refused before the export, in one line: the shipped model is untouched
    (tmp_path / "empty").mkdir()
    failed = bundle(trained_run, "--name", "small", "--tta", "flip", "--val", tmp_path / "empty", "--replace",
                    "--weights-dir", weights)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr and "has no class folders" in failed.stderr
    # a shipped model of that name is replaced only when asked; a folder that is no run, in one line
    again = bundle(trained_run, "--name", "small", "--weights-dir", weights)
    assert again.returncode == 2 and again.stderr == (f"error: ferkit ships a model named small already (of {trained_run.name}): "
                                                      "--replace replaces it\n")
    for run in (tmp_path / "empty", tmp_path / "nothing"):
        refused = bundle(run, "--name", "other", "--weights-dir", weights)
        assert refused.returncode == 2 and refused.stderr == f"error: {run} is not a run folder of ferkit train (no config.json and state.json)\n"
    assert {p.name: sha256_of(p) for p in weights.iterdir()} == before


def test_the_bundle_tool_scores_a_network_of_another_input_size_at_its_own_size(pattern_data, tmp_path):
    from ferkit.config import TrainConfig
    from ferkit.training import train

    run = train(TrainConfig(model="mobilenetv2-transfer", weights="none", data=str(pattern_data / "train"),
                            val=str(pattern_data / "val"), epochs=1, batch_size=32, out=str(tmp_path / "run")), verbose=0)
    weights = tmp_path / "weights"
    weights.mkdir()
    shipped = bundle(run, "--name", "large", "--val", pattern_data / "val", "--weights-dir", weights)
    assert shipped.returncode == 0, shipped.stderr
    entry = json.loads((weights / "manifest.json").read_text())["models"]["large"]
    classifier = OnnxClassifier(weights / "large.onnx")
    assert tuple(classifier.input_size) == (96, 96)
    val = load_dataset(pattern_data / "val", classes=classifier.classes, image_size=(96, 96))
    assert entry["val_accuracy"] == float(np.mean(classifier.predict_proba(val.images).argmax(axis=1) == val.labels))


def test_models_lists_each_shipped_model_with_its_score_and_speed():
    listing = CliRunner().invoke(cli, ["models"], env={"COLUMNS": "200"})
    assert listing.exit_code == 0, listing.output
    lines = listing.output.splitlines()
    for name, entry in shipped_models().items():
        row = next(line for line in lines if f" {name} " in line)
        assert f"{entry['val_accuracy']:.1%}" in row
        if "speed" in entry:
            assert f"{entry['speed']['faces_per_second']:,}" in row and entry["speed"]["machine"] in listing.output
    assert "seed-cnn" in listing.output  # and the networks to train


def test_a_shipped_model_is_picked_by_name_everywhere():
    default = shipped_model()
    assert resolve_model_path(default["name"]) == resolve_model_path("default") == default_model_path()
    assert load_classifier(default["name"]) is load_classifier()
    assert init_model_path(default["name"]) == init_model_path("default") == files_path("weights", default["keras_file"])
    result = CliRunner().invoke(cli, ["predict", str(EXAMPLE), "--model", default["name"], "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["model"] == default["model"]


def test_a_shipped_model_names_its_run_not_where_it_was_trained():
    classifier = load_classifier()
    version = model_version(classifier)
    assert version == model_version(classifier, public=True)
    assert version.startswith(f"{Path(classifier.metadata.extra['run']).name} ({default_model_path().name}")


def test_an_unknown_model_name_gets_one_line_naming_the_shipped_ones():
    result = CliRunner().invoke(cli, ["predict", str(EXAMPLE), "--model", "no-such-model"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: no such model or run folder: no-such-model (the models shipped with ferkit: {', '.join(shipped_models())})"]


def test_a_folder_here_wins_over_a_shipped_model_of_its_name(tmp_path, monkeypatch):
    name = shipped_model()["name"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).mkdir()
    result = CliRunner().invoke(cli, ["predict", str(EXAMPLE), "--model", name])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {name} holds no model (no best.keras or last.keras): is it a ferkit run folder? "
        f"It hides the shipped model {name}: run from another folder to use that."]


def test_a_run_folder_named_default_here_is_that_run(trained_run, tmp_path, monkeypatch):
    import shutil

    from ferkit.runtime import resolve_model_path

    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained_run, tmp_path / "default")
    assert resolve_model_path("default") == Path("default") / "best.keras"
    assert resolve_model_path(None) == default_model_path()  # no name given: the shipped default still


def test_models_lists_the_networks_when_the_build_ships_no_model(tmp_path, monkeypatch):
    monkeypatch.setattr("ferkit.runtime.files_path", lambda *parts: tmp_path.joinpath(*parts[1:]))
    listing = CliRunner().invoke(cli, ["models"])
    assert listing.exit_code == 0, listing.output
    assert "seed-cnn" in listing.output and "Shipped" not in listing.output
    result = CliRunner().invoke(cli, ["predict", str(EXAMPLE)])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        "error: this ferkit build ships no model: give a run folder or a model file"]
