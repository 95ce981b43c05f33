import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ferkit.evaluation import score_predictions
from ferkit.labels import EMOTIONS
from ferkit.runtime import read_metadata


def test_confusion_matrix_is_7x7_even_without_a_class():
    rng = np.random.default_rng(0)
    y_true = rng.choice([0, 2, 3, 4, 5, 6], 200)  # no disgust (1)
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, 7, 200))
    report = score_predictions(y_true, y_pred, EMOTIONS)
    assert report.confusion_matrix.shape == (7, 7)
    assert report.confusion_matrix[1].sum() == 0 and report.per_class["disgust"].support == 0
    assert report.confusion_matrix.sum() == 200
    assert report.accuracy == np.trace(report.confusion_matrix) / 200


def test_a_class_without_faces_is_named_with_what_its_scores_mean(tmp_path):
    y_true = np.array([0, 0, 2, 3, 3, 4, 5, 6])  # no disgust (1)
    never = score_predictions(y_true, y_true, EMOTIONS)
    assert never.absent_classes == ["disgust"] and never.macro_f1 == 1.0  # left out: neither true nor predicted
    assert "no faces of disgust in the data" in never.absent_classes_note and "leaves out" in never.absent_classes_note

    y_pred = y_true.copy()
    y_pred[0] = 1  # an angry face called disgust
    wrong = score_predictions(y_true, y_pred, EMOTIONS, model="m", data="d")
    scores = [s.f1 for name, s in wrong.per_class.items() if name != "disgust" and s.support]
    assert wrong.macro_f1 == pytest.approx(sum(scores) / (len(scores) + 1))  # disgust counts, with F1 0
    assert "wrongly predicted as disgust count in macro-F1" in wrong.absent_classes_note
    wrong.save(tmp_path)
    assert "Note: no faces of disgust" in (tmp_path / "report.html").read_text()
    assert json.loads((tmp_path / "metrics.json").read_text())["absent_classes"] == ["disgust"]
    assert score_predictions(np.arange(7), np.arange(7), EMOTIONS).absent_classes_note is None
    missed = np.arange(7).repeat(2)
    unseen = score_predictions(missed, np.where(missed == 2, 5, missed), EMOTIONS)  # fear always called sad
    assert unseen.per_class["fear"].precision == 0 and unseen.absent_classes == []
    assert unseen.absent_classes_note == "fear never predicted: precision is undefined there (shown as 0.000)"


def test_per_class_scores_agree_with_the_confusion_matrix():
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 7, 500)
    y_pred = np.where(rng.random(500) < 0.6, y_true, rng.integers(0, 7, 500))
    report = score_predictions(y_true, y_pred, EMOTIONS)
    cm = report.confusion_matrix
    for i, name in enumerate(EMOTIONS):
        assert np.isclose(report.per_class[name].recall, cm[i, i] / cm[i].sum())
        assert np.isclose(report.per_class[name].precision, cm[i, i] / cm[:, i].sum())
        assert np.isclose(report.confusion_matrix_normalized[i, i], report.per_class[name].recall)
    scores = report.per_class.values()
    assert np.isclose(report.macro_precision, np.mean([s.precision for s in scores]))
    assert np.isclose(report.macro_recall, np.mean([s.recall for s in scores]))
    assert np.isclose(report.weighted_f1, sum(s.f1 * s.support for s in scores) / 500)
    assert report.never_predicted == []
    never = score_predictions(y_true, np.where(y_pred == 1, 0, y_pred), EMOTIONS)  # disgust never predicted
    assert never.never_predicted == ["disgust"] and never.to_dict()["never_predicted"] == ["disgust"]


def test_report_files(tmp_path):
    y = np.arange(7).repeat(3)
    report = score_predictions(y, y, EMOTIONS, model="m", data="d")
    written = report.save(tmp_path)
    assert all(p.exists() and p.stat().st_size > 0 for p in written)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["accuracy"] == 1.0 and metrics["macro_f1"] == 1.0
    matrix = json.loads((tmp_path / "confusion_matrix.json").read_text())
    assert matrix["confusion_matrix"] == (np.eye(7, dtype=int) * 3).tolist()
    assert (tmp_path / "per_class.csv").read_text().splitlines()[0] == "class,precision,recall,f1,support"
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    html = (tmp_path / "report.html").read_text()
    assert "accuracy <b>1.0000</b>" in html and html.count("<tr>") == 8
    assert f'src="data:image/png;base64,{_base64(tmp_path / "confusion_matrix.png")}"' in html  # moves with the page


