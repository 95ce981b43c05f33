import json

import numpy as np

from ferkit.evaluate import score_predictions
from ferkit.labels import EMOTIONS


def test_confusion_matrix_is_7x7_even_without_a_class():
    rng = np.random.default_rng(0)
    y_true = rng.choice([0, 2, 3, 4, 5, 6], 200)  # no disgust (1)
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, 7, 200))
    report = score_predictions(y_true, y_pred, EMOTIONS)
    assert report.confusion_matrix.shape == (7, 7)
    assert report.confusion_matrix[1].sum() == 0 and report.per_class["disgust"].support == 0
    assert report.confusion_matrix.sum() == 200
    assert report.accuracy == np.trace(report.confusion_matrix) / 200


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
    assert "accuracy <b>1.0000</b>" in html and html.count("<tr>") == 8 and 'src="confusion_matrix.png"' in html
