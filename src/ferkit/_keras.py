"""Import Keras on demand, quietly: only training and .keras models need it, never ONNX inference."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys

from ferkit.errors import FerkitError


MISSING = "this needs the training extra (Keras and TensorFlow): pip install 'ferkit[train]'"


def check_keras_installed() -> None:
    """A FerkitError naming the training extra when Keras or its backend is not installed; cheap (imports nothing)."""
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if sys.modules.get("keras") is None and (importlib.util.find_spec("keras") is None or importlib.util.find_spec(backend) is None):
        raise FerkitError(MISSING)


def import_keras():
    if sys.modules.get("keras") is not None:
        return sys.modules["keras"]
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        with _stderr_silenced():
            import keras
    except ImportError as err:
        if isinstance(err.__context__, KeyboardInterrupt):  # Ctrl-C during the import, turned into this by a library
            raise KeyboardInterrupt from None
        backend = os.environ["KERAS_BACKEND"]
        if importlib.util.find_spec("keras") is None or importlib.util.find_spec(backend) is None:
            raise FerkitError(MISSING) from None
        raise FerkitError(f"Keras is installed but failed to import on the {backend} backend: {err}") from None
    if not os.environ.get("FERKIT_DEBUG"):
        # its Python-side warnings, such as retracing notes when one process trains several models (a study)
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
    return keras


@contextlib.contextmanager
def _stderr_silenced():
    """TensorFlow's C++ start-up notes (oneDNN, CPU features) ignore TF_CPP_MIN_LOG_LEVEL; drop them."""
    if os.environ.get("FERKIT_DEBUG"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
