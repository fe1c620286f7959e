"""DivPrune: keep a maximally diverse subset of each image's visual tokens (max-min diversity).

Based on "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models" (Alvar et al.,
CVPR 2025), restated in ``../../docs/methods.md``: on the decoder input embeddings of one image's visual
tokens, with distance ``1 - cos``, start with the token whose nearest neighbour is farthest, then
repeatedly add the token whose minimum distance to the chosen set is largest. Attention-free and
text-agnostic.

Scores encode the greedy order (first picked = highest score), so the per-image top-k of
:func:`~sparse_cache.select.select_visual` is exactly the first k tokens the greedy algorithm picks, for
any budget. The order is computed per image (or video), as the budgets are.
"""

from __future__ import annotations

import torch

from .base import Scorer, ScoringContext


def visual_block_ranges(context: ScoringContext, row: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges, into the row's visual tokens, of each image or video.

    Uses ``context.visual_blocks`` (per row, the image/video index of each visual token) when set;
    otherwise maximal runs of consecutive positions. In chat prompts every
    image and video is wrapped in start/end marker tokens, so the runs are the blocks.
    """
    visual = context.visual_positions[row]
    n = visual.numel()
    if n == 0:
        return []
    ids = context.visual_blocks[row] if context.visual_blocks is not None else None
    if ids is not None and ids.numel() == n:
        change = ids[1:] != ids[:-1]
    else:
        change = visual[1:] - visual[:-1] != 1
    starts = [0] + (torch.nonzero(change, as_tuple=False).flatten() + 1).tolist()
    return list(zip(starts, starts[1:] + [n]))


def order_to_scores(order: torch.Tensor, n: int) -> torch.Tensor:
    """Scores in ``(0, 1]`` that rank tokens as ``order`` does: ``order[0]`` gets 1, the last ``1/n``."""
    scores = torch.empty(n, dtype=torch.float32, device=order.device)
    scores[order] = (n - torch.arange(n, dtype=torch.float32, device=order.device)) / n
    return scores


def max_min_order(embeds: torch.Tensor) -> torch.Tensor:
    """Greedy max-min diversity order of ``embeds`` ``(n, D)`` under the distance ``1 - cos``.

    First the token whose nearest neighbour is farthest, then each time the token whose minimum
    distance to the tokens already picked is largest. Ties go to the earlier token.

    Returns:
        ``(n,)`` LongTensor: the tokens in the order picked.
    """
    n = embeds.shape[0]
    if n <= 1:
        return torch.arange(n, device=embeds.device)
    unit = torch.nn.functional.normalize(embeds.float(), dim=-1)
    distance = (1.0 - unit @ unit.T).clamp_min_(0.0)  # (n, n), one image's tokens only
    distance.fill_diagonal_(float("inf"))
    first = int(torch.argmax(distance.min(dim=1).values))  # argmax returns the first maximum
    distance.fill_diagonal_(0.0)
    order = torch.empty(n, dtype=torch.long, device=embeds.device)
    order[0] = first
    min_to_chosen = distance[first].clone()
    min_to_chosen[first] = float("-inf")
    for step in range(1, n):
        pick = int(torch.argmax(min_to_chosen))
        order[step] = pick
        torch.minimum(min_to_chosen, distance[pick], out=min_to_chosen)
        min_to_chosen[pick] = float("-inf")  # chosen tokens stay at -inf (minimum keeps it)
    return order


class DivPruneScorer(Scorer):
    """Max-min diversity of the visual input embeddings, per image; scores = greedy pick order."""

    name = "divprune"
    default_layer = None

    def score(self, context: ScoringContext) -> list[torch.Tensor]:
        scores = []
        for row in range(context.batch_size):
            visual = context.visual_positions[row]
            embeds = context.inputs_embeds[row]
            row_scores = torch.zeros(visual.numel(), dtype=torch.float32, device=embeds.device)
            for start, end in visual_block_ranges(context, row):
                block = embeds[visual[start:end].to(embeds.device)]
                row_scores[start:end] = order_to_scores(max_min_order(block), end - start)
            scores.append(row_scores)
        return scores
