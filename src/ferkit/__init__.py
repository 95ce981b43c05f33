"""ferkit: facial expression recognition you can run, train, evaluate and fine-tune offline."""

__version__ = "0.1.0"

from ferkit.errors import FerkitError
from ferkit.labels import EMOTIONS

__all__ = ["EMOTIONS", "FerkitError", "__version__"]
