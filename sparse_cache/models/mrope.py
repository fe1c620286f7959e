"""Families with 3-D multimodal RoPE (M-RoPE) and per-sequence offsets (``rope_deltas``).

Such a model keeps the offsets of its last call on itself (``model.rope_deltas``) and reads them for calls
without ``position_ids`` and for a continued ``generate``: shared state that threads and interleaved
conversations overwrite. A pruned conversation never reads nor writes it: its offsets live in its cache,
derived from the positions its own forwards receive, and this adapter computes from them exactly what the
model would have computed from its attribute.
"""

from __future__ import annotations

import torch

from .._compat import CACHE_KWARGS
from .base import VLMAdapter, expand_rope_deltas


class MRopeAdapter(VLMAdapter):
    """Positions ``(3, B, S)`` (temporal, height, width), offsets ``(B, 1)`` as the model's ``get_rope_index``."""

    def position_rows(self, position_ids: torch.Tensor) -> torch.Tensor:
        """The 3 M-RoPE rows of a ``(4|3, B, S)`` tensor (the text row of a 4-row tensor dropped), the one row
        of a ``(1, B, S)`` tensor (a continued ``generate``), or a ``(B, S)`` tensor as one row."""
        if position_ids.ndim == 2:
            return position_ids[None]
        return position_ids[-3:] if position_ids.shape[0] >= 3 else position_ids

    def continuation_positions(self, deltas, past_logical: int, seq_len: int, attention_mask, device):
        """``(3, B, S)``: the text positions of :meth:`text_positions` on each M-RoPE row, what the model computes
        for a call without ``position_ids``, with the conversation's own offsets."""
        return self.text_positions(deltas, past_logical, seq_len, attention_mask, device).unsqueeze(0).expand(3, -1, -1)

    def prefill_positions(self, input_ids, kwargs: dict, attention_mask):
        """``(3, B, S)`` positions of a first forward without ``position_ids``, from the model's pure
        ``get_rope_index``; ``None`` where the model itself falls back to plain positions."""
        token_types = kwargs.get("mm_token_type_ids")
        grids = {keyword: kwargs.get(keyword) for _, keyword in self.grid_kwargs}
        if token_types is None or all(g is None for g in grids.values()):
            return None
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 else None
        extra = {k: kwargs[k] for k in ("second_per_grid_ts",) if kwargs.get(k) is not None}
        positions, _ = self.vlm.get_rope_index(
            input_ids, mm_token_type_ids=token_types, attention_mask=mask, **grids, **extra
        )
        return positions

    def generation_positions(self, inputs_tensor, model_kwargs: dict, cache):
        """The model's ``_prepare_position_ids_for_generation`` (transformers 5.24's, which also re-positions
        new images of a continued conversation), with a continued conversation's offsets from ``cache``."""
        from transformers.generation.utils import GenerationMixin

        text_positions = GenerationMixin._prepare_position_ids_for_generation(self.top, inputs_tensor, model_kwargs)
        past_length = cache.get_seq_length()
        token_types = model_kwargs.get("mm_token_type_ids")
        has_new_visual = token_types is not None and bool(token_types[:, past_length:].any())
        deltas = cache.rope_deltas
        if past_length != 0 and deltas is not None and not has_new_visual:
            return text_positions[None, ...] + expand_rope_deltas(deltas, text_positions.shape[0]).to(text_positions.device)
        if "input_ids" in model_kwargs and model_kwargs["input_ids"].shape[1] > 0:
            inputs_tensor = model_kwargs["input_ids"]
        is_input_ids = inputs_tensor.ndim == 2 and inputs_tensor.dtype in (torch.int, torch.long)
        has_grids = any(model_kwargs.get(keyword) is not None for _, keyword in self.grid_kwargs)
        if is_input_ids and token_types is not None and has_grids:
            rope_kwargs = {k: v for k, v in model_kwargs.items() if k not in ("input_ids",) + CACHE_KWARGS}
            vision_positions, _ = self.vlm.get_rope_index(inputs_tensor, **rope_kwargs)
        else:
            vision_positions = text_positions.unsqueeze(0).expand(3, -1, -1)
        return torch.cat([text_positions[None, ...], vision_positions], dim=0)

    def rope_tables(self, attn_module, cos: torch.Tensor, sin: torch.Tensor):
        """``(B, S, d)`` tables. Recent transformers hand attention the M-RoPE tables already recomposed per head
        dimension; older ones (5.14) hand the three ``(3, B, S, d)`` tables and recompose them inside the
        attention: do the same recomposition here."""
        if cos.ndim == 3:
            return cos, sin
        sections = list(attn_module.config.rope_parameters["mrope_section"]) * 2

        def recompose(table: torch.Tensor) -> torch.Tensor:
            return torch.cat([m[i % 3] for i, m in enumerate(table.split(sections, dim=-1))], dim=-1)

        return recompose(cos), recompose(sin)

    def grids_from_positions(self, position_ids, block_of: torch.Tensor, is_visual: torch.Tensor):
        """Merged ``(t, h, w)`` grid of every block, read from the M-RoPE positions; ``None`` if unusable.

        ``generate`` may encode the images before the prefill and call the model with ``mm_encoder_outputs`` and
        no grids; the positions still carry each block's extent.
        """
        if not isinstance(position_ids, torch.Tensor) or position_ids.ndim != 3 or position_ids.shape[0] not in (3, 4):
            return None
        rope = position_ids[-3:].to(block_of.device)  # (3, B, S): t, h, w
        if rope.shape[1:] != block_of.shape:
            return None
        grids = []
        for block in range(int(block_of.max()) + 1):
            member = (block_of == block) & is_visual
            count = int(member.sum())
            if count == 0:
                return None
            h_pos, w_pos = rope[1][member], rope[2][member]
            h = int(h_pos.max() - h_pos.min()) + 1
            w = int(w_pos.max() - w_pos.min()) + 1
            if count % (h * w):
                return None
            grids.append((count // (h * w), h, w))
        return grids
