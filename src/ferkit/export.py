"""Keras -> ONNX, with ferkit's metadata inside and a check that both give the same probabilities;
optionally quantized to int8 (about 2.5 times faster on CPUs with VNNI), checked against the float model,
and given a temperature fitted on held-out faces (calibrated confidence, see ferkit.calibration)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ferkit.data.dataset import FaceDataset
from ferkit.errors import FerkitError
from ferkit.images import faces_to_batch, resized_faces
from ferkit.results import check_output_file
from ferkit.runtime import (
    EXPORT_SOURCE, METADATA_NAME, KerasClassifier, OnnxClassifier, read_metadata, resolve_model_path, sha256_of,
)

TOLERANCE = 1e-4  # max abs difference allowed between Keras and ONNX probabilities
MIN_INT8_AGREEMENT = 0.95  # share of held-out faces whose top class the int8 model must keep
CALIBRATION_FACES = 512
log = logging.getLogger("ferkit")
AGREEMENT_FACES = 1024
MIN_TEMPERATURE_FACES = 50  # a temperature fitted on fewer held-out faces is a matter of chance
MIN_INT8_CHECK_FACES = 20  # at 95% agreement, one disagreement in 20: fewer faces would make the check meaningless


def calibration_faces(model: str | Path, data: str | Path | None = None, *, progress: bool = False) -> FaceDataset:
    """The faces to re-measure batch norm on and calibrate an int8 export with: `data`, else the training
    data that the run folder of `model` (the folder, or a model file in it) records; of a FER2013 CSV,
    the Training rows only (never test faces), with the model's classes."""
    from ferkit.config import TrainConfig
    from ferkit.data import load_dataset
    from ferkit.data.fer2013_csv import TRAIN_USAGE
    from ferkit.runs import recorded_training_faces

    if data is None:
        run = Path(model) if Path(model).is_dir() else Path(model).parent
        if not (run / "config.json").is_file():
            raise FerkitError("int8 and batch-norm recalibration need faces like those the model will see "
                              "(--calibration DATA; in Python, calibration=DATA)")
        config = TrainConfig.load(run / "config.json")
        data = config.data
        if not data or not Path(data).exists():
            raise FerkitError(f"the run's training data {data} is not here; pass --calibration DATA (in Python, calibration=DATA)")
        faces = load_dataset(data, **_as_the_model_reads(model), usage=TRAIN_USAGE, progress=progress)
        recorded = recorded_training_faces(resolve_model_path(model))
        if config.val and recorded and faces.class_counts() != recorded:  # a path relative to where the run trained
            raise FerkitError(f"{data}, read from here, holds other faces than the run's training data (faces per class "
                              f"{faces.class_counts()}, the run recorded {recorded}); pass --calibration DATA")
        return faces
    return _faces_of_any_class(data, model, progress)


def _faces_of_any_class(data, model, progress: bool) -> FaceDataset:
    """Calibration faces at the model's input size: their labels are not used, so class folders of other
    names than the model's classes are read too."""
    from ferkit.data import load_dataset
    from ferkit.data.fer2013_csv import TRAIN_USAGE
    from ferkit.data.folder import UnknownClassFolders

    from ferkit.data.fer2013_csv import NoRowsOfUsage

    reads = _as_the_model_reads(model)
    try:
        return load_dataset(data, **reads, usage=TRAIN_USAGE, progress=progress)
    except NoRowsOfUsage as err:  # its message names --usage, which export has not
        raise FerkitError(f"{err.path} has no {TRAIN_USAGE} rows, the faces a FER2013 CSV gives to calibrate on: give a "
                          "folder or CSV of faces like those the model will see") from None
    except UnknownClassFolders as err:
        if err.datasets:
            raise
        return load_dataset(data, **{**reads, "classes": [*reads["classes"], *err.folders]}, usage=TRAIN_USAGE,
                            progress=progress)


