"""train(config) -> run folder. Reads top to bottom: folder, data, model, fit, record.

What the run folder holds is described in ferkit.runs; Keras is imported only when training starts.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ferkit._keras import import_keras
from ferkit.config import TrainConfig
from ferkit.data import FaceDataset, load_dataset, split_dataset
from ferkit.data.batches import face_batches
from ferkit.distributed import Topology, device_names
from ferkit.distributed import start as start_distributed
from ferkit.errors import FerkitError
from ferkit.images import faces_to_batch
from ferkit.models import create_model, get_model_spec
from ferkit.runs import RUN_FILES, RunState, trim_history, write_atomic
from ferkit.runtime import ModelMetadata, read_metadata, resolve_model_path

log = logging.getLogger("ferkit")


class TrainingInterrupted(FerkitError):
    exit_code = 130


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, verbose: int = 2,
          callbacks: list | None = None, topology: Topology | None = None) -> Path:
    """Train `config.model` on `config.data`; returns the run folder. `verbose`: 0 silent, 1 bar, 2 line.
    `callbacks`: Keras callbacks of your own, run after ferkit's (which record the run).

    `kill` (SIGTERM) or Ctrl-C stops at the end of the current batch; the epoch under way is dropped, so
    the run folder holds complete epochs only, and TrainingInterrupted says how to resume. A second
    Ctrl-C stops at once.

    `topology`: this process's place in a data-parallel job (ferkit.distributed); process 0 writes the
    run folder, the others a temporary copy."""
    topology = topology or Topology()
    if topology.coordinator:
        _check_distributable(config)
        start_distributed(topology)
    if topology.is_chief:
        return _train(config, Path(config.out), resume, overwrite, verbose, callbacks, topology)
    _check_run_folder(Path(config.out), resume=resume, overwrite=overwrite)  # fail as process 0 will
    with tempfile.TemporaryDirectory(prefix="ferkit-worker-") as folder:
        if resume:
            shutil.copytree(config.out, folder, dirs_exist_ok=True)
        _train(config, Path(folder), resume, True, verbose, callbacks, topology)
    return Path(config.out)


def _train(config: TrainConfig, run: Path, resume: bool, overwrite: bool, verbose: int, callbacks, topology) -> Path:
    _check_run_folder(run, resume=resume, overwrite=overwrite)
    if config.init and not resume:
        init_metadata = read_metadata(init_model_path(config.init))
        config.model = init_metadata.model
        config.classes = config.classes or list(init_metadata.classes)
    spec = get_model_spec(config.model)
    train_set, val_set = load_train_val(config, spec.input_size, progress=verbose > 0)
    config.classes = list(train_set.classes)
    num_classes = len(train_set.classes)
    total = config.epochs + config.fine_tune_epochs if config.fine_tune else config.epochs
    state = RunState.load(run) if resume else RunState()
    if state.epochs_done >= total:
        log.warning("%s already has %d epochs; pass a larger --epochs to train on", run, state.epochs_done)
        return run
    teacher = teacher_probabilities(config.teacher, train_set) if config.teacher else None
    cached_features = _trains_on_cached_features(config)
    # Memory-mapped (packed) datasets and data-parallel jobs read one batch at a time (ferkit.data.batches);
    # faces in memory go to Keras whole, whose pipeline was measured faster on small networks.
    streamed = bool(topology.coordinator) or not isinstance(train_set.images, np.ndarray) or isinstance(train_set.images, np.memmap)
    # a data-parallel job drops each epoch's last incomplete batch; its schedule counts the steps it runs
    train_size = len(train_set) // config.batch_size * config.batch_size if topology.coordinator else len(train_set)

    keras = import_keras()
    from ferkit.callbacks import RunRecorder, StopOnSignal

    keras.utils.set_random_seed(config.seed + state.epochs_done)
    keras.mixed_precision.set_global_policy(config.precision)
    try:
        if resume and (run / "checkpoint.keras").exists():
            training_model = keras.saving.load_model(run / "checkpoint.keras")
            if training_model.name == FEATURE_HEAD:  # stopped in a phase that trained on cached features
                head_weights = training_model.get_weights()
                training_model = _build_training_model(keras, config, num_classes, train_size)
                _split_at_backbone(keras, training_model)[1].set_weights(head_weights)
        elif resume and (run / COMPACT_CHECKPOINT).exists():
            training_model = _build_training_model(keras, config, num_classes, train_size)
            _restore_compact_checkpoint(training_model, config, run / COMPACT_CHECKPOINT, state.epochs_done, train_size)
        else:
            state = RunState()
            base = _init_model(keras, config.init, config.classes, config.model) if config.init else None
            training_model = _build_training_model(keras, config, num_classes, train_size, base=base)
        base_model = training_model.layers[-1] if config.augment else training_model
        # a separate network receives what is saved: float32 weights of a mixed-precision one, or the averages
        saved_model = _float32_twin(keras, spec, num_classes) if config.precision != "float32" or config.ema else base_model

        # Only now that data and model are known to be good does the run folder change.
        if not resume:
            _clear_run_folder(run)
        _save_run_config(run, config, train_set, val_set)
        trim_history(run / "history.csv", state.epochs_done)
        metadata = ModelMetadata(model=config.model, classes=config.classes, input_size=list(spec.input_size),
                                 channels=spec.channels, crop=spec.crop)
        averaged = None
        if config.ema:  # validation scores the averaged weights, and RunRecorder saves them
            from ferkit.callbacks import AveragedWeightsValidation

            picked = np.random.default_rng(config.seed).permutation(len(train_set))[:BATCH_NORM_FACES]
            averaged = AveragedWeightsValidation(base_model, faces_to_batch(train_set.images[picked], spec.channels))
        stop = StopOnSignal()
        recorder = RunRecorder(run, state, base_model, metadata, saved_model=saved_model, averaged=averaged, stop=stop)
        callbacks = [stop, *([averaged] if averaged is not None else []), recorder, *(callbacks or [])]
        if config.lr_schedule == "plateau":
            callbacks.append(
                keras.callbacks.ReduceLROnPlateau("val_accuracy", mode="max", factor=0.5, patience=config.lr_patience)
            )
        to_input = functools.partial(faces_to_batch, channels=spec.channels)
        train_y = _targets(train_set.labels, num_classes, config, teacher)
        val_y = _targets(val_set.labels, num_classes, config)
        class_weight = _class_weights(config, train_set.labels, num_classes)
        face_weight = None if class_weight is None else np.array([class_weight[c] for c in train_set.labels], np.float32)
        if topology.coordinator and topology.is_chief:
            topology.save(run / "topology.json", device_names())
        fit = dict(callbacks=callbacks, verbose=verbose)
        if cached_features or config.mixup:  # whole arrays: features are computed once / mixup blends them
            fit["validation_data"] = (to_input(val_set.images), val_y)
            if config.mixup:
                fit["x"] = mixup_batches(to_input(train_set.images), train_y, config.batch_size, alpha=config.mixup,
                                         sample_weight=face_weight, seed=config.seed + state.epochs_done)
            else:
                fit.update(x=to_input(train_set.images), y=train_y, batch_size=config.batch_size, shuffle=True,
                           class_weight=class_weight)
        elif not streamed:  # in memory: Keras' own array pipeline, fed 8-bit faces (the network casts them)
            fit.update(x=faces_to_batch(train_set.images, spec.channels, np.uint8), y=train_y, batch_size=config.batch_size,
                       shuffle=True, class_weight=class_weight, validation_data=(to_input(val_set.images), val_y))
        else:  # batches made one at a time from the stored faces: memory does not grow with the data
            common = dict(batch_size=config.batch_size, to_input=to_input, seed=config.seed,
                          num_processes=topology.num_processes, process_id=topology.process_id)
            fit["x"] = face_batches(train_set.images, train_y, sample_weight=face_weight, first_epoch=state.epochs_done,
                                    drop_remainder=bool(topology.coordinator), **common)
            fit["validation_data"] = face_batches(val_set.images, val_y, shuffle=False, pad=bool(topology.coordinator), **common)
        state.status = "running"
        state.save(run)
        with stop.listening():
            if state.epochs_done < config.epochs and cached_features:
                _fit_head_on_features(keras, base_model, config, fit, epochs=config.epochs, initial_epoch=state.epochs_done)
            elif state.epochs_done < config.epochs:
                training_model.fit(epochs=config.epochs, initial_epoch=state.epochs_done, **fit)
            if config.fine_tune and state.epochs_done < total and not stop.requested:
                if state.epochs_done == config.epochs:  # a checkpoint from phase two is unfrozen already
                    _unfreeze_top(base_model, config.fine_tune)
                    _compile(keras, training_model, config, train_size, config.learning_rate / 10)
                training_model.fit(epochs=total, initial_epoch=state.epochs_done, **fit)
        if stop.requested:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        state.status = "interrupted"
        if (run / "config.json").exists():
            state.save(run)
        raise TrainingInterrupted(
            f"interrupted after {state.epochs_done} of {total} epochs (the epoch under way is dropped); {run} is usable, "
            f"continue with: ferkit train --resume {run}"
        ) from None
    finally:
        keras.mixed_precision.set_global_policy("float32")
    state.status = "finished"
    state.save(run)
    return run


def _trains_on_cached_features(config: TrainConfig) -> bool:
    """A frozen pretrained backbone without augmentation or mixup: its features are computed once."""
    return get_model_spec(config.model).pretrained and config.cache_features and not (config.augment or config.mixup)


def _check_distributable(config: TrainConfig) -> None:
    unsupported = [name for name, used in (("--mixup", config.mixup), ("--ema", config.ema), ("cached features (pass "
                   "--no-cache-features)", _trains_on_cached_features(config))) if used]
    if unsupported:
        raise FerkitError(f"multi-process training does not support {' and '.join(unsupported)} yet")


BATCH_NORM_FACES = 2048  # un-augmented training faces that measure the averaged weights' batch-norm statistics
COMPACT_CHECKPOINT = "checkpoint.npz"
COMPACT_FILES = ("config.json", "datasets.json", "history.csv", "state.json", "curves.png")


def save_compact_checkpoint(run: str | Path, out: str | Path) -> Path:
    """A small copy of the run in flight at `run`, in a new folder `out` that `ferkit train --resume`
    continues: its record (config, history, state, curves) and the network's weights in float16.

    The optimizer's state is not kept, which makes the copy a third of the size: on resuming, momentum
    restarts at zero and the weights' moving average at the weights themselves; the learning-rate
    schedule goes on from the right step.
    """
    keras = import_keras()
    run, out = Path(run), Path(out)
    if not (run / "checkpoint.keras").exists():
        raise FerkitError(f"{run} has no checkpoint.keras to pack")
    if out.exists() and any(out.iterdir()):
        raise FerkitError(f"{out} already exists; choose an empty or new folder")
    config = TrainConfig.load(run / "config.json")
    training_model = keras.saving.load_model(run / "checkpoint.keras", compile=False)
    network = training_model.layers[-1] if config.augment else training_model
    out.mkdir(parents=True, exist_ok=True)
    for name in COMPACT_FILES:
        if (run / name).exists():
            shutil.copy2(run / name, out / name)
    config.out = str(out)  # the pack is a run folder of its own; where the run lived says nothing here
    config.save(out / "config.json")
    weights = [np.asarray(w, np.float16) for w in network.get_weights()]
    np.savez_compressed(out / COMPACT_CHECKPOINT, *weights)
    return out


def _restore_compact_checkpoint(training_model, config: TrainConfig, path: Path, epochs_done: int, train_size: int) -> None:
    """Load save_compact_checkpoint's weights into a freshly compiled training model, with the optimizer
    at the step where the run stopped (so the learning-rate schedule continues)."""
    with np.load(path) as stored:
        weights = [stored[f"arr_{i}"] for i in range(len(stored.files))]
    network = training_model.layers[-1] if config.augment else training_model
    try:
        network.set_weights([w.astype(np.float32) for w in weights])
    except ValueError:
        raise FerkitError(f"{path} does not hold the weights of a {config.model} network") from None
    optimizer = training_model.optimizer
    optimizer.build(training_model.trainable_variables)
    optimizer.iterations.assign(epochs_done * -(-train_size // config.batch_size))
    for variable, average in zip(optimizer._trainable_variables, getattr(optimizer, "_model_variables_moving_average", [])):
        average.assign(variable)


def load_train_val(config: TrainConfig, input_size, *, progress: bool = False) -> tuple[FaceDataset, FaceDataset]:
    """The training set and the validation set (its own source, or a stratified split of the data)."""
    if not config.data:
        raise FerkitError("no training data given (--data DIR_OR_CSV)")
    common = {"classes": config.classes, "image_size": tuple(input_size), "progress": progress}
    data = load_dataset(config.data, usage="Training", **common)
    if config.val:
        return data, load_dataset(config.val, usage="PublicTest", **{**common, "classes": data.classes})
    return split_dataset(data, val_fraction=config.val_split, seed=config.seed)


def _check_run_folder(run: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse, before any work, to resume what is not a run or to replace anything silently."""
    is_run = (run / "config.json").exists()
    if resume:
        if not is_run:
            raise FerkitError(f"cannot resume: {run} is not a ferkit run folder (no config.json)")
        return
    if run.exists() and any(run.iterdir()):
        if not overwrite:
            raise FerkitError(f"{run} already exists; use --resume to continue it, --overwrite to replace it, or another --out")
        if not is_run:
            raise FerkitError(f"{run} is not a ferkit run folder; refusing to overwrite it, choose another --out")


