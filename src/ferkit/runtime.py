"""One classifier interface over saved models, and the metadata that travels inside them.

A saved ferkit model knows its class names, input size, channel count and preprocessing: they are
stored in the model file (`ferkit.json` inside the `.keras` zip), so nothing is guessed at predict time.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ferkit import __version__
from ferkit.calibration import apply_temperature, check_temperature
from ferkit.errors import FerkitError
from ferkit.images import faces_to_batch

log = logging.getLogger("ferkit")

MANIFEST = "manifest.json"  # in ferkit/weights: the shipped models
METADATA_NAME = "ferkit.json"  # inside a .keras zip; the metadata_props key in an .onnx file
EXPORT_SOURCE = "source_sha256"  # in an ONNX export's metadata.extra: the SHA-256 of the .keras file it came from
PREPROCESSING = "exif-upright, grayscale (ITU-R 601-2 luma), resized to input_size, gray repeated to channels, raw 0-255"
# test-time augmentation: flip averages each face with its mirror image; tencrop (models that crop their
# input) averages the centre and four corner crops of the face and of its mirror image
TTA_CHOICES = ("none", "flip", "tencrop")
EXTRA_MARGINS = (-0.05, 0.05)  # see ModelMetadata.extra_margins


@dataclass
class ModelMetadata:
    model: str  # registry name, e.g. "seed-cnn"
    classes: list[str]
    input_size: list[int]  # (height, width)
    channels: int
    crop: int | None = None  # the network sees the central crop x crop pixels of its input
    # How a face found in a photo is framed for the model, chosen by benchmarks/crop_policy.py: the square
    # around the detector's box enlarged by face_margin of its side each way (0.1 cost 4 points there; with
    # 0 the crop cost no more than the scene itself); level_eyes turns the eye line level first (between
    # -0.5 and +0.2 points there: FER2013's faces are not levelled either).
    face_margin: float = 0.0
    level_eyes: bool = False
    # A face cut from a photo is also classified in the crops at face_margin + each of these, and the
    # probabilities averaged: a detector's box is a little off in scale from face to face, and three scales
    # cost 0.3-0.6 points less than one in benchmarks/crop_policy.py (three samples of ~8,100 scenes).
    # Models saved before this field existed get the same.
    extra_margins: list[float] = field(default_factory=lambda: list(EXTRA_MARGINS))
    preprocessing: str = PREPROCESSING
    tta: str = "none"  # the test-time augmentation the model is meant to run with (one of TTA_CHOICES)
    ferkit_version: str = __version__
    extra: dict = field(default_factory=dict)  # e.g. the run it came from, its best val accuracy
    # calibrated confidence: each view's probabilities p become softmax(log p / temperature) (1: unchanged);
    # fitted on held-out faces by `ferkit export --calibrate-temperature DATA` (see ferkit.calibration)
    temperature: float = 1.0

    def __post_init__(self):
        self.temperature = check_temperature(self.temperature)
        _check_metadata(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelMetadata":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def _check_metadata(meta: ModelMetadata) -> None:
    """ValueError unless the fields can describe a model (a damaged or hand-edited file may say anything)."""
    def positive_ints(values, count):
        return isinstance(values, (list, tuple)) and len(values) == count and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)

    if not isinstance(meta.model, str) or not meta.model:
        raise ValueError("model must be a name")
    if not isinstance(meta.classes, (list, tuple)) or not meta.classes or not all(isinstance(c, str) for c in meta.classes):
        raise ValueError("classes must be a list of names")
    if not positive_ints(meta.input_size, 2) or meta.channels not in (1, 3) or isinstance(meta.channels, bool):
        raise ValueError("input_size must be two positive sizes and channels 1 or 3")
    if meta.crop is not None and not (positive_ints([meta.crop], 1) and meta.crop <= min(meta.input_size)):
        raise ValueError("crop must fit in the input")
    if meta.tta not in TTA_CHOICES:
        raise ValueError(f"tta must be one of {', '.join(TTA_CHOICES)}")
    if isinstance(meta.face_margin, bool) or not isinstance(meta.face_margin, (int, float)) or not 0 <= meta.face_margin <= 1:
        raise ValueError("face_margin must be a fraction of the box between 0 and 1")
    if not isinstance(meta.level_eyes, bool):
        raise ValueError("level_eyes must be true or false")
    extra = meta.extra_margins
    if not isinstance(extra, (list, tuple)) or len(extra) > 8 or not all(
            isinstance(m, (int, float)) and not isinstance(m, bool) and -0.4 <= m <= 0.4 for m in extra):
        raise ValueError("extra_margins must be up to 8 changes to face_margin, each between -0.4 and 0.4")


def save_keras_model(model, path: str | Path, metadata: ModelMetadata) -> Path:
    """Save a Keras model with ferkit's metadata inside, atomically (a kill never leaves half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    try:
        model.save(tmp)
        with zipfile.ZipFile(tmp, "a") as archive:
            archive.writestr(METADATA_NAME, json.dumps(asdict(metadata), indent=2))
        os.replace(tmp, path)
    finally:  # Ctrl-C or a full disk on the way: no hidden half-file left beside it
        tmp.unlink(missing_ok=True)
    return path


