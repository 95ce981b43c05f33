"""The reference CNN of ferkit's founding study (52.5% on FER2013's test split).

Rescaling(1/255) -> 3 x [Conv2D(32, 2x2, relu) -> MaxPool2D] -> Flatten -> Dense(512, relu)
-> Dense(7, softmax) on 48x48x3: 422,375 parameters.
"""

from __future__ import annotations

from ferkit._keras import import_keras
from ferkit.models.registry import register_model


@register_model("seed-cnn", input_size=(48, 48), channels=3)
def seed_cnn(*, num_classes: int = 7, input_shape=(48, 48, 3)):
    """The founding study's reference CNN: three 2x2 conv blocks of 32 filters and a 512-unit head."""
    keras = import_keras()
    layers = keras.layers
    blocks = []
    for _ in range(3):
        blocks += [layers.Conv2D(32, 2, activation="relu"), layers.MaxPooling2D()]
    return keras.Sequential(
        [
            keras.Input(input_shape),
            layers.Rescaling(1.0 / 255),
            *blocks,
            layers.Flatten(),
            layers.Dense(512, activation="relu"),
            layers.Dense(num_classes, activation="softmax", dtype="float32"),  # float32 under mixed precision too
        ],
        name="seed_cnn",
    )