def _clear_run_folder(run: Path) -> None:
    """Remove what an earlier run wrote (only ferkit's own files), ready for a fresh run."""
    for name in (*RUN_FILES, COMPACT_CHECKPOINT):
        (run / name).unlink(missing_ok=True)
    for folder in run.glob("eval-*"):
        shutil.rmtree(folder)
    run.mkdir(parents=True, exist_ok=True)


def _save_run_config(run: Path, config: TrainConfig, train_set: FaceDataset, val_set: FaceDataset) -> None:
    config.save(run / "config.json")
    sizes = {"train": train_set.class_counts(), "val": val_set.class_counts()}
    write_atomic(run / "datasets.json", json.dumps(sizes, indent=2) + "\n")


def init_model_path(init: str) -> Path:
    """The .keras model that --init names: "default" (the bundled model's Keras twin), a run or a file."""
    if init == "default":
        from ferkit.runtime import bundled_manifest, files_path

        from ferkit.runtime import _check_hash

        manifest = bundled_manifest()
        if "keras_file" not in manifest:
            raise FerkitError("the bundled model has no Keras version to start from; pass --init RUN")
        path = files_path("weights", manifest["keras_file"])
        if "keras_sha256" in manifest:
            _check_hash(path, manifest["keras_sha256"])
        return path
    path = resolve_model_path(init)
    if path.suffix != ".keras":
        raise FerkitError(f"--init needs a Keras model (a run folder or .keras file), not {path}")
    return path


