"""Calibration measures and temperature fitting, on synthetic probabilities whose truth is known."""

import numpy as np
import pytest

from ferkit.calibration import (
    TEMPERATURE_BOUNDS,
    apply_temperature,
    confidence_accuracy_table,
    expected_calibration_error,
    fit_temperature,
    held_out_ece,
    negative_log_likelihood,
    reliability_bins,
    tta_average,
)


def _softmax(logits):
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def _sample_labels(probabilities, rng):
    """One class per row, drawn from that row's probabilities."""
    drawn = (rng.random((len(probabilities), 1)) > probabilities.cumsum(axis=1)).sum(axis=1)
    return np.minimum(drawn, probabilities.shape[1] - 1)


def _model_at_temperature(true_temperature, n=20000, seed=0):
    """Labels drawn from softmax(z / T_true), and the model's probabilities softmax(z): the model needs T_true."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, 7))
    return _softmax(logits), _sample_labels(_softmax(logits / true_temperature), rng)


@pytest.mark.parametrize("true_temperature", [2.0, 0.5])
def test_fit_temperature_recovers_the_temperature_the_labels_were_drawn_at(true_temperature):
    probabilities, labels = _model_at_temperature(true_temperature)
    fitted = fit_temperature(probabilities, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.10)
    nll = negative_log_likelihood(probabilities, labels)
    assert negative_log_likelihood(probabilities, labels, fitted) < nll
    # the fitted temperature is a minimum: nudging it either way costs likelihood
    for nudged in (fitted * 0.9, fitted * 1.1):
        assert negative_log_likelihood(probabilities, labels, nudged) > negative_log_likelihood(probabilities, labels, fitted)


def test_fit_temperature_stays_within_its_bounds_and_says_when_it_stops_at_one(caplog):
    probabilities = np.tile([0.6, 0.3, 0.1], (50, 1))
    with caplog.at_level("WARNING", logger="ferkit"):
        assert fit_temperature(probabilities, np.zeros(50, int)) == pytest.approx(TEMPERATURE_BOUNDS[0], rel=1e-3)
    assert "at the end of the range searched" in caplog.text
    caplog.clear()
    rng = np.random.default_rng(0)
    mixed = rng.dirichlet(np.ones(3), 400)
    with caplog.at_level("WARNING", logger="ferkit"):
        fit_temperature(mixed, np.array([rng.choice(3, p=p) for p in mixed]))  # calibrated: T near 1
    assert "end of the range" not in caplog.text
    with pytest.raises(ValueError):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, int))


def test_held_out_ece_shows_a_temperature_helping_an_overconfident_model_and_not_a_calibrated_one():
    overconfident, labels = _model_at_temperature(2.0, n=4000)
    checked = held_out_ece(overconfident, labels, splits=5)
    assert checked["splits"] == 5 and checked["improved"] == 1.0
    assert checked["ece_after"] < checked["ece_before"] / 3
    calibrated, labels = _model_at_temperature(1.0, n=4000)
    checked = held_out_ece(calibrated, labels, splits=5)
    assert checked["ece_after"] == pytest.approx(checked["ece_before"], abs=0.01)  # nothing to gain
    assert held_out_ece(calibrated, labels, splits=5) == checked  # the same halves each time (its seed)
    with pytest.raises(ValueError):
        held_out_ece(calibrated[:3], labels[:3])


def test_ece_is_near_zero_when_calibrated_and_large_when_overconfident():
    rng = np.random.default_rng(1)
    calibrated = rng.dirichlet(np.full(7, 0.5), 20000)
    assert expected_calibration_error(calibrated, _sample_labels(calibrated, rng)) < 0.02
    overconfident, labels = _model_at_temperature(2.0)
    ece = expected_calibration_error(overconfident, labels)
    assert ece > 0.15
    assert expected_calibration_error(apply_temperature(overconfident, fit_temperature(overconfident, labels)), labels) < 0.02


def test_ece_of_a_known_case():
    # every face at confidence 0.9, right on 60% of them: ECE = |0.6 - 0.9| = 0.3
    probabilities = np.tile([0.9] + [0.1 / 6] * 6, (10, 1))
    labels = np.array([0] * 6 + [1] * 4)
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.3)
    bins = reliability_bins(probabilities, labels, n_bins=10)
    assert bins["count"].tolist() == [0] * 8 + [10, 0]  # 0.9 belongs to (0.8, 0.9]
    assert bins["accuracy"][8] == pytest.approx(0.6) and bins["confidence"][8] == pytest.approx(0.9)
    assert np.isnan(bins["accuracy"][0])


def test_confidence_accuracy_table_counts_the_faces_at_or_above_each_level():
    probabilities = np.array([[0.95, 0.05], [0.85, 0.15], [0.35, 0.65], [0.55, 0.45]])
    labels = np.array([0, 1, 1, 1])  # right, wrong, right, wrong
    rows = confidence_accuracy_table(probabilities, labels, [0.5, 0.65, 0.9, 0.99])
    assert [row["faces"] for row in rows] == [4, 3, 1, 0]
    assert [row["share"] for row in rows] == [1.0, 0.75, 0.25, 0.0]
    assert [row["accuracy"] for row in rows] == [0.5, pytest.approx(2 / 3), 1.0, None]


def test_apply_temperature_is_softmax_of_log_p_over_t():
    rng = np.random.default_rng(2)
    probabilities = rng.dirichlet(np.ones(7), 100).astype(np.float32)
    assert apply_temperature(probabilities, 1.0) is probabilities  # T = 1: untouched, bit for bit
    for temperature in (0.3, 2.5):
        calibrated = apply_temperature(probabilities, temperature)
        expected = _softmax(np.log(probabilities.astype(np.float64)) / temperature)
        assert np.allclose(calibrated, expected, atol=1e-12)
        assert (calibrated.argmax(axis=1) == probabilities.argmax(axis=1)).all()
        assert np.allclose(calibrated.sum(axis=1), 1)
    softened = apply_temperature(probabilities, 2.5).max(axis=1)
    assert (softened <= probabilities.max(axis=1) + 1e-7).all()
    with_zero = apply_temperature(np.array([[1.0, 0.0, 0.0]]), 2.0)
    assert np.isfinite(with_zero).all() and with_zero[0, 0] > 0.99
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            apply_temperature(probabilities, bad)


def test_a_temperature_for_test_time_augmentation_is_fitted_to_the_average_of_its_views():
    """A model with TTA outputs the mean of its views, each at T: its temperature minimises that mean's log
    loss, not one view's (the mean of views is softer than each, so it wants a lower T)."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (4000, 7))
    labels = _sample_labels(_softmax(logits / 0.7), rng)
    views = np.stack([_softmax(logits + rng.normal(0, 1.5, logits.shape)) for _ in range(2)])  # two noisy views
    fitted = fit_temperature(views, labels)
    grid = np.exp(np.linspace(np.log(0.2), np.log(5), 400))
    loss = [-np.mean(np.log(tta_average(views, t)[np.arange(len(labels)), labels])) for t in grid]
    assert fitted == pytest.approx(grid[int(np.argmin(loss))], rel=0.02)
    assert negative_log_likelihood(views, labels, fitted) == pytest.approx(min(loss), rel=1e-3)
    assert fitted != pytest.approx(fit_temperature(views[0], labels), rel=0.02)  # one view's would be another
    # one view given as (1, N, classes) is the same as (N, classes)
    assert fit_temperature(views[:1], labels) == pytest.approx(fit_temperature(views[0], labels), rel=1e-6)
    assert np.allclose(tta_average(views, fitted), np.mean([apply_temperature(v, fitted) for v in views], axis=0))
    checked = held_out_ece(views, labels, splits=2)
    assert 0 <= checked["ece_after"] and 0 <= checked["improved"] <= 1
