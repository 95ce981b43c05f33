"""A registry of model builders by name, like timm's: `create_model("seed-cnn")`, `list_models()`."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ferkit.errors import FerkitError, first_line
from ferkit.labels import EMOTIONS


@dataclass(frozen=True)
class ModelSpec:
    """What a model family needs to be built and fed: its builder and its default input."""

    name: str
    builder: Callable
    input_size: tuple[int, int]  # (height, width) in pixels
    channels: int  # the grayscale face is repeated to this many channels
    description: str
    pretrained: bool = False  # takes `weights=` ("imagenet", a file, or "none")
    crop: int | None = None  # the network sees the central crop x crop pixels of its input (random crops in training)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, *, input_size=(48, 48), channels: int = 3, description: str = "", pretrained: bool = False,
                   crop: int | None = None):
    """Decorator for a builder `fn(*, num_classes, input_shape) -> keras.Model`."""

    def decorate(builder: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        doc = description or next(iter((builder.__doc__ or "").strip().splitlines()), "")
        _REGISTRY[name] = ModelSpec(name, builder, tuple(input_size), channels, doc, pretrained, crop)
        return builder

    return decorate


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style `pattern`, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_model_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise FerkitError(f"unknown model {name!r} (available: {', '.join(list_models())})")
    return _REGISTRY[name]


def create_model(
    name: str, *, num_classes: int = len(EMOTIONS), input_size: tuple[int, int] | None = None, weights: str | None = None
):
    """Build the named model for `num_classes` outputs (softmax probabilities). `weights` is for
    pretrained backbones only: "imagenet" (their default), a local file, or "none"."""
    spec = get_model_spec(name)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise FerkitError(f"num_classes is a whole number of at least 1, not {num_classes!r}")
    height, width = input_size or spec.input_size
    if spec.crop and min(height, width) < spec.crop:
        raise FerkitError(f"{name} classifies {spec.crop}x{spec.crop} crops of its input: input_size must be at least that")
    kwargs = {}
    if weights is not None:
        check_weights(name, weights)
        kwargs["weights"] = weights
    if spec.crop:
        kwargs["crop"] = spec.crop  # declared once, in register_model: ten-crop scoring and training read it there too
    try:
        return spec.builder(num_classes=num_classes, input_shape=(height, width, spec.channels), **kwargs)
    except ValueError as err:
        if input_size is None:
            raise
        raise FerkitError(f"{name} cannot be built for {height}x{width} faces: {first_line(err)}") from None


def check_weights(name: str, weights: str | None) -> None:
    """A FerkitError, before anything is built or loaded, when `weights` cannot apply to the model `name`:
    it has no pretrained backbone, or the weights file is not there."""
    if weights is None:
        return
    if not get_model_spec(name).pretrained:
        raise FerkitError(f"{name} has no pretrained backbone; --weights applies to {', '.join(n for n in list_models() if _REGISTRY[n].pretrained)}")
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise FerkitError(f"no such weights file: {weights}")