def test_report_files_are_utf_8_whatever_the_locale(tmp_path):
    """Windows and a C locale write text in an encoding without the report's dashes, or a class's accents."""
    import os
    import subprocess
    import sys

    script = ("import sys, numpy as np; from ferkit.evaluation import score_predictions; y = np.arange(2).repeat(3); "
              "score_predictions(y, y, ['fr\\u00f6hlich', 'traurig'], model='m', data='d').save(sys.argv[1])")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONIOENCODING": "ascii"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "fröhlich" in (tmp_path / "report.html").read_text(encoding="utf-8")
    assert (tmp_path / "per_class.csv").read_text(encoding="utf-8").splitlines()[1].startswith("fröhlich,")


def test_report_with_probabilities_measures_calibration_and_draws_the_reliability_diagram(tmp_path):
    # every face at confidence 0.9 and right on 60% of them: ECE 0.3, an over-confident model
    y_true = np.array([0] * 12 + [1] * 8)
    probabilities = np.tile([0.9] + [0.1 / 6] * 6, (20, 1))
    report = score_predictions(y_true, probabilities.argmax(1), EMOTIONS, model="m", data="d", probabilities=probabilities)
    assert report.ece == pytest.approx(0.3)
    levels = {row["confidence"]: row for row in report.confidence_levels}
    assert list(levels) == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert levels[0.9]["share"] == 1.0 and levels[0.9]["accuracy"] == pytest.approx(0.6)
    written = report.save(tmp_path)
    assert tmp_path / "reliability_diagram.png" in written
    assert (tmp_path / "reliability_diagram.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["ece"] == pytest.approx(0.3) and metrics["ece_bins"] == 15 and metrics["temperature"] == 1.0
    assert "ece_before_temperature" not in metrics  # temperature 1: nothing to compare
    assert metrics["confidence_levels"][-1] == {"confidence": 0.9, "faces": 20, "share": 1.0, "accuracy": 0.6}
    assert sum(metrics["reliability"]["count"]) == 20 and metrics["reliability"]["accuracy"][13] == 0.6
    html = (tmp_path / "report.html").read_text()
    assert "ECE 0.3000 (15 bins)" in html and "their accuracy" in html
    assert f'src="data:image/png;base64,{_base64(tmp_path / "reliability_diagram.png")}"' in html


def test_report_without_probabilities_has_no_calibration(tmp_path):
    y = np.arange(7).repeat(3)
    report = score_predictions(y, y, EMOTIONS)
    assert report.ece is None and report.confidence_levels is None
    report.save(tmp_path)
    assert not (tmp_path / "reliability_diagram.png").exists()
    assert "ece" not in json.loads((tmp_path / "metrics.json").read_text())


def test_evaluate_scores_the_calibration_of_a_trained_model(trained_run, pattern_data, tmp_path):
    from ferkit.calibration import expected_calibration_error
    from ferkit.data import load_dataset
    from ferkit.evaluation import evaluate
    from ferkit.runtime import load_classifier

    val = load_dataset(pattern_data / "val")
    report = evaluate(trained_run, val)
    probabilities = load_classifier(trained_run).predict_proba(val.images)
    assert report.temperature == 1.0 and report.ece_before_temperature is None
    assert report.ece == pytest.approx(expected_calibration_error(probabilities, val.labels))
    report.save(tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["ece"] == pytest.approx(report.ece, abs=1e-6)
    assert (tmp_path / "reliability_diagram.png").stat().st_size > 0


def test_data_with_a_class_the_model_does_not_know_is_refused_before_scoring(trained_run, pattern_data, tmp_path):
    import shutil

    from ferkit.data import load_dataset
    from ferkit.errors import FerkitError
    from ferkit.evaluation import evaluate

    shutil.copytree(pattern_data / "val", tmp_path / "val")
    shutil.copytree(tmp_path / "val" / "happy", tmp_path / "val" / "contempt")
    data = load_dataset(tmp_path / "val", classes=[*EMOTIONS, "contempt"])
    with pytest.raises(FerkitError, match=r"the data has classes the model does not know: contempt \(the model's: angry,"):
        evaluate(trained_run, data)  # was a bare ValueError, an internal error to the CLI


def test_default_report_folders_never_write_into_the_package_and_keep_other_evaluations(trained_run, tmp_path, monkeypatch):
    import shutil

    from ferkit.evaluation import default_report_folder
    from ferkit.runtime import resolve_model_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "val").mkdir()
    (tmp_path / "fer.csv").write_text("emotion,pixels,Usage\n")
    model = shutil.copy(trained_run / "best.keras", tmp_path / "best.keras")
    this = ("m", "val", "none")
    shipped = resolve_model_path(None)
    assert default_report_folder(None, "val", this) == Path("runs") / f"eval-{shipped.stem}-onnx-val"
    assert default_report_folder(trained_run, "val", this, tta="flip") == trained_run / "eval-val-flip"
    assert default_report_folder(model, "fer.csv", this, usage="PrivateTest") == tmp_path / "eval-best-fer-PrivateTest"
    score_predictions(np.arange(7), np.arange(7), EMOTIONS, model="other", data="val").save(tmp_path / "eval-best-val")
    assert default_report_folder(model, "val", this) == tmp_path / "eval-best-val-2"
    assert default_report_folder(model, "val", ("other", "val", "none")) == tmp_path / "eval-best-val"


def test_another_model_of_the_same_network_never_replaces_a_report(trained_run, pattern_data, tmp_path):
    from click.testing import CliRunner

    from ferkit.cli import cli

    val = str(pattern_data / "val")
    out = str(tmp_path / "eval")
    assert CliRunner().invoke(cli, ["evaluate", str(trained_run), "--data", val, "--out", out]).exit_code == 0
    before = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    epoch = read_metadata(trained_run / "best.keras").extra["epoch"]
    assert before["model_version"].endswith(f"(best.keras, epoch {epoch})")
    again = CliRunner().invoke(cli, ["evaluate", str(trained_run), "--data", val, "--out", out])
    assert again.exit_code == 0  # the same evaluation: replaced
    other = CliRunner().invoke(cli, ["evaluate", str(trained_run / "last.keras"), "--data", val, "--out", out])
    assert other.exit_code == 2 and "holds the evaluation of seed-cnn" in other.output
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == before
    # two files of one name and metadata in two folders, outside any run, are two models
    import keras

    from ferkit.runtime import save_keras_model

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(trained_run / "best.keras", tmp_path / "a" / "model.keras")
    save_keras_model(keras.saving.load_model(trained_run / "last.keras"), tmp_path / "b" / "model.keras",
                     read_metadata(trained_run / "best.keras"))
    first = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "a" / "model.keras"), "--data", val, "--out", out + "-2"])
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "b" / "model.keras"), "--data", val, "--out", out + "-2"])
    assert second.exit_code == 2 and "holds the evaluation of seed-cnn" in second.output


