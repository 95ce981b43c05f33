"""Plain result types shared by the Python API and the CLI.

Boxes are `(x, y, width, height)` in pixels of the upright (EXIF-rotated) original image, origin top-left.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Face:
    box: tuple[int, int, int, int]  # (x, y, width, height), pixels of the upright original
    emotion: str  # the most probable class
    score: float  # its probability
    probabilities: dict[str, float]  # every class, in the model's class order

    def to_dict(self) -> dict:
        return {
            "box": list(self.box),
            "emotion": self.emotion,
            "score": round(self.score, 6),
            "probabilities": {k: round(v, 6) for k, v in self.probabilities.items()},
        }


@dataclass
class ImageResult:
    source: str  # path, or "<array>"
    image_size: tuple[int, int]  # (width, height) of the upright image
    faces: list[Face] = field(default_factory=list)
    model: str = ""
    model_version: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)  # per stage: decode, classify, ...

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "image_size": list(self.image_size),
            "model": self.model,
            "model_version": self.model_version,
            "faces": [face.to_dict() for face in self.faces],
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
        }

    def summary(self) -> str:
        if not self.faces:
            return f"{self.source}: no face"
        return "; ".join(f"{self.source}: {f.emotion} ({f.score:.0%})" for f in self.faces)
