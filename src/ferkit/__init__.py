"""ferkit: facial expression recognition you can run, train, evaluate and fine-tune offline.

    >>> import ferkit
    >>> faces = ferkit.analyze("group.jpg")           # every face, with the bundled model
    >>> ferkit.analyze("face.jpg", detector="none")   # a photo of one face, already cropped
    >>> results = ferkit.analyze_images(paths)        # many photos: one ImageResult each, as they come
    >>> faces[0].box, faces[0].emotion, faces[0].probabilities
    >>> run = ferkit.train(ferkit.TrainConfig(data="fer2013/train", val="fer2013/val", epochs=30))
    >>> report = ferkit.evaluate(run, ferkit.load_dataset("fer2013/val"))

Importing ferkit is light: Keras and TensorFlow load only when a model is trained or a .keras model runs.
"""

__version__ = "0.1.0"

from ferkit._lazy import submodules_on_first_use
from ferkit.config import TrainConfig
from ferkit.data import FaceDataset, load_dataset
from ferkit.errors import FerkitError
from ferkit.evaluation import EvaluationReport, evaluate
from ferkit.labels import EMOTIONS
from ferkit.models import create_model, list_models
from ferkit.draw import draw_faces
from ferkit.predict import analyze, analyze_image, analyze_images, predict_image
from ferkit.results import Face, ImageResult
from ferkit.runtime import load_classifier
from ferkit.training import train

__getattr__ = submodules_on_first_use(__name__)  # ferkit.video.analyze_video(...) after `import ferkit`


__all__ = [
    "EMOTIONS",
    "analyze",
    "analyze_image",
    "analyze_images",
    "draw_faces",
    "EvaluationReport",
    "Face",
    "FaceDataset",
    "FerkitError",
    "ImageResult",
    "TrainConfig",
    "create_model",
    "evaluate",
    "list_models",
    "load_classifier",
    "load_dataset",
    "predict_image",
    "train",
    "__version__",
]
