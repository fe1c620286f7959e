"""Hooks that let a :class:`~sparse_cache.PrunableDynamicCache` see what ``generate`` hides from a cache.

``generate`` never hands ``input_ids`` to the decoder layers, and a cache's ``update`` never sees the
queries. So a few forward hooks are installed, once per model, on:

- the ``Qwen2_5_VLModel`` (pre): captures ``input_ids`` (where the visual tokens are) and grids;
- the text decoder (pre): captures the input embeddings, and hands the model a 2-D mask in the
  physical layout of a compacted cache; (post): selects and compacts right after the forward;
- every decoder layer's attention (post): gives the scoring layer's inputs to the scorer;
- every decoder layer (pre/post), in-prefill mode: cuts the pruning layer's output to the kept tokens
  and hands the later layers the matching mask and RoPE tables;
- the top-level model (pre/post): splits a first forward that carries draft tokens after the prompt
  (assisted decoding) into the prompt's prefill, pruned, and the drafts, verified on the pruned cache;
- ``prepare_inputs_for_generation`` (wrapped): sees the full ``input_ids`` of a ``generate`` call, to
  refuse a cache reused for an unrelated conversation.

Each hook returns at once unless the call's ``past_key_values`` is a ``PrunableDynamicCache``: all state
lives in that cache object, so a call without one behaves exactly as if the library were absent, and
calls on one model with different caches (threads) do not interfere. :func:`uninstall` removes them.
"""

from __future__ import annotations

import functools
import logging

import torch

from ._compat import TEXT_FORWARD_ARGS, VLM_FORWARD_ARGS, ModelAdapter, get_arg

logger = logging.getLogger(__name__)

_HANDLES_ATTR = "_sparse_cache_hook_handles"
_ORIGINAL_PREPARE_ATTR = "_sparse_cache_original_prepare"
_ORIGINAL_POSITIONS_ATTR = "_sparse_cache_original_positions"


def _prunable(cache) -> bool:
    from .cache import PrunableDynamicCache  # local import: cache.py imports this module

    return isinstance(cache, PrunableDynamicCache)


def _vlm_pre_hook(module, args, kwargs):
    cache = get_arg(args, kwargs, VLM_FORWARD_ARGS, "past_key_values")
    if _prunable(cache):
        cache._on_vlm_forward(module, args, kwargs)
    return None


def _top_pre_hook(module, args, kwargs):
    cache = kwargs.get("past_key_values")
    if _prunable(cache):
        return cache._on_top_forward(module, args, kwargs)
    return None


def _top_post_hook(module, args, kwargs, output):
    cache = kwargs.get("past_key_values")
    if _prunable(cache):
        return cache._on_top_forward_end(output)
    return None


def _text_pre_hook(module, args, kwargs):
    cache = get_arg(args, kwargs, TEXT_FORWARD_ARGS, "past_key_values")
    if _prunable(cache):
        return cache._on_text_forward(args, kwargs)
    return None


def _text_post_hook(module, args, kwargs, output):
    cache = get_arg(args, kwargs, TEXT_FORWARD_ARGS, "past_key_values")
    if _prunable(cache):
        cache._on_text_forward_end()
    return None


def _layer_pre_hook(module, args, kwargs):
    cache = kwargs.get("past_key_values")
    if _prunable(cache):
        return cache._on_layer_forward(module, args, kwargs)
    return None


def _layer_post_hook(module, args, kwargs, output):
    cache = kwargs.get("past_key_values")
    if _prunable(cache):
        return cache._on_layer_forward_end(module, output)
    return None


def _attention_post_hook(module, args, kwargs, output):
    cache = kwargs.get("past_key_values")
    if _prunable(cache):
        cache._on_attention(module, args, kwargs)
    return None


def _wrap_prepare_inputs(top: torch.nn.Module) -> None:
    original = top.prepare_inputs_for_generation  # bound method of the class

    @functools.wraps(original)
    def prepare_inputs_for_generation(*args, **kwargs):
        cache = kwargs.get("past_key_values")
        if _prunable(cache) and kwargs.get("is_first_iteration"):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            cache._on_generate_prefill(input_ids)
        return original(*args, **kwargs)

    setattr(top, _ORIGINAL_PREPARE_ATTR, original)
    top.prepare_inputs_for_generation = prepare_inputs_for_generation


def _wrap_prepare_positions(top: torch.nn.Module) -> None:
    """A continued conversation must use its own ``rope_deltas``, not the last call's on this model."""
    original = top._prepare_position_ids_for_generation

    @functools.wraps(original)
    def _prepare_position_ids_for_generation(inputs_tensor, model_kwargs):
        cache = model_kwargs.get("past_key_values")
        if _prunable(cache):
            cache._restore_rope_deltas()
        return original(inputs_tensor, model_kwargs)

    setattr(top, _ORIGINAL_POSITIONS_ATTR, original)
    top._prepare_position_ids_for_generation = _prepare_position_ids_for_generation


def install(adapter: ModelAdapter) -> None:
    """Install the hooks on ``adapter``'s model once (idempotent)."""
    top = adapter.top
    if getattr(top, _HANDLES_ATTR, None):
        return
    handles = [
        adapter.vlm.register_forward_pre_hook(_vlm_pre_hook, with_kwargs=True),
        adapter.text_model.register_forward_pre_hook(_text_pre_hook, with_kwargs=True),
        adapter.text_model.register_forward_hook(_text_post_hook, with_kwargs=True),
    ]
    if top is not adapter.vlm:
        handles.append(top.register_forward_pre_hook(_top_pre_hook, with_kwargs=True))
        handles.append(top.register_forward_hook(_top_post_hook, with_kwargs=True))
    for layer in adapter.layers:
        handles.append(layer.self_attn.register_forward_hook(_attention_post_hook, with_kwargs=True))
        handles.append(layer.register_forward_pre_hook(_layer_pre_hook, with_kwargs=True))
        handles.append(layer.register_forward_hook(_layer_post_hook, with_kwargs=True))
    if hasattr(top, "prepare_inputs_for_generation"):
        _wrap_prepare_inputs(top)
    if hasattr(top, "_prepare_position_ids_for_generation"):
        _wrap_prepare_positions(top)
    setattr(top, _HANDLES_ATTR, handles)
    logger.debug("sparse_cache: installed %d hooks on %s", len(handles), type(top).__name__)


def is_installed(model: torch.nn.Module) -> bool:
    return bool(getattr(model, _HANDLES_ATTR, None))


def uninstall(model: torch.nn.Module) -> None:
    """Remove every hook and wrapper :func:`install` added to ``model``; a no-op if there are none."""
    for handle in getattr(model, _HANDLES_ATTR, None) or []:
        handle.remove()
    if hasattr(model, _HANDLES_ATTR):
        delattr(model, _HANDLES_ATTR)
    # the wrappers are instance attributes shadowing the class methods: deleting them restores the originals
    for saved, name in (
        (_ORIGINAL_PREPARE_ATTR, "prepare_inputs_for_generation"),
        (_ORIGINAL_POSITIONS_ATTR, "_prepare_position_ids_for_generation"),
    ):
        if hasattr(model, saved):
            delattr(model, saved)
            if name in vars(model):
                delattr(model, name)
