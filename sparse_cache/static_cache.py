"""Fixed-shape decoding over a pruned cache, for ``torch.compile``.

After compaction a :class:`~sparse_cache.PrunableDynamicCache` holds ``P`` physical entries per row, known at the
end of the prefill. :func:`to_static` copies them into a :class:`PrunedStaticCache`: transformers' own
``StaticLayer`` buffers of ``P + max_new_tokens`` slots (the anchor is transformers' ``StaticCache`` path: each
decode step writes its key/value in place at ``cumulative_length``, a tensor, and attention reads the whole
buffer), so every decode step has the same shapes and a compiled step is traced once.

What differs from a plain ``StaticCache``:

- **positions stay logical**: decode step ``i`` gets the position of the ``i``-th new token of the full
  sequence (dropped tokens counted), from the conversation's own M-RoPE offsets (``cache.rope_deltas``),
  while its key/value go to physical slot ``P + i``;
- **the 2-D mask covers the physical buffer**: ``(B, P + max_new_tokens)``, the compacted prefix's validity
  (re-padding masked) then ones; the slots not written yet are masked by causality, the query offset being the
  physical write position (a tensor, as in ``StaticLayer``), so the mask tensor itself never changes.

Nothing of the library runs inside a decode step: the hooks see no pruning cache on these calls and return at
once (as for any other cache), so the step can be compiled with ``fullgraph=True``. Use::

    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    first = model.generate(**inputs, past_key_values=cache, max_new_tokens=1)    # pruned prefill, first token
    static = to_static(cache, max_new_tokens=64, attention_mask=inputs["attention_mask"])
    step = torch.compile(static.step_function(model), fullgraph=True)
    logits = static.decode(step, first[:, -1:], 64)                               # greedy; per-step logits

:func:`to_static` also takes a cache that was not compacted (``keep_ratio=1.0``, text-only prompts): the same
fixed-shape decode then runs over the full prompt, which is the unpruned baseline of ``sparse-cache bench``'s
compiled decode.
"""

from __future__ import annotations

import logging

import torch
from transformers.cache_utils import Cache, StaticLayer

from ._compat import CACHE_KWARG

logger = logging.getLogger(__name__)

__all__ = ["PrunedStaticCache", "to_static"]


class PrunedStaticCache(Cache):
    """Static (fixed-shape) storage of a pruned conversation, for compiled decoding (see :func:`to_static`).

    Attributes:
        physical_mask: ``(B, P + max_new_tokens)`` 2-D mask of the physical buffer, handed to every decode step.
        positions: ``(R, B, 1)`` logical positions of the next token to feed (R = 3 M-RoPE rows, or ``(B, 1)``
            for 1-D RoPE families); :meth:`advance` moves them on by one.
        logical_length: tokens seen, dropped ones included (a Python int, updated by :meth:`advance`).
    """

    is_compileable = True

    def __init__(self, layers: list[StaticLayer], physical_mask: torch.Tensor, positions: torch.Tensor,
                 logical_length: int, prefix_length: int):
        super().__init__(layers=layers)
        self.physical_mask = physical_mask
        self.positions = positions
        self.logical_length = logical_length
        self.prefix_length = prefix_length
        self.capacity = physical_mask.shape[1]

    # transformers' generic helpers read the written length as a tensor (``StaticLayer.cumulative_length``)
    def get_physical_length(self) -> int:
        return int(self.layers[0].cumulative_length)

    def get_logical_length(self) -> int:
        return self.logical_length

    def advance(self) -> None:
        """After a step: the next token's logical positions are one further (in place, no new tensor)."""
        self.positions.add_(1)
        self.logical_length += 1

    def step_function(self, model: torch.nn.Module):
        """``step(input_ids (B, 1), position_ids) -> logits (B, vocab)`` of one decode step writing into this cache;
        fixed shapes, no Python state read or changed inside: the function to hand ``torch.compile``."""
        mask = self.physical_mask
        cache = self

        def step(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
            out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=True,
                        logits_to_keep=1, **{CACHE_KWARG: cache})
            return out.logits[:, -1, :]

        return step

    def decode(self, step, tokens: torch.Tensor, steps: int, *, greedy: bool = True) -> list[torch.Tensor]:
        """Run ``steps`` decode steps from ``tokens`` ``(B, 1)`` (the last generated token, not yet fed) with
        ``step`` (from :meth:`step_function`, compiled or not); greedy: each step feeds the previous argmax.
        Returns the per-step logits ``(B, vocab)``."""
        free = self.capacity - self.get_physical_length()
        if not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps <= free:
            raise ValueError(f"steps: expected an int in 0..{free} (the buffer's free slots), got {steps!r}")
        if tokens.ndim != 2 or tokens.shape != (self.physical_mask.shape[0], 1):
            raise ValueError(
                f"tokens: expected shape ({self.physical_mask.shape[0]}, 1) (one token per row), got {tuple(tokens.shape)}"
            )
        logits = []
        with torch.no_grad():  # as in generate: the buffers never require grad (a compiled step guards on it)
            for _ in range(steps):
                out = step(row_major(tokens), self.positions.clone())
                logits.append(out.clone())
                self.advance()
                if greedy:
                    tokens = out.argmax(-1, keepdim=True)
        return logits


