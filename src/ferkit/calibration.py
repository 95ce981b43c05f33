"""Calibrated confidence: temperature scaling (Guo et al., "On Calibration of Modern Neural Networks",
ICML 2017) and the measures that show whether a model's probabilities can be taken at their word.

ferkit's models output softmax probabilities p. With temperature T a model gives softmax(log p / T)
instead: T > 1 softens over-confident probabilities, T < 1 sharpens timid ones; the most probable class
never changes. T is fitted on held-out labelled faces by minimising their negative log-likelihood.

Only numpy is imported here (scipy when a temperature is fitted), so the runtime can use this module
without slowing `import ferkit`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

EPSILON = 1e-12  # probabilities are clipped here before their logarithm: a zero would make log p = -inf
TEMPERATURE_BOUNDS = (0.05, 20.0)  # the range fit_temperature searches
ECE_BINS = 15
CONFIDENCE_LEVELS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T) along the last axis, computed in float64 (p clipped at EPSILON first).

    T = 1 returns `probabilities` itself, untouched, so an uncalibrated model's outputs stay bit-identical.
    """
    temperature = check_temperature(temperature)
    if temperature == 1.0:
        return probabilities
    logits = np.log(np.clip(np.asarray(probabilities, np.float64), EPSILON, None)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=-1, keepdims=True)


def check_temperature(temperature: float) -> float:
    """`temperature` as a float; ValueError unless it is finite and positive."""
    value = float(temperature)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"a temperature must be a positive number, not {temperature!r}")
    return value