def test_a_report_of_other_faces_of_the_same_relative_path_is_never_replaced(trained_run, pattern_data, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from ferkit.cli import cli

    for folder in ("a", "b"):
        shutil.copytree(pattern_data / "val", tmp_path / folder / "val")
    monkeypatch.chdir(tmp_path / "a")
    assert CliRunner().invoke(cli, ["evaluate", str(trained_run), "--data", "val", "--out", str(tmp_path / "eval")]).exit_code == 0
    monkeypatch.chdir(tmp_path / "b")  # "val" is another folder from here
    other = CliRunner().invoke(cli, ["evaluate", str(trained_run), "--data", "val", "--out", str(tmp_path / "eval")])
    assert other.exit_code == 2 and "holds the evaluation of" in other.output


def test_the_default_report_folder_of_data_given_as_a_dot_is_named_and_never_inside_it(pattern_data, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from ferkit.cli import cli

    shutil.copytree(pattern_data / "val", tmp_path / "val")
    monkeypatch.chdir(tmp_path / "val")
    result = CliRunner().invoke(cli, ["evaluate", "--data", "."])  # the shipped model: runs/ here, inside the data
    assert result.exit_code == 2 and "lies inside the data folder" in result.output
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == sorted(p.name for p in (pattern_data / "val").iterdir())
    monkeypatch.chdir(tmp_path)
    from ferkit.evaluation import default_report_folder

    assert default_report_folder(None, "val/.", ("m", "val", "none")).name.endswith("-val")


def test_a_runs_best_model_of_a_later_epoch_reports_beside_the_earlier_one(trained_run, pattern_data, tmp_path):
    import keras
    from click.testing import CliRunner

    from ferkit.cli import cli
    from ferkit.runtime import save_keras_model

    run = shutil.copytree(trained_run, tmp_path / "run")
    val = str(pattern_data / "val")
    assert CliRunner().invoke(cli, ["evaluate", str(run), "--data", val]).exit_code == 0
    first = json.loads((run / "eval-val" / "metrics.json").read_text())
    # the run trains on and finds a better model (here: its last one, recorded as a later epoch's best)
    later = read_metadata(run / "last.keras")
    later.extra["epoch"] = read_metadata(run / "best.keras").extra["epoch"] + 1
    save_keras_model(keras.saving.load_model(run / "last.keras"), run / "best.keras", later)
    result = CliRunner().invoke(cli, ["evaluate", str(run), "--data", val])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "eval-val" / "metrics.json").read_text()) == first  # kept
    assert f"epoch {later.extra['epoch']})" in json.loads((run / "eval-val-2" / "metrics.json").read_text())["model_version"]


