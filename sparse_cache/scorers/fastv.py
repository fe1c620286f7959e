"""FastV: the last prompt token's attention to the visual tokens at a shallow layer.

Based on "An Image is Worth 1/2 Tokens After Layer 2" (Chen et al., ECCV 2024): attention of the last
token of the prompt to each visual token at layer K-1 (K = 2), averaged over heads. Text-guided
through one row only; a baseline for :mod:`sparsevlm`.
"""

from __future__ import annotations

import torch

from .base import Scorer, ScoringContext


class FastVScorer(Scorer):
    """Attention of the row's last valid token to each visual token, averaged over heads."""

    name = "fastv"
    default_layer = 1
    score_mass = True  # attention probabilities of the last prompt token (sparse_cache.budget)

    def score(self, context: ScoringContext) -> list[torch.Tensor | None]:
        scores = []
        for row in range(context.batch_size):
            visual = context.visual_positions[row]
            text = context.text_positions[row]
            if visual.numel() == 0 or text.numel() == 0:
                scores.append(None)
                continue
            probs = context.attention_to_visual(row, text[-1:])  # (H, 1, N_v)
            scores.append(probs.mean(dim=(0, 1)))
        return scores
