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


def adaptive_keep_count(rater_attention: torch.Tensor, scale: float) -> int:
    """Tokens to keep under SparseVLM's rank-based budget (paper section 3.2).

    ``P`` (raters x visual tokens) with a low rank means redundant visual tokens: prune
    ``N = scale * (n - rank(P))`` of the ``n`` tokens and keep the rest (at least one). The rank is computed
    in float32 on the small matrix (rank <= number of raters).
    """
    n = rater_attention.shape[-1]
    if n == 0:
        return 0
    rank = int(torch.linalg.matrix_rank(rater_attention.float()))
    pruned = int(math.floor(scale * (n - rank) + 0.5))
    return max(1, min(n, n - pruned))


def top_k_ascending(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in ascending index order; ties go to the earlier token."""
    if k >= scores.numel():
        return torch.arange(scores.numel(), device=scores.device)
    order = torch.argsort(scores.float(), descending=True, stable=True)
    return torch.sort(order[:k]).values


def select_visual(
    scores: torch.Tensor,
    block_ids: torch.Tensor,
    keep_ratio: float | None,
    keep_tokens: int | None,
    reference_counts: dict[int, int] | None = None,
    block_budgets: dict[int, int] | None = None,
) -> torch.Tensor:
    """Indices (into the row's visual tokens) kept: the top-scored of each block (image or video).

    Args:
        scores: ``(N_v,)`` scores of the row's visual tokens in position order.
        block_ids: ``(N_v,)`` which image/video each visual token belongs to (non-decreasing).
        reference_counts: block -> token count the budget is relative to (an image's original count
            when a progressive schedule scores survivors of an earlier stage); default: the members.
        block_budgets: block -> number to keep, overriding the ratio (the adaptive budget).
    """
    kept = []
    for block in torch.unique_consecutive(block_ids):
        members = torch.nonzero(block_ids == block, as_tuple=False).flatten()
        reference = members.numel() if reference_counts is None else reference_counts[int(block)]
        if block_budgets is not None:
            k = min(members.numel(), block_budgets[int(block)])
        else:
            k = min(members.numel(), budget(reference, keep_ratio, keep_tokens))
        kept.append(members[top_k_ascending(scores[members], k)])
    if not kept:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    return torch.cat(kept)


#: SparseVLM's progressive schedule for a 32-layer LLaVA-1.5-7B: pruning layers and visual tokens kept
#: (of 576) after each, for an "equivalent" 192 tokens (the authors' v1 budgets, ../docs/methods.md section 4).
SPARSEVLM_LAYERS_OF_32 = (2, 6, 15)
SPARSEVLM_PROFILE = (300 / 576, 200 / 576, 110 / 576)


def layer_average_ratio(schedule: list[tuple[int, float]], num_layers: int) -> float:
    """Fraction of the visual tokens an average layer computes under ``schedule`` (layer, ratio after it)."""
    total, previous_layer, previous_ratio = 0.0, -1, 1.0
    for layer, ratio in schedule:
        total += (layer - previous_layer) * previous_ratio
        previous_layer, previous_ratio = layer, ratio
    total += (num_layers - 1 - previous_layer) * previous_ratio
    return total / num_layers


def derive_schedule(equivalent_keep_ratio: float, num_layers: int) -> list[tuple[int, float]]:
    """A progressive schedule whose layer-average keep ratio is ``equivalent_keep_ratio``.

    The authors' layers 2/6/15 of 32 are scaled to the model's depth (2/5/13 of a 28-layer model,
    duplicates merged), and their budget profile 300:200:110 is scaled by one factor so that the average
    over layers of the visual tokens computed equals the target. Ratios are relative to each image's own
    visual count. Raises ``ValueError`` if the target is below what the first pruning layer allows.
    """
    validate_budget(equivalent_keep_ratio, None)
    layers: list[int] = []
    profile: list[float] = []
    for layer32, share in zip(SPARSEVLM_LAYERS_OF_32, SPARSEVLM_PROFILE):
        layer = min(num_layers - 1, max(0, int(math.floor(layer32 * num_layers / 32 + 0.5))))
        if layers and layer <= layers[-1]:
            continue
        layers.append(layer)
        profile.append(share)
    spans = [(nxt - cur) for cur, nxt in zip(layers, layers[1:] + [num_layers - 1])]
    weighted = sum(share * span for share, span in zip(profile, spans))
    full_layers = layers[0] + 1
    if weighted == 0:
        return [(layers[0], equivalent_keep_ratio)]
    factor = (equivalent_keep_ratio * num_layers - full_layers) / weighted
    if factor <= 0:
        minimum = full_layers / num_layers
        raise ValueError(
            f"keep_ratio: an equivalent keep ratio of {equivalent_keep_ratio} is below what pruning after layer "
            f"{layers[0]} of {num_layers} can reach (> {minimum:.3f}); use a larger ratio or an explicit schedule"
        )
    return [(layer, min(1.0, factor * share)) for layer, share in zip(layers, profile)]


def validate_schedule(schedule, num_layers: int) -> list[tuple[int, float]]:
    """Check an explicit ``[(layer, keep_ratio), ...]`` schedule; return it as a list of tuples."""
    try:
        stages = [(layer, ratio) for layer, ratio in schedule]
    except (TypeError, ValueError):
        raise TypeError(f"schedule: expected 'sparsevlm' or a list of (layer, keep_ratio) pairs, got {schedule!r}")
    if not stages:
        raise ValueError("schedule: needs at least one (layer, keep_ratio) stage")
    previous_layer, previous_ratio = -1, 1.0
    for layer, ratio in stages:
        if isinstance(layer, bool) or not isinstance(layer, int) or not previous_layer < layer < num_layers:
            raise ValueError(
                f"schedule: layers must be increasing ints in 0..{num_layers - 1}; got {[l for l, _ in stages]}"
            )
        validate_budget(ratio, None)
        if ratio > previous_ratio:
            raise ValueError(f"schedule: keep ratios must not increase from stage to stage; got {[r for _, r in stages]}")
        previous_layer, previous_ratio = layer, ratio
    return stages


#: Depth of the models the published scoring layers refer to (LLaVA-1.5-7B / Vicuna-7B: 32 decoder layers).
REFERENCE_DEPTH = 32


def scaled_layer(reference_layer: int | None, num_layers: int) -> int | None:
    """A layer given for a 32-layer model, at the same relative depth of a ``num_layers``-layer one.

    SparseVLM scores at layer 2 of 32: that is layer 2 of Qwen2.5-VL-7B (28 layers) and -3B (36), and layer 0
    of a 4-layer model, whose retrieval is over by layer 2 (docs/toy-vlm.md). Rounded half up, within range.
    """
    if reference_layer is None:
        return None
    return max(0, min(num_layers - 1, int(reference_layer * num_layers / REFERENCE_DEPTH + 0.5)))

