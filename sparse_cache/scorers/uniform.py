"""Uniform: a spatial stride over each image, the text-agnostic downsampling baseline.

Based on the spatial-uniformity analysis of "Token Pruning in Multimodal Large Language Models: Are We
Solving the Right Problem?" (Wen et al., 2025; random and spatially uniform selection rival many scoring
methods), as the "spatial stride over the image grid" baseline of ``../../docs/methods.md``: keep an evenly
spread subset of each image's visual tokens, whatever the question.

One score vector has to serve every budget (the scorer does not see ``k``), so the kept sets for
growing ``k`` are nested. The order is built so that the nested sets are exact strides whenever the
budget allows one, and evenly spread in between:

* on a line of ``n`` tokens, the first ``ceil(n / s)`` tokens are exactly ``tokens[::s]`` for every
  power of two ``s``; the tokens added between two such strides are themselves spread by the same rule;
* on a ``(t, h, w)`` grid of merged tokens, the first ``t * ceil(h / s) * ceil(w / s)`` are exactly the
  sub-grid ``[:, ::s, ::s]`` of every frame (so ``keep_ratio=0.25`` on an even grid is a stride of 2
  in both directions).

The grid of each image is ``context.block_grids[block]`` (its ``(t, h, w)`` in merged tokens), found
through ``context.visual_blocks``. When the grids are unknown (not given to the model call, or not
matching the placeholders), the grid cannot be recovered from the token count (48 tokens may be 6 x 8,
8 x 6 or 4 x 12), so each image's tokens are strided in their own order, row-major: a 1-D stride over
the flattened grid, which samples whole columns when the stride divides the grid width.
"""

from __future__ import annotations

import functools

import torch

from .base import Scorer, ScoringContext
from .divprune import order_to_scores, visual_block_ranges


def _trailing_zeros(values: torch.Tensor, cap: int) -> torch.Tensor:
    """Number of trailing zero bits of each non-negative int; ``cap`` for 0."""
    level = torch.zeros_like(values)
    for bit in range(cap):
        level += ((values % (1 << (bit + 1))) == 0).long()
    return level


@functools.lru_cache(maxsize=256)
def _line_order(n: int) -> tuple[int, ...]:
    """Nested stride order of ``n`` tokens on a line (see :func:`stride_order`)."""
    if n <= 1:
        return tuple(range(n))
    order = [0]
    top = (n - 1).bit_length() - 1  # largest L with 2**L <= n - 1
    for level in range(top, -1, -1):
        step = 1 << level
        members = range(step, n, 2 * step)  # indices whose lowest set bit is 2**level
        order.extend(members[q] for q in _line_order(len(members)))
    return tuple(order)


def stride_order(n: int, grid: tuple[int, int, int] | None = None, device=None) -> torch.Tensor:
    """Priority order of one image's ``n`` tokens such that every prefix is evenly spread.

    Args:
        n: number of visual tokens of the image (or video).
        grid: ``(t, h, w)`` in merged tokens, row-major per frame (``t * h * w == n``); ``None`` strides
            the tokens on a line.

    Returns:
        ``(n,)`` LongTensor, a permutation: ``order[:k]`` are the tokens kept with a budget of ``k``.
        On a line, ``order[:ceil(n / 2**j)]`` is ``range(0, n, 2**j)``; on a grid,
        ``order[:t * ceil(h / 2**j) * ceil(w / 2**j)]`` is the ``[:, ::2**j, ::2**j]`` sub-grid.
    """
    if grid is None:
        return torch.tensor(_line_order(n), dtype=torch.long, device=device)
    t, h, w = (int(x) for x in grid)
    if t * h * w != n:
        raise ValueError(f"grid: {(t, h, w)} holds {t * h * w} tokens, but the image has {n}")
    index = torch.arange(n)
    y = (index // w) % h
    x = index % w
    cap = max(h, w).bit_length() + 1
    # Level of a token = largest j such that both coordinates are multiples of 2**j: level >= j is
    # exactly the sub-grid [::2**j, ::2**j] of every frame.
    level = torch.minimum(_trailing_zeros(y, cap), _trailing_zeros(x, cap))
    order = []
    for value in torch.unique(level, sorted=True).flip(0).tolist():
        members = torch.nonzero(level == value, as_tuple=False).flatten()  # row-major, frame-major
        order.append(members[torch.tensor(_line_order(members.numel()), dtype=torch.long)])
    return torch.cat(order).to(device)


class UniformScorer(Scorer):
    """Evenly strided tokens of each image (text-agnostic); scores = the nested stride order."""

    name = "uniform"
    default_layer = None

    def score(self, context: ScoringContext) -> list[torch.Tensor]:
        scores = []
        for row in range(context.batch_size):
            visual = context.visual_positions[row]
            row_scores = torch.zeros(visual.numel(), dtype=torch.float32, device=visual.device)
            for start, end in visual_block_ranges(context, row):
                grid = _block_grid(context, row, start, end - start)
                order = stride_order(end - start, grid, device=visual.device)
                row_scores[start:end] = order_to_scores(order, end - start)
            scores.append(row_scores)
        return scores


def _block_grid(context: ScoringContext, row: int, start: int, count: int) -> tuple[int, int, int] | None:
    """``(t, h, w)`` of the block whose first visual token is ``start``, if known and consistent."""
    if context.block_grids is None or context.visual_blocks is None:
        return None
    block = int(context.visual_blocks[row][start])
    if not 0 <= block < len(context.block_grids):
        return None
    grid = tuple(int(v) for v in context.block_grids[block])
    return grid if grid[0] * grid[1] * grid[2] == count else None
