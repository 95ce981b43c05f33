"""ferkit-resnet18-h: a CIFAR-style ResNet-18 at half width, a second family beside the VGG-style
ferkit-net for ensembles and as a distillation teacher.

A 3x3 stem and four stages of two basic residual blocks (two 3x3 conv + batch norm each, a 1x1 projection
where the shape changes), widths 32-64-128-256, strides 1-2-2-2, global average pooling, a 7-way softmax.
Like ferkit-net-l it looks at the central crop of the 48x48 face (44x44), so `--augment crop` trains on
random crops and `--tta tencrop` applies.
"""

from __future__ import annotations

from ferkit._keras import import_keras
from ferkit.models.ferkit_net import face_input
from ferkit.models.registry import register_model


def _basic_block(layers, x, filters: int, stride: int):
    shortcut = x
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
    y = layers.BatchNormalization()(y)
    y = layers.ReLU()(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
    y = layers.BatchNormalization()(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False)(shortcut)
        shortcut = layers.BatchNormalization()(shortcut)
    return layers.ReLU()(layers.Add()([y, shortcut]))


def build_resnet(*, num_classes, input_shape, widths, blocks_per_stage, crop=None, dropout=0.2, name):
    keras = import_keras()
    layers = keras.layers
    inputs, x = face_input(keras, input_shape, crop)
    x = layers.Conv2D(widths[0], 3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    for stage, (width, blocks) in enumerate(zip(widths, blocks_per_stage)):
        for block in range(blocks):
            x = _basic_block(layers, x, width, 2 if stage and not block else 1)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(dropout)(x)
    # float32 softmax even under mixed precision: bf16 probabilities are too coarse for the loss
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


@register_model("ferkit-resnet18-h", input_size=(48, 48), channels=1, crop=44)
def ferkit_resnet18_h(*, num_classes: int = 7, input_shape=(48, 48, 1), crop: int):
    """ResNet-18 at half width (32-64-128-256, 2.8M parameters) on the central 44x44 of the face."""
    return build_resnet(num_classes=num_classes, input_shape=input_shape, widths=(32, 64, 128, 256),
                        blocks_per_stage=(2, 2, 2, 2), crop=crop, name="ferkit_resnet18_h")