def row_major(tensor: torch.Tensor) -> torch.Tensor:
    """A copy with the default (row-major) strides: a compiled step guards on strides, and a ``(B, 1)`` slice of a
    longer sequence has the sequence's stride (``contiguous()`` keeps it, size-1 dimensions being contiguous)."""
    return torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device).copy_(tensor)


def to_static(cache, max_new_tokens: int, attention_mask: torch.Tensor | None = None) -> PrunedStaticCache:
    """A :class:`PrunedStaticCache` holding ``cache``'s entries plus ``max_new_tokens`` free slots.

    Args:
        cache: a :class:`~sparse_cache.PrunableDynamicCache` after its (pruned) prefill, e.g. a
            ``generate(..., max_new_tokens=1)``; compacted or not. It is left as it was (the entries are copied).
        max_new_tokens: decode steps the buffer has room for (slots after the stored entries).
        attention_mask: the caller's 2-D mask of the logical sequence so far (``(B, L)``, e.g. the prompt's),
            needed when rows are padded; ``None`` means every token is real.
    """
    from .cache import PrunableDynamicCache

    if not isinstance(cache, PrunableDynamicCache):
        raise TypeError(f"cache: expected a PrunableDynamicCache after its prefill, got {type(cache).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1 (free decode slots), got {max_new_tokens!r}")
    logical = cache.get_seq_length()
    if logical == 0:
        raise ValueError("cache: it is empty; run the prefill (e.g. generate(..., max_new_tokens=1)) before to_static")
    layers = [layer for layer in cache.layers if layer.is_initialized and layer.keys is not None]
    if len(layers) != len(cache.layers):
        raise ValueError("cache: some layers hold no entries; to_static needs every layer filled by the prefill")
    physical = cache.get_physical_length()
    batch = layers[0].keys.shape[0]
    device = layers[0].keys.device
    if attention_mask is not None:
        if not (isinstance(attention_mask, torch.Tensor) and attention_mask.shape == (batch, logical)):
            raise ValueError(
                f"attention_mask: expected the 2-D mask of the {logical} tokens seen, shape ({batch}, {logical}); "
                f"got {tuple(getattr(attention_mask, 'shape', ()))}"
            )
    physical_part = cache.physical_mask(attention_mask, batch, 0) if cache._prefix_mask is not None else attention_mask
    if physical_part is None:
        physical_part = torch.ones(batch, physical, dtype=torch.long, device=device)
    mask = torch.ones(batch, physical + max_new_tokens, dtype=torch.long, device=device)
    mask[:, :physical] = physical_part.to(device=device, dtype=torch.long)
    static_layers = []
    for layer in layers:
        static = StaticLayer(max_cache_len=physical + max_new_tokens)
        static.lazy_initialization(layer.keys, layer.values)
        static.keys[:, :, :physical] = layer.keys
        static.values[:, :, :physical] = layer.values
        static.cumulative_length.fill_(physical)
        static_layers.append(static)
    deltas = cache.rope_deltas
    if deltas is None:
        deltas = torch.zeros(batch, 1, dtype=torch.long, device=device)
    step_mask = None
    if attention_mask is not None:
        step_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
    positions = cache._adapter.continuation_positions(deltas, logical, 1, step_mask, device).clone()
    logger.debug("static decode cache: %d physical entries (logical %d) + %d free slots", physical, logical,
                 max_new_tokens)
    return PrunedStaticCache(static_layers, mask, positions.contiguous(), logical, physical)
