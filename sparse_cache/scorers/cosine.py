"""Cosine (VisSparse-style): similarity of each visual token to the question, from the embeddings.

Based on the cosine-similarity token scoring of the VisSparse toolkit (NEO, "VisSparse Token Pruning
Toolkit for Vision-Language Models", https://heyneo.com/blog/vissparse), restated in ``../../docs/methods.md``:
the score of a visual token is the cosine similarity between its decoder input embedding and the mean
input embedding of the question tokens (``context.text_positions``: the text after the row's last
visual token). Needs no attention, so it runs before the decoder; a row with no text after its visual
tokens gets ``None`` (the cache keeps its visual tokens).
"""

from __future__ import annotations

import torch

from .base import Scorer, ScoringContext


def question_relevance(visual_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """``(N_v,)`` float32 cosine similarity of each visual embedding to the mean text embedding."""
    query = text_embeds.float().mean(dim=0, keepdim=True)
    return torch.nn.functional.cosine_similarity(visual_embeds.float(), query, dim=-1)


class CosineScorer(Scorer):
    """Cosine similarity of each visual input embedding to the mean question embedding."""

    name = "cosine"
    default_layer = None

    def score(self, context: ScoringContext) -> list[torch.Tensor | None]:
        scores = []
        for row in range(context.batch_size):
            visual = context.visual_positions[row]
            text = context.text_positions[row]
            embeds = context.inputs_embeds[row]
            if visual.numel() == 0:
                scores.append(torch.zeros(0, dtype=torch.float32, device=embeds.device))
            elif text.numel() == 0:
                scores.append(None)  # no question to compare with
            else:
                scores.append(question_relevance(embeds[visual.to(embeds.device)], embeds[text.to(embeds.device)]))
        return scores
