"""SparseVLM: text raters' attention to the visual tokens at a shallow decoder layer.

Based on "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference"
(Zhang et al., ICML 2025), sections 3.1-3.2, restated in ``../../docs/methods.md``.

1. Raters: of the text tokens after the last visual token, those whose relevance
   ``mean_over_visual(softmax(E_V E_T^T, axis=text))`` is strictly above the mean relevance. When
   none qualifies (a tiny prompt such as "Describe this image."), all of them rate: the authors'
   code has no such fallback and yields NaN scores.
2. Score of a visual token: the raters' attention to it at the scoring layer, averaged over heads
   and raters. With a progressive schedule (in-prefill mode) the same raters score the surviving
   tokens again at each pruning layer.
"""

from __future__ import annotations

import torch

from .base import Scorer, ScoringContext


def select_raters(visual_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Indices (into ``text_embeds``) of the text raters; all of them if none is above the mean.

    Args:
        visual_embeds: ``(N_v, D)`` decoder input embeddings of the visual tokens.
        text_embeds: ``(N_t, D)`` those of the candidate text tokens.
    """
    relevance = torch.softmax(visual_embeds.float() @ text_embeds.float().T, dim=-1).mean(dim=0)  # (N_t,)
    raters = torch.nonzero(relevance > relevance.mean(), as_tuple=False).flatten()
    if raters.numel() == 0:
        raters = torch.arange(text_embeds.shape[0], device=text_embeds.device)
    return raters


def raters_of_row(context: ScoringContext, row: int) -> torch.Tensor:
    """Positions (in the context's slots) of the row's text raters; chosen once per forward.

    At the first stage they are selected from the decoder input embeddings; at a later stage of a
    progressive schedule the same tokens rate again, wherever they now sit.
    """
    visual = context.visual_positions[row]
    text = context.text_positions[row]
    chosen = context.extras.setdefault("raters", {})
    if context.original_positions is None or row not in chosen:
        embeds = context.inputs_embeds[row]
        raters = text[select_raters(embeds[visual], embeds[text]).to(text.device)]
        chosen[row] = raters  # positions in this forward's tokens (first stage)
        return raters
    current = context.original_positions[row].to(text.device)
    is_rater = torch.isin(current, chosen[row]) & context.token_valid[row].to(text.device)
    return torch.nonzero(is_rater, as_tuple=False).flatten()


class SparseVLMScorer(Scorer):
    """Text-guided scores: attention from the selected text raters to each visual token."""

    name = "sparsevlm"
    default_layer = 2
    #: stores ``extras["rater_attention"][row]`` (raters x visual, head-averaged) for the adaptive budget
    provides_rater_attention = True
    score_mass = True  # attention probabilities: coverage= normalizes them per image (sparse_cache.budget)

    def score(self, context: ScoringContext) -> list[torch.Tensor | None]:
        scores = []
        for row in range(context.batch_size):
            if context.visual_positions[row].numel() == 0 or context.text_positions[row].numel() == 0:
                scores.append(None)  # nothing to rate with: the cache keeps this row's visual tokens
                continue
            probs = context.attention_to_visual(row, raters_of_row(context, row)).mean(dim=0)  # (R, N_v)
            context.extras.setdefault("rater_attention", {})[row] = probs
            scores.append(probs.mean(dim=0))
        return scores
