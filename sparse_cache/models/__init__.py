"""Model adapters, one file per VLM family; a family registers itself with ``@register``.

The engine asks :func:`adapter_for` for a model's adapter and never names a family.
"""

from __future__ import annotations

import torch

from .._compat import check_transformers_version
from .base import SUPPORTED_ATTENTION, VLMAdapter  # noqa: F401

_FAMILIES: list[type[VLMAdapter]] = []


def register(adapter_class: type[VLMAdapter]) -> type[VLMAdapter]:
    """Class decorator: make a family's adapter known to :func:`adapter_for`."""
    _FAMILIES.append(adapter_class)
    return adapter_class


def families() -> tuple[type[VLMAdapter], ...]:
    return tuple(_FAMILIES)


def supported_model_classes() -> tuple[str, ...]:
    return tuple(name for family in _FAMILIES for name in family.model_classes + family.base_model_classes)


def adapter_for(model: torch.nn.Module) -> VLMAdapter:
    """The adapter of ``model``'s family, or ``TypeError`` naming every supported class."""
    check_transformers_version()
    for family in _FAMILIES:
        if family.handles(model):
            return family(model)
    names = ", ".join(supported_model_classes())
    examples = ", ".join(f.example for f in _FAMILIES)
    raise TypeError(
        f"model: {type(model).__name__} is not supported yet; supported models are {names} (e.g. {examples})."
    )


# one line per family
from . import qwen2_vl  # noqa: E402,F401
from . import qwen2_5_vl  # noqa: E402,F401
from . import qwen3_vl  # noqa: E402,F401
from . import llava  # noqa: E402,F401
from . import llava_next  # noqa: E402,F401
from . import llava_onevision  # noqa: E402,F401
from . import video_llava  # noqa: E402,F401