def _as_the_model_reads(model: str | Path) -> dict:
    """Faces loaded with the model's classes, at its input size (a 96x96 network's, not 48x48 enlarged)."""
    meta = read_metadata(resolve_model_path(model))
    return {"classes": meta.classes, "image_size": tuple(meta.input_size)}


def temperature_faces(model: str | Path, data: str | Path, *, progress: bool = False) -> FaceDataset:
    """The labelled held-out faces to fit `model`'s temperature on (a FER2013 CSV gives its PublicTest
    rows), loaded with the model's classes and input size."""
    from ferkit.data import load_dataset
    from ferkit.data.fer2013_csv import VAL_USAGE, NoRowsOfUsage

    try:
        faces = load_dataset(data, **_as_the_model_reads(model), usage=VAL_USAGE, progress=progress)
    except NoRowsOfUsage as err:  # its message names --usage, which export has not
        raise FerkitError(f"{err.path} has no {VAL_USAGE} rows, the held-out faces a FER2013 CSV gives to fit a temperature "
                          "on: give a folder or CSV of held-out labelled faces") from None
    return _held_out_part(model, faces)


def _held_out_part(model: str | Path, faces: FaceDataset) -> FaceDataset:
    """Of the data a run split its validation faces off (--val-split), the faces it held out, as `evaluate`
    scores them; any other faces as they are."""
    from ferkit.runs import held_out_faces, held_out_in_words, run_config_of, run_folder_of

    path = resolve_model_path(model)
    config = run_config_of(path, warn=False)
    if config is None or config.val:
        return faces
    held = held_out_faces(run_folder_of(path), config, faces)
    if held is None:
        return faces
    log.info("%s is the data %s was trained on: fitting the temperature on the %d faces it held out for validation",
             faces.source, run_folder_of(path), len(held))
    return dataclasses.replace(held, source=held.source + held_out_in_words(config))


def exportable_model(model: str | Path) -> Path:
    """The .keras file that `model` (a run folder or model file) names, or a FerkitError: only Keras
    models are exported."""
    source = resolve_model_path(model)
    if source.suffix != ".keras":
        raise FerkitError(f"{source} is not a Keras model; only .keras models (or run folders) are exported")
    return source


def check_tta(source: Path, tta: str | None) -> None:
    """Ten-crop TTA needs a model that looks at a central crop of its input (said before any faces load)."""
    meta = read_metadata(source)
    if tta == "tencrop" and not meta.crop:  # as Classifier.with_tta says it, once the model is loaded
        raise FerkitError(f"tencrop needs a model that crops its input (such as ferkit-net-l); {meta.model} does not")


