"""sparse_cache: training-free visual token pruning for Hugging Face vision-language models.

    from sparse_cache import PrunableDynamicCache
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=256)
"""

import logging

from ._compat import MAX_TRANSFORMERS_EXCLUSIVE, MIN_TRANSFORMERS
from .models import supported_model_classes
from . import processor as _processor  # noqa: F401  (registers the torchvision-free processor class)
from .auto import disable, enable, is_enabled, pruning
from .cache import PrunableDynamicCache
from .hooks import uninstall
from .scorers import SCORERS, Scorer, ScoringContext

__version__ = "0.1.0"

#: Model classes a :class:`PrunableDynamicCache` can be built for (every registered family).
SUPPORTED_MODEL_CLASSES = supported_model_classes()

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "PrunableDynamicCache",
    "Scorer",
    "ScoringContext",
    "SCORERS",
    "SUPPORTED_MODEL_CLASSES",
    "MIN_TRANSFORMERS",
    "MAX_TRANSFORMERS_EXCLUSIVE",
    "uninstall",
    "enable",
    "disable",
    "is_enabled",
    "pruning",
]
