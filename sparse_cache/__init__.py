"""sparse_cache: training-free visual token pruning for Hugging Face vision-language models.

    from sparse_cache import PrunableDynamicCache
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=256)

The public names are loaded on first use (PEP 562), so ``import sparse_cache`` and the command line's
``--help``, ``--version`` and argument errors do not import torch or transformers. The first access to any
public name imports the library and registers the torchvision-free processor class with ``AutoProcessor``
(as does importing :mod:`sparse_cache.testing` or :mod:`sparse_cache.toy`).
"""

import importlib
import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

#: public name -> (submodule, attribute); ``SUPPORTED_MODEL_CLASSES`` is computed on first access
_LAZY = {
    "PrunableDynamicCache": ("cache", "PrunableDynamicCache"),
    "Scorer": ("scorers", "Scorer"),
    "ScoringContext": ("scorers", "ScoringContext"),
    "SCORERS": ("scorers", "SCORERS"),
    "MIN_TRANSFORMERS": ("_compat", "MIN_TRANSFORMERS"),
    "MAX_TRANSFORMERS_EXCLUSIVE": ("_compat", "MAX_TRANSFORMERS_EXCLUSIVE"),
    "uninstall": ("hooks", "uninstall"),
    "enable": ("auto", "enable"),
    "disable": ("auto", "disable"),
    "is_enabled": ("auto", "is_enabled"),
    "pruning": ("auto", "pruning"),
}

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


def _load_library() -> None:
    """Import the library proper once (torch, transformers, the model families, the processor registration)."""
    importlib.import_module(f"{__name__}.processor")  # registers the torchvision-free processor class
    importlib.import_module(f"{__name__}.models")


def __getattr__(name: str):
    if name == "SUPPORTED_MODEL_CLASSES":
        _load_library()
        from .models import supported_model_classes

        value = supported_model_classes()
    elif name in _LAZY:
        _load_library()
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
