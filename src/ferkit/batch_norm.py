"""Batch-norm statistics measured afresh on clean faces: after training with augmentation (export
--recalibrate-bn), and for the moving average of the weights during training (--ema)."""

from __future__ import annotations

import numpy as np

from ferkit._keras import import_keras


def recalibrate_on_faces(model, faces: np.ndarray, input_size, channels: int, *, limit: int | None = None) -> int:
    """recalibrate_batch_norm on (N, H, W) uint8 faces (`limit` of them at most, picked at random with a
    fixed seed), resized to the model's `input_size` as at inference; returns how many layers were re-measured."""
    from ferkit.images import faces_to_batch, resized_faces

    order = np.random.default_rng(0).permutation(len(faces))[:limit]
    batches = (faces_to_batch(resized_faces(faces[order[i : i + 256]], tuple(input_size)), channels)
               for i in range(0, len(order), 256))
    return recalibrate_batch_norm(model, batches)


def recalibrate_batch_norm(model, batches) -> int:
    """Measure every trainable BatchNormalization layer's moving mean and variance afresh on `batches`
    (an iterable of model-input arrays of un-augmented faces), averaged over all their faces; returns
    how many layers were re-measured.

    Why: the statistics kept during training were measured on augmented faces (erased patches, zoom,
    rotation), unlike the faces seen at inference; on FER2013 PublicTest re-measuring them on the
    clean training faces added 0.6-1.3 points to two ferkit-net-s checkpoints. Dropout is off meanwhile,
    as at inference; frozen layers (a frozen pretrained backbone) keep their statistics.
    """
    keras = import_keras()
    everything = _all_layers(model)
    layers = [layer for layer in everything if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]
    if not layers:
        return 0
    dropouts = [layer for layer in everything if isinstance(layer, keras.layers.Dropout)]
    momenta, rates = [layer.momentum for layer in layers], [layer.rate for layer in dropouts]
    try:
        for layer in dropouts:
            layer.rate = 0.0
        seen = 0
        for part in batches:
            for layer in layers:  # moving = moving * m + part * (1 - m): this m keeps the mean over all faces
                layer.momentum = seen / (seen + len(part))
            model(part, training=True)
            seen += len(part)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        for layer, rate in zip(dropouts, rates):
            layer.rate = rate
    return len(layers)


def _all_layers(model) -> list:
    """Every layer of `model`, nested models' layers included."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if hasattr(layer, "layers"):
            found.extend(_all_layers(layer))
    return found
