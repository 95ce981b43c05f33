"""ferkit-net: ferkit's own FER2013 model, a VGG-style CNN sized for CPU training.

Stages of 3x3 conv + batch norm + ReLU (two convs per stage, one in the first), max-pooling between
stages, global average pooling and a dropout-regularised dense head. Works on the grayscale face
directly (one channel), which saves a third of the first layer's work over RGB-repeated input.
"""

from __future__ import annotations

from ferkit._keras import import_keras
from ferkit.models.registry import register_model


def face_input(keras, input_shape, crop: int | None = None):
    """(inputs, x): the 0-255 face scaled to 0-1 and, with `crop`, cut to its central crop x crop pixels
    (a fixed slice, in training and inference alike, exported to ONNX as one)."""
    inputs = keras.Input(input_shape)
    x = keras.layers.Rescaling(1.0 / 255)(inputs)
    if crop:
        height, width = input_shape[0] - crop, input_shape[1] - crop
        cropping = ((height // 2, height - height // 2), (width // 2, width - width // 2))
        x = keras.layers.Cropping2D(cropping, name="center_crop")(x)
    return inputs, x


def _conv_bn_relu(layers, x, filters: int):
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    return layers.ReLU()(x)


def build_vgg_bn(*, num_classes, input_shape, widths, convs_per_stage, head_units=256, dropout=0.4, name, crop=None):
    """Stages of `convs_per_stage[i]` conv-BN-ReLU blocks of `widths[i]` filters, each closed by max-pooling.

    With `crop`, the network looks only at the central `crop` x `crop` pixels of its input. Shifting the
    face in front of it (the "crop" augmentation) then trains on random crops, and scoring the whole face
    uses the centre crop: the input stays the full face, so nothing outside the model needs to know.
    """
    keras = import_keras()
    layers = keras.layers
    inputs, x = face_input(keras, input_shape, crop)
    for width, convs in zip(widths, convs_per_stage):
        for _ in range(convs):
            x = _conv_bn_relu(layers, x, width)
        x = layers.MaxPooling2D()(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(dropout)(x)
    x = layers.Dense(head_units, use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.Dropout(dropout)(x)
    # float32 softmax even under mixed precision: bf16 probabilities are too coarse for the loss
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


@register_model("ferkit-net", input_size=(48, 48), channels=1)
def ferkit_net(*, num_classes: int = 7, input_shape=(48, 48, 1)):
    """ferkit's own VGG-style CNN with batch norm (48x48 gray, 64-128-256-512, 4.8M parameters)."""
    return build_vgg_bn(
        num_classes=num_classes, input_shape=input_shape, widths=(64, 128, 256, 512),
        convs_per_stage=(1, 2, 2, 2), name="ferkit_net",
    )


@register_model("ferkit-net-s", input_size=(48, 48), channels=1)
def ferkit_net_s(*, num_classes: int = 7, input_shape=(48, 48, 1)):
    """A half-width ferkit-net (32-64-128-256, 1.2M parameters): about 6 times cheaper per epoch."""
    return build_vgg_bn(
        num_classes=num_classes, input_shape=input_shape, widths=(32, 64, 128, 256),
        convs_per_stage=(1, 2, 2, 2), name="ferkit_net_s",
    )


@register_model("ferkit-net-m", input_size=(48, 48), channels=1)
def ferkit_net_m(*, num_classes: int = 7, input_shape=(48, 48, 1)):
    """ferkit-net at 3/4 width (48-96-192-384, 2.7M parameters): the cost of two ferkit-net-s."""
    return build_vgg_bn(
        num_classes=num_classes, input_shape=input_shape, widths=(48, 96, 192, 384),
        convs_per_stage=(1, 2, 2, 2), name="ferkit_net_m",
    )


@register_model("ferkit-net-l", input_size=(48, 48), channels=1, crop=40)
def ferkit_net_l(*, num_classes: int = 7, input_shape=(48, 48, 1), crop: int):
    """VGG-style, two convs per stage (64-128-256-512, 4.8M parameters) on the central 40x40 of the face."""
    return build_vgg_bn(
        num_classes=num_classes, input_shape=input_shape, widths=(64, 128, 256, 512),
        convs_per_stage=(2, 2, 2, 2), name="ferkit_net_l", crop=crop,
    )