def check_not_written_over_its_inputs(out: Path, inputs: list[Path]) -> None:
    """Refuse a model made from `inputs` (ensembles, averages) written over one of them, or over a run's own
    best.keras or last.keras, which its run's records describe (--overwrite does not allow either)."""
    if any(Path(out).resolve() == Path(path).resolve() for path in inputs):
        raise FerkitError(f"{out} is one of the models it is made from: write it elsewhere")
    if Path(out).name in ("best.keras", "last.keras") and (Path(out).parent / "config.json").is_file():
        raise FerkitError(f"{out} is the run {Path(out).parent}'s own model, which its records describe: write it elsewhere")


def resolve_model_path(model: str | Path | None) -> Path:
    """A model file (.keras or .onnx), a run folder (its best model, else its last), the name of a model
    shipped inside ferkit (`ferkit models` lists them), or None / "default" for the default shipped one.
    A file or folder here wins over a shipped model of the same name."""
    if is_shipped_model_name(model):
        return shipped_model_path("default" if model is None else str(model))
    path = Path(model)
    if path.is_dir():
        for name in ("best.keras", "last.keras", "best.onnx", "last.onnx"):  # the exports of a run without its models
            if (path / name).is_file():
                return path / name
        if (path / "config.json").is_file():
            if (path / "checkpoint.npz").is_file():  # a packed run (tools/pack_run.py)
                raise FerkitError(f"{path} is a packed run: its models come back when it resumes (`ferkit train "
                                  f"--resume {path}`, after copying it elsewhere), or average it "
                                  "(tools/average_checkpoints.py)")
            if _run_status(path) == "diverged":  # resuming would diverge again
                raise FerkitError(f"{path} holds no model: its training diverged in the first epoch; train it again "
                                  "with a lower --lr (ferkit train ... --overwrite)")
            done = _epochs_done(path)
            if done:  # its model files were moved or deleted (the runs kept in training/ keep only their records)
                raise FerkitError(f"{path} holds no model: its run trained {done} epoch(s), and its model files "
                                  "(best.keras, last.keras) are not in its folder")
            raise FerkitError(f"{path} holds no model yet: its run stopped before the first epoch ended "
                              f"(continue it with `ferkit train --resume {path}`)")
        hidden = str(model) == "default" or str(model) in shipped_models()
        raise FerkitError(f"{path} holds no model (no best.keras or last.keras): is it a ferkit run folder?"
                          + (f" It hides the shipped model {model}: run from another folder to use that." if hidden else ""))
    if not path.exists():
        shipped = shipped_models()
        known = f" (the models shipped with ferkit: {', '.join(shipped)})" if shipped else ""
        raise FerkitError(f"no such model or run folder: {path}{known}")
    if path.suffix.lower() not in (".keras", ".onnx"):
        raise FerkitError(f"{path} is not a ferkit model (expected a .keras or .onnx file, or a run folder)")
    return path


