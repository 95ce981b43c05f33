"""The model shipped inside ferkit: present, untampered, TensorFlow-free, and right on real faces."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import FER2013, needs_fer2013
from ferkit.cli import cli
from ferkit.data import load_dataset
from ferkit.evaluation import evaluate
from ferkit.runtime import OnnxClassifier, default_model_path, load_classifier, sha256_of, shipped_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "people.jpg"


def test_the_bundled_file_matches_its_recorded_hash():
    manifest = shipped_model()
    path = default_model_path()
    assert path.name == manifest["file"] and sha256_of(path) == manifest["sha256"]
    assert path.stat().st_size <= 25 * 1024 * 1024
    classifier = load_classifier()
    assert isinstance(classifier, OnnxClassifier) and list(classifier.classes) == manifest["classes"]


def test_the_default_path_runs_without_tensorflow():
    code = (
        "import sys, json, ferkit;"
        f"faces = ferkit.analyze({str(EXAMPLE)!r});"
        "print(json.dumps([len(faces), 'tensorflow' in sys.modules, 'keras' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [3, False, False]


def test_predict_on_the_example_photo_with_no_options(tmp_path):
    result = CliRunner().invoke(cli, ["predict", str(EXAMPLE), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "people.faces.json").read_text())
    assert len(data["faces"]) == 3 and data["model"] == shipped_model()["model"]
    assert (tmp_path / "people.annotated.jpg").stat().st_size > 0
    # the broad smile of the official 2012 portrait (the middle face, left to right)
    middle = sorted(data["faces"], key=lambda f: f["box"][0])[1]
    assert middle["emotion"] == "happy"


@needs_fer2013()
def test_the_bundled_model_scores_on_val_what_its_manifest_records():
    val = load_dataset(FER2013 / "val")
    report, single_view = evaluate(None, val), evaluate(None, val, tta="none")
    manifest = shipped_model()
    assert report.tta == manifest["tta"] and report.accuracy == pytest.approx(manifest["val_accuracy"], abs=1e-6)
    assert single_view.accuracy == pytest.approx(manifest["val_accuracy_single_view"], abs=1e-6)
    # the shipped network (batch norm re-measured, int8), one view, loses no more than a point against
    # the float one validated during training
    assert single_view.accuracy >= manifest["val_accuracy_during_training"] - 0.01
    # faces any decent model gets right: happy and surprised ones
    assert report.per_class["happy"].recall > 0.75 and report.per_class["surprise"].recall > 0.6


def test_evaluate_with_the_bundled_model_imports_no_tensorflow(tmp_path):
    sample = Path(__file__).resolve().parents[1] / "examples" / "fer2013-sample" / "val"
    code = (
        "import sys, json; from ferkit.cli import cli;"
        f"cli.main(['evaluate', '--data', {str(sample)!r}, '--json', '--out', {str(tmp_path)!r}], standalone_mode=False);"
        "print(json.dumps(['tensorflow' in sys.modules, 'keras' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [False, False]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["samples"] == len(list(sample.rglob("*.jpg"))) and metrics["tta"] == shipped_model()["tta"]
    # real PublicTest faces (30 per class) that any decent model gets right: clearly happy and surprised
    assert metrics["per_class"]["happy"]["recall"] >= 0.8 and metrics["per_class"]["surprise"]["recall"] >= 0.6
    assert metrics["accuracy"] > 0.5  # chance is 1/7


def test_the_shipped_files_match_their_hashes_and_name_no_machine_paths():
    from ferkit.runtime import MANIFEST, files_path, read_manifest, sha256_of, shipped_models

    named = {MANIFEST}
    for entry in shipped_models().values():
        assert sha256_of(files_path("weights", entry["file"])) == entry["sha256"]
        assert sha256_of(files_path("weights", entry["keras_file"])) == entry["keras_sha256"]
        assert entry["keras_file"] == f"{entry['keras_file_run']}.keras"  # named for the network it is
        assert files_path("weights", entry["file"]).stat().st_size <= 25 * 1024 * 1024
        named |= {entry["file"], entry["keras_file"]}
    # nothing else lies in the package's weights: every file there is one a user downloads
    assert {p.name for p in files_path("weights").iterdir() if p.name != "__pycache__"} == named
    manifest = read_manifest()

    def strings(value):
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    assert not [s for s in strings(manifest) if s.startswith(("/", "~")) or s.startswith("..")]