def tta_average(views: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """What a model with test-time augmentation outputs: each view's probabilities at `temperature`,
    averaged. `views` (views, N, classes) are the views' probabilities at T = 1; (N, classes) is one view."""
    views = np.asarray(views)
    return apply_temperature(views, temperature) if views.ndim == 2 else apply_temperature(views, temperature).mean(axis=0)


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean -log p(true class) at `temperature` of `probabilities` (N, classes), or of the average of
    views (views, N, classes) each at that temperature (see `tta_average`); labels index the columns."""
    probabilities, labels = _checked(probabilities, labels)
    if len(labels) == 0:
        return float("nan")
    return float(_nll(_log_probabilities(probabilities), labels, check_temperature(temperature)))


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray, *, warn: bool = True) -> float:
    """The temperature T in TEMPERATURE_BOUNDS that minimises the negative log-likelihood of softmax(log p / T)
    on these faces: `probabilities` (N, classes) as the model gives them at T = 1, `labels` (N,) the true
    class indices (columns of `probabilities`). For a model with test-time augmentation, give its views'
    probabilities (views, N, classes): T is fitted to their average at T, what the model outputs. Fit it on
    faces the model was not trained on."""
    probabilities, labels = _checked(probabilities, labels)
    if len(labels) == 0:
        raise ValueError("fitting a temperature needs at least one labelled face")
    temperature, at_an_end = _fit(probabilities, labels)
    if at_an_end and warn:
        logging.getLogger("ferkit").warning(
            "the fitted temperature %.3g is at the end of the range searched (%g to %g): the best fit lies beyond "
            "it, so these faces say little about calibration (too few, or unlike the model's)", temperature, *TEMPERATURE_BOUNDS)
    return temperature


def _fit(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, bool]:
    """fit_temperature's temperature, and whether it lies at an end of TEMPERATURE_BOUNDS."""
    from ferkit.extras import require

    minimize_scalar = require("scipy.optimize", "fitting a temperature").minimize_scalar
    log_p = _log_probabilities(probabilities)
    low, high = np.log(TEMPERATURE_BOUNDS)
    # searched over log T: the likelihood changes as much from 0.5 to 1 as from 1 to 2
    found = minimize_scalar(lambda log_t: _nll(log_p, labels, np.exp(log_t)), bounds=(low, high),
                            method="bounded", options={"xatol": 1e-5})
    return float(np.exp(found.x)), at_search_bound(float(np.exp(found.x)))


def at_search_bound(temperature: float) -> bool:
    """Whether a fitted temperature lies at an end of TEMPERATURE_BOUNDS: the best fit lies beyond the range."""
    return min(abs(np.log(temperature / bound)) for bound in TEMPERATURE_BOUNDS) < 1e-3


def held_out_ece(probabilities: np.ndarray, labels: np.ndarray, *, splits: int = 20, seed: int = 0) -> dict:
    """Whether a fitted temperature calibrates faces it was not fitted on: the faces are cut in two halves
    at random `splits` times; each time the temperature is fitted on one half and the other half's ECE is
    scored at T = 1 and at that temperature, both ways round. Returns the mean `ece_before` and
    `ece_after`, and `improved`, the share of those fits that lowered the ECE. An ECE measured on the
    faces a temperature was fitted on flatters it; this does not."""
    probabilities, labels = _checked(probabilities, labels)
    if len(labels) < 4:
        raise ValueError("a held-out check needs at least 4 labelled faces")
    views = probabilities if probabilities.ndim == 3 else probabilities[None]  # faces along axis 1
    rng = np.random.default_rng(seed)
    before, after = [], []
    for _ in range(splits):
        order = rng.permutation(len(labels))
        halves = order[: len(labels) // 2], order[len(labels) // 2 :]
        for fit, score in (halves, halves[::-1]):
            temperature, _ = _fit(views[:, fit], labels[fit])  # a fit at a bound was said of the whole fit
            before.append(expected_calibration_error(tta_average(views[:, score]), labels[score]))
            after.append(expected_calibration_error(tta_average(views[:, score], temperature), labels[score]))
    before, after = np.array(before), np.array(after)
    return {"splits": splits, "ece_before": float(before.mean()), "ece_after": float(after.mean()),
            "improved": float(np.mean(after < before))}


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """Faces grouped by confidence (their top probability) into `n_bins` equal-width bins over [0, 1]
    (each bin holds (low, high]): per bin the number of faces, their mean confidence and their accuracy
    (NaN for an empty bin). Keys: edges (n_bins + 1), count, confidence, accuracy (n_bins each)."""
    probabilities, labels = _checked(probabilities, labels, views=False)
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, not {n_bins}")
    confidence = probabilities.max(axis=1) if len(labels) else np.zeros(0)
    correct = probabilities.argmax(axis=1) == labels if len(labels) else np.zeros(0, bool)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # (low, high] bins; a confidence of exactly 0 (impossible for a softmax) joins the first bin
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(index, weights=correct.astype(float), minlength=n_bins) / count
    return {"edges": edges, "count": count, "confidence": mean_confidence, "accuracy": accuracy}


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE: the gap between confidence and accuracy, |accuracy - mean confidence| per bin of
    `reliability_bins`, averaged with the bins' shares of the faces as weights. 0 is perfectly calibrated."""
    bins = reliability_bins(probabilities, labels, n_bins)
    total = bins["count"].sum()
    if total == 0:
        return float("nan")
    used = bins["count"] > 0
    gaps = np.abs(bins["accuracy"][used] - bins["confidence"][used])
    return float(np.sum(bins["count"][used] / total * gaps))


def confidence_accuracy_table(
    probabilities: np.ndarray, labels: np.ndarray, thresholds: Sequence[float] = CONFIDENCE_LEVELS
) -> list[dict]:
    """For each confidence level t: the faces whose top probability is at least t, as `faces` (a count)
    and `share` (of all faces), and their `accuracy` (None when no face reaches t). This is what a
    threshold such as `ferkit predict --uncertain-below t` keeps, and how often it is then right."""
    probabilities, labels = _checked(probabilities, labels, views=False)
    confidence = probabilities.max(axis=1) if len(labels) else np.zeros(0)
    correct = probabilities.argmax(axis=1) == labels if len(labels) else np.zeros(0, bool)
    rows = []
    for threshold in thresholds:
        kept = confidence >= threshold
        n = int(kept.sum())
        rows.append({
            "confidence": float(threshold),
            "faces": n,
            "share": float(n / len(labels)) if len(labels) else 0.0,
            "accuracy": float(correct[kept].mean()) if n else None,
        })
    return rows


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    top = x.max(axis=axis, keepdims=True)
    return np.squeeze(top, axis=axis) + np.log(np.exp(x - top).sum(axis=axis))


def _checked(probabilities, labels, *, views: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (N, classes), or where `views`, also (views, N, classes), and labels (N,) that index
    their columns."""
    probabilities = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels).astype(np.int64, copy=False)
    shapes = (2, 3) if views else (2,)
    if probabilities.ndim not in shapes or labels.shape != (probabilities.shape[-2],):
        expected = "(N, classes) or (views, N, classes)" if views else "(N, classes)"
        raise ValueError(f"expected probabilities {expected} and labels (N,), got {probabilities.shape} and {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= probabilities.shape[-1]):
        raise ValueError(f"labels must index the {probabilities.shape[-1]} columns of the probabilities")
    return probabilities, labels


def _log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    return np.log(np.clip(probabilities, EPSILON, None))


def _nll(log_p: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """The mean -log p(true class) at `temperature`; for views (views, N, classes), of their average."""
    if log_p.ndim == 3:
        logits = log_p / temperature
        log_softmax = logits - _logsumexp(logits, axis=2)[..., None]
        of_label = log_softmax[:, np.arange(len(labels)), labels]  # (views, N)
        return float(np.mean(np.log(len(log_p)) - _logsumexp(of_label, axis=0)))
    logits = log_p / temperature
    top = logits.max(axis=1, keepdims=True)
    log_normaliser = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return float(np.mean(log_normaliser - logits[np.arange(len(labels)), labels]))
