"""Spare capacity after a compacted layer's keys and values: a decode step writes in place, O(1).

transformers' ``DynamicLayer.update`` concatenates every step (``torch.cat([keys, new])``): a copy of the whole
layer per step, O(length). After compaction :class:`~sparse_cache.PrunableDynamicCache` stores each layer's
entries at the start of a buffer with free slots after them (:func:`allocate`) and hands the layer a view of the
used part; :func:`write` puts a step's keys/values into the next free slots and moves the view on. When the
buffer is full it is regrown with ``max(MIN_SPARE, used // GROWTH)`` free slots (amortized O(1) per step, at
most 1/GROWTH of the layer plus ``MIN_SPARE`` entries unused).

Anything else that replaces a layer's tensors (beam reordering, batch selection, an offloaded copy, a later
compaction) makes them stop being a view of the buffer: :func:`write` then declines and the layer goes back to
transformers' own update for the rest of the conversation (its buffer is dropped and none is made again).
``crop`` slices the view, which stays valid: the next write overwrites the cropped slots, as ``StaticLayer``
does. A layer that was never compacted (``keep_ratio=1.0``, a text-only prompt, an auto budget that kept
everything) is moved into a buffer at its first continued write (:func:`grow`: the one copy transformers'
``torch.cat`` would make anyway), so its later decode steps are O(1) too; its logits stay bit-identical to
``DynamicCache``'s (tests/test_core.py). A plain ``DynamicCache`` (a call without the library's cache) is never
touched.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

#: free slots at least, after the used part of a compacted layer's buffer
MIN_SPARE = 256
#: regrown buffers get ``used // GROWTH`` free slots when that is more than MIN_SPARE
GROWTH = 8


def allocate(entries: torch.Tensor, free: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(view, buffer)``: ``entries`` ``(B, H, N, D)`` copied to the start of a buffer with free slots after them."""
    b, h, n, d = entries.shape
    free = max(MIN_SPARE, n // GROWTH) if free is None else free
    buffer = entries.new_empty(b, h, n + free, d)
    buffer[:, :, :n].copy_(entries)
    return buffer[:, :, :n], buffer


def grow(layer, key_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Move a filled, uncompacted layer's keys/values into buffers with free slots for ``key_states`` and more
    (one copy, as the ``torch.cat`` of transformers' update would make); return the buffers, or ``None`` (the
    layer is left as it is) when it is not a plain ``DynamicLayer`` holding ``(B, H, N, D)`` entries that
    ``key_states`` continues."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if type(layer) is not DynamicLayer or keys is None or values is None or keys.ndim != 4 or keys.numel() == 0:
        return None  # sliding-window or quantized layers keep transformers' own update
    if key_states.shape[0] != keys.shape[0] or key_states.dtype != keys.dtype or key_states.device != keys.device:
        return None
    kbuf, vbuf = _regrown(keys, values, key_states.shape[2])
    layer.keys, layer.values = kbuf[:, :, : keys.shape[2]], vbuf[:, :, : values.shape[2]]
    return kbuf, vbuf


def _regrown(keys: torch.Tensor, values: torch.Tensor, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Buffers holding ``keys``/``values`` with room for ``new`` entries and the growth policy's free slots."""
    used = keys.shape[2]
    _, kbuf = allocate(keys, max(MIN_SPARE, (used + new) // GROWTH) + new)
    _, vbuf = allocate(values, kbuf.shape[2] - used)
    return kbuf, vbuf


def _is_view_of(tensor: torch.Tensor, buffer: torch.Tensor) -> bool:
    return (
        tensor.data_ptr() == buffer.data_ptr()
        and tensor.shape[:2] == buffer.shape[:2]
        and tensor.shape[3] == buffer.shape[3]
        and tensor.stride() == buffer.stride()
        and tensor.dtype == buffer.dtype
        and tensor.device == buffer.device
    )


def write(layer, buffers: tuple[torch.Tensor, torch.Tensor], key_states: torch.Tensor, value_states: torch.Tensor):
    """Append ``key_states``/``value_states`` to ``layer`` inside ``buffers`` (regrown if full); return
    ``(keys, values, buffers)``, or ``None`` when the layer's tensors are no longer views of the buffers."""
    kbuf, vbuf = buffers
    keys, values = layer.keys, layer.values
    if keys is None or not (_is_view_of(keys, kbuf) and _is_view_of(values, vbuf)):
        return None
    if key_states.shape[0] != kbuf.shape[0] or key_states.dtype != kbuf.dtype:
        return None
    used, new = keys.shape[2], key_states.shape[2]
    if used + new > kbuf.shape[2]:
        kbuf, vbuf = _regrown(keys, values, new)
    kbuf[:, :, used : used + new].copy_(key_states)
    vbuf[:, :, used : used + new].copy_(value_states)
    layer.keys = kbuf[:, :, : used + new]
    layer.values = vbuf[:, :, : used + new]
    return layer.keys, layer.values, (kbuf, vbuf)
