"""SparseVLM+: rater attention with the position-only bias divided out, from the most attentive heads.

Based on "SparseVLM+: Visual Token Sparsification with Improved Text-Visual Attention Pattern" (the
SparseVLM authors, Dec 2025), restated in ``../../docs/methods.md`` section 6:

(a) gravity correction: RoPE alone makes a query favour some key positions (nearby ones, for
    M-RoPE models the image rows closest to the text). The attention that all-ones queries and keys would
    get after RoPE at the same (3-D M-RoPE) positions measures that bias; the raters' attention is
    divided by it;
(b) head selection: only the half of the query heads with the largest rater-to-visual attention mass
    is averaged;
(c) original position ids are kept (this library always keeps them), no recycling.

The raters are SparseVLM's. In a later turn of a conversation, the bias is normalised over that turn's
tokens only (the RoPE tables of earlier turns are not kept).
"""

from __future__ import annotations

import torch

from .._compat import rotate_half
from .base import Scorer, ScoringContext
from .sparsevlm import raters_of_row


def position_bias(
    cos_q: torch.Tensor, sin_q: torch.Tensor, cos_k: torch.Tensor, sin_k: torch.Tensor, scaling: float,
    allowed: torch.Tensor,
) -> torch.Tensor:
    """``(R, K)`` attention of all-ones queries over all-ones keys after RoPE (float32).

    Args:
        cos_q, sin_q: ``(R, d)`` RoPE tables at the query positions; cos_k, sin_k: ``(K, d)`` at the keys'.
        scaling: the attention's ``1/sqrt(d)``; allowed: ``(R, K)`` bool causal/padding mask.
    """
    ones_q = torch.ones(cos_q.shape, dtype=torch.float32, device=cos_q.device)
    ones_k = torch.ones(cos_k.shape, dtype=torch.float32, device=cos_k.device)
    q = ones_q * cos_q.float() + rotate_half(ones_q) * sin_q.float()
    k = ones_k * cos_k.float() + rotate_half(ones_k) * sin_k.float()
    logits = (q @ k.T) * scaling
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)


class SparseVLMPlusScorer(Scorer):
    """SparseVLM raters, gravity-corrected attention, top half of the heads."""

    name = "sparsevlm_plus"
    default_layer = 2
    provides_rater_attention = True
    score_mass = True  # attention divided by a positive position bias: non-negative (sparse_cache.budget)

    def score(self, context: ScoringContext) -> list[torch.Tensor | None]:
        scores = []
        for row in range(context.batch_size):
            visual = context.visual_positions[row]
            if visual.numel() == 0 or context.text_positions[row].numel() == 0:
                scores.append(None)
                continue
            raters = raters_of_row(context, row)
            probs = context.attention_to_visual(row, raters)  # (H, R, N_v)
            cos, sin = context.cos[row], context.sin[row]
            device = cos.device
            raters_d, visual_d = raters.to(device), visual.to(device)
            columns = torch.arange(cos.shape[0], device=device)
            allowed = (columns[None, :] <= raters_d[:, None]) & context.token_valid[row].to(device)[None, :]
            bias = position_bias(cos[raters_d], sin[raters_d], cos, sin, context.attn_module.scaling, allowed)
            corrected = probs / bias[:, visual_d].to(probs.device).clamp_min(torch.finfo(torch.float32).tiny)
            mass = probs.sum(dim=(1, 2))
            heads = torch.topk(mass, max(1, probs.shape[0] // 2)).indices
            context.extras.setdefault("rater_attention", {})[row] = probs.mean(dim=0)
            scores.append(corrected[heads].mean(dim=(0, 1)))
        return scores
