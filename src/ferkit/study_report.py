"""The study's report: one HTML file with its figures inside (PNG data URIs), readable offline."""

from __future__ import annotations

import base64
import io
from datetime import datetime, timezone
from html import escape
from pathlib import Path

import numpy as np
from PIL import Image

from ferkit.data import FaceDataset
from ferkit.plots import _pyplot

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:78em;padding:0 1em;color:#222}
.wide{overflow-x:auto}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f4f4f4}img{max-width:100%}
.note{color:#555;font-size:.92em}code{background:#f4f4f4;padding:0 .2em}
"""


def write_report(path: Path, config, results, val: FaceDataset, photos: list[dict], facts: dict) -> Path:
    from ferkit.study import pretraining_gain

    sections = [
        _comparison(results, pretraining_gain(results)),
        _curves(results),
        _recall_table(results),
        _confusions(results),
        _wrong_faces(results, val),
        _photos(photos, results),
        _reproduction(facts),
    ]
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    html = (
        "<!doctype html><html lang='en'><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>ferkit study</title><style>{STYLE}</style>"
        "<h1>Facial expression recognition on FER2013: the study, reproduced</h1>"
        f"<p class='note'>Made by <code>{escape(facts['text']['command'])}</code> ({generated}). "
        f"Every model is scored on the same {len(val):,} validation faces ({escape(config.val)}).</p>"
        + "".join(sections) + "</html>\n"
    )
    path.write_text(html, encoding="utf-8")
    return path


def _comparison(results, gain) -> str:
    header = ("<tr><th>model</th><th>network</th><th>parameters</th><th>val accuracy</th><th>published</th>"
              "<th>macro-F1</th><th>train − val gap</th><th>epochs</th><th>training time</th>"
              "<th>s / epoch</th><th>faces / s</th></tr>")
    rows = "".join(
        f"<tr><td><b>{escape(r.name)}</b><br><span class='note'>{escape(r.label)}</span></td><td>{escape(r.model)}</td><td>{r.parameters:,}</td><td><b>{r.accuracy:.3f}</b></td>"
        f"<td>{_number(r.published_accuracy, '.3f')}</td><td>{r.macro_f1:.3f}</td><td>{_number(r.train_val_gap, '+.3f')}</td>"
        f"<td>{_number(r.epochs, 'd')}</td><td>{_duration(r.training_seconds)}</td>"
        f"<td>{_number(r.seconds_per_epoch, '.1f')}</td><td>{r.faces_per_second:,.0f}</td></tr>"
        for r in results
    )
    notes = ("<p class='note'>Train − val gap: training minus validation accuracy at the last epoch (training "
             "accuracy is taken on the faces as trained on: flipped and zoomed for the augmented entry). Published: "
             "the founding study's figures (its own test split; its transfer model was "
             "VGG19). Faces/s: ONNX Runtime, batches of 256, on this machine's CPU (see Reproduction). "
             "Training time and s/epoch: from each run's history; s/epoch is the median epoch, leaving out the "
             "first (graph tracing) and, for the transfer models, the head's epochs on features computed once "
             "(their fine-tuning epochs are what costs).</p>")
    if gain is not None:
        notes += (f"<p><b>What ImageNet pretraining buys:</b> {gain * 100:+.1f} points of val accuracy over the same "
                  "network, same recipe and epochs, started from random weights.</p>")
    said = list(dict.fromkeys(warning for r in results for warning in r.warnings))  # the same val faces: once each
    notes += "".join(f"<p><b>Warning:</b> {escape(warning)}</p>" for warning in said)
    return f"<h2>Comparison</h2><div class='wide'><table>{header}{rows}</table></div>{notes}"


def _curves(results) -> str:
    trained = [r for r in results if r.history]
    if not trained:
        return ""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for colour, result in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], trained):
        for ax, metric in zip(axes, ("accuracy", "loss")):
            ax.plot(result.history["epoch"], result.history[metric], "--", marker=".", color=colour, alpha=0.8)
            ax.plot(result.history["epoch"], result.history[f"val_{metric}"], "-", marker=".", color=colour,
                    label=result.name)
    epochs = sorted({epoch for result in trained for epoch in result.history["epoch"]})
    for ax, metric in zip(axes, ("accuracy", "loss")):
        if len(epochs) == 1:
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)  # not 0.96-1.04 around lone points
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(title="solid: val, dashed: train")
    return ("<h2>Training curves</h2><p class='note'>The gap between a dashed (train) and a solid (val) line of "
            "one colour is overfitting.</p>" + _figure(fig, "training curves of every model"))


def _recall_table(results) -> str:
    classes = list(results[0].recall)
    header = "<tr><th>model</th>" + "".join(f"<th>{escape(c)}</th>" for c in classes) + "</tr>"
    rows = "".join(
        f"<tr><td>{escape(r.name)}</td>" + "".join(f"<td>{r.recall[c]:.3f}</td>" for c in classes) + "</tr>"
        for r in results
    )
    return f"<h2>Recall per class</h2><table>{header}{rows}</table>"


def _confusions(results) -> str:
    from ferkit.evaluation import normalize_rows

    plt = _pyplot()
    classes = list(results[0].recall)
    columns = min(3, len(results))
    rows = -(-len(results) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4.6 * rows), constrained_layout=True, squeeze=False)
    for ax in axes.flat[len(results):]:
        ax.axis("off")
    for ax, result in zip(axes.flat, results):
        matrix = normalize_rows(np.asarray(result.confusion_matrix))
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value > 0.5 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set_title(f"{result.name}: {result.accuracy:.3f}", fontsize=10)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    return ("<h2>Confusion matrices</h2><p class='note'>Rows: the true class; each row sums to 1, so the diagonal "
            "is the recall.</p>" + _figure(fig, "confusion matrix of every model"))


def _wrong_faces(results, val: FaceDataset) -> str:
    parts = []
    for result in results:
        if not result.wrong:
            continue
        tiles = [(val.images[i], f"{true} -> {pred}\n{p:.0%}") for i, true, pred, p in result.wrong]
        parts.append(f"<h3>{escape(result.name)}</h3>" + _face_grid(tiles, f"most confident mistakes of {result.name}"))
    return ("<h2>The most confidently wrong faces</h2><p class='note'>Per model: true class → predicted class, and "
            "the probability it gave. Some are label noise in FER2013, some real confusions.</p>" + "".join(parts))


def _photos(photos: list[dict], results) -> str:
    if not photos:
        return ""
    from ferkit.draw import draw_faces

    parts = []
    for photo in photos:
        faces = photo["faces"]
        shown = "shipped" if "shipped" in faces else next(iter(faces))
        picture = draw_faces(photo["path"], faces[shown])  # read as analyze read it (a huge JPEG at a reduced scale)
        picture.thumbnail((1200, 1200))
        header = "<tr><th>face</th>" + "".join(f"<th>{escape(name)}</th>" for name in faces) + "</tr>"
        rows = "".join(
            f"<tr><td>{n}</td>" + "".join(
                f"<td>{escape(faces[name][n - 1].emotion)} {faces[name][n - 1].score:.0%}</td>" for name in faces
            ) + "</tr>"
            for n in range(1, len(photo["boxes"]) + 1)
        )
        parts.append(
            f"<h3>{escape(Path(photo['path']).name)}: {len(photo['boxes'])} face{'' if len(photo['boxes']) == 1 else 's'}</h3>"
            f"<p class='note'>Drawn: {escape(shown)}. The table gives every model's answer for the same faces.</p>"
            + _image(picture, f"faces found in {Path(photo['path']).name}")
            + (f"<table>{header}{rows}</table>" if photo["boxes"] else "<p>No face was found.</p>")
        )
    return "<h2>Real photos</h2>" + "".join(parts)


def _reproduction(facts: dict) -> str:
    text = facts["text"]
    train_counts, val_counts = text["train"]["per_class"], text["val"]["per_class"]
    header = "<tr><th>set</th>" + "".join(f"<th>{escape(c)}</th>" for c in train_counts) + "<th>all</th></tr>"
    rows = "".join(
        f"<tr><td>{name} ({escape(text[name]['source'])})</td>" + "".join(f"<td>{n:,}</td>" for n in counts.values())
        + f"<td>{sum(counts.values()):,}</td></tr>"
        for name, counts in (("train", train_counts), ("val", val_counts))
    )
    if text["train"]["subset_of"]:
        rows += (f"<tr><td colspan='{len(train_counts) + 2}' class='note'>train: the first faces of each class of "
                 f"{escape(text['train']['subset_of'])} (--subset)</td></tr>")
    versions = ", ".join(f"{escape(k)} {escape(str(v))}" for k, v in text["versions"].items())
    train = facts["train"]
    samples = [(train.images[i], train.classes[train.labels[i]])
               for k in range(len(train.classes)) for i in np.flatnonzero(train.labels == k)[:8]]
    return (
        "<h2>Reproduction</h2><h3>Data</h3>" f"<table>{header}{rows}</table>"
        + _face_grid(samples, "sample training faces per class", columns=8)
        + "<h3>How this report was made</h3><ul>"
        f"<li>Command: <code>{escape(text['command'])}</code></li>"
        f"<li>Versions: {versions}</li><li>Machine: {escape(text['machine'])}</li>"
        f"<li>Seed: {text['seed']} (weights, shuffling, augmentation)</li>"
        "<li>Each trained model's run folder (settings in config.json, history.csv) is under <code>runs/</code>; "
        "every figure of this page is in <code>study.json</code>.</li></ul>"
    )


def _face_grid(tiles: list[tuple[np.ndarray, str]], alt: str, columns: int = 6, scale: int = 2) -> str:
    """Faces side by side at `scale` times their size (nearest pixel: the faces as the models see them),
    each with its caption (one or two lines) under it."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    side = tiles[0][0].shape[0] * scale
    cell_w, cell_h = max(side, 110) + 8, side + 36
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (face, caption) in enumerate(tiles):
        x, y = (n % columns) * cell_w, (n // columns) * cell_h
        picture = Image.fromarray(np.asarray(face, dtype=np.uint8)).resize((side, side), Image.NEAREST)
        sheet.paste(picture.convert("RGB"), (x + (cell_w - side) // 2, y + 2))
        draw.multiline_text((x + cell_w // 2, y + side + 4), caption, fill="black", font=font, anchor="ma", align="center")
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", optimize=True)
    return _data_uri_img(buffer.getvalue(), alt)


def _figure(fig, alt: str) -> str:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return _data_uri_img(buffer.getvalue(), alt)


def _image(picture: Image.Image, alt: str) -> str:
    buffer = io.BytesIO()
    picture.convert("RGB").save(buffer, format="JPEG", quality=85)
    return _data_uri_img(buffer.getvalue(), alt, "image/jpeg")


def _data_uri_img(data: bytes, alt: str, kind: str = "image/png") -> str:
    return f"<p><img alt='{escape(alt)}' src='data:{kind};base64,{base64.b64encode(data).decode()}'></p>"


def _number(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"