def test_evaluate_takes_a_models_name_and_a_datasets_path(trained_run, pattern_data):
    from ferkit.data import load_dataset
    from ferkit.evaluation import evaluate

    by_path = evaluate(str(trained_run), str(pattern_data / "val"))
    loaded = evaluate(trained_run, load_dataset(pattern_data / "val"))
    assert by_path.accuracy == loaded.accuracy and by_path.confusion_matrix.tolist() == loaded.confusion_matrix.tolist()


def test_a_report_folder_inside_the_data_is_refused_before_anything_is_written(trained_run, pattern_data, tmp_path):
    from click.testing import CliRunner

    from ferkit.cli import cli

    data = tmp_path / "faces"
    shutil.copytree(pattern_data / "val", data)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    for out in (data / "happy", data / "reports"):  # its pictures would be read as faces the next time
        result = CliRunner().invoke(cli, ["evaluate", str(trained_run), "--data", str(data), "--out", str(out)])
        assert result.exit_code == 2 and "lies inside the data folder" in result.output
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


def _base64(path: Path) -> str:
    import base64

    return base64.b64encode(path.read_bytes()).decode()


def test_a_csv_without_a_usage_column_is_scored_whole_and_named_without_a_usage(trained_run, pattern_data, tmp_path):
    from click.testing import CliRunner

    from ferkit.cli import cli
    from ferkit.data import load_dataset
    from ferkit.labels import FER2013_CSV_CODES

    codes = {name: code for code, name in FER2013_CSV_CODES.items()}
    faces = load_dataset(pattern_data / "val")
    rows = [f"{codes[faces.classes[label]]},{' '.join(map(str, image.ravel()))}" for image, label in zip(faces.images, faces.labels)]
    (tmp_path / "mine.csv").write_text("emotion,pixels\n" + "\n".join(rows) + "\n")
    result = CliRunner().invoke(cli, ["evaluate", str(trained_run), "--data", str(tmp_path / "mine.csv")])
    assert result.exit_code == 0, result.output
    assert f"({len(faces)} faces)" in result.output and (trained_run / "eval-mine").is_dir()
    result = CliRunner().invoke(cli, ["evaluate", str(trained_run), "--data", str(tmp_path / "mine.csv"), "--usage", "PrivateTest"])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: --usage selects rows by their Usage column, which {tmp_path / 'mine.csv'} lacks: every row is used"


