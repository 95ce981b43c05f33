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
from ferkit.runtime import (OnnxClassifier, default_model_path, files_path, load_classifier, resolve_model_path,
                            sha256_of, shipped_model, shipped_models)
from ferkit.training_model import init_model_path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "people.jpg"


def bundle(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "bundle_model.py"), *map(str, args)],
                          capture_output=True, text=True)


def test_the_bundle_tool_adds_replaces_and_removes_shipped_models(trained_run, pattern_data, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    first = bundle(trained_run, "--name", "small", "--val", pattern_data / "val", "--speed", "--weights", weights)
    assert first.returncode == 0, first.stderr
    manifest = json.loads((weights / "manifest.json").read_text())
    assert manifest["default"] == "small"  # the first model shipped is the default
    entry = manifest["models"]["small"]
    assert sha256_of(weights / "small.onnx") == entry["sha256"]
    assert sha256_of(weights / entry["keras_file"]) == entry["keras_sha256"]
    assert entry["speed"]["faces_per_second"] > 0 and entry["speed"]["ms_per_face"] > 0
    # the recorded score is the exported file's own on that data
    classifier = OnnxClassifier(weights / "small.onnx")
    from ferkit.data import load_dataset

    val = load_dataset(pattern_data / "val", classes=classifier.classes)
    accuracy = float(np.mean(classifier.predict_proba(val.images).argmax(axis=1) == val.labels))
    assert abs(entry["val_accuracy"] - accuracy) < 1e-9

    second = bundle(trained_run, "--name", "flipped", "--tta", "flip", "--weights", weights)
    assert second.returncode == 0, second.stderr
    manifest = json.loads((weights / "manifest.json").read_text())
    assert manifest["default"] == "small" and set(manifest["models"]) == {"small", "flipped"}
    assert manifest["models"]["flipped"]["tta"] == "flip" and "speed" not in manifest["models"]["flipped"]
    assert sha256_of(weights / "small.onnx") == manifest["models"]["small"]["sha256"]  # left as it was

    assert bundle(trained_run, "--name", "flipped", "--tta", "flip", "--default", "--weights", weights).returncode == 0
    assert json.loads((weights / "manifest.json").read_text())["default"] == "flipped"

    refused = bundle("--remove", "flipped", "--weights", weights)
    assert refused.returncode != 0 and refused.stderr.strip().splitlines() == [
        "flipped is the default model: bundle another with --default first"]
    removed = bundle("--remove", "small", "--weights", weights)
    assert removed.returncode == 0, removed.stderr
    manifest = json.loads((weights / "manifest.json").read_text())
    assert set(manifest["models"]) == {"flipped"} and not (weights / "small.onnx").exists()
    # the Keras file both were made from is still shipped with the one left
    assert (weights / manifest["models"]["flipped"]["keras_file"]).is_file()
    assert sorted(p.name for p in weights.iterdir()) == sorted(["manifest.json", "flipped.onnx",
                                                                manifest["models"]["flipped"]["keras_file"]])


def test_models_lists_each_shipped_model_with_its_score_and_speed():
    listing = CliRunner().invoke(cli, ["models"], terminal_width=200)
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


def test_an_unknown_model_name_gets_one_line_naming_the_shipped_ones():
    result = CliRunner().invoke(cli, ["predict", str(EXAMPLE), "--model", "no-such-model"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: no such model or run folder: no-such-model (the models shipped with ferkit: {', '.join(shipped_models())})"]
