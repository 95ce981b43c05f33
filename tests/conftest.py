"""Shared fixtures: an isolated cache, small generated face datasets a model can actually learn, and
small real photos with annotated faces (tests/data)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ferkit.labels import EMOTIONS

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FER2013 = SHARED / "data" / "fer2013"
REAL_PHOTOS = Path(__file__).resolve().parent / "data"  # small real photos with hand-drawn face boxes


def real_photo_boxes() -> dict[Path, list[tuple[int, int, int, int]]]:
    """Each photo of tests/data/boxes.json with its annotated face boxes."""
    images = json.loads((REAL_PHOTOS / "boxes.json").read_text())["images"]
    return {(REAL_PHOTOS / name).resolve(): [tuple(box) for box in boxes] for name, boxes in images.items()}


def smiling_real_faces() -> list[Path]:
    return [REAL_PHOTOS / name for name in json.loads((REAL_PHOTOS / "boxes.json").read_text())["smiling"]]


@pytest.fixture(autouse=True)
def ferkit_logger_restored():
    """The CLI points the "ferkit" logger at stderr and stops it propagating; undo that after each test,
    so that tests run later still see its records (pytest's caplog listens at the root)."""
    log = logging.getLogger("ferkit")
    saved = (log.handlers[:], log.level, log.propagate)
    yield
    log.handlers[:], log.level, log.propagate = saved


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own dataset cache, so no test sees another's (or the user's) cache."""
    monkeypatch.setenv("FERKIT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


def one_crop_per_face_model(folder: Path) -> Path:
    """A copy of the default model in `folder` that classifies one crop of each face found in a photo,
    as a face photo without detection is classified (no extra margins)."""
    import dataclasses
    import shutil

    from ferkit.export import _set_metadata
    from ferkit.runtime import default_model_path, read_metadata

    copy = folder / "one-crop-per-face.onnx"
    shutil.copy(default_model_path(), copy)
    _set_metadata(copy, dataclasses.replace(read_metadata(copy), extra_margins=[]))
    return copy


def pattern_face(label: int, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """A noisy gray image whose class is written as a bright horizontal band at a class-specific row."""
    image = rng.normal(90, 25, (size, size))
    band = size // len(EMOTIONS)
    image[label * band : (label + 1) * band, :] += 120
    return np.clip(image, 0, 255).astype(np.uint8)


def write_pattern_dataset(root: Path, per_class: int, *, seed: int = 0, folder_names=None, suffix=".png") -> Path:
    rng = np.random.default_rng(seed)
    for label, name in enumerate(folder_names or EMOTIONS):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(pattern_face(label, rng)).save(folder / f"{name}_{i}{suffix}")
    return root


@pytest.fixture(scope="session")
def pattern_data(tmp_path_factory) -> Path:
    """train/ and val/ folders of generated, learnable faces (20 and 8 per class)."""
    root = tmp_path_factory.mktemp("pattern")
    write_pattern_dataset(root / "train", 20, seed=1)
    write_pattern_dataset(root / "val", 8, seed=2)
    return root


@pytest.fixture(scope="session")
def trained_run(pattern_data, tmp_path_factory) -> Path:
    """A seed-cnn run trained for a few epochs on the pattern data (shared by read-only tests)."""
    from ferkit.config import TrainConfig
    from ferkit.training import train

    out = tmp_path_factory.mktemp("runs") / "pattern"
    config = TrainConfig(data=str(pattern_data / "train"), val=str(pattern_data / "val"), epochs=8, out=str(out))
    return train(config, verbose=0)


def needs_fer2013():
    return pytest.mark.skipif(not FER2013.is_dir(), reason=f"the FER2013 folders are not at {FER2013}")
