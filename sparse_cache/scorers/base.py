"""What a scorer sees, and the interface it implements.

A scorer is a small object with a ``name``, a ``default_layer`` (the decoder layer whose attention
inputs it reads, or ``None`` if it needs none) and ``score(context) -> list[Tensor]``: one float
score per visual token of each row, higher = keep. Selection (budgets, top-k per image), compaction
and decoding are shared; a new method is a new file in this folder plus one line in the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..attention import attention_rows


@dataclass
class ScoringContext:
    """Everything captured during one forward that holds visual tokens (a prefill or a new turn).

    Positions are indices into this forward's tokens (``0 .. S-1``); ``past_length`` physical cache
    entries precede them in the keys.

    Attributes:
        inputs_embeds: ``(B, S, D)`` decoder input embeddings, visual features already inserted.
        token_valid: ``(B, S)`` bool, False for padding tokens of this forward.
        visual_positions: per row, ascending positions of the visual tokens.
        text_positions: per row, the text tokens after the row's last visual token (padding
            excluded): the question, end-of-turn marker and assistant header.
        visual_blocks: per row, the index of the image or video each visual token belongs to
            (budgets apply per block; non-decreasing within a row).
        block_grids: ``(t, h, w)`` merged-token grid of each block index (row-major layout within a
            frame), or ``None`` if the grids were not given or did not match the placeholders.
        layer_idx: the decoder layer whose inputs were captured (``None`` if none was needed).
        hidden_states, cos, sin: ``(B, S, .)`` inputs of that layer's attention module.
        keys: ``(B, H_kv, P + S, d)`` that layer's keys after the update.
        key_valid: ``(B, P + S)`` bool, False for padding columns of the physical cache.
        past_length: ``P``, physical cache entries before this forward.
        generator: a seeded ``torch.Generator`` for stochastic scorers.
        extras: scratch space shared by the stages of one forward (e.g. SparseVLM's raters).
        original_positions: ``(B, S_cur)`` at a later stage of a progressive schedule, the position in
            this forward's tokens behind each current slot (``None`` at the first stage).
        tensor_parallel: under a tensor-parallel model, its group (``keys`` then hold this rank's heads only;
            :meth:`attention` gathers every head, :meth:`sum_over_key_heads` sums over all of them).
        keep_limit: per row, block index -> the most tokens of that block the selection keeps (``None``:
            unknown; set by the cache for fixed budgets).
    """

    inputs_embeds: torch.Tensor
    token_valid: torch.Tensor
    visual_positions: list[torch.Tensor]
    text_positions: list[torch.Tensor]
    visual_blocks: list[torch.Tensor] | None = None
    block_grids: list[tuple[int, int, int]] | None = None
    layer_idx: int | None = None
    attn_module: torch.nn.Module | None = None
    hidden_states: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    key_valid: torch.Tensor | None = None
    past_length: int = 0
    generator: torch.Generator | None = None
    extras: dict = field(default_factory=dict)
    original_positions: torch.Tensor | None = None
    tensor_parallel: Any = None  # a sparse_cache.distributed.TensorParallel under a tensor-parallel model
    #: per row, image/video index -> the most of its tokens this pass's selection can keep (a fixed keep_ratio or
    #: keep_tokens); ``None`` when the budget depends on the scores or is not known (adaptive, auto budgets, a
    #: scorer called directly). Scorers that build a greedy order may stop after that many picks: the top
    #: ``limit`` are then the same as the full order's, the rest rank below them.
    keep_limit: list[dict[int, int]] | None = None

    def block_limit(self, row: int, start: int) -> int | None:
        """``keep_limit`` of the image or video whose tokens start at index ``start`` of ``row``'s visual tokens
        (``None`` when unknown)."""
        if self.keep_limit is None or self.visual_blocks is None:
            return None
        return self.keep_limit[row].get(int(self.visual_blocks[row][start]))

    def sum_over_key_heads(self, partial: torch.Tensor) -> torch.Tensor:
        """A sum over the layer's key heads, from this process's sum over the heads it holds (``keys``)."""
        if self.tensor_parallel is None:
            return partial
        total = self.attn_module.config.num_key_value_heads
        return self.tensor_parallel.sum_heads(partial, self.keys.shape[1], total)

    @property
    def batch_size(self) -> int:
        return self.inputs_embeds.shape[0]

    def attention(self, row: int, query_positions: torch.Tensor) -> torch.Tensor:
        """``(H, R, P + S)`` float32 attention probabilities of ``query_positions`` of ``row``."""
        if self.keys is None:
            raise RuntimeError("this scorer asked for attention but no scoring layer was captured")
        query_positions = query_positions.to(self.hidden_states.device)
        probs = attention_rows(
            self.attn_module,
            self.hidden_states[row],
            self.cos[row],
            self.sin[row],
            self.keys[row],
            query_positions,
            query_positions + self.past_length,
            self.key_valid[row].to(self.keys.device),
        )
        if self.tensor_parallel is not None:  # every rank: all heads, in the single-process order
            probs = self.tensor_parallel.gather_heads(probs, self.attn_module.config.num_attention_heads)
        return probs

    def attention_to_visual(self, row: int, query_positions: torch.Tensor) -> torch.Tensor:
        """``(H, R, N_visual)`` attention of ``query_positions`` to the row's visual tokens."""
        probs = self.attention(row, query_positions)
        columns = self.visual_positions[row].to(probs.device) + self.past_length
        return probs.index_select(-1, columns)


class Scorer:
    """Base class: subclasses set ``name`` and ``default_layer`` and implement :meth:`score`."""

    name: str = ""
    #: decoder layer whose attention inputs the scorer reads; ``None`` = embeddings only.
    default_layer: int | None = None
    #: scores are a mass (non-negative attention shares), so ``coverage=`` budgets can normalize them per image
    score_mass: bool = False

    def score(self, context: ScoringContext) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