def test_every_row_of_a_csv_is_scored_with_usage_all(trained_run, pattern_data, tmp_path):
    from click.testing import CliRunner

    from ferkit.cli import cli
    from ferkit.data import load_dataset
    from ferkit.labels import FER2013_CSV_CODES

    codes = {name: code for code, name in FER2013_CSV_CODES.items()}
    faces = load_dataset(pattern_data / "val")
    usages = ["PublicTest", "PrivateTest"]
    rows = [f"{codes[faces.classes[label]]},{' '.join(map(str, image.ravel()))},{usages[n % 2]}"
            for n, (image, label) in enumerate(zip(faces.images, faces.labels))]
    (tmp_path / "fer.csv").write_text("emotion,pixels,Usage\n" + "\n".join(rows) + "\n")
    result = CliRunner().invoke(cli, ["evaluate", str(trained_run), "--data", str(tmp_path / "fer.csv"), "--usage", "all", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{"):])["samples"] == len(faces)


def test_evaluate_reports_its_progress_as_it_classifies(trained_run, pattern_data):
    from ferkit.data import load_dataset
    from ferkit.evaluation import evaluate

    faces = load_dataset(pattern_data / "val")
    seen = []
    report = evaluate(trained_run, faces, batch_size=16, tta="flip", progress=lambda done, total: seen.append((done, total)))
    assert len(seen) == -(-len(faces) // 8) and seen[-1] == (len(faces), len(faces))  # 8 faces, two views each, a call
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert report.accuracy == evaluate(trained_run, faces, batch_size=16, tta="flip").accuracy


def test_a_run_folder_whose_name_holds_a_parenthesis_is_named_whole():
    report = score_predictions(np.arange(7), np.arange(7), EMOTIONS, model="seed-cnn", data="val")
    report.model_version, report.model_epoch = "runs/m7 (copy) (best.keras, epoch 3)", 3
    assert report.model_label == "m7 (copy) (epoch 3)"
    report.model_version, report.model_epoch = "photo model (2).keras", None  # a file outside any run
    assert report.model_label == "photo model (2).keras"


def test_files_skipped_in_the_data_are_named_in_the_saved_report(trained_run, pattern_data, tmp_path):
    from ferkit.evaluation import evaluate

    shutil.copytree(pattern_data / "val", tmp_path / "val")
    (tmp_path / "val" / "happy" / "broken.png").write_text("not an image")
    report = evaluate(trained_run, tmp_path / "val")
    report.save(tmp_path / "eval")
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())["warnings"]
    assert len(saved) == 1 and "1 unreadable file(s)" in saved[0] and "broken.png" in saved[0]


def test_faces_of_another_size_are_resized_and_no_faces_is_one_line(trained_run, pattern_data):
    from ferkit.data import load_dataset
    from ferkit.errors import FerkitError
    from ferkit.evaluation import evaluate

    larger = load_dataset(pattern_data / "val", image_size=(64, 64))  # a 48x48 network's faces, loaded larger
    report = evaluate(trained_run, larger)
    as_loaded = evaluate(trained_run, pattern_data / "val").accuracy
    assert len(report.y_true) == len(larger) and abs(report.accuracy - as_loaded) <= 2 / len(larger)
    with pytest.raises(FerkitError, match="holds no faces to score"):
        evaluate(trained_run, larger.subset(np.array([], int)))


def test_the_numbers_of_a_normalised_matrix_of_small_shares_are_dark_on_its_light_cells(tmp_path):
    """scikit-learn coloured each number by the matrix's own range: where every share is small, half of them
    came out in the lightest colour, on cells nearly as light."""
    from PIL import Image

    from ferkit.plots import plot_confusion_matrix

    counts = np.random.default_rng(0).integers(10, 20, (7, 7))  # shares of 0.1-0.2 of each row
    picture = np.asarray(Image.open(plot_confusion_matrix(counts, EMOTIONS, tmp_path / "m.png")).convert("RGB")).astype(int)
    normalised = picture[:, picture.shape[1] // 2:]
    red, green, blue = normalised[..., 0], normalised[..., 1], normalised[..., 2]
    lightest = (red >= 244) & (red <= 250) & (green - red >= 3) & (blue >= 253)  # Blues' lightest colour, not white
    assert lightest.sum() == 0


def test_a_long_title_is_broken_into_lines_the_figure_holds(tmp_path):
    from PIL import Image

    from ferkit.calibration import reliability_bins
    from ferkit.plots import plot_reliability_diagram

    rng = np.random.default_rng(0)
    title = (f"ferkit-net-l-distilled-v1 (ferkit-net-l-distilled-v1.onnx, epoch 23, flip TTA) on {tmp_path}/datasets/"
             "fer2013-cleaned/validation\nECE 0.0912 (15 bins)")
    path = plot_reliability_diagram(reliability_bins(rng.dirichlet(np.ones(7), 100), rng.integers(0, 7, 100), 15),
                                    tmp_path / "r.png", title=title)
    grey = np.asarray(Image.open(path).convert("L")).astype(int)
    title_band = grey[: grey.shape[0] // 8]
    assert (title_band < 128).any() and (title_band[:, :3] >= 128).all() and (title_band[:, -3:] >= 128).all()