def read_manifest() -> dict:
    """ferkit/weights/manifest.json: {"default": NAME, "models": {NAME: entry}}, where an entry records
    the model's file and SHA-256, how it was made and how it scored (tools/bundle_model.py writes it)."""
    manifest = files_path("weights", MANIFEST)
    if not manifest.is_file():
        raise FerkitError("this ferkit build ships no model: give a run folder or a model file")
    return _parsed_manifest(manifest, manifest.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _parsed_manifest(path: Path, mtime_ns: int) -> dict:
    return json.loads(path.read_text())  # callers copy what they hand out: the cached dict stays as read


def shipped_models() -> dict[str, dict]:
    """The models inside the package by name, the default one first, each entry with its name; empty
    when this build ships none."""
    if not files_path("weights", MANIFEST).is_file():
        return {}
    manifest = read_manifest()
    names = [manifest["default"], *(name for name in manifest["models"] if name != manifest["default"])]
    return {name: {"name": name, **manifest["models"][name]} for name in names}


def _epochs_done(run: Path) -> int:
    try:
        return int(json.loads((run / "state.json").read_text()).get("epochs_done") or 0)
    except (OSError, ValueError, AttributeError, TypeError):
        return 0


def _run_status(run: Path) -> str | None:
    """The status a run folder's state.json records (running, interrupted, diverged, finished), if any."""
    try:
        return json.loads((run / "state.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def is_shipped_model_name(model: str | Path | None) -> bool:
    """Whether `model` is None, "default" or the name of a shipped model (and not a file or folder here)."""
    if model is None:
        return True
    return not Path(model).exists() and (str(model) == "default" or str(model) in shipped_models())


def shipped_model(name: str = "default") -> dict:
    """The manifest entry of a shipped model ("default" or one of `shipped_models()`), with its name."""
    models = shipped_models() or read_manifest()  # read_manifest says what is wrong when nothing is shipped
    name = next(iter(models)) if name == "default" else name
    if name not in models:
        raise FerkitError(f"ferkit ships no model named {name!r} (it ships {', '.join(models)})")
    return models[name]


def shipped_model_path(name: str = "default") -> Path:
    """The ONNX file of a shipped model, checked against its recorded SHA-256 once per process."""
    return shipped_file(shipped_model(name), "file", "sha256")


def shipped_file(entry: dict, key: str, hash_key: str) -> Path:
    """A file that a shipped model's manifest entry names under `key`, checked against its SHA-256."""
    path = files_path("weights", entry[key])
    if not path.is_file():
        raise FerkitError(f"the shipped file {path} is missing from this installation; reinstall ferkit")
    _check_hash(path, entry[hash_key])
    return path


def is_shipped_file(path: str | Path) -> bool:
    """Whether `path` is one of the files inside the package's weights folder."""
    return Path(path).resolve().parent == files_path("weights").resolve()


def default_model_path() -> Path:
    """The ONNX file of the model `ferkit predict` uses when given none."""
    return shipped_model_path()


def files_path(*parts: str) -> Path:
    from importlib.resources import files

    return Path(str(files("ferkit").joinpath(*parts)))


@functools.lru_cache(maxsize=32)
def _check_hash(path: Path, expected: str) -> None:
    if sha256_of(path) != expected:
        raise FerkitError(f"the shipped file {path} does not match its recorded SHA-256; reinstall ferkit")


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_metadata(path: str | Path) -> ModelMetadata:
    path = resolve_model_path(path)
    if path.suffix.lower() == ".onnx":
        return _onnx_session(path)[1]
    try:
        with zipfile.ZipFile(path) as archive:
            data = json.loads(archive.read(METADATA_NAME))
        return ModelMetadata.from_dict(data)
    except (zipfile.BadZipFile, OSError):
        raise FerkitError(f"{path} is not a valid .keras model file") from None
    except KeyError:
        raise FerkitError(f"{path} is a Keras model without ferkit metadata (class names, input size)") from None
    except (ValueError, TypeError):
        raise FerkitError(f"{path} has unreadable ferkit metadata") from None


def classifier_threads() -> int:
    """Threads for ONNX Runtime's classifier: $FERKIT_CLASSIFIER_THREADS, else 0 (one per core)."""
    value = os.environ.get("FERKIT_CLASSIFIER_THREADS", "0")
    if not value.isdigit():
        raise FerkitError(f"FERKIT_CLASSIFIER_THREADS must be a whole number of threads, not {value!r}")
    return int(value)


def _onnx_session(path: Path):
    """An ONNX Runtime session and the ferkit metadata stored in the model's metadata_props."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    # Idle ORT threads spin by default and then starve the detector's OpenMP threads on small machines.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = classifier_threads()
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for damaged files
        raise FerkitError(f"{path} is not a valid ONNX model ({type(err).__name__})") from None
    props = session.get_modelmeta().custom_metadata_map
    if METADATA_NAME not in props:
        raise FerkitError(f"{path} is an ONNX model without ferkit metadata (class names, input size)")
    try:
        return session, ModelMetadata.from_dict(json.loads(props[METADATA_NAME]))
    except (ValueError, TypeError):
        raise FerkitError(f"{path} has unreadable ferkit metadata") from None


class Classifier:
    """Class probabilities for batches of grayscale faces; subclasses wrap one runtime each."""

    def __init__(self, metadata: ModelMetadata, path: Path):
        self.metadata = metadata
        self.path = path

    @functools.cached_property
    def sha256(self) -> str:
        """The SHA-256 of the model's file ("" for a model without one)."""
        return sha256_of(self.path) if self.path else ""

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.metadata.classes)

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.metadata.input_size)

    @property
    def name(self) -> str:
        return self.metadata.model

    @property
    def tta(self) -> str:
        return self.metadata.tta

    @property
    def temperature(self) -> float:
        return self.metadata.temperature

    def with_temperature(self, temperature: float | None) -> "Classifier":
        """The same loaded model with another temperature (None: keep the model's own; 1.0: the network's
        own probabilities, uncalibrated)."""
        if temperature is None or temperature == self.temperature:
            return self
        try:
            temperature = check_temperature(temperature)
        except ValueError as err:
            raise FerkitError(str(err)) from None
        view = copy.copy(self)
        view.metadata = replace(self.metadata, temperature=temperature)
        return view

    def with_tta(self, tta: str | None) -> "Classifier":
        """The same loaded model with another test-time augmentation (None: keep the model's own)."""
        if tta is None or tta == self.tta:
            return self
        if tta not in TTA_CHOICES:
            raise FerkitError(f"unknown test-time augmentation {tta!r}; choose one of {', '.join(TTA_CHOICES)}")
        if tta == "tencrop" and not self.metadata.crop:
            raise FerkitError(f"tencrop needs a model that crops its input (such as ferkit-net-l); {self.name} does not")
        view = copy.copy(self)
        view.metadata = replace(self.metadata, tta=tta)
        return view

    def predict_proba(self, faces: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        """(N, height, width) uint8 faces at `input_size` -> (N, len(classes)) probabilities.

        With test-time augmentation every view of a face (see `face_views`) goes through the model in
        the same batch. The model's temperature T calibrates each view's probabilities p, as
        softmax(log p / T), and the calibrated views are averaged (T = 1 leaves p exactly as it is).
        """
        return self.predict_proba_at_temperatures(faces, [self.temperature], batch_size=batch_size)[0]

    def predict_proba_at_temperatures(
        self, faces: np.ndarray, temperatures: list[float], *, batch_size: int = 256,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[np.ndarray]:
        """`predict_proba` at each of several temperatures, running the model once: e.g. the model's own
        and 1.0, to compare calibrated and uncalibrated probabilities. `progress(faces_done, faces)` after
        each batch."""
        temperatures = [check_temperature(t) for t in temperatures]
        outputs: list[list[np.ndarray]] = [[np.zeros((0, len(self.classes)), np.float32)] for _ in temperatures]
        for probabilities in self._view_chunks(faces, batch_size, progress):
            for output, temperature in zip(outputs, temperatures):
                output.append(apply_temperature(probabilities, temperature).mean(axis=0))
        return [np.concatenate(output).astype(np.float32) for output in outputs]

    def view_probabilities(self, faces: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        """(views, N, len(classes)): each view's probabilities (see `face_views`) at temperature 1, which
        `predict_proba` calibrates and averages; what a temperature for this test-time augmentation is fitted on."""
        chunks = list(self._view_chunks(faces, batch_size, None))
        views = {"none": 1, "flip": 2, "tencrop": 10}[self.tta]
        return np.concatenate([np.zeros((views, 0, len(self.classes)), np.float32), *chunks], axis=1)

    def _view_chunks(self, faces: np.ndarray, batch_size: int, progress):
        """(views, chunk, classes) probabilities at T = 1 for each chunk of `faces`, every view of a face in one batch."""
        faces = np.asarray(faces)
        if faces.ndim != 3 or tuple(faces.shape[1:]) != self.input_size:
            raise ValueError(f"expected faces of shape (N, {self.input_size[0]}, {self.input_size[1]}), got {faces.shape}")
        views = {"none": 1, "flip": 2, "tencrop": 10}[self.tta]
        step = max(1, batch_size // views)
        for i in range(0, len(faces), step):
            chunk = faces[i : i + step]
            batch = np.concatenate(face_views(chunk, self.tta, self.input_size[0] - (self.metadata.crop or 0)))
            yield self._run(faces_to_batch(batch, self.metadata.channels)).reshape(views, len(chunk), -1)
            if progress:
                progress(i + len(chunk), len(faces))

    def _run(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def face_views(faces: np.ndarray, tta: str, margin: int = 0) -> list[np.ndarray]:
    """The views of (N, height, width) faces that test-time augmentation `tta` averages over.

    tencrop is for models that look at the centre of their input, `margin` pixels short of its side:
    rolling a face by half the margin brings a corner crop to the centre. The pixels that wrap around
    land outside the central window, so the model sees exactly the corner crop.
    """
    if tta == "none":
        return [faces]
    mirrored = faces[:, :, ::-1]
    if tta == "flip":
        return [faces, mirrored]
    d = margin // 2
    shifts = [(0, 0), (d, d), (d, -d), (-d, d), (-d, -d)]
    return [np.roll(view, shift, axis=(1, 2)) for view in (faces, mirrored) for shift in shifts]


class KerasClassifier(Classifier):
    def __init__(self, metadata: ModelMetadata, path: Path):
        super().__init__(metadata, path)
        from ferkit._keras import MISSING, import_keras

        try:
            keras = import_keras()
        except FerkitError as err:
            if str(err) == MISSING and (hint := _onnx_export_hint(path)):  # an ONNX export runs without Keras
                raise FerkitError(f"{path.name}: {err}; or use {hint}") from None
            raise
        self.model = load_keras_model(keras, path)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.model(batch, training=False))


def load_keras_model(keras, path: str | Path, *, compile: bool = False):
    """keras.saving.load_model, with a one-line FerkitError for a damaged file (Keras raises many types)."""
    try:
        return keras.saving.load_model(path, compile=compile)
    except Exception as err:
        raise FerkitError(f"{path} could not be loaded as a Keras model ({type(err).__name__})") from None


def _onnx_export_hint(path: Path) -> str | None:
    """The ONNX export beside the Keras model `path` to use in its place: of the model as it is, else of an
    earlier one, said so."""
    sources = {}  # ferkit's exports beside it and the model each was made from; no other .onnx file
    for export in sorted(path.parent.glob("*.onnx")):
        try:
            sources[export] = read_metadata(export).extra.get(EXPORT_SOURCE)
        except FerkitError:
            continue
    own = [export for export, source in sources.items() if source == sha256_of(path)]
    if own:
        return f"its ONNX export, {own[0]}"
    return f"the ONNX export of an earlier {path.name} beside it, {next(iter(sources))}" if sources else None


class OnnxClassifier(Classifier):
    """ONNX Runtime inference: no TensorFlow needed, and the fastest runtime measured here."""

    def __init__(self, path: Path):
        self.session, metadata = _onnx_session(path)
        _check_graph_fits_metadata(self.session, metadata, path)
        super().__init__(metadata, path)
        self._input = self.session.get_inputs()[0].name

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input: batch})[0]


def _check_graph_fits_metadata(session, metadata: ModelMetadata, path: Path) -> None:
    """A FerkitError when the graph takes other faces, or gives another number of classes, than its
    metadata says (a file edited or made by hand): found on loading, not as a crash or a truncated answer later."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    expected = (*metadata.input_size, metadata.channels)
    shape = tuple(inputs[0].shape[1:]) if inputs else ()
    if len(inputs) != 1 or any(isinstance(n, int) and n != e for n, e in zip(shape, expected)) or len(shape) != 3:
        raise FerkitError(f"{path}: its graph takes {', '.join(str(i.shape) for i in inputs)}, its metadata says faces "
                          f"of {expected}")
    classes = outputs[0].shape[-1] if outputs and outputs[0].shape else None
    if isinstance(classes, int) and classes != len(metadata.classes):
        raise FerkitError(f"{path}: its graph gives {classes} probabilities, its metadata names {len(metadata.classes)} "
                          "classes")


def load_classifier(model: str | Path | Classifier | None = None, *, prefer_export: bool = False) -> Classifier:
    """A ready classifier from a model file or run folder (or one already loaded), or a shipped
    model's name; None: the default shipped model. With `prefer_export` (what predicting uses), a run
    folder's ONNX export is run in place of its Keras model when it was made from that model as it is
    now (see exported_model_path).

    Loaded models are kept, so calling this per image costs nothing after the first call; a model
    file that changes on disk is loaded afresh.
    """
    if isinstance(model, Classifier):
        return model
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise FerkitError(f"a model is a run folder, a .keras or .onnx file, or a shipped model's name, not an "
                          f"object of type {type(model).__name__}")
    path = exported_model_path(model) if prefer_export else resolve_model_path(model)
    path = path.absolute()  # not resolved: a link's own name says what the file is
    return _load_cached(path, path.stat().st_mtime_ns)


def exported_model_path(model: str | Path | None) -> Path:
    """resolve_model_path's file, or for a run folder its ONNX export (`ferkit export RUN` writes best.onnx
    beside best.keras) when that was exported from the model as it is now: ONNX Runtime runs it faster,
    and without TensorFlow. The export runs as it was made: int8, its test-time augmentation, its
    temperature."""
    path = resolve_model_path(model)
    export = path.with_suffix(".onnx")
    if model is None or path.suffix != ".keras" or not Path(model).is_dir() or not export.is_file():
        return path
    return export if _exported_from(export, path) else path


def _exported_from(export: Path, model_file: Path) -> bool:
    return _export_matches(export, model_file, export.stat().st_mtime_ns, model_file.stat().st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _export_matches(export: Path, model_file: Path, *modified) -> bool:
    """Whether `export` was made from `model_file` as it is now, by the SHA-256 the export records of its
    source (said once for each state of the two files)."""
    try:
        source = read_metadata(export).extra.get(EXPORT_SOURCE)
    except FerkitError as err:  # a damaged export: the model it came from still runs
        log.warning("%s; using %s", err, model_file)
        return False
    if source == sha256_of(model_file):
        return True
    log.warning("%s was %s; using %s (export again, with --overwrite, to run it with ONNX Runtime)", export,
                f"exported from another {model_file.name}" if source else "exported by an older ferkit, which "
                "did not record its source", model_file)
    return False


def classifier_speed(classifier: Classifier, *, batch: int = 256, repeat: int = 20) -> dict:
    """How fast `classifier` runs here, as it is (with its test-time augmentation): faces per second in
    batches of `batch` and milliseconds for one face alone (see seconds_per_call)."""
    return {"faces_per_second": round(faces_per_second(classifier, batch=batch, repeat=repeat)),
            "ms_per_face": round(seconds_per_call(classifier, 1, repeat * 10) * 1e3, 2), "machine": machine_description()}


def faces_per_second(classifier: Classifier, *, batch: int = 256, repeat: int = 20) -> float:
    """Faces classified per second in batches of `batch`, over `repeat` calls (see seconds_per_call)."""
    return batch / seconds_per_call(classifier, batch, repeat)


def seconds_per_call(classifier: Classifier, size: int, calls: int, *, rounds: int = 5) -> float:
    """Seconds per `predict_proba` call on `size` random faces (speed does not depend on them), after a
    warm-up call: the fastest of `rounds` rounds (at most `calls`) of calls/rounds calls, so that a moment
    when the machine was busy elsewhere does not count."""
    faces = np.random.default_rng(0).integers(0, 256, (size, *classifier.input_size), dtype=np.uint8)
    classifier.predict_proba(faces, batch_size=size)
    rounds = min(rounds, calls)
    per_round = max(1, calls // rounds)
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(per_round):
            classifier.predict_proba(faces, batch_size=size)
        best = min(best, (time.perf_counter() - started) / per_round)
    return best


def machine_description() -> str:
    """This machine's CPU model, the instructions int8 models depend on, and its usable cores, e.g.
    "AMD EPYC 7B13 (AVX-512 VNNI), 2 cores, Linux x86_64"."""
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    except (OSError, StopIteration):
        cpu, flags = platform.processor() or "unknown CPU", set()
    # int8 ONNX models run 2-3 times faster with VNNI than with AVX2 alone (docs/model-card.md)
    kind = next((name for flag, name in (("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"), ("avx2", "AVX2"))
                 if flag in flags), None)
    cpu += f" ({kind})" if kind else ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return f"{cpu}, {cores} cores, {platform.system()} {platform.machine()}"


@functools.lru_cache(maxsize=4)
def _load_cached(path: Path, mtime_ns: int) -> Classifier:
    return open_classifier(path)


def open_classifier(model: str | Path | None = None) -> Classifier:
    """A classifier of its own, as load_classifier gives, but loaded afresh and not kept: for a model
    used once, or one whose weights will change."""
    path = resolve_model_path(model).absolute()
    if path.suffix.lower() == ".onnx":
        return OnnxClassifier(path)
    return KerasClassifier(read_metadata(path), path)
