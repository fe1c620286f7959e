"""DART: keep the visual tokens that duplicate a few pivot tokens the least.

Based on "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More"
(Wen et al., 2025, DART), restated in ``../../docs/methods.md``. At decoder layer ``K`` (2 by default):

1. pivots: per image (or video), the ``num_visual_pivots`` visual tokens with the largest L1 norm of
   their keys at layer ``K`` (all heads), plus the row's ``num_text_pivots`` text tokens (after the last
   visual token) with the largest key norm;
2. for each pivot, its least cosine-similar visual tokens are kept, the budget shared evenly between
   pivots. Similarity is taken on the layer's attention input (the RMS-normed hidden states).

Scores encode a priority order, since one score vector serves every budget: the image's visual pivots
first (by key norm), then every token in the order of the first ``(round m, pivot p)`` slot at which
pivot ``p``'s ``m``-th least similar token is that token. The tokens reached within the first ``m``
rounds, the pivots plus the union of every pivot's ``m`` least similar tokens (DART's per-pivot
selection with ``m`` tokens per pivot), rank before all others.
"""

from __future__ import annotations

import torch

from .base import Scorer, ScoringContext
from .divprune import order_to_scores, visual_block_ranges


def duplication_order(
    features: torch.Tensor, pivot_features: torch.Tensor, visual_pivots: torch.Tensor
) -> torch.Tensor:
    """Priority order of one image's tokens: visual pivots, then the round-robin of least-similar picks.

    Args:
        features: ``(n, D)`` the image's visual tokens.
        pivot_features: ``(P, D)`` the pivots (visual and text), in pivot order.
        visual_pivots: indices into ``features`` of the visual pivots, first in the order.
    """
    n = features.shape[0]
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    pivot_unit = torch.nn.functional.normalize(pivot_features.float(), dim=-1)
    num_pivots = pivot_unit.shape[0]
    if num_pivots == 0:
        return torch.arange(n, device=features.device)
    similarity = unit @ pivot_unit.T  # (n, P)
    ranks = torch.empty_like(similarity, dtype=torch.long)
    ascending = torch.argsort(similarity, dim=0, stable=True)  # least similar first, ties to the earlier
    ranks.scatter_(0, ascending, torch.arange(n, device=features.device)[:, None].expand(n, num_pivots).contiguous())
    slot = ranks * num_pivots + torch.arange(num_pivots, device=features.device)[None, :]  # (round, pivot)
    key = slot.min(dim=1).values
    key[visual_pivots] = -visual_pivots.numel() + torch.arange(visual_pivots.numel(), device=features.device)
    return torch.argsort(key, stable=True)


class DartScorer(Scorer):
    """Duplication-aware order per image: pivots by key L1 norm at layer ``K``, least-similar tokens next.

    Args:
        num_visual_pivots: visual pivots per image or video (default 4).
        num_text_pivots: text pivots per row, from the text after the last visual token (default 4).
    """

    name = "dart"
    default_layer = 2

    def __init__(self, num_visual_pivots: int = 4, num_text_pivots: int = 4):
        for arg, value in (("num_visual_pivots", num_visual_pivots), ("num_text_pivots", num_text_pivots)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{arg}: expected an int >= 0, got {value!r}")
        if num_visual_pivots + num_text_pivots == 0:
            raise ValueError("num_visual_pivots/num_text_pivots: at least one pivot is needed, got 0 and 0")
        self.num_visual_pivots = num_visual_pivots
        self.num_text_pivots = num_text_pivots

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_visual_pivots={self.num_visual_pivots}, "
                f"num_text_pivots={self.num_text_pivots})")

    def score(self, context: ScoringContext) -> list[torch.Tensor]:
        if context.keys is None:
            raise RuntimeError("dart needs a scoring layer (its keys and hidden states); got none")
        scores = []
        for row in range(context.batch_size):
            visual = context.visual_positions[row]
            text = context.text_positions[row]
            hidden = context.hidden_states[row]
            device = hidden.device
            row_scores = torch.zeros(visual.numel(), dtype=torch.float32, device=device)
            if visual.numel() == 0:
                scores.append(row_scores)
                continue
            keys = context.keys[row]  # (H_kv, P + S, d)
            # L1 norm of every key column (over every key head, this rank's under tensor parallelism: summed)
            key_norm = context.sum_over_key_heads(keys.float().abs().sum(dim=(0, 2))).to(device)
            columns = context.past_length + torch.arange(hidden.shape[0], device=device)
            norm = key_norm[columns]  # (S,) this forward's tokens
            text = text.to(device)
            text_pivots = text[_top(norm[text], self.num_text_pivots)]
            for start, end in visual_block_ranges(context, row):
                block = visual[start:end].to(device)
                visual_pivots = _top(norm[block], self.num_visual_pivots)
                pivots = torch.cat([block[visual_pivots], text_pivots])
                order = duplication_order(hidden[block], hidden[pivots], visual_pivots)
                row_scores[start:end] = order_to_scores(order, end - start)
            scores.append(row_scores)
        return scores


def _top(values: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest ``values``, largest first, ties to the earlier."""
    order = torch.argsort(values.float(), descending=True, stable=True)
    return order[: min(count, values.numel())]
