"""Hooks that let a :class:`~sparse_cache.PrunableDynamicCache` see what ``generate`` hides from a cache.

``generate`` never hands ``input_ids`` to the decoder layers, and a cache's ``update`` never sees the
queries. So a few forward hooks are installed on the model while a pruning cache (or :func:`~sparse_cache.enable`)
needs them:

- the VLM (pre): captures ``input_ids`` (where the visual tokens are) and grids, and hands
  the model the positions of a call without ``position_ids`` from the conversation's own M-RoPE offsets;
- the text decoder (pre): captures the input embeddings, and hands the model a 2-D mask in the
  physical layout of a compacted cache; (post): selects and compacts right after the forward, and checks
  that everything that had to happen did;
- every decoder layer's attention (post): gives the scoring layer's inputs to the scorer;
- every decoder layer (pre/post), in-prefill mode: cuts the pruning layer's output to the kept tokens
  and hands the later layers the matching mask and RoPE tables;
- the top-level model (pre/post): splits a first forward that carries draft tokens after the prompt
  (assisted decoding) into the prompt's prefill, pruned, and the drafts, verified on the pruned cache;
- ``prepare_inputs_for_generation`` (wrapped): sees the full ``input_ids`` of a ``generate`` call, to
  refuse a cache reused for an unrelated conversation;
- ``_prepare_position_ids_for_generation`` (wrapped): positions of a ``generate`` call from the cache's own
  offsets, never from the model's shared ``rope_deltas``.

Each hook returns at once unless the call carries a ``PrunableDynamicCache`` (under ``cache=`` or
``past_key_values=``: transformers 5.24 renamed the keyword, users still write the old one): all state
lives in that cache object, so a call without one behaves exactly as if the library were absent, and
calls on one model with different caches (threads) do not interfere.

Lifetime: the hooks are installed under a lock by the first holder (a live cache, or :func:`enable`) and
removed when the last one lets go (a cache when it is garbage-collected, :func:`enable` at :func:`disable`),
so a conversation started before ``disable()`` stays correct, and a model with no pruning cache alive
carries no hook at all.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref

import torch

from ._compat import CACHE_KWARGS, get_cache

logger = logging.getLogger(__name__)

_STATE_ATTR = "_sparse_cache_hooks"
_LOCK = threading.RLock()
#: test seam: called inside the locked install window, after the check and before registering (a race test
#: injects a delay here to prove two threads cannot both install).
_before_install = None


class _Installation:
    """The hooks and wrappers on one model, and who holds them."""

    def __init__(self, handles: list, wrapped: dict[str, object]):
        self.handles = handles
        self.wrapped = wrapped  # attribute name -> original bound method
        self.caches = 0  # live PrunableDynamicCache objects built for this model
        self.enabled = False  # sparse_cache.enable() holds them too

    @property
    def held(self) -> bool:
        return self.caches > 0 or self.enabled


_LIFECYCLE_ATTR = "sparse_cache_lifecycle"  # what a pruning cache carries; the hooks talk to it only


def _lifecycle(cache):
    return getattr(cache, _LIFECYCLE_ATTR, None) if cache is not None else None


def _cache_of(args, kwargs, names: tuple[str, ...] = ()):
    """The pruning lifecycle of the call's cache, or ``None`` for any other cache (the hooks' one gate)."""
    return _lifecycle(get_cache(args, kwargs, names))


def _vlm_pre_hook(module, args, kwargs):
    life = _cache_of(args, kwargs, getattr(module, "_sparse_cache_args", ()))
    if life is not None:
        return life.on_vlm_forward(module, args, kwargs)
    return None


def _top_pre_hook(module, args, kwargs):
    life = _cache_of(args, kwargs)
    if life is not None:
        return life.on_top_forward(module, args, kwargs)
    return None


def _top_post_hook(module, args, kwargs, output):
    life = _cache_of(args, kwargs)
    if life is not None:
        return life.on_top_forward_end(output)
    return None


def _text_pre_hook(module, args, kwargs):
    life = _cache_of(args, kwargs, getattr(module, "_sparse_cache_args", ()))
    if life is not None:
        return life.on_text_forward(args, kwargs)
    return None


def _text_post_hook(module, args, kwargs, output):
    life = _cache_of(args, kwargs, getattr(module, "_sparse_cache_args", ()))
    if life is not None:
        life.on_text_forward_end(failed=output is None)
    return None


def _layer_pre_hook(module, args, kwargs):
    life = _cache_of(args, kwargs)
    if life is not None:
        return life.on_layer_forward(module, args, kwargs)
    return None


def _layer_post_hook(module, args, kwargs, output):
    life = _cache_of(args, kwargs)
    if life is not None:
        return life.on_layer_forward_end(module, output)
    return None


def _attention_post_hook(module, args, kwargs, output):
    life = _cache_of(args, kwargs)
    if life is not None:
        life.on_attention(module, args, kwargs)
    return None


def _model_kwargs_cache(kwargs: dict):
    """The pruning cache among a ``generate`` call's model kwargs (under either keyword), else ``None``."""
    for name in CACHE_KWARGS:
        if _lifecycle(kwargs.get(name)) is not None:
            return kwargs[name]
    return None


def _wrap_prepare_inputs(top: torch.nn.Module):
    original = top.prepare_inputs_for_generation  # bound method of the class

    @functools.wraps(original)
    def prepare_inputs_for_generation(*args, **kwargs):
        cache = _model_kwargs_cache(kwargs)
        if cache is not None and kwargs.get("is_first_iteration"):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            _lifecycle(cache).on_generate_prefill(input_ids)
        return original(*args, **kwargs)

    return original, prepare_inputs_for_generation