def _init_model(keras, init: str, classes: list[str], model_name: str):
    """A trained model to start from, rebuilt under the current precision policy with its weights.
    If its classes differ from `classes`, its last layer is replaced: classes it already knew keep their
    learnt weights, new ones start fresh."""
    path = init_model_path(init)
    known = list(read_metadata(path).classes)
    trained = keras.saving.load_model(path, compile=False)
    spec = get_model_spec(model_name)
    model = create_model(model_name, num_classes=len(classes), weights="none" if spec.pretrained else None)
    if len(model.layers) != len(trained.layers):
        raise FerkitError(f"{path} does not have the layers of a {model_name} model")
    for source, target in zip(trained.layers[:-1], model.layers[:-1]):
        target.set_weights(source.get_weights())
    kernel, bias = trained.layers[-1].get_weights()
    new_kernel, new_bias = model.layers[-1].get_weights()
    for i, name in enumerate(classes):
        if name in known:
            new_kernel[:, i], new_bias[i] = kernel[:, known.index(name)], bias[known.index(name)]
    model.layers[-1].set_weights([new_kernel, new_bias])
    return model


def _build_training_model(keras, config: TrainConfig, num_classes: int, train_size: int, *, base=None):
    """The registered model (or `base`), behind the augmentation layers when asked (off at inference)."""
    base = base or create_model(config.model, num_classes=num_classes, weights=config.weights)
    augmenters = _augmentation_layers(keras, config)
    model = keras.Sequential([keras.Input(base.input_shape[1:]), *augmenters, base], name="train") if augmenters else base
    _compile(keras, model, config, train_size, config.learning_rate)
    return model


