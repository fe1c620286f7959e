"""Prune inside code you do not control (``transformers.pipeline``, evaluation harnesses).

A :class:`~sparse_cache.PrunableDynamicCache` is single-use, so something must make one per call:
:func:`enable` wraps ``model.generate`` so that every call without an explicit cache (``cache=`` or
``past_key_values=``) gets a fresh pruning cache; :func:`disable` removes the wrapper, and the hooks go as
soon as no live pruning cache needs them (a conversation started before ``disable()`` stays exact)::

    pipe = transformers.pipeline("image-text-to-text", model=model, processor=processor)
    sparse_cache.enable(model, keep_ratio=0.25)
    pipe(text=messages, max_new_tokens=64)      # every generate prunes
    sparse_cache.disable(model)                 # back to plain transformers

or, scoped: ``with sparse_cache.pruning(model, keep_ratio=0.25): ...``.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

from . import hooks
from ._compat import CACHE_KWARG, CACHE_KWARGS
from .cache import PrunableDynamicCache

logger = logging.getLogger(__name__)

_ORIGINAL_GENERATE_ATTR = "_sparse_cache_original_generate"


def enable(model: torch.nn.Module, keep_ratio: float | None = None, keep_tokens: int | None = None, **cache_kwargs):
    """Make every ``model.generate`` call without its own cache prune visual tokens.

    Args:
        model: a supported model (see :class:`~sparse_cache.PrunableDynamicCache`).
        keep_ratio, keep_tokens, **cache_kwargs: passed to a new ``PrunableDynamicCache`` per call;
            validated now, so a bad value fails here and not inside a pipeline.
    """
    probe = PrunableDynamicCache(model, keep_ratio=keep_ratio, keep_tokens=keep_tokens, **cache_kwargs)  # validates
    hooks.hold_for_enable(probe._adapter)  # before the probe goes, so the hooks are not removed and re-installed
    del probe
    if hasattr(model, _ORIGINAL_GENERATE_ATTR):
        disable_generate_wrapper(model)
    original = model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        has_cache = any(kwargs.get(name) is not None for name in CACHE_KWARGS)
        if not has_cache and kwargs.get("use_cache", True) is not False:
            kwargs[CACHE_KWARG] = PrunableDynamicCache(
                model, keep_ratio=keep_ratio, keep_tokens=keep_tokens, **cache_kwargs
            )
        return original(*args, **kwargs)

    setattr(model, _ORIGINAL_GENERATE_ATTR, original)
    model.generate = generate
    logger.info("sparse_cache: pruning enabled on %s (keep_ratio=%s, keep_tokens=%s)",
                type(model).__name__, keep_ratio, keep_tokens)
    return model


def disable_generate_wrapper(model: torch.nn.Module) -> None:
    if hasattr(model, _ORIGINAL_GENERATE_ATTR):
        delattr(model, _ORIGINAL_GENERATE_ATTR)
        if "generate" in vars(model):
            del model.generate


def disable(model: torch.nn.Module) -> None:
    """Undo :func:`enable`: later ``generate`` calls are plain transformers again.

    The hooks are removed now if no live ``PrunableDynamicCache`` needs them, else when the last one is
    collected: a conversation started before ``disable()`` continues exactly (its cache keeps the hooks).
    """
    disable_generate_wrapper(model)
    hooks.release_enable(model)


def is_enabled(model: torch.nn.Module) -> bool:
    return hasattr(model, _ORIGINAL_GENERATE_ATTR)


@contextlib.contextmanager
def pruning(model: torch.nn.Module, keep_ratio: float | None = None, keep_tokens: int | None = None, **cache_kwargs):
    """Context manager form of :func:`enable` / :func:`disable`."""
    enable(model, keep_ratio=keep_ratio, keep_tokens=keep_tokens, **cache_kwargs)
    try:
        yield model
    finally:
        disable(model)
