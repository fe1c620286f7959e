"""From scores to kept tokens: budgets and top-k, per image (or per video) of a row."""

from __future__ import annotations

import math
import numbers

import torch


def validate_budget(keep_ratio, keep_tokens) -> None:
    """Raise ``TypeError``/``ValueError`` unless exactly one valid budget is given."""
    if (keep_ratio is None) == (keep_tokens is None):
        raise ValueError(
            "keep_ratio/keep_tokens: give exactly one of them, e.g. keep_ratio=0.25 (a fraction in (0, 1] of each "
            f"image's visual tokens) or keep_tokens=256; got keep_ratio={keep_ratio!r}, keep_tokens={keep_tokens!r}"
        )
    if keep_ratio is not None:
        if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real):
            raise TypeError(f"keep_ratio: expected a float in (0, 1], got {type(keep_ratio).__name__} {keep_ratio!r}")
        if math.isnan(keep_ratio) or not 0 < keep_ratio <= 1:
            raise ValueError(f"keep_ratio: must be in (0, 1] (1.0 keeps every token), got {keep_ratio!r}")
    if keep_tokens is not None:
        if isinstance(keep_tokens, bool) or not isinstance(keep_tokens, numbers.Integral):
            raise TypeError(f"keep_tokens: expected an int >= 1, got {type(keep_tokens).__name__} {keep_tokens!r}")
        if keep_tokens < 1:
            raise ValueError(f"keep_tokens: must be >= 1, got {keep_tokens!r}")


def budget(num_visual: int, keep_ratio: float | None, keep_tokens: int | None) -> int:
    """Number of visual tokens to keep out of ``num_visual`` (one image or video).

    ``keep_ratio``: ``round(keep_ratio * n)`` (halves round up), at least 1. ``keep_tokens``: at most ``n``.
    """
    if num_visual == 0:
        return 0
    if keep_ratio is not None:
        return max(1, min(num_visual, int(math.floor(keep_ratio * num_visual + 0.5))))
    return min(num_visual, int(keep_tokens))


def top_k_ascending(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in ascending index order; ties go to the earlier token."""
    if k >= scores.numel():
        return torch.arange(scores.numel(), device=scores.device)
    order = torch.argsort(scores.float(), descending=True, stable=True)
    return torch.sort(order[:k]).values


def select_visual(
    scores: torch.Tensor, block_ids: torch.Tensor, keep_ratio: float | None, keep_tokens: int | None
) -> torch.Tensor:
    """Indices (into the row's visual tokens) kept: the top-scored of each block (image or video).

    Args:
        scores: ``(N_v,)`` scores of the row's visual tokens in position order.
        block_ids: ``(N_v,)`` which image/video each visual token belongs to (non-decreasing).
    """
    kept = []
    for block in torch.unique_consecutive(block_ids):
        members = torch.nonzero(block_ids == block, as_tuple=False).flatten()
        k = budget(members.numel(), keep_ratio, keep_tokens)
        kept.append(members[top_k_ascending(scores[members], k)])
    if not kept:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    return torch.cat(kept)
