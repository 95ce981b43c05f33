"""Several trained models as one: a Keras model that averages their probabilities, saved with ferkit's
metadata, so it evaluates, exports (ONNX, int8) and predicts like any single model.

    ferkit ensemble runs/a runs/b --out runs/ab.keras
"""

from __future__ import annotations

from pathlib import Path

from ferkit.errors import FerkitError
from ferkit.results import check_output_file
from ferkit.runtime import (ModelMetadata, check_not_written_over_its_inputs, load_keras_model, read_metadata,
                            resolve_model_path, save_keras_model)


def ensemble_models(members: list[str | Path], out: str | Path, *, overwrite: bool = False) -> Path:
    """Write to `out` (.keras) one model whose output is the mean of the `members`' probabilities
    (run folders or .keras files, trained for the same classes on the same input)."""
    from ferkit._keras import import_keras

    out = check_output_file(out, ".keras", "an ensemble", overwrite=overwrite)
    paths = [resolve_model_path(member) for member in members]
    if len(paths) < 2:
        raise FerkitError("an ensemble needs at least two models")
    check_not_written_over_its_inputs(out, paths)
    seen = set()
    for member, path in zip(members, paths):
        if path.resolve() in seen:
            raise FerkitError(f"{member} is given twice; an ensemble of a model with itself is that model")
        seen.add(path.resolve())
    if any(path.suffix != ".keras" for path in paths):
        raise FerkitError("ensemble members must be Keras models (.keras files or run folders)")
    metadata = [read_metadata(path) for path in paths]
    _check_compatible(paths, metadata)
    keras = import_keras()  # once everything is checked: a refusal is at once
    first = metadata[0]
    inputs = keras.Input(shape=(*first.input_size, first.channels), name="faces")
    outputs = []
    for index, path in enumerate(paths):
        member = load_keras_model(keras, path)
        member.name = f"member_{index}"  # layer names must be unique within the ensemble
        outputs.append(member(inputs))
    averaged = keras.layers.Average(dtype="float32", name="mean_probabilities")(outputs)
    model = keras.Model(inputs, averaged, name="ensemble")
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_keras_model(model, out, _ensemble_metadata(paths, metadata))


def _check_compatible(paths: list[Path], metadata: list[ModelMetadata]) -> None:
    first = metadata[0]
    for path, other in zip(paths[1:], metadata[1:]):
        for what in ("classes", "input_size", "channels"):
            if getattr(other, what) != getattr(first, what):
                raise FerkitError(
                    f"{path} has {what} {getattr(other, what)}, unlike {paths[0]} ({getattr(first, what)}); "
                    "ensemble members must agree"
                )


def _ensemble_metadata(paths: list[Path], metadata: list[ModelMetadata]) -> ModelMetadata:
    """The members' networks and their runs' training data (so that a temperature is not fitted, or an
    accuracy taken, on faces a member learned)."""
    from ferkit.runs import TRAINED_ON, training_faces_origin

    first = metadata[0]
    members = []
    for path, meta in zip(paths, metadata):
        origin = training_faces_origin(path)
        members.append({"model": meta.model, **meta.extra, **({TRAINED_ON: origin} if origin else {})})
    names = [meta.model for meta in metadata]
    label = f"{names[0]} x{len(names)}" if len(set(names)) == 1 else " + ".join(names)
    return ModelMetadata(
        model=f"ensemble({label})",
        classes=first.classes,
        input_size=first.input_size,
        channels=first.channels,
        crop=first.crop if len({meta.crop for meta in metadata}) == 1 else None,  # tencrop needs one shared crop
        tta=first.tta,
        extra={"members": members},
    )
