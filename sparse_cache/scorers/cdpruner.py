"""CDPruner: conditional diversity of the visual tokens, by greedy MAP inference of a DPP.

Based on "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs"
(Zhang et al., 2025, CDPruner), restated in ``../../docs/methods.md``; greedy MAP with the incremental
Cholesky update of "Fast Greedy MAP Inference for Determinantal Point Process to Improve
Recommendation Diversity" (Chen et al., NeurIPS 2018).

Per image (or video) of a row, on the decoder input embeddings:

* similarity ``S = cos`` between visual tokens;
* relevance ``r_i`` = cosine of visual token ``i`` to the mean question embedding (the text after the
  row's last visual token), min-max normalised over the image; all ones when the row has no such text or
  the image's relevances are all equal (the DPP is then a pure diversity prior);
* kernel ``L = diag(r) S diag(r)``; greedy MAP adds, at each step, the token that most increases
  ``log det L_Y``.

Scores encode the greedy order (first picked = highest), so the top-k per image is the first k picks for
any budget. Once the kernel is exhausted (its rank is at most the embedding size; tokens with ``r = 0``
never add volume), the remaining tokens follow by decreasing relevance.
"""

from __future__ import annotations

import torch

from .base import Scorer, ScoringContext
from .cosine import question_relevance
from .divprune import order_to_scores, visual_block_ranges


def greedy_dpp_order(kernel: torch.Tensor, max_picks: int | None = None, eps: float = 1e-10) -> torch.Tensor:
    """Greedy MAP order of a DPP with PSD ``kernel`` ``(n, n)``, by incremental Cholesky.

    Step ``t`` picks ``argmax_j det(L[Y + j]) / det(L[Y])`` (= the residual ``d_j^2`` of ``j`` after
    projecting out the picked tokens), ties to the earlier token; it stops when ``max_picks`` tokens are
    picked or the best residual is at most ``eps * max(diag(L))``. Computed in float64.

    Returns:
        LongTensor of the picked tokens, in order (possibly fewer than ``n``).
    """
    n = kernel.shape[0]
    limit = n if max_picks is None else min(n, max_picks)
    if limit == 0:
        return torch.zeros(0, dtype=torch.long, device=kernel.device)
    kernel = kernel.double()
    residual = torch.diagonal(kernel).clone()  # d_j^2
    threshold = eps * float(residual.max().clamp_min(0))
    factors = kernel.new_zeros(n, limit)  # row j: Cholesky coefficients of token j on the picks
    available = torch.ones(n, dtype=torch.bool, device=kernel.device)
    picks = []
    for step in range(limit):
        gains = residual.masked_fill(~available, float("-inf"))
        pick = int(torch.argmax(gains))
        if not float(gains[pick]) > threshold:
            break
        picks.append(pick)
        column = (kernel[pick] - factors[:, :step] @ factors[pick, :step]) / gains[pick].sqrt()
        factors[:, step] = column
        residual = residual - column.square()
        available[pick] = False
    return torch.tensor(picks, dtype=torch.long, device=kernel.device)


def conditional_kernel(visual_embeds: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """``diag(r) S diag(r)`` with ``S`` the cosine similarity of ``visual_embeds`` ``(n, D)``."""
    unit = torch.nn.functional.normalize(visual_embeds.double(), dim=-1)
    r = relevance.double()
    return r[:, None] * (unit @ unit.T) * r[None, :]


def min_max(values: torch.Tensor) -> torch.Tensor:
    """``values`` rescaled to ``[0, 1]``; all ones if they span no range."""
    low, high = values.min(), values.max()
    if not float(high - low) > 1e-12:
        return torch.ones_like(values)
    return (values - low) / (high - low)


class CDPrunerScorer(Scorer):
    """Conditional DPP (relevance-weighted cosine kernel) per image; scores = greedy MAP order."""

    name = "cdpruner"
    default_layer = None

    def score(self, context: ScoringContext) -> list[torch.Tensor]:
        scores = []
        for row in range(context.batch_size):
            visual = context.visual_positions[row]
            text = context.text_positions[row]
            embeds = context.inputs_embeds[row]
            row_scores = torch.zeros(visual.numel(), dtype=torch.float32, device=embeds.device)
            for start, end in visual_block_ranges(context, row):
                block = embeds[visual[start:end].to(embeds.device)]
                if text.numel():
                    relevance = min_max(question_relevance(block, embeds[text.to(embeds.device)]))
                else:
                    relevance = torch.ones(end - start, dtype=torch.float32, device=embeds.device)
                picks = greedy_dpp_order(conditional_kernel(block, relevance), max_picks=block.shape[-1])
                rest = torch.ones(end - start, dtype=torch.bool, device=embeds.device)
                rest[picks] = False
                rest_idx = torch.nonzero(rest, as_tuple=False).flatten()
                rest_idx = rest_idx[torch.argsort(relevance[rest_idx], descending=True, stable=True)]
                order = torch.cat([picks.to(embeds.device), rest_idx])
                row_scores[start:end] = order_to_scores(order, end - start)
            scores.append(row_scores)
        return scores