def _wrap_prepare_positions(top: torch.nn.Module, adapter):
    """A pruned conversation's positions come from its own offsets, never from the model's ``rope_deltas``."""
    original = top._prepare_position_ids_for_generation

    @functools.wraps(original)
    def _prepare_position_ids_for_generation(inputs_tensor, model_kwargs):
        cache = _model_kwargs_cache(model_kwargs)
        if cache is not None:
            return adapter.generation_positions(inputs_tensor, model_kwargs, cache)
        return original(inputs_tensor, model_kwargs)

    return original, _prepare_position_ids_for_generation


def _register(adapter) -> _Installation:
    top = adapter.top
    adapter.vlm._sparse_cache_args = adapter.vlm_args
    adapter.text_model._sparse_cache_args = adapter.text_args
    handles = [
        adapter.vlm.register_forward_pre_hook(_vlm_pre_hook, with_kwargs=True),
        adapter.text_model.register_forward_pre_hook(_text_pre_hook, with_kwargs=True),
        # always_call: a forward that raises still ends the cache's pass (no half-state leaks to the next call)
        adapter.text_model.register_forward_hook(_text_post_hook, with_kwargs=True, always_call=True),
    ]
    if top is not adapter.vlm:
        handles.append(top.register_forward_pre_hook(_top_pre_hook, with_kwargs=True))
        handles.append(top.register_forward_hook(_top_post_hook, with_kwargs=True))
    for layer in adapter.layers:
        handles.append(layer.self_attn.register_forward_hook(_attention_post_hook, with_kwargs=True))
        handles.append(layer.register_forward_pre_hook(_layer_pre_hook, with_kwargs=True))
        handles.append(layer.register_forward_hook(_layer_post_hook, with_kwargs=True))
    wrapped = {}
    if hasattr(top, "prepare_inputs_for_generation"):
        original, wrapper = _wrap_prepare_inputs(top)
        wrapped["prepare_inputs_for_generation"] = original
        top.prepare_inputs_for_generation = wrapper
    if hasattr(top, "_prepare_position_ids_for_generation"):
        original, wrapper = _wrap_prepare_positions(top, adapter)
        wrapped["_prepare_position_ids_for_generation"] = original
        top._prepare_position_ids_for_generation = wrapper
    handles += adapter.install()  # family-specific extras (e.g. per-token features an in-prefill cut must follow)
    logger.debug("sparse_cache: installed %d hooks on %s", len(handles), type(top).__name__)
    return _Installation(handles, wrapped)


def _remove(top: torch.nn.Module, installation: _Installation) -> None:
    for handle in installation.handles:
        handle.remove()
    # the wrappers are instance attributes shadowing the class methods: deleting them restores the originals
    for name in installation.wrapped:
        if name in vars(top):
            delattr(top, name)
    for module in top.modules():
        if "_sparse_cache_args" in vars(module):
            del module._sparse_cache_args
    if _STATE_ATTR in vars(top):
        delattr(top, _STATE_ATTR)
    logger.debug("sparse_cache: removed %d hooks from %s", len(installation.handles), type(top).__name__)


def _acquire(adapter) -> _Installation:
    with _LOCK:
        installation = vars(adapter.top).get(_STATE_ATTR)
        if installation is None:
            if _before_install is not None:
                _before_install()
            installation = _register(adapter)
            setattr(adapter.top, _STATE_ATTR, installation)
        return installation


def _release_if_unheld(top: torch.nn.Module) -> None:
    installation = vars(top).get(_STATE_ATTR)
    if installation is not None and not installation.held:
        _remove(top, installation)


def _cache_released(top_ref: weakref.ref) -> None:
    top = top_ref()
    if top is None:
        return
    with _LOCK:
        installation = vars(top).get(_STATE_ATTR)
        if installation is not None:
            installation.caches -= 1
            _release_if_unheld(top)


def hold_for_cache(adapter, cache) -> None:
    """Install the hooks if needed and keep them while ``cache`` is alive (released when it is collected)."""
    with _LOCK:
        installation = _acquire(adapter)
        installation.caches += 1
    weakref.finalize(cache, _cache_released, weakref.ref(adapter.top))


def hold_for_enable(adapter) -> None:
    with _LOCK:
        _acquire(adapter).enabled = True


def release_enable(model: torch.nn.Module) -> None:
    """Let go of :func:`enable`'s hold; the hooks go when no live cache holds them either."""
    with _LOCK:
        installation = vars(model).get(_STATE_ATTR)
        if installation is not None:
            installation.enabled = False
            _release_if_unheld(model)


def live_caches(model: torch.nn.Module) -> int:
    """How many live ``PrunableDynamicCache`` objects hold the hooks on ``model``."""
    installation = vars(model).get(_STATE_ATTR)
    return 0 if installation is None else installation.caches


def is_installed(model: torch.nn.Module) -> bool:
    return vars(model).get(_STATE_ATTR) is not None


def uninstall(model: torch.nn.Module) -> None:
    """Remove every hook and wrapper from ``model`` now; a no-op if there are none.

    Refused (``RuntimeError``) while a live ``PrunableDynamicCache`` still needs them: a conversation in
    progress would otherwise continue without its mask translation. Delete those caches first (or let them
    go out of scope); hooks are removed automatically when the last one is collected.
    """
    with _LOCK:
        installation = vars(model).get(_STATE_ATTR)
        if installation is None:
            return
        if installation.caches:
            raise RuntimeError(
                f"model: {installation.caches} live PrunableDynamicCache object(s) still use the hooks on this "
                f"{type(model).__name__}; a conversation in progress would continue unpruned-and-wrong without "
                "them. Delete those caches (or let them go out of scope) first: the hooks are then removed "
                "automatically."
            )
        installation.enabled = False
        _remove(model, installation)