def _compile(keras, model, config: TrainConfig, train_size: int, learning_rate: float) -> None:
    if _needs_one_hot(config):
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
    else:
        loss = keras.losses.SparseCategoricalCrossentropy()
    steps_per_epoch = -(-train_size // config.batch_size)
    model.compile(optimizer=_optimizer(keras, config, steps_per_epoch, learning_rate), loss=loss, metrics=["accuracy"])


FEATURE_HEAD = "feature_head"


def _split_at_backbone(keras, model):
    """(extractor, head): the layers up to the frozen backbone and those after it, as two models that
    share the original layers (and so their weights)."""
    layers = [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
    cut = layers.index(model.get_layer("backbone")) + 1
    inputs = keras.Input(model.input_shape[1:])
    x = inputs
    for layer in layers[:cut]:
        x = layer(x)
    features = keras.Input(x.shape[1:])
    y = features
    for layer in layers[cut:]:
        y = layer(y)
    return keras.Model(inputs, x), keras.Model(features, y, name=FEATURE_HEAD)


def _fit_head_on_features(keras, model, config: TrainConfig, fit: dict, *, epochs: int, initial_epoch: int) -> None:
    """Phase one with a frozen backbone: its features are computed once, then each epoch trains the head
    alone on them. Checkpoints hold the head; the saved models are the whole network."""
    extractor, head = _split_at_backbone(keras, model)
    train_features = extractor.predict(fit["x"], batch_size=256, verbose=0)
    val_x, val_y = fit["validation_data"]
    val_features = extractor.predict(val_x, batch_size=256, verbose=0)
    _compile(keras, head, config, len(train_features), config.learning_rate)
    head.fit(**{**fit, "x": train_features, "validation_data": (val_features, val_y)}, epochs=epochs, initial_epoch=initial_epoch)


def _unfreeze_top(model, count: int) -> None:
    """Make the top `count` layers of the model's backbone trainable (batch norm layers stay frozen,
    the usual practice when fine-tuning on small data)."""
    try:
        backbone = model.get_layer("backbone")
    except ValueError:
        raise FerkitError(f"{model.name} has no pretrained backbone to fine-tune") from None
    backbone.trainable = True
    for index, layer in enumerate(backbone.layers):
        is_batch_norm = type(layer).__name__ == "BatchNormalization"
        layer.trainable = index >= len(backbone.layers) - count and not is_batch_norm


def _float32_twin(keras, spec, num_classes: int):
    """The same network in float32, to receive the weights of a mixed-precision one for saving, so
    that saved models (and their ONNX exports) compute in float32 everywhere."""
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        return create_model(spec.name, num_classes=num_classes, weights="none" if spec.pretrained else None)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def _augmentation_layers(keras, config: TrainConfig) -> list:
    # Augmentation runs in float32 under mixed precision too: it costs little, and TensorFlow 2.16 has no
    # bfloat16 CPU kernel for an op that RandomErasing uses.
    layers, seed, f32 = keras.layers, config.seed, "float32"
    chosen = {
        "flip": lambda: layers.RandomFlip("horizontal", seed=seed, dtype=f32),
        "shift": lambda: layers.RandomTranslation(config.shift, config.shift, fill_mode="reflect", seed=seed + 1, dtype=f32),
        "crop": lambda: _random_crop_layer(keras, config, seed + 6),
        "rotate": lambda: layers.RandomRotation(config.rotate / 360.0, fill_mode="reflect", seed=seed + 2, dtype=f32),
        "zoom": lambda: layers.RandomZoom(config.zoom, seed=seed + 3, dtype=f32),
        "contrast": lambda: layers.RandomContrast(0.3, value_range=(0, 255), seed=seed + 4, dtype=f32),
        "erase": lambda: layers.RandomErasing(factor=0.5, scale=(0.02, 0.2), value_range=(0, 255), seed=seed + 5, dtype=f32),
    }
    # a fixed order, whatever order the user listed them in
    augmenters = [make() for name, make in chosen.items() if name in config.augment]
    if keras.backend.backend() == "jax":
        # Keras marks the affine layers (shift, rotate, zoom) as not XLA-compilable, which is true of
        # TensorFlow's kernel only; under JAX that flag made the whole train step run op by op (0.7 s
        # per step on an H100 instead of milliseconds).
        for layer in augmenters:
            layer.supports_jit = True
    return augmenters


def _random_crop_layer(keras, config: TrainConfig, seed: int):
    """Random crops for a model that looks at the central `crop` pixels of its input: a whole-pixel
    shift of up to half the margin each way moves a random crop-sized window to the centre."""
    crop = get_model_spec(config.model).crop
    if not crop:
        raise FerkitError(f"the crop augmentation needs a model that crops its input; {config.model} does not")
    height, width = get_model_spec(config.model).input_size
    return keras.layers.RandomTranslation(
        (height - crop) / 2 / height, (width - crop) / 2 / width, fill_mode="reflect", interpolation="nearest", seed=seed,
        dtype="float32",
    )


def _optimizer(keras, config: TrainConfig, steps_per_epoch: int, learning_rate: float):
    rate = learning_rate
    if config.lr_schedule == "cosine":
        warmup_steps = config.warmup_epochs * steps_per_epoch
        decay_steps = config.epochs * steps_per_epoch - warmup_steps
        if warmup_steps:
            rate = keras.optimizers.schedules.CosineDecay(
                learning_rate / 10, decay_steps=decay_steps, alpha=0.01,
                warmup_target=learning_rate, warmup_steps=warmup_steps,
            )
        else:
            rate = keras.optimizers.schedules.CosineDecay(rate, decay_steps=decay_steps, alpha=0.01)
    ema = dict(use_ema=True, ema_momentum=config.ema) if config.ema else {}
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(rate, momentum=0.9, nesterov=True, weight_decay=config.weight_decay or None, **ema)
    if config.optimizer == "adamw":
        return keras.optimizers.AdamW(rate, weight_decay=config.weight_decay, **ema)
    return keras.optimizers.Adam(rate, **ema)


def _class_weights(config: TrainConfig, labels: np.ndarray, num_classes: int) -> dict[int, float] | None:
    if config.class_weight == "none":
        return None
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    weights = len(labels) / (num_classes * np.maximum(counts, 1))
    if config.class_weight == "sqrt":
        weights = np.sqrt(weights)
    return {i: float(w) for i, w in enumerate(weights)}


def teacher_probabilities(teacher: str, train_set: FaceDataset) -> np.ndarray:
    """The teacher model's class probabilities for every training face, averaged over the face and its
    mirror image: the soft targets of distillation. A .npz `teacher` holds them already (ferkit.teacher).

    They are computed once, on the un-augmented faces, and serve for every augmented view of a face:
    the augmentations are mild enough (small shifts, zoom, rotation, erased patches) that the teacher's
    opinion of the face carries over, and training costs nothing more per step.
    """
    from ferkit.runtime import load_classifier
    from ferkit.teacher import TEACHER_SUFFIX, load_teacher_probabilities

    if Path(teacher).suffix == TEACHER_SUFFIX:
        log.info("distilling from the probabilities saved in %s", teacher)
        return load_teacher_probabilities(teacher, train_set)
    classifier = load_classifier(teacher).with_tta("flip")
    if classifier.classes != train_set.classes:
        raise FerkitError(
            f"the teacher {teacher} knows the classes {', '.join(classifier.classes)}, "
            f"the training data {', '.join(train_set.classes)}"
        )
    if classifier.input_size != train_set.image_size:
        raise FerkitError(f"the teacher {teacher} takes {classifier.input_size} faces, the model {train_set.image_size}")
    log.info("distilling from %s: its probabilities for %d training faces", teacher, len(train_set))
    return classifier.predict_proba(train_set.images)


def _needs_one_hot(config: TrainConfig) -> bool:
    """Label smoothing, distillation and mixup train on probability rows, not class indices."""
    return bool(config.label_smoothing or config.teacher or config.mixup)


def _targets(labels: np.ndarray, num_classes: int, config: TrainConfig, teacher: np.ndarray | None = None) -> np.ndarray:
    """Class indices; one-hot rows when label smoothing or distillation needs them; with a teacher,
    each row mixes its probabilities (share `config.distill`) with the true label."""
    if not _needs_one_hot(config):
        return labels
    one_hot = np.eye(num_classes, dtype=np.float32)[labels]
    if teacher is None:
        return one_hot
    return ((1.0 - config.distill) * one_hot + config.distill * teacher).astype(np.float32)


def mixup_batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, alpha: float,
                  sample_weight: np.ndarray | None = None, seed: int = 0):
    """Training batches for mixup (Zhang et al. 2018), as a Keras PyDataset: each face blended with
    another face of its batch, weight lam ~ Beta(alpha, alpha) per face, and its target row and sample
    weight blended the same way. Reshuffled every epoch, reproducibly from `seed`."""
    batches_class = _mixup_batches_class(import_keras())
    return batches_class(x, y, batch_size, alpha=alpha, sample_weight=sample_weight, seed=seed)


@functools.cache
def _mixup_batches_class(keras):
    """The PyDataset subclass behind mixup_batches: defined once Keras is imported, not at ferkit's import."""

    class MixupBatches(keras.utils.PyDataset):
        def __init__(self, x, y, batch_size, *, alpha, sample_weight=None, seed=0):
            super().__init__()
            self.x, self.y, self.weight, self.batch_size, self.alpha = x, y, sample_weight, batch_size, alpha
            self.rng = np.random.default_rng(seed)
            self.order = self.rng.permutation(len(x))

        def __len__(self):
            return -(-len(self.x) // self.batch_size)

        def __getitem__(self, index):
            picked = self.order[index * self.batch_size:(index + 1) * self.batch_size]
            partner = picked[self.rng.permutation(len(picked))]
            lam = self.rng.beta(self.alpha, self.alpha, size=len(picked)).astype(np.float32)
            return tuple(_blend(a[picked], a[partner], lam) for a in (self.x, self.y, self.weight) if a is not None)

        def on_epoch_end(self):
            self.order = self.rng.permutation(len(self.x))

    return MixupBatches


def _blend(a: np.ndarray, b: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """lam * a + (1 - lam) * b, one lam per row."""
    lam = lam.reshape((-1,) + (1,) * (a.ndim - 1))
    return (lam * a + (1 - lam) * b).astype(np.float32)
