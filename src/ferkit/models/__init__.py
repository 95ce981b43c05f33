"""Models by name. Each family lives in its own file and registers itself on import."""

from ferkit.models import efficientnet_lite, ferkit_net, resnet, seed_cnn, transfer  # noqa: F401  (register their models)
from ferkit.models.registry import ModelSpec, check_weights, create_model, get_model_spec, list_models, register_model

__all__ = ["ModelSpec", "check_weights", "create_model", "get_model_spec", "list_models", "register_model"]
