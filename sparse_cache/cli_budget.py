"""``sparse-cache generate``'s flags for the budgets that pick themselves (:mod:`sparse_cache.budget`).

``--coverage C``, ``--max-visual-tokens N`` and ``--max-kv-bytes B`` are ``PrunableDynamicCache(model,
keep_ratio="auto", coverage=C)`` and its two per-call caps. They share argparse's mutually exclusive group with
``--keep-ratio``, ``--keep-tokens`` and ``--adaptive-scale`` (the library takes exactly one budget); every other
rule (a coverage needs a scorer whose scores are a mass; no ``--schedule``) is the library's own validation,
run before the model loads, its messages naming the flags. No torch import at module level (the command line's
``--help`` and argument errors answer without it).
"""

from __future__ import annotations

import argparse
import re

#: library argument -> flag
FLAGS = {
    "coverage": "--coverage",
    "max_visual_tokens": "--max-visual-tokens",
    "max_kv_bytes": "--max-kv-bytes",
    "keep_ratio": "--keep-ratio",
    "keep_tokens": "--keep-tokens",
    "schedule": "--schedule",
    "adaptive_scale": "--adaptive-scale",
}
TARGETS = ("coverage", "max_visual_tokens", "max_kv_bytes")


def add_flags(group, share_type, count_type) -> None:
    """Add the three flags to ``group`` (the generate command's mutually exclusive budget group)."""
    group.add_argument(
        "--coverage", type=share_type, metavar="C",
        help="a budget that picks itself (keep_ratio='auto'): each image keeps the fewest top-scored visual tokens "
        "holding C of its score mass, C in (0, 1], e.g. 0.9 (scorers whose scores are a mass: sparsevlm, "
        "sparsevlm_plus, fastv)",
    )
    group.add_argument(
        "--max-visual-tokens", type=count_type, metavar="N",
        help="keep_ratio='auto': keep at most N visual tokens in the call, split over its images by their counts",
    )
    group.add_argument(
        "--max-kv-bytes", type=count_type, metavar="B",
        help="keep_ratio='auto': the KV cache holds at most B bytes after the prefill (all layers, keys and values; "
        "the text's entries first, the rest for visual tokens)",
    )


def arguments(args: argparse.Namespace) -> dict:
    """The cache arguments of the given flag (``{}`` without one): ``{"coverage": 0.9}``, ..."""
    return {name: getattr(args, name) for name in TARGETS if getattr(args, name, None) is not None}


def flag_names(message: str) -> str:
    """The library's message in flag names: ``coverage: ... leave schedule unset`` -> ``--coverage: ... leave
    --schedule unset`` (argument names written as identifiers only: ``name:``, ``name=``, ``name unset``)."""
    pattern = r"(?<![\w-])(" + "|".join(FLAGS) + r")(?=[:=,.;]| unset| and | or | >|$)"
    return re.sub(pattern, lambda m: FLAGS[m.group(1)], message)


def check(args: argparse.Namespace) -> None:
    """The library's validation of the self-picking budget (:func:`sparse_cache.budget.resolve_auto_budget`,
    :func:`~sparse_cache.budget.check_auto_budget`) against ``--scorer`` and ``--schedule``, before the model
    loads; ``ValueError`` with the flags' names."""
    given = arguments(args)
    if not given:
        return
    from .budget import check_auto_budget, resolve_auto_budget
    from .scorers import SCORERS

    try:
        auto = resolve_auto_budget(None, None, **given)
        check_auto_budget(auto, SCORERS[args.scorer], schedule=args.schedule, adaptive_scale=None, recycle=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(flag_names(" ".join(str(exc).split()))) from exc


def text(args: argparse.Namespace) -> str:
    """``--coverage 0.9`` (the budget in the words of the command line)."""
    return " ".join(f"{FLAGS[name]} {value:g}" for name, value in arguments(args).items())


def pruning_request(args: argparse.Namespace, total_visual: int) -> str | None:
    """``None`` if the flag may prune; why it keeps everything when that is known before the call
    (``--max-visual-tokens`` at or above the image's count)."""
    cap = getattr(args, "max_visual_tokens", None)
    if cap is not None and cap >= total_visual:
        return f"--max-visual-tokens {cap} is not below the image's {total_visual} visual tokens"
    return None


def kept_everything(cache, total_visual: int, budget_text: str) -> str | None:
    """After a call with a coverage or byte budget: why nothing was pruned if the budget itself picked every
    token (the selection and ``cache.stats`` recorded, all kept), else ``None`` (pruned, or no selection recorded:
    :func:`sparse_cache.cli.check_pruned` then refuses the run)."""
    stats = getattr(cache, "stats", None)
    positions = getattr(cache, "kept_visual_positions", None)
    if stats is None or not positions or stats.visual_tokens_kept < stats.visual_tokens_total:
        return None
    if int(positions[0].numel()) < total_visual:
        return None
    return f"{budget_text} kept every one of the image's {total_visual} visual tokens (the count the budget picked)"
