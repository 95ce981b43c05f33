"""`ferkit study --quick` on the bundled FER2013 sample: every model trained, scored and reported in one
self-contained HTML file whose images decode (and render in Chromium, where it is installed)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("keras", reason="ferkit[train] is not installed")
pytest.importorskip("sklearn", reason="ferkit[evaluate] is not installed")

from click.testing import CliRunner  # noqa: E402

from ferkit.cli import cli  # noqa: E402
from ferkit.data import load_dataset  # noqa: E402
from ferkit.evaluation import evaluate  # noqa: E402
from ferkit.models.efficientnet_lite import efficientnet_lite0_backbone  # noqa: E402
from ferkit.runs import read_history  # noqa: E402
from ferkit.runtime import load_classifier  # noqa: E402
from ferkit.study import ENTRIES, StudyConfig, study  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "fer2013-sample"
PEOPLE = ROOT / "examples" / "people.jpg"
CHROMIUM = os.environ.get("FERKIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs["src"])
        for name in ("href", "src"):
            if tag != "img" and attrs.get(name):
                self.links.append(attrs[name])


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """One quick study of every entry, with a transfer weights file given by path."""
    folder = tmp_path_factory.mktemp("study")
    weights = folder / "backbone.weights.h5"
    efficientnet_lite0_backbone((96, 96, 3)).save_weights(weights)
    config = StudyConfig.quick(str(SAMPLE / "train"), str(SAMPLE / "val"), out=str(folder / "study"),
                               photos=[str(PEOPLE)], transfer_weights=str(weights))
    report = study(config, verbose=0)
    return config, report


def test_the_report_is_one_file_whose_images_all_decode(quick_study):
    config, report = quick_study
    parser = _Images()
    parser.feed(report.read_text())
    assert parser.links == []  # nothing outside the file: no scripts, styles or images to fetch
    assert len(parser.sources) >= 6  # curves, confusions, mistakes per model, the photo, the data grid
    for source in parser.sources:
        kind, data = source.split(",", 1)
        assert kind in ("data:image/png;base64", "data:image/jpeg;base64")
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        image.load()
        assert min(image.size) > 50


def test_every_entry_is_scored_on_the_same_faces_as_evaluate_scores_it(quick_study):
    config, report = quick_study
    figures = json.loads((report.parent / "study.json").read_text())
    entries = {e["name"]: e for e in figures["entries"]}
    assert list(entries) == list(ENTRIES)
    [photo] = figures["photos"]  # the photo's answers too: every figure of the report
    assert photo["path"] == str(PEOPLE) and {len(faces) for faces in photo["faces"].values()} == {len(photo["boxes"])} == {3}
    for name, entry in entries.items():
        assert entry["model_file"] == (str(Path(entry["run"]) / "best.onnx") if entry["run"] else None)
        classifier = load_classifier(entry["model_file"])
        val = load_dataset(config.val, image_size=classifier.input_size)
        assert entry["accuracy"] == pytest.approx(evaluate(classifier, val).accuracy)
        assert sum(map(sum, entry["confusion_matrix"])) == len(val)
        assert entry["faces_per_second"] > 0 and entry["parameters"] > 0
    for name in ("reference", "augmented", "transfer", "transfer-random"):
        assert entries[name]["epochs"] == 2  # reference CNNs: --epochs 2; transfer: 1 frozen + 1 fine-tuned
        assert entries[name]["training_seconds"] > 0
    assert figures["pretraining_gain"] == pytest.approx(entries["transfer"]["accuracy"] - entries["transfer-random"]["accuracy"])
    trained = load_dataset(figures["reproduction"]["train"]["source"])
    assert set(trained.class_counts().values()) == {20}  # --subset 20 per class


def test_the_report_names_every_model_and_the_photo(quick_study):
    config, report = quick_study
    html = report.read_text()
    for entry in ENTRIES:
        assert f"<td>{entry}</td>" in html  # in the per-class recall table
    assert "people.jpg: 3 faces" in html
    assert "What ImageNet pretraining buys" in html


def test_a_second_study_reuses_the_finished_runs(quick_study):
    config, report = quick_study
    history = Path(config.out) / "runs" / "reference" / "history.csv"
    before = history.stat().st_mtime_ns
    study(StudyConfig.quick(config.data, config.val, out=config.out, models=["reference"]), verbose=0)
    assert history.stat().st_mtime_ns == before


def test_a_users_own_export_and_evaluation_in_a_run_folder_are_neither_scored_nor_replaced(quick_study, tmp_path):
    config, _ = quick_study
    moved = shutil.copytree(config.out, tmp_path / "study")
    run_folder = moved / "runs" / "reference"
    flip = CliRunner().invoke(cli, ["export", str(run_folder), "--onnx", "--tta", "flip", "--overwrite"])
    mine = CliRunner().invoke(cli, ["evaluate", str(run_folder), "--data", config.val])  # RUN/eval-val
    assert flip.exit_code == 0 and mine.exit_code == 0, flip.output + mine.output
    exported, evaluated = (run_folder / "best.onnx").read_bytes(), (run_folder / "eval-val" / "metrics.json").read_bytes()
    study(StudyConfig.quick(config.data, config.val, out=str(moved), models=["reference"]), verbose=0)
    [entry] = json.loads((moved / "study.json").read_text())["entries"]
    assert entry["model_file"] == str(run_folder / "study.onnx") and load_classifier(entry["model_file"]).tta == "none"
    assert (run_folder / "best.onnx").read_bytes() == exported
    assert (run_folder / "eval-val" / "metrics.json").read_bytes() == evaluated
    assert (run_folder / "study-eval" / "metrics.json").is_file()
    assert entry["history"]["val_accuracy"] == read_history(run_folder / "history.csv")["val_accuracy"]


def test_a_study_folder_inside_its_data_is_refused_before_any_work(tmp_path):
    data = shutil.copytree(SAMPLE / "train", tmp_path / "train")
    result = CliRunner().invoke(cli, ["study", "--quick", "--data", str(data), "--val", str(SAMPLE / "val"),
                                      "--out", str(data / "study"), "--models", "shipped"])
    assert result.exit_code == 2 and result.output.startswith(f"error: {data / 'study'} lies inside the data folder {data}")
    assert not (data / "study").exists()


def test_a_moved_study_with_its_paths_spelled_otherwise_reuses_its_runs_but_not_for_other_faces(quick_study, tmp_path):
    config, _ = quick_study
    moved = shutil.copytree(config.out, tmp_path / "moved")
    history = moved / "runs" / "reference" / "history.csv"
    before = history.stat().st_mtime_ns
    val = os.path.relpath(config.val) + "/"
    result = CliRunner().invoke(cli, ["study", "--quick", "--data", config.data + "/.", "--val", val, "--out", str(moved),
                                      "--models", "reference"])
    assert result.exit_code == 0, result.output
    assert history.stat().st_mtime_ns == before  # reused, not trained again

    fewer = shutil.copytree(config.val, tmp_path / "fewer")
    next(fewer.glob("happy/*")).unlink()
    result = CliRunner().invoke(cli, ["study", "--quick", "--data", config.data, "--val", str(fewer), "--out", str(moved),
                                      "--models", "reference"])
    assert result.exit_code == 2 and "the val data given (--val) holds other faces than" in result.output
    assert history.stat().st_mtime_ns == before
    # as many faces per class, one of them another: refused too, not reported as of faces the run never saw
    changed = shutil.copytree(config.val, tmp_path / "changed")
    face = next(changed.glob("happy/*"))
    Image.eval(Image.open(face), lambda v: 255 - v).save(face)
    result = CliRunner().invoke(cli, ["study", "--quick", "--data", config.data, "--val", str(changed), "--out", str(moved),
                                      "--models", "reference"])
    assert result.exit_code == 2 and "(as many per class, other pixels)" in result.output, result.output
    assert "give the study the data its runs were trained with, or another --out" in result.output


def test_a_run_folder_with_other_settings_is_refused_not_replaced_and_more_epochs_extend_it(quick_study, tmp_path):
    config, _ = quick_study
    shutil.copytree(Path(config.out) / "runs" / "reference", tmp_path / "runs" / "reference")
    common = ["study", "--quick", "--data", config.data, "--val", config.val, "--out", str(tmp_path), "--models", "reference"]
    for other in (["--epochs", "1"], ["--seed", "5"]):
        result = CliRunner().invoke(cli, [*common, *other])
        assert result.exit_code == 2
        assert "holds a run with other settings" in result.output
    assert "(it has 2 epochs: a study extends a run, never shortens it)" in CliRunner().invoke(cli, [*common, "--epochs", "1"]).output
    assert (tmp_path / "runs" / "reference" / "best.keras").exists()
    result = CliRunner().invoke(cli, [*common, "--epochs", "3"])  # trained on from where it stopped
    assert result.exit_code == 0, result.output
    assert read_history(tmp_path / "runs" / "reference" / "history.csv")["epoch"] == [1, 2, 3]


def test_a_refused_subset_leaves_no_copy_of_its_faces_behind(quick_study, tmp_path):
    config, _ = quick_study
    moved = shutil.copytree(config.out, tmp_path / "moved")
    result = CliRunner().invoke(cli, ["study", "--quick", "--data", config.data, "--val", config.val, "--out", str(moved),
                                      "--models", "reference", "--subset", "10"])
    assert result.exit_code == 2, result.output
    assert sorted(path.name for path in (moved / "data").iterdir()) == [f"train-{config.subset}-per-class"]


def test_a_study_folder_of_other_data_is_refused_not_reused(quick_study, tmp_path):
    config, _ = quick_study
    other = shutil.copytree(config.data, tmp_path / "other")
    result = CliRunner().invoke(cli, ["study", "--quick", "--data", str(other), "--val", config.val, "--out", config.out,
                                      "--models", "reference"])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {config.out} holds a study of {Path(config.data).resolve()}; choose another --out for {other}"


def test_a_folder_of_the_users_own_is_refused_not_written_into(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.html").write_text("my own report")
    result = CliRunner().invoke(cli, ["study", "--quick", "--data", str(SAMPLE / "train"), "--val", str(SAMPLE / "val"),
                                      "--out", str(mine), "--models", "reference"])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {mine} holds files that are not a ferkit study; choose a new or empty --out"
    assert sorted(p.name for p in mine.iterdir()) == ["report.html"]
    assert (mine / "report.html").read_text() == "my own report"
    (mine / "runs" / "my-run").mkdir(parents=True)  # a project folder: its runs/ is ferkit train's default
    result = CliRunner().invoke(cli, ["study", "--quick", "--data", str(SAMPLE / "train"), "--val", str(SAMPLE / "val"),
                                      "--out", str(mine), "--models", "reference"])
    assert result.exit_code == 2 and "holds files that are not a ferkit study" in result.output
    assert sorted(p.name for p in (mine / "runs").iterdir()) == ["my-run"]
    assert (mine / "report.html").read_text() == "my own report"
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(cli, ["study", "--quick", "--data", str(SAMPLE / "train"), "--val", str(SAMPLE / "val"),
                                      "--out", str(tmp_path / "file"), "--models", "reference"])
    assert result.exit_code == 2 and "is a file" in result.output


def test_a_fer2013_csv_trains_on_its_training_rows_and_scores_on_its_publictest_rows(tmp_path):
    from ferkit.labels import FER2013_CSV_CODES

    codes = {name: code for code, name in FER2013_CSV_CODES.items()}
    lines = ["emotion,pixels,Usage"]
    for split, usage in (("train", "Training"), ("val", "PublicTest"), ("val", "PrivateTest")):
        faces = load_dataset(SAMPLE / split)
        for image, label in list(zip(faces.images, faces.labels))[::3]:
            lines.append(f"{codes[faces.classes[label]]},{' '.join(map(str, image.ravel()))},{usage}")
    csv_file = tmp_path / "fer2013.csv"
    csv_file.write_text("\n".join(lines) + "\n")
    public = load_dataset(csv_file, usage="PublicTest")

    config = StudyConfig.quick(str(csv_file), str(csv_file), out=str(tmp_path / "study"), models=["shipped"])
    study(config, verbose=0)
    [entry] = json.loads((tmp_path / "study" / "study.json").read_text())["entries"]
    assert np.sum(entry["confusion_matrix"]) == len(public)  # not the Training or PrivateTest rows
    assert entry["accuracy"] == pytest.approx(evaluate("default", public).accuracy)
    copied = load_dataset(tmp_path / "study" / "data" / f"train-{config.subset}-per-class")
    training = load_dataset(csv_file, usage="Training")
    assert len(copied) == sum(min(config.subset, int(np.sum(training.labels == k))) for k in range(len(training.classes)))


def test_missing_imagenet_weights_are_named_before_anything_trains(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    result = CliRunner().invoke(cli, ["study", "--quick", "--data", str(SAMPLE / "train"), "--val", str(SAMPLE / "val"),
                                      "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "no ImageNet weights at" in result.output and "--transfer-weights" in result.output
    others = ",".join(name for name in ENTRIES if name != "transfer")
    assert result.output.strip().endswith(f"; or leave the transfer entry out: --models {others}")
    assert not (tmp_path / "s").exists()


def test_bad_study_options_are_one_line_errors(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    for args, message in ((["--models", "reference,vgg"], "unknown study entry vgg"),
                          (["--models", ""], "--models names no entry"),
                          (["--models", "transfer", "--transfer-weights", "none"], "transfer-random is the one"),
                          (["--photo", str(tmp_path / "missing.jpg")], "no such photo"),
                          (["--photo", str(tmp_path / "empty.jpg")], "empty.jpg: empty file"),
                          (["--epochs", "0"], "at least 1"),
                          (["--fine-tune-layers", "0"], "--fine-tune-layers must be at least 1"),
                          (["--models", "reference,transfer-random", "--transfer-model", "nope"], "unknown model 'nope'"),
                          (["--models", "reference,transfer-random", "--transfer-model", "seed-cnn"],
                           "--fine-tune unfreezes a pretrained backbone, which seed-cnn does not have")):
        result = CliRunner().invoke(cli, ["study", "--data", str(SAMPLE / "train"), "--val", str(SAMPLE / "val"),
                                          "--out", str(tmp_path / "s"), *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s").exists()  # nothing written before the options are known to be good


def test_an_entry_named_twice_is_one_entry():
    config = StudyConfig.quick(str(SAMPLE / "train"), str(SAMPLE / "val"), models=["reference", "shipped", "reference"])
    assert config.models == ["reference", "shipped"]


def test_a_photo_too_large_to_open_whole_is_drawn_as_analyze_reads_it(tmp_path):
    big = tmp_path / "big.jpg"
    Image.new("L", (13500, 13300), 128).save(big)  # over Pillow's decompression-bomb limit; read at a reduced scale
    config = StudyConfig.quick(str(SAMPLE / "train"), str(SAMPLE / "val"), out=str(tmp_path / "s"), models=["shipped"],
                               photos=[str(big)])
    report = study(config, verbose=0)
    assert "big.jpg: 0 faces" in report.read_text()


@pytest.mark.skipif(not CHROMIUM, reason="Chromium is not installed (apt-get install chromium)")
def test_the_report_renders_in_chromium(quick_study):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
    _, report = quick_study
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.route("**/*", lambda route: route.abort() if not route.request.url.startswith(("file:", "data:")) else route.continue_())
        page.goto(report.as_uri())
        widths = page.locator("img").evaluate_all("images => images.map(i => i.complete ? i.naturalWidth : 0)")
        browser.close()
    assert widths and all(w > 50 for w in widths)
    assert np.isfinite(widths).all()


def test_validation_files_skipped_are_said_on_the_report(tmp_path):
    val = shutil.copytree(SAMPLE / "val", tmp_path / "val")
    (val / "happy" / "broken.jpg").write_text("not an image")
    report = study(StudyConfig.quick(str(SAMPLE / "train"), str(val), out=str(tmp_path / "study"), models=["shipped"]),
                   verbose=0)
    said = f"<b>Warning:</b> 1 unreadable file(s) of {val} were skipped, e.g. {val / 'happy' / 'broken.jpg'}"
    assert said in report.read_text(encoding="utf-8")
