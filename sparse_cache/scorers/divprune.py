"""DivPrune: keep a maximally diverse subset of each image's visual tokens (max-min diversity).

Based on "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models" (Alvar et al.,
CVPR 2025), restated in ``../../docs/methods.md``: on the decoder input embeddings of one image's visual
tokens, with distance ``1 - cos``, start with the token whose nearest neighbour is farthest, then
repeatedly add the token whose minimum distance to the chosen set is largest. Attention-free and
text-agnostic.

Scores encode the greedy order (first picked = highest score), so the per-image top-k of
:func:`~sparse_cache.select.select_visual` is exactly the first k tokens the greedy algorithm picks, for
any budget. The order is computed per image (or video), as the budgets are. When the cache knows the most
tokens a selection keeps from an image (``context.keep_limit``: a fixed ``keep_ratio`` or ``keep_tokens``)
the greedy stops there, and the rest are ranked by their distance to the picks: the kept set is the same,
the time is divided by ``n / k`` (at 16K visual tokens and keep 0.25, a quarter of the full order's).

No ``n x n`` distance matrix: a running vector of every token's minimum distance to the picks is updated
with one matrix-vector product per pick (``O(n)`` memory per step), in float32, without a host sync per
pick.
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


#: most elements of one block of pairwise similarities computed at a time (16 MiB in float32); a block
#: has ``min(n, max(1, CHUNK_ELEMENTS // n))`` rows, so for ``n > 2048`` no ``n x n`` tensor exists.
CHUNK_ELEMENTS = 1 << 22


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the diversity scorers compute in: the model's dtype upcast to at least float32."""
    return torch.promote_types(dtype, torch.float32)


def nearest_neighbour_distance(unit: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """``(n,)`` distance ``1 - cos`` of each unit row of ``unit`` ``(n, D)`` to its nearest other row.

    Computed by blocks of rows (``O(rows x n)`` memory, never ``n x n`` once ``n^2 > chunk_elements``).
    """
    n = unit.shape[0]
    rows = min(n, max(1, chunk_elements // n))
    nearest = torch.empty(n, dtype=unit.dtype, device=unit.device)
    for start in range(0, n, rows):
        end = min(n, start + rows)
        distance = (1.0 - unit[start:end] @ unit.T).clamp_min_(0.0)  # (rows, n)
        index = torch.arange(start, end, device=unit.device)
        distance[index - start, index] = float("inf")  # not its own neighbour
        nearest[start:end] = distance.min(dim=1).values
    return nearest


def max_min_order(embeds: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS, limit: int | None = None) -> torch.Tensor:
    """Greedy max-min diversity order of ``embeds`` ``(n, D)`` under the distance ``1 - cos``.

    First the token whose nearest neighbour is farthest, then each time the token whose minimum
    distance to the tokens already picked is largest. Ties go to the earlier token.

    ``limit``: stop after that many picks (a selection that keeps at most ``limit`` tokens needs no more);
    the tokens not picked follow in decreasing minimum distance to the picks (the criterion of the next
    pick; ties to the earlier token), so ``order[:limit]`` equals the full order's and the first token
    after it is the full order's next pick. One pick costs a pass over the ``n x D`` embeddings, so the
    limit divides the time by ``n / limit``.

    Memory is ``O(n)`` per step plus the normalised embeddings: a running vector of each token's
    minimum distance to the picks is updated with one matrix-vector product per pick (no ``n x n``
    matrix; the first pick's nearest-neighbour distances are computed by blocks of rows). Float32 (or
    float64 input kept as is); no host synchronisation inside the loop.

    Returns:
        ``(n,)`` LongTensor: the tokens in the order picked.
    """
    n = embeds.shape[0]
    if n <= 1:
        return torch.arange(n, device=embeds.device)
    unit = torch.nn.functional.normalize(embeds.to(compute_dtype(embeds.dtype)), dim=-1)
    first = torch.argmax(nearest_neighbour_distance(unit, chunk_elements))  # the first maximum
    order = torch.empty(n, dtype=torch.long, device=embeds.device)
    order[0:1] = first.view(1)
    min_to_chosen = (1.0 - unit @ unit.index_select(0, first.view(1))[0]).clamp_min_(0.0)
    min_to_chosen.index_fill_(0, first.view(1), float("-inf"))
    picks = n if limit is None else max(1, min(n, int(limit)))
    for step in range(1, picks):
        pick = torch.argmax(min_to_chosen).view(1)  # stays on the device: no host sync
        order[step : step + 1] = pick
        distance = (1.0 - unit @ unit.index_select(0, pick)[0]).clamp_min_(0.0)
        torch.minimum(min_to_chosen, distance, out=min_to_chosen)
        min_to_chosen.index_fill_(0, pick, float("-inf"))  # chosen tokens stay at -inf (minimum keeps it)
    if picks < n:  # the rest by the next pick's criterion; the picks (-inf) sort last and are cut off
        order[picks:] = torch.argsort(min_to_chosen, descending=True, stable=True)[: n - picks]
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
                order = max_min_order(block, limit=context.block_limit(row, start))
                row_scores[start:end] = order_to_scores(order, end - start)
            scores.append(row_scores)
        return scores
