"""Keras -> ONNX, with ferkit's metadata inside and a check that both give the same probabilities."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ferkit.errors import FerkitError
from ferkit.images import faces_to_batch
from ferkit.runtime import METADATA_NAME, KerasClassifier, OnnxClassifier, load_classifier, resolve_model_path

TOLERANCE = 1e-4  # max abs difference allowed between Keras and ONNX probabilities


def export_onnx(model: str | Path, out: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """Write `model` (a run folder or .keras file) as ONNX, default beside it with the .onnx suffix.

    Raises FerkitError if the exported model disagrees with Keras by more than TOLERANCE.
    """
    source = resolve_model_path(model)
    if source.suffix != ".keras":
        raise FerkitError(f"{source} is already not a Keras model; only .keras models are exported")
    out = Path(out) if out else source.with_suffix(".onnx")
    if out.exists() and not overwrite:
        raise FerkitError(f"{out} already exists; pass --overwrite to replace it")
    keras_model = load_classifier(source)
    assert isinstance(keras_model, KerasClassifier)
    tmp = out.with_name(f".{out.stem}.tmp.onnx")
    _write_onnx(keras_model, tmp)
    difference = max_difference(keras_model, OnnxClassifier(tmp))
    if difference > TOLERANCE:
        tmp.unlink()
        raise FerkitError(f"the ONNX export differs from Keras by {difference:.2e} (> {TOLERANCE}); not written")
    os.replace(tmp, out)
    return out


def max_difference(first, second, *, samples: int = 64, seed: int = 0) -> float:
    """Max abs difference of two classifiers' probabilities on random and smooth synthetic faces."""
    rng = np.random.default_rng(seed)
    height, width = first.input_size
    noise = rng.integers(0, 256, (samples // 2, height, width), dtype=np.uint8)
    ramps = np.linspace(0, 255, width)[None, None, :] * rng.uniform(0.2, 1.0, (samples - len(noise), 1, 1))
    faces = np.concatenate([noise, np.broadcast_to(ramps, (len(ramps), height, width)).astype(np.uint8)])
    return float(np.abs(first.predict_proba(faces) - second.predict_proba(faces)).max())


def _write_onnx(classifier: KerasClassifier, path: Path) -> None:
    import onnx

    model = classifier.model
    channels = classifier.metadata.channels
    model(faces_to_batch(np.zeros((1, *classifier.input_size), np.uint8), channels))  # export needs a built call
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # tf2onnx's use of np.object
            model.export(str(path), format="onnx", verbose=False)
    except Exception as err:
        raise FerkitError(f"ONNX export failed ({type(err).__name__}: {err})") from None
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_NAME, json.dumps(asdict(classifier.metadata))
    onnx.save(proto, str(path))
