"""One model from the mean of several checkpoints' weights (stochastic weight averaging, Izmailov et al.,
2018): checkpoints taken along one run's late epochs lie in one basin, and their mean often scores
above each of them. Batch-norm statistics do not average into those of the mean network, so they are
measured afresh on training faces.

Measured on FER2013 PublicTest, ferkit-net-l-v1 (one view): its last model (epoch 127) 0.6796; the
mean of its packed epochs 50, 67, 92, 96 and 120 with its last model, 0.6916 (0.6977 ten-crop); of
epochs 92, 96, 120 and 127 only, 0.6885. Its best epoch (83) had scored 0.6963.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from ferkit._keras import import_keras
from ferkit.checkpoints import COMPACT_CHECKPOINT, load_float16_weights
from ferkit.config import TrainConfig
from ferkit.errors import FerkitError
from ferkit.results import check_output_file
from ferkit.runs import TRAINED_ON, run_folder_of, training_faces_origin
from ferkit.runtime import (ModelMetadata, check_not_written_over_its_inputs, load_keras_model, read_metadata,
                            resolve_model_path, save_keras_model)
from ferkit.training_model import float32_twin, network_metadata

log = logging.getLogger("ferkit")

BATCH_NORM_FACES = 5000  # training faces the mean network's batch-norm statistics are measured on


def average_checkpoints(sources, out: str | Path, *, calibration=None, overwrite: bool = False) -> Path:
    """Write to `out` (.keras) the network whose weights are the mean of those of `sources`: .keras
    files, run folders (their best model, else their last) or packed runs (tools/pack_run.py), all of one
    network and classes. `calibration`: training faces (a FaceDataset, or a dataset's path, read after
    the checkpoints are checked) to measure the batch-norm statistics on, un-augmented
    (BATCH_NORM_FACES of them, picked at random); without it they are averaged like the weights, which
    is only right for networks without batch norm."""
    out = check_output_file(out, ".keras", "the averaged model", overwrite=overwrite)
    if len(sources) < 2:
        raise FerkitError("averaging needs two checkpoints or more")
    check_not_written_over_its_inputs(out, [Path(source) / "best.keras" if Path(source).is_dir() else Path(source)
                                            for source in sources])
    _check_each_once(sources)
    keras = import_keras()
    loaded = [_metadata_and_weights(keras, source) for source in sources]
    metadata = loaded[0][0]
    for source, (other, weights) in zip(sources, loaded):
        if (other.model, list(other.classes)) != (metadata.model, list(metadata.classes)) or \
                [w.shape for w in weights] != [w.shape for w in loaded[0][1]]:
            raise FerkitError(f"{source} is a {other.model} network with classes {', '.join(other.classes)}, unlike "
                              f"{sources[0]} ({metadata.model}: {', '.join(metadata.classes)}): only checkpoints of "
                              "one network average")
    _warn_of_other_runs(sources)
    network = float32_twin(keras, metadata.model, len(metadata.classes))
    network.set_weights([np.mean([weights[i] for _, weights in loaded], axis=0) for i in range(len(loaded[0][1]))])
    averaged = {"sources": [str(s) for s in sources]}
    if isinstance(calibration, (str, Path)):
        from ferkit.data import load_dataset
        from ferkit.data.fer2013_csv import TRAIN_USAGE

        calibration = load_dataset(calibration, classes=metadata.classes, usage=TRAIN_USAGE)
    if calibration is not None:
        measured = _measure_batch_norm(network, calibration, metadata)
        if measured:  # a network without batch norm has nothing to measure
            averaged["batch_norm_faces"] = measured
    elif _has_batch_norm(network):
        log.warning("%s has batch norm, whose statistics averaged like the weights fit none of the checkpoints: "
                    "give its training faces as calibration (the tool's --calibration DATA) to measure them afresh", metadata.model)
    # the crop policy and test-time augmentation carry over; a temperature fitted to one checkpoint does not
    # where each checkpoint's run took its training faces, as an ensemble records it: evaluating there is warned of
    members = [{"model": metadata.model, **({TRAINED_ON: origin} if (origin := training_faces_origin(_model_file(s))) else {})}
               for s in sources]
    metadata = dataclasses.replace(metadata, temperature=1.0, extra={"averaged": averaged, "members": members})
    return save_keras_model(network, out, metadata)


def _model_file(source) -> Path:
    """A file inside the folder of the run that made checkpoint `source` (its config.json lies beside it)."""
    folder = Path(source)
    return folder / COMPACT_CHECKPOINT if (folder / COMPACT_CHECKPOINT).exists() and folder.is_dir() else resolve_model_path(source)


def _check_each_once(sources) -> None:
    """A FerkitError where two sources are one model file (a run folder and its best.keras, a link): its
    weights would count twice in the mean."""
    seen: dict[str, str] = {}
    for source in sources:
        real = os.path.realpath(_model_file(source))
        if real in seen:
            raise FerkitError(f"{seen[real]} and {source} are the same checkpoint: its weights would count twice in the mean")
        seen[real] = str(source)


def _warn_of_other_runs(sources) -> None:
    """Weights average well along one run (its late epochs lie in one basin); those of runs trained apart
    (another seed, other settings) average into a network far worse than each."""
    configs = [(s, run_folder_of(_model_file(s)) / "config.json") for s in sources]
    known = [(s, TrainConfig.load(path)) for s, path in configs if path.is_file()]
    for source, config in known[1:]:
        changed = config.settings_changed_from(known[0][1])
        if changed:
            log.warning("%s and %s come from runs of other settings (%s): weights average well only along one run; "
                        "`ferkit ensemble` averages runs trained apart", known[0][0], source, ", ".join(changed))
            return


def _metadata_and_weights(keras, source) -> tuple[ModelMetadata, list[np.ndarray]]:
    folder = Path(source)
    if folder.is_dir() and (folder / COMPACT_CHECKPOINT).exists() and not any(
            (folder / name).exists() for name in ("best.keras", "last.keras")):
        return _packed(folder)
    path = resolve_model_path(source)
    if path.suffix != ".keras":
        raise FerkitError(f"{path} is not a Keras model; only .keras models, runs and packed runs average")
    return read_metadata(path), [np.asarray(w, np.float32) for w in load_keras_model(keras, path).get_weights()]


def _packed(folder: Path) -> tuple[ModelMetadata, list[np.ndarray]]:
    config = TrainConfig.load(folder / "config.json")
    return network_metadata(config.model, config.classes), load_float16_weights(folder / COMPACT_CHECKPOINT)


def _measure_batch_norm(network, dataset, metadata: ModelMetadata) -> int:
    """How many faces the batch-norm statistics were measured on (0: the network has none)."""
    from ferkit.batch_norm import recalibrate_on_faces

    layers = recalibrate_on_faces(network, dataset.images, metadata.input_size, metadata.channels, limit=BATCH_NORM_FACES)
    return min(len(dataset), BATCH_NORM_FACES) if layers else 0


def _has_batch_norm(network) -> bool:
    from ferkit.batch_norm import _all_layers

    keras = import_keras()
    return any(isinstance(layer, keras.layers.BatchNormalization) and layer.trainable for layer in _all_layers(network))
