"""Families whose language model uses plain 1-D RoPE (LLaVA and its successors: Llama, Mistral, Qwen2 backbones).

There are no ``rope_deltas``: a token's position is its index among the row's real tokens (``generate``: the
cumulative sum of the 2-D mask), or, for a forward called without ``position_ids``, ``get_seq_length()`` onward
(the decoder's own default). A pruning cache reports the *logical* length from ``get_seq_length()``, so both
stay those of the full sequence after compaction, and the kept tokens keep their original positions.

The engine still records a per-row offset (``cache.rope_deltas``: next position = real tokens seen + offset).
It is 0 for positions built by ``generate``; for a prefill called without ``position_ids`` on a left-padded
batch it is the row's padding (the decoder counted the pads), so that a hand-written decode loop without
``position_ids`` gets exactly the positions the decoder would have computed over a full cache.
"""

from __future__ import annotations

import torch

from .base import VLMAdapter


class Rope1DAdapter(VLMAdapter):
    """Positions ``(B, S)`` (or ``(1, S)``), one rotary row, offsets ``(B, 1)``."""

    grid_kwargs: tuple[tuple[str, str], ...] = ()

    def validate(self) -> None:
        super().validate()
        text = self.text_config
        # Mistral-style configs have no use_sliding_window switch: a set sliding_window means sliding masks
        if not hasattr(text, "use_sliding_window") and getattr(text, "sliding_window", None) is not None:
            raise ValueError(
                "model: sliding-window attention is not supported by PrunableDynamicCache (it assumes contiguous "
                f"storage); got text_config.sliding_window={text.sliding_window}. Load the model with "
                "text_config.sliding_window=None (as llava-hf/llava-v1.6-mistral-7b-hf ships)."
            )

    def position_rows(self, position_ids: torch.Tensor) -> torch.Tensor:
        """``(B, S)`` positions as given (one rotary row)."""
        return position_ids if position_ids.ndim == 2 else position_ids.reshape(-1, position_ids.shape[-1])

    def continuation_positions(self, deltas, past_logical: int, seq_len: int, attention_mask, device):
        """``(B, S)``: :meth:`text_positions` (``generate``'s mask count, or ``past_logical`` onward, plus the
        row's offset)."""
        return self.text_positions(deltas, past_logical, seq_len, attention_mask, device)

    def prefill_positions(self, input_ids, kwargs: dict, attention_mask):
        """``(B, S)`` positions the decoder computes itself on a first forward without ``position_ids``
        (``0..S-1``, pads counted), one row per batch row (in-prefill cuts gather the RoPE tables per row)."""
        batch, seq_len = input_ids.shape
        return torch.arange(seq_len, device=input_ids.device).unsqueeze(0).repeat(batch, 1)

    def generation_positions(self, inputs_tensor, model_kwargs: dict, cache):
        """transformers' own ``_prepare_position_ids_for_generation`` (the mask's cumulative sum, or the
        cache's logical length onward): it reads no shared state, so it is called as it is."""
        return type(self.top)._prepare_position_ids_for_generation(self.top, inputs_tensor, model_kwargs)

    # ------------------------------------------------------------------ blocks
    def block_counts(self, kwargs: dict) -> list[tuple[int, list[int] | None, list | None]]:
        """Per visual kind: ``(token id, tokens of each image/video in consumption order or None, grids or None)``."""
        return []

    def visual_blocks(self, input_ids: torch.Tensor, is_visual: torch.Tensor, kwargs: dict):
        """Blocks from each image's (video's) own token count, consumed in order over all rows as the model's
        ``masked_scatter`` does; contiguous runs of visual tokens when the counts are unknown or do not match."""
        block = torch.full_like(input_ids, -1)
        offset = 0
        grids: list | None = []
        consistent = True
        for token_id, counts, kind_grids in self.block_counts(kwargs):
            is_kind = (input_ids == token_id) & is_visual
            total = int(is_kind.sum())
            if total == 0:
                continue
            if not counts or sum(counts) != total:
                consistent = False
                break
            ends = torch.cumsum(torch.tensor(counts, device=input_ids.device), 0)
            rank = torch.cumsum(is_kind.flatten().long(), 0).view_as(input_ids) - 1
            ids = torch.searchsorted(ends, rank, right=True) + offset
            block = torch.where(is_kind, ids, block)
            offset += len(counts)
            if grids is not None and kind_grids is not None and len(kind_grids) == len(counts):
                grids += list(kind_grids)
            else:
                grids = None
        if consistent and bool((block[is_visual] >= 0).all()):
            return block, grids
        starts = is_visual.clone()
        starts[:, 1:] &= ~is_visual[:, :-1]
        runs = torch.cumsum(starts.flatten().long(), dim=0).view_as(input_ids) - 1
        return torch.where(is_visual, runs, torch.full_like(runs, -1)), None
