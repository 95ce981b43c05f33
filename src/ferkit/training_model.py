"""The model stage of training: the registered network, behind its augmentation layers, compiled with
the loss, optimizer and learning-rate schedule a TrainConfig asks for. Keras is passed in, imported only
once training starts."""

from __future__ import annotations

from pathlib import Path

from ferkit.config import TrainConfig
from ferkit.errors import FerkitError
from ferkit.models import create_model, get_model_spec, list_models
from ferkit.runtime import ModelMetadata, load_keras_model, read_metadata, resolve_model_path

FEATURE_HEAD = "feature_head"  # the name of the model trained on cached features (split_at_backbone)


def build_training_model(keras, config: TrainConfig, num_classes: int, train_size: int, *, base=None):
    """The registered model (or `base`), behind the augmentation layers when asked (off at inference)."""
    base = base or create_model(config.model, num_classes=num_classes, weights=config.weights)
    augmenters = augmentation_layers(keras, config)
    model = keras.Sequential([keras.Input(base.input_shape[1:]), *augmenters, base], name="train") if augmenters else base
    compile_model(keras, model, config, train_size, config.learning_rate)
    return model


def network_of(training_model, config: TrainConfig):
    """The network inside a training model: what is saved, without the augmentation layers."""
    return training_model.layers[-1] if config.augment else training_model


def compile_model(keras, model, config: TrainConfig, train_size: int, learning_rate: float, *, fine_tuning: bool = False) -> None:
    """Compile for the main phase, or with `fine_tuning` for fine-tuning's: a cosine schedule then spans its
    own epochs, without a warm-up."""
    if needs_one_hot(config):
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
    else:
        loss = keras.losses.SparseCategoricalCrossentropy()
    steps_per_epoch = -(-train_size // config.batch_size)
    # A data-parallel job pads its last validation batch with faces of weight 0, which only a weighted
    # accuracy leaves out (callbacks.UnpaddedValidation reports that one as val_accuracy).
    weighted = ["accuracy"] if keras.distribution.distribution() is not None else None
    epochs, warmup = (config.fine_tune_epochs, 0) if fine_tuning else (config.epochs, config.warmup_epochs)
    model.compile(optimizer=_optimizer(keras, config, steps_per_epoch, learning_rate, epochs, warmup), loss=loss, metrics=["accuracy"],
                  weighted_metrics=weighted)


def needs_one_hot(config: TrainConfig) -> bool:
    """Label smoothing, distillation and mixup train on probability rows, not class indices."""
    return bool(config.label_smoothing or config.teacher or config.mixup)


def _optimizer(keras, config: TrainConfig, steps_per_epoch: int, learning_rate: float, epochs: int, warmup_epochs: int):
    rate = learning_rate
    if config.lr_schedule == "cosine":
        warmup_steps = warmup_epochs * steps_per_epoch
        decay_steps = epochs * steps_per_epoch - warmup_steps
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


def augmentation_layers(keras, config: TrainConfig) -> list:
    # Augmentation runs in float32 under mixed precision too: it costs little, and TensorFlow 2.16 has no
    # bfloat16 CPU kernel for an op that RandomErasing uses.
    layers, seed, f32 = keras.layers, config.seed, "float32"
    chosen = {
        "flip": lambda: layers.RandomFlip("horizontal", seed=seed, dtype=f32),
        "shift": lambda: layers.RandomTranslation(config.shift, config.shift, fill_mode="reflect", seed=seed + 1, dtype=f32),
        "crop": lambda: random_crop_layer(keras, config, seed + 6),
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


def random_crop_layer(keras, config: TrainConfig, seed: int):
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


def init_model_path(init: str) -> Path:
    """The .keras model that --init names: "default" or a shipped model's name (its Keras twin), a run
    or a file."""
    from ferkit.runtime import is_shipped_model_name, shipped_file, shipped_model

    if is_shipped_model_name(init):
        entry = shipped_model(init)
        if "keras_file" not in entry:
            raise FerkitError(f"the shipped model {entry['name']} has no Keras version to start from; pass --init RUN")
        return shipped_file(entry, "keras_file", "keras_sha256")
    path = resolve_model_path(init)
    if path.suffix != ".keras":
        raise FerkitError(f"--init needs a Keras model (a run folder or .keras file), not {path}")
    return path


def adopt_init_model(config: TrainConfig) -> None:
    """With --init, the run trains the initial model's network, and keeps its classes unless told others.
    A `model` other than the default must be that network."""
    default_model = TrainConfig.__dataclass_fields__["model"].default
    metadata = check_init_model(config.init, None if config.model == default_model else config.model)
    config.model = metadata.model
    config.classes = config.classes or list(metadata.classes)


def check_init_model(init: str, model: str | None = None):
    """The metadata of the --init model, or a FerkitError if it does not train further (an ensemble) or is
    another network than `model` (when given)."""
    metadata = read_metadata(init_model_path(init))
    if metadata.model not in list_models():
        raise FerkitError(f"--init {init} is a {metadata.model}, which does not train further: start from "
                          "one of its members' run folders")
    if model is not None and model != metadata.model:
        raise FerkitError(f"--init {init} is a {metadata.model} network, not {model}: leave --model out")
    return metadata


def check_fine_tuning(config: TrainConfig) -> None:
    """Refuse --fine-tune before any training for a network without a pretrained backbone to unfreeze."""
    if config.fine_tune and not get_model_spec(config.model).pretrained:
        raise FerkitError(f"--fine-tune unfreezes a pretrained backbone, which {config.model} does not have")


def init_model(keras, init: str, classes: list[str], model_name: str):
    """A trained model to start from, rebuilt under the current precision policy with its weights.
    If its classes differ from `classes`, its last layer is replaced: classes it already knew keep their
    learnt weights, new ones start fresh."""
    path = init_model_path(init)
    known = list(read_metadata(path).classes)
    trained = load_keras_model(keras, path)
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


def network_metadata(model_name: str, classes) -> ModelMetadata:
    """What a saved model of the network `model_name` records about its input."""
    spec = get_model_spec(model_name)
    return ModelMetadata(model=model_name, classes=list(classes), input_size=list(spec.input_size),
                         channels=spec.channels, crop=spec.crop)


def float32_twin(keras, model_name: str, num_classes: int):
    """The same network in float32, to receive the weights of a mixed-precision one for saving, so
    that saved models (and their ONNX exports) compute in float32 everywhere."""
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        return create_model(model_name, num_classes=num_classes, weights="none" if get_model_spec(model_name).pretrained else None)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def split_at_backbone(keras, model):
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


def feature_head(keras, model, config: TrainConfig, train_size: int):
    """The compiled head of a frozen-backbone model (split_at_backbone), and the extractor before it."""
    extractor, head = split_at_backbone(keras, model)
    compile_model(keras, head, config, train_size, config.learning_rate)
    return extractor, head


def unfreeze_top(model, count: int) -> None:
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


def prepare_fine_tuning(keras, model, config: TrainConfig, train_size: int) -> None:
    """The second phase: the backbone's top layers unfrozen, compiled anew at a tenth of the rate."""
    unfreeze_top(network_of(model, config), config.fine_tune)
    compile_model(keras, model, config, train_size, config.learning_rate / 10, fine_tuning=True)
