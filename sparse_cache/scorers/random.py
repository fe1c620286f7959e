"""Random scores: the baseline every scorer has to beat.

Independent benchmarks found uniformly random pruning surprisingly strong; a scorer that cannot beat
it has not earned its place. Seeded through the cache's ``seed`` for reproducibility.
"""

from __future__ import annotations

import torch

from .base import Scorer, ScoringContext


class RandomScorer(Scorer):
    """Independent uniform scores per visual token (needs no attention)."""

    name = "random"
    default_layer = None

    def score(self, context: ScoringContext) -> list[torch.Tensor | None]:
        return [
            torch.rand(visual.numel(), generator=context.generator).to(visual.device)
            for visual in context.visual_positions
        ]
