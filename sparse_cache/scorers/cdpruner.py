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
never add volume), the remaining tokens follow by decreasing relevance. When the cache knows the most tokens
its budget keeps from an image (``context.keep_limit``), the greedy stops there too: the same kept set, the
remaining tokens by relevance.

The kernel is never built: ``L = F F^T`` with ``F = diag(r) U`` (``U`` the unit embeddings), and the fast
greedy MAP update keeps only the ``k x n`` Cholesky rows and the ``n``-vector of residual gains
(``k <= D`` picks), in float32, without a host sync per pick.
"""

from __future__ import annotations

import torch

from .base import Scorer, ScoringContext
from .cosine import question_relevance
from .divprune import compute_dtype, order_to_scores, visual_block_ranges


#: relative stopping threshold of the greedy MAP per compute dtype: a token whose residual gain is at most
#: ``eps * max(diag(L))`` adds no volume. Float32 rounding leaves residuals of order ``1e-7 * sqrt(steps)``
#: where exact arithmetic gives 0 (duplicates, an exhausted rank), hence the larger float32 value.
STOP_EPS = {torch.float64: 1e-10, torch.float32: 1e-5}


def greedy_dpp_order(features: torch.Tensor, max_picks: int | None = None, eps: float | None = None) -> torch.Tensor:
    """Greedy MAP order of the DPP with kernel ``L = F F^T``, ``F = features`` ``(n, D)``.

    Step ``t`` picks ``argmax_j det(L[Y + j]) / det(L[Y])`` (= the residual ``d_j^2`` of ``j`` after
    projecting out the picked tokens), ties to the earlier token; it stops when ``max_picks`` tokens are
    picked or the best residual is at most ``eps * max(diag(L))`` (``STOP_EPS`` of the compute dtype when
    ``eps`` is None).

    Fast greedy MAP (Chen et al., 2018) without the kernel: each step computes the picked token's kernel
    row ``F f_pick`` (``O(nD)``), its Cholesky coefficients on the earlier picks, and updates the
    ``n``-vector of residual gains. Memory: the ``k x n`` Cholesky rows and a few ``n``-vectors, never
    ``n x n``. Computed in float32 (float64 input kept as is); no host synchronisation inside the loop
    (the steps after the stop are computed but masked out; one sync at the end reads the picks).

    Returns:
        LongTensor of the picked tokens, in order (possibly fewer than ``max_picks``).
    """
    n = features.shape[0]
    limit = n if max_picks is None else min(n, max_picks)
    if limit == 0:
        return torch.zeros(0, dtype=torch.long, device=features.device)
    dtype = compute_dtype(features.dtype)
    f = features.to(dtype)
    eps = STOP_EPS.get(dtype, 1e-5) if eps is None else eps
    residual = f.square().sum(dim=-1)  # d_j^2 = diag(L) before any pick
    threshold = eps * residual.max().clamp_min(0)
    factors = f.new_zeros(limit, n)  # row t: Cholesky coefficient of every token on pick t
    picks = torch.zeros(limit, dtype=torch.long, device=f.device)
    valid = torch.zeros(limit, dtype=torch.bool, device=f.device)
    alive = torch.ones(1, dtype=torch.bool, device=f.device)
    zero = f.new_zeros(())
    for step in range(limit):
        pick = torch.argmax(residual).view(1)  # picked tokens hold -inf
        gain = residual.index_select(0, pick)
        alive = alive & (gain > threshold)
        valid[step : step + 1] = alive
        picks[step : step + 1] = pick
        row = f @ f.index_select(0, pick)[0]  # L[pick, :]
        if step:
            row = row - factors[:step].T @ factors[:step].index_select(1, pick)[:, 0]
        column = torch.where(alive, row / gain.clamp_min(torch.finfo(dtype).tiny).sqrt(), zero)
        factors[step] = column
        residual.sub_(column.square())
        residual.index_fill_(0, pick, float("-inf"))
    return picks[valid]


def conditional_features(visual_embeds: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """``F = diag(r) U`` with ``U`` the unit rows of ``visual_embeds`` ``(n, D)``: the kernel is ``F F^T``.

    In the compute dtype (float32, or float64 input kept as is).
    """
    dtype = compute_dtype(visual_embeds.dtype)
    unit = torch.nn.functional.normalize(visual_embeds.to(dtype), dim=-1)
    return relevance.to(dtype)[:, None] * unit


def conditional_kernel(visual_embeds: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """``diag(r) S diag(r)`` ``(n, n)``, ``S`` the cosine similarity: a reference for tests, not used when scoring."""
    features = conditional_features(visual_embeds.double(), relevance.double())
    return features @ features.T


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
                max_picks = block.shape[-1]  # the kernel's rank
                limit = context.block_limit(row, start)
                if limit is not None:  # no more picks than the budget keeps
                    max_picks = min(max_picks, max(1, limit))
                picks = greedy_dpp_order(conditional_features(block, relevance), max_picks=max_picks)
                rest = torch.ones(end - start, dtype=torch.bool, device=embeds.device)
                rest[picks] = False
                rest_idx = torch.nonzero(rest, as_tuple=False).flatten()
                rest_idx = rest_idx[torch.argsort(relevance[rest_idx], descending=True, stable=True)]
                order = torch.cat([picks.to(embeds.device), rest_idx])
                row_scores[start:end] = order_to_scores(order, end - start)
            scores.append(row_scores)
        return scores
