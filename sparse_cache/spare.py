"""Spare capacity after a compacted layer's keys and values: a decode step writes in place, O(1).

transformers' ``DynamicLayer.update`` concatenates every step (``torch.cat([keys, new])``): a copy of the whole
layer per step, O(length). After compaction :class:`~sparse_cache.PrunableDynamicCache` stores each layer's
entries at the start of a buffer with free slots after them (:func:`allocate`) and hands the layer a view of the
used part; :func:`write` puts a step's keys/values into the next free slots and moves the view on. When the
buffer is full it is regrown with ``max(MIN_SPARE, used // GROWTH)`` free slots (amortized O(1) per step, at
most 1/GROWTH of the layer plus ``MIN_SPARE`` entries unused).

Anything else that replaces a layer's tensors (beam reordering, batch selection, an offloaded copy, a later
compaction) makes them stop being a view of the buffer: :func:`write` then declines and the layer goes back to
transformers' own update (its buffer is dropped). ``crop`` slices the view, which stays valid: the next write
overwrites the cropped slots, as ``StaticLayer`` does. Caches that are never compacted (``keep_ratio=1.0``,
text-only prompts, plain transformers) never get a buffer, so they stay bit-identical to ``DynamicCache``.
"""

from __future__ import annotations

import torch

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
        _, kbuf = allocate(keys, max(MIN_SPARE, (used + new) // GROWTH) + new)
        _, vbuf = allocate(values, kbuf.shape[2] - used)
    kbuf[:, :, used : used + new].copy_(key_states)
    vbuf[:, :, used : used + new].copy_(value_states)
    layer.keys = kbuf[:, :, : used + new]
    layer.values = vbuf[:, :, : used + new]
    return layer.keys, layer.values, (kbuf, vbuf)
