"""ImageNet backbones from keras.applications with a new head: the study's VGG19 transfer model and a
light MobileNetV2. The gray face is repeated to three channels and given the backbone's own
preprocessing inside the model, so exported models carry it too.

Weights: "imagenet" (Keras' standard download and cache in ~/.keras/models, or $KERAS_HOME/models),
a local weights file, or "none" (random init). With no cached file and no network, ferkit says at once
which file to put where, instead of hanging; FERKIT_OFFLINE=1 never tries the network.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from ferkit._keras import import_keras
from ferkit.errors import FerkitError
from ferkit.models.registry import register_model

KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
CAFFE_MEANS = [103.939, 116.779, 123.68]  # VGG's ImageNet channel means (BGR; equal channels here)


def imagenet_weights_file(filename: str) -> Path:
    """Where Keras caches a downloaded weights file."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models" / filename


def resolve_weights(weights: str | None, filename: str, subfolder: str) -> str | None:
    """What to hand keras.applications: None, a local file path, or "imagenet" (download allowed)."""
    if weights in (None, "none"):
        return None
    if weights != "imagenet":
        path = Path(weights)
        if not path.is_file():
            raise FerkitError(f"no such weights file: {path}")
        return str(path)
    cached = imagenet_weights_file(filename)
    if cached.is_file():
        return str(cached)
    if os.environ.get("FERKIT_OFFLINE") or not _online():
        raise FerkitError(
            f"ImageNet weights are not cached and cannot be downloaded here: put {filename} "
            f"(from {KERAS_WEIGHTS_URL}{subfolder}/{filename}) at {cached}, or give a weights file (train: --weights FILE, or none for random weights; study: --transfer-weights FILE)"
        )
    return "imagenet"


def resolve_local_weights(weights: str | None, cached: Path, hint: str) -> str | None:
    """Like `resolve_weights` for backbones whose ImageNet weights are made locally, not downloaded:
    "imagenet" is the file at `cached`, and `hint` says how to make it when it is missing."""
    if weights in (None, "none"):
        return None
    path = cached if weights == "imagenet" else Path(weights)
    if not path.is_file():
        if weights == "imagenet":
            raise FerkitError(f"no ImageNet weights at {cached}: make them once with `{hint}`, "
                              "or give a weights file (train: --weights FILE, or none for random weights; study: --transfer-weights FILE)")
        raise FerkitError(f"no such weights file: {path}")
    return str(path)


def _online(host: str = "storage.googleapis.com", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def transfer_model(backbone_fn, preprocessing, *, num_classes, input_shape, weights, name, head_units=256):
    """`backbone_fn(include_top=False, weights=..., input_shape=...)` (keras.applications' signature),
    frozen, between `preprocessing(layers)` and a new dense head."""
    keras = import_keras()
    layers = keras.layers
    inputs = keras.Input(input_shape)
    x = preprocessing(layers)(inputs)
    try:
        backbone = backbone_fn(include_top=False, weights=weights, input_shape=input_shape)
    except Exception as err:  # h5py, Keras and OS errors for a corrupt or mismatched file
        if weights in (None, "imagenet"):
            raise
        raise FerkitError(f"{weights} does not hold {backbone_fn.__name__} weights ({type(err).__name__})") from None
    backbone.name = "backbone"
    backbone.trainable = False  # phase one trains the head; --fine-tune N unfreezes the top N layers
    x = backbone(x, training=False)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(head_units, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


def _caffe(layers):
    # the means as constants: a Normalization layer's become inputs of an exported ONNX graph, not part of it
    return layers.Rescaling(1.0, offset=[-mean for mean in CAFFE_MEANS])


def _tf(layers):
    return layers.Rescaling(1.0 / 127.5, offset=-1.0)


@register_model("vgg19-transfer", input_size=(48, 48), channels=3, pretrained=True)
def vgg19_transfer(*, num_classes: int = 7, input_shape=(48, 48, 3), weights: str | None = "imagenet"):
    """The study's transfer model: frozen VGG19 (ImageNet) at 48x48 with a new dense head."""
    keras = import_keras()
    filename = "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
    return transfer_model(keras.applications.VGG19, _caffe, num_classes=num_classes, input_shape=input_shape,
                           weights=resolve_weights(weights, filename, "vgg19"), name="vgg19_transfer")


@register_model("mobilenetv2-transfer", input_size=(96, 96), channels=3, pretrained=True)
def mobilenetv2_transfer(*, num_classes: int = 7, input_shape=(96, 96, 3), weights: str | None = "imagenet"):
    """A light transfer model: frozen MobileNetV2 (ImageNet, alpha 1.0) at 96x96 with a new dense head."""
    keras = import_keras()
    filename = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{input_shape[0]}_no_top.h5"
    return transfer_model(keras.applications.MobileNetV2, _tf, num_classes=num_classes, input_shape=input_shape,
                           weights=resolve_weights(weights, filename, "mobilenet_v2"), name="mobilenetv2_transfer")