def export_path(model: str | Path, out: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """Where export_onnx writes `model`: `out`, default beside the model with the .onnx suffix; a
    FerkitError if that is no .onnx file or is there already and `overwrite` is not given."""
    out = out or resolve_model_path(model).with_suffix(".onnx")
    return check_output_file(out, ".onnx", "an exported model", overwrite=overwrite)


def export_onnx(
    model: str | Path,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    calibration: FaceDataset | str | Path | None = None,
    recalibrate_bn: bool = False,
    int8: bool = False,
    tta: str | None = None,
    temperature_data: FaceDataset | str | Path | None = None,
) -> Path:
    """Write `model` (a run folder or .keras file) as ONNX, default beside it with the .onnx suffix.

    `calibration`: faces like those the model will see (a dataset, or a folder or CSV to load; default: the
    training data its run folder records), needed by
    `recalibrate_bn`: batch-norm statistics measured afresh on these faces, un-augmented (see
    ferkit.batch_norm.recalibrate_batch_norm), and by `int8`: quantization calibrated on some of them, its
    agreement with the float model on others recorded in the metadata.
    `tta`: the test-time augmentation recorded as the model's default ("none", "flip" or "tencrop").
    `temperature_data`: labelled faces the model was not trained on (e.g. validation data; a dataset, or a
    folder or CSV to load, of which a CSV's PublicTest rows). The exported model (after int8, if asked)
    classifies them, uncalibrated, with its test-time augmentation; the temperature that fits them best is
    stored in the model, with the calibration error before and after in `extra["temperature"]`.
    Raises FerkitError if the export disagrees with Keras by more than TOLERANCE, or the int8 model keeps
    the float model's top class on fewer than MIN_INT8_AGREEMENT of the faces; nothing is written then.
    """
    source = exportable_model(model)
    check_tta(source, tta)
    if temperature_data is not None and not isinstance(temperature_data, FaceDataset):
        temperature_data = temperature_faces(model, temperature_data)
    if (recalibrate_bn or int8) and not isinstance(calibration, FaceDataset):
        calibration = calibration_faces(model, calibration)
    if int8 and len(calibration) < 2 * MIN_INT8_CHECK_FACES:  # said before the float export, not after it
        raise FerkitError(f"int8 export needs at least {2 * MIN_INT8_CHECK_FACES} calibration faces (half to calibrate, "
                          f"half to check the int8 model on), got {len(calibration)}: pass --calibration DATA with "
                          "more faces like these (in Python, calibration=DATA)")
    if temperature_data is not None:  # checked before the minutes of exporting, not after
        _refuse_training_faces(source, temperature_data)
        if len(temperature_data) < MIN_TEMPERATURE_FACES:
            raise FerkitError(f"fitting a temperature needs at least {MIN_TEMPERATURE_FACES} held-out labelled faces (a few "
                              f"hundred give a steady one); {temperature_data.source or 'the temperature data'} has "
                              f"{len(temperature_data)}")
    out = export_path(model, out, overwrite=overwrite)
    keras_model = _load_keras(source).with_tta(tta)
    # where its run took its training faces, so that the export, moved out of the run folder, still knows them
    from ferkit.runs import TRAINED_ON, training_faces_origin

    origin = {TRAINED_ON: found} if (found := training_faces_origin(source)) else {}
    keras_model.metadata = dataclasses.replace(keras_model.metadata,
                                               extra={**keras_model.metadata.extra, EXPORT_SOURCE: sha256_of(source), **origin})
    if recalibrate_bn:
        _recalibrate(keras_model, calibration)
    tmp = out.with_name(f".{out.stem}.tmp.onnx")
    try:
        _write_onnx(keras_model, tmp)
        difference = max_difference(keras_model, OnnxClassifier(tmp))
        if difference > TOLERANCE:
            raise FerkitError(f"the ONNX export differs from Keras by {difference:.2e} (> {TOLERANCE}); not written")
        if int8:
            _quantize_int8(tmp, calibration)
        if temperature_data is not None:
            _fit_temperature(tmp, temperature_data)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _load_keras(source: Path) -> KerasClassifier:
    """A private copy of the Keras model (not the shared cached one: recalibration changes it)."""
    return KerasClassifier(read_metadata(source), source)


def _recalibrate(classifier: KerasClassifier, dataset: FaceDataset) -> None:
    from ferkit.batch_norm import recalibrate_on_faces

    log.info("re-measuring batch norm on %d faces", len(dataset))
    layers = recalibrate_on_faces(classifier.model, dataset.images, classifier.input_size, classifier.metadata.channels)
    if not layers:
        log.warning("%s has no batch-norm layers that train (frozen ones are left as they are): --recalibrate-bn "
                    "changes nothing", classifier.name)
        return
    classifier.metadata = dataclasses.replace(
        classifier.metadata,
        extra={**classifier.metadata.extra, "batch_norm_recalibrated": {"faces": len(dataset), "layers": layers}},
    )


def _quantize_int8(path: Path, dataset: FaceDataset) -> None:
    """Replace the float ONNX model at `path` by a statically quantized int8 one (QDQ, per channel).

    Weights use 7 bits (reduce_range): on x86 CPUs without VNNI (AVX2 only), ONNX Runtime's uint8 x int8
    kernels add pairs of products in 16 bits, which saturate with full-range weights. There the bundled
    pair lost 10 points of accuracy on FER2013 PublicTest (0.683 -> 0.578); with 7-bit weights no pair
    of products can overflow.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    floating = OnnxClassifier(path)
    calibration, held_out = _calibration_split(dataset, floating.input_size)
    if len(held_out) < MIN_INT8_CHECK_FACES:
        raise FerkitError(f"int8 export needs at least {2 * MIN_INT8_CHECK_FACES} calibration faces (half to calibrate, half "
                          f"to check the int8 model on), got {len(dataset)}")
    batches = [faces_to_batch(calibration[i : i + 64], floating.metadata.channels) for i in range(0, len(calibration), 64)]
    log.info("quantizing to int8: calibrating on %d faces, then checking it against the float model on %d others",
             len(calibration), len(held_out))

    class Batches(CalibrationDataReader):
        def __init__(self):
            self._feeds = iter([{floating.session.get_inputs()[0].name: batch} for batch in batches])

        def get_next(self):
            return next(self._feeds, None)

    prepared, quantized = path.with_suffix(".pre.onnx"), path.with_suffix(".int8.onnx")
    try:
        quant_pre_process(str(path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(quantized), Batches(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        reduce_range=True, nodes_to_exclude=_output_layer_nodes(prepared))
        agreement = top1_agreement(floating.with_tta("none"), OnnxClassifier(quantized).with_tta("none"), held_out)
        if agreement < MIN_INT8_AGREEMENT:
            raise FerkitError(
                f"the int8 model keeps the float model's prediction for only {agreement:.1%} of held-out faces "
                f"(< {MIN_INT8_AGREEMENT:.0%}); not written"
            )
        metadata = dataclasses.replace(
            floating.metadata,
            extra={**floating.metadata.extra, "int8": {"calibration_faces": len(calibration),
                                                        "top1_agreement_with_float": round(agreement, 4),
                                                        "agreement_faces": len(held_out)}},
        )
        _set_metadata(quantized, metadata)
        os.replace(quantized, path)
    finally:
        prepared.unlink(missing_ok=True)
        quantized.unlink(missing_ok=True)


def _refuse_training_faces(source: Path, dataset: FaceDataset) -> None:
    """A FerkitError when the faces given for the temperature are the run's own training data: the
    model is surest on the faces it learned, so the fitted temperature would make it more confident,
    not calibrated."""
    from ferkit.runs import export_trained_on, holds_its_training_faces, members_in_words, members_trained_on, trained_on

    run = trained_on(source, dataset.source)
    if run or holds_its_training_faces(source, dataset) or export_trained_on(source, dataset.source):
        held_out = f" (its validation data: {run.val})" if run and run.val else ""
        raise FerkitError(f"{dataset.source} is the data the model was trained on; fit the temperature on held-out faces{held_out}")
    metadata = read_metadata(source)
    members = members_trained_on(metadata, dataset.source)
    if members:
        raise FerkitError(f"{dataset.source} is the data the {members_in_words(metadata, members)} were trained on; fit "
                          "the temperature on held-out faces")


def _fit_temperature(path: Path, dataset: FaceDataset) -> float:
    """Fit the temperature of the ONNX model at `path` on `dataset` and store it in the model's metadata."""
    from ferkit.calibration import (
        TEMPERATURE_BOUNDS, at_search_bound, expected_calibration_error, fit_temperature, held_out_ece,
        negative_log_likelihood, tta_average,
    )

    classifier = OnnxClassifier(path)
    labels = dataset.labels_for(classifier.classes)
    faces = resized_faces(dataset.images, classifier.input_size)
    # fitted to what the model outputs: with test-time augmentation, the average of its views, each at T
    views = classifier.with_temperature(1.0).view_probabilities(faces)
    temperature = fit_temperature(views, labels)  # at the low end, warned of: the model is right on these faces
    if at_search_bound(temperature) and temperature > 1:  # it would make every face near-uniform, "uncertain"
        raise FerkitError(f"the temperature that fits {dataset.source or 'these faces'} best lies at the top of the range "
                          f"searched ({TEMPERATURE_BOUNDS[1]:g}): the model is wrong on most of these faces, and that "
                          "temperature would flatten every answer; nothing was written; fit it on a few hundred held-out "
                          "faces of every class, labelled as the model's classes")
    probabilities, calibrated = tta_average(views), tta_average(views, temperature)
    record = {
        "faces": len(labels),
        "data": Path(dataset.source).name if dataset.source else "",
        "tta": classifier.tta,
        "ece_before": round(expected_calibration_error(probabilities, labels), 6),
        "ece_after": round(expected_calibration_error(calibrated, labels), 6),
        "nll_before": round(negative_log_likelihood(views, labels), 6),
        "nll_after": round(negative_log_likelihood(views, labels, temperature), 6),
        # fitted on one half of the faces and scored on the other: what a temperature does for unseen faces
        "held_out": {key: round(value, 6) for key, value in held_out_ece(views, labels).items()},
    }
    metadata = dataclasses.replace(classifier.metadata, temperature=temperature,
                                   extra={**classifier.metadata.extra, "temperature": record})
    _set_metadata(path, metadata)
    return temperature


def _output_layer_nodes(path: Path) -> list[str]:
    """The softmax nodes, the layers feeding them and every node after them (an ensemble's averaging of its
    members' probabilities), kept in float: quantized, the probabilities would come in steps of 1/255 (and
    ties between classes would be common)."""
    import onnx

    graph = onnx.load(str(path)).graph
    softmax = [node for node in graph.node if node.op_type == "Softmax"]
    inputs = {name for node in softmax for name in node.input}
    kept = [node.name for node in softmax] + [node.name for node in graph.node if set(node.output) & inputs]
    after = {name for node in softmax for name in node.output}  # tensors computed from probabilities
    for node in graph.node:  # in topological order, as ONNX requires
        if node.op_type != "Softmax" and set(node.input) & after:
            kept.append(node.name)
            after.update(node.output)
    return kept


def _calibration_split(dataset: FaceDataset, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint random faces for calibration and for the agreement check, resized to the model's size."""
    order = np.random.default_rng(0).permutation(len(dataset))
    n_calibration = min(CALIBRATION_FACES, len(order) // 2)
    faces = resized_faces(dataset.images, size)
    return faces[order[:n_calibration]], faces[order[n_calibration : n_calibration + AGREEMENT_FACES]]


def top1_agreement(first, second, faces: np.ndarray) -> float:
    """Share of `faces` on which two classifiers predict the same class."""
    return float(np.mean(first.predict_proba(faces).argmax(1) == second.predict_proba(faces).argmax(1)))


def max_difference(first, second, *, samples: int = 64, seed: int = 0) -> float:
    """Max abs difference of two classifiers' probabilities on random and smooth synthetic faces."""
    rng = np.random.default_rng(seed)
    height, width = first.input_size
    noise = rng.integers(0, 256, (samples // 2, height, width), dtype=np.uint8)
    ramps = np.linspace(0, 255, width)[None, None, :] * rng.uniform(0.2, 1.0, (samples - len(noise), 1, 1))
    faces = np.concatenate([noise, np.broadcast_to(ramps, (len(ramps), height, width)).astype(np.uint8)])
    return float(np.abs(first.predict_proba(faces) - second.predict_proba(faces)).max())


def _write_onnx(classifier: KerasClassifier, path: Path) -> None:
    model = classifier.model
    channels = classifier.metadata.channels
    model(faces_to_batch(np.zeros((1, *classifier.input_size), np.uint8), channels))  # export needs a built call
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # tf2onnx's use of np.object
            model.export(str(path), format="onnx", verbose=False)
    except Exception as err:
        raise FerkitError(f"ONNX export failed ({type(err).__name__}: {err})") from None
    _set_metadata(path, classifier.metadata)  # an export that takes more than the faces is refused on loading


def _set_metadata(path: Path, metadata) -> None:
    import onnx

    proto = onnx.load(str(path))
    kept = [entry for entry in proto.metadata_props if entry.key != METADATA_NAME]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_NAME, json.dumps(asdict(metadata))
    onnx.save(proto, str(path))
