"""Labelled face datasets: class folders or the Kaggle FER2013 CSV, decoded once and cached.

    >>> train = ferkit.data.load_dataset("fer2013/train")
    >>> train.images.shape, train.classes
    ((28709, 48, 48), ('angry', 'disgust', 'fear', 'happy', 'neutral', 'sad', 'surprise'))
"""

from ferkit._lazy import submodules_on_first_use
from ferkit.data.dataset import FaceDataset, split_dataset
from ferkit.data.fer2013_csv import load_fer2013_csv
from ferkit.data.folder import load_folder
from ferkit.data.load import load_dataset

__all__ = ["FaceDataset", "load_dataset", "load_folder", "load_fer2013_csv", "split_dataset"]


__getattr__ = submodules_on_first_use(__name__)  # ferkit.data.crops.crop_faces(...) after `import ferkit`
