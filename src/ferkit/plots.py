"""Figures: training curves, confusion matrices, reliability diagrams. matplotlib is imported only when drawing."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ferkit import __version__
from ferkit.extras import require


def _pyplot():
    matplotlib = require("matplotlib", "drawing plots")

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _plain_text(plot):
    """Draw with `$` read as a dollar sign, not as the start of math: titles hold file names."""
    @functools.wraps(plot)
    def drawn(*args, **kwargs):
        with _pyplot().rc_context({"text.parse_math": False}):
            return plot(*args, **kwargs)

    return drawn


def _fitted(title: str, fig, fontsize: float) -> str:
    """`title` broken into lines that fit the figure's width (titles hold paths and model names, which the
    figure would otherwise cut at both ends)."""
    import textwrap

    width = max(20, int(fig.get_figwidth() * 72 / (fontsize * 0.62)))  # characters of about 0.6 em
    return "\n".join(part for line in title.splitlines() for part in textwrap.wrap(line, width) or [""])


PLOT_SOURCE = "Source"  # a PNG text chunk: the file a plot is of (a video's timeline), where it says


def _save(fig, path: str | Path, *, source: str | None = None) -> Path:
    """Save and close `fig`; a PNG is marked as ferkit's in a text chunk, so that a later run knows it may
    replace it (ferkit.results.check_replaceable), and names the `source` it is of, where given."""
    text = {"Software": f"ferkit {__version__}", **({PLOT_SOURCE: source} if source else {})}
    marked = {"metadata": text} if Path(path).suffix.lower() == ".png" else {}
    fig.savefig(path, dpi=110, **marked)
    _pyplot().close(fig)
    return Path(path)


@_plain_text
def plot_history(history: dict[str, Sequence[float]], path: str | Path, *, title: str = "") -> Path:
    """Accuracy and loss per epoch, train vs val, side by side, saved as a PNG."""
    plt = _pyplot()
    epochs = history["epoch"]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, metric in ((ax_acc, "accuracy"), (ax_loss, "loss")):
        ax.plot(epochs, history[metric], marker=".", label=f"train {metric}")
        if history.get(f"val_{metric}"):
            ax.plot(epochs, history[f"val_{metric}"], marker=".", label=f"val {metric}")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)  # no epoch 1.5 on short runs
        if len(epochs) == 1:
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)  # not 0.96-1.04 around a lone point
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(_fitted(title, fig, 12))
    return _save(fig, path)


@_plain_text
def plot_confusion_matrix(matrix: np.ndarray, classes: Sequence[str], path: str | Path, *, title: str = "") -> Path:
    """Counts and row-normalised (recall) matrices side by side, labelled, saved as a PNG."""
    ConfusionMatrixDisplay = require("sklearn.metrics", "drawing a confusion matrix").ConfusionMatrixDisplay

    from ferkit.evaluation import normalize_rows

    plt = _pyplot()
    matrix = np.asarray(matrix)
    normalised = normalize_rows(matrix)
    fig, (ax_counts, ax_norm) = plt.subplots(1, 2, figsize=(14, 6), constrained_layout=True)
    ConfusionMatrixDisplay(matrix, display_labels=list(classes)).plot(
        ax=ax_counts, cmap="Blues", colorbar=False, values_format="d", xticks_rotation=45
    )
    ax_counts.set_title("counts")
    shown = ConfusionMatrixDisplay(normalised, display_labels=list(classes)).plot(
        ax=ax_norm, cmap="Blues", colorbar=False, values_format=".2f", xticks_rotation=45, im_kw={"vmin": 0, "vmax": 1}
    )
    # scikit-learn picks each number's colour by the matrix's own range, not the 0-1 the colours span: light
    # numbers on light cells where every share is small
    for (row, column), text in np.ndenumerate(shown.text_):
        text.set_color(shown.im_.cmap(0.0 if normalised[row, column] > 0.5 else 1.0))
    ax_norm.set_title("normalised by true class (recall)")
    if title:
        fig.suptitle(_fitted(title, fig, 12))
    return _save(fig, path)


@_plain_text
def plot_reliability_diagram(bins: dict, path: str | Path, *, title: str = "") -> Path:
    """Accuracy against confidence per bin (ferkit.calibration.reliability_bins), saved as a PNG.

    Each bar spans its bin and rises to the accuracy of the faces in it, its face count written above; an
    orange mark shows their mean confidence; the diagonal is perfect calibration. Bars under the diagonal
    are over-confident, bars above it under-confident. The legend lies below the axes, where it hides no bar.
    """
    plt = _pyplot()
    edges, count = np.asarray(bins["edges"]), np.asarray(bins["count"])
    accuracy, confidence = np.asarray(bins["accuracy"], float), np.asarray(bins["confidence"], float)
    used = count > 0
    lefts, widths = edges[:-1], np.diff(edges)
    fig, ax = plt.subplots(figsize=(6.5, 6), constrained_layout=True)
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.4", linewidth=1, label="perfect calibration")
    ax.bar(lefts[used], accuracy[used], width=widths[used], align="edge", color=(0.0, 0.45, 0.70, 0.75),
           edgecolor="white", label="accuracy")
    ax.scatter(confidence[used], confidence[used], marker="_", s=120, color=(0.84, 0.37, 0.0), zorder=3,
               label="mean confidence")
    for left, width, acc, conf, n in zip(lefts[used], widths[used], accuracy[used], confidence[used], count[used]):
        # above the bar and its confidence mark, whichever is higher
        ax.text(left + width / 2, max(acc, conf) + 0.015, str(int(n)), ha="center", va="bottom", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, fontsize=8)  # below the axes: over no bar
    if title:
        ax.set_title(_fitted(title, fig, 9), fontsize=9)
    return _save(fig, path)


@_plain_text
def plot_emotion_timeline(series: dict, path: str | Path, *, title: str = "", until: float | None = None,
                          source: str | None = None) -> Path:
    """One panel per track: each emotion's probability over time, from 0 to `until` seconds where given.
    `series`: track -> (times, {class: values}); none: one empty panel that says no face was found.
    `source`: the video's path, recorded in the PNG."""
    plt = _pyplot()
    from ferkit.draw import colour_of

    tracks = list(series) or [0]
    fig, axes = plt.subplots(len(tracks), 1, figsize=(10, 2.2 * len(tracks) + 0.9), sharex=True, squeeze=False,
                             constrained_layout=True)
    for ax, track in zip(axes[:, 0], tracks):
        times, values = series.get(track, ([], {}))
        for name, ys in values.items():
            # neutral's light grey, readable on photos, is darkened on white; a face seen once is still a dot
            colour = (0.4, 0.4, 0.4) if name == "neutral" else tuple(c / 255 for c in colour_of(name))
            ax.plot(times, ys, label=name, color=colour, linewidth=1.6, marker="o" if len(times) <= 30 else None,
                    markersize=3)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"face {track}" if series else "")
        if until is not None:
            end = until or 1.0
            ax.set_xlim(-end / 50, end)  # a little room left of 0, where a face seen first is drawn
        ax.grid(alpha=0.3)
    if series:
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, ncol=min(len(labels), 8), loc="outside lower center", fontsize=8, frameon=False)
    else:
        axes[0, 0].text(0.5, 0.5, "no face found", ha="center", va="center", transform=axes[0, 0].transAxes)
    axes[-1, 0].set_xlabel("time (s)")
    if title:
        fig.suptitle(_fitted(title, fig, 12))
    return _save(fig, path, source=source)
