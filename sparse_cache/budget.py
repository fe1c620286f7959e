"""Budgets that pick themselves: ``keep_ratio="auto"`` with a coverage target or a per-call memory budget.

Three targets, exactly one per cache (``PrunableDynamicCache(model, keep_ratio="auto", coverage=0.9)``; the
targets alone imply ``keep_ratio="auto"``):

* ``coverage=c`` (per image or video): keep the smallest set of its visual tokens whose score mass reaches ``c``
  of the image's total. The mass of a token is its score ``s_i`` normalized over the image's tokens,
  ``s_i / sum_j s_j``; the smallest set reaching ``c`` is the ``k`` top-scored tokens with the least ``k`` such
  that their cumulative mass is ``>= c`` (in float64, with a relative tolerance of ``1e-9`` so that rounding of
  the sum cannot add a token). An image the scorer gives no mass at all keeps one token. An image whose mass
  sits on a few tokens keeps few; one whose mass is spread keeps many. Only scorers whose scores are a mass
  qualify (``Scorer.score_mass = True``: attention probabilities, non-negative and additive): ``sparsevlm``
  and ``fastv`` (the raters' / last token's head-averaged attention to each visual token), ``sparsevlm_plus``
  (the same attention divided by a position bias, still non-negative). Cosine similarities (``cosine``) can be
  negative, the diversity and stride scorers (``divprune``, ``cdpruner``, ``dart``, ``uniform``) encode an
  order, and ``random`` a draw: none is a mass, and coverage with them is refused.
* ``max_visual_tokens=M`` (per call): at most ``M`` visual tokens kept over every image of every row of the
  call, split over the images in proportion to their token counts.
* ``max_kv_bytes=B`` (per call): the cache right after the call's prefill holds at most ``B`` bytes of real
  entries (all layers, keys and values; padding slots of left-padded rows are not entries: see ``cache.stats``
  for the allocated size). Text and earlier turns' entries are always kept, so ``B`` first pays for them; the
  rest, ``floor(B / bytes_per_token) - other_entries`` visual tokens, is split as for ``max_visual_tokens``. A
  budget below the text's KV (plus one token per image) is an error at call time.

The split (:func:`apportion`): image ``j`` with ``n_j`` of the call's ``N`` visual tokens has the quota
``q_j = M n_j / N`` and keeps ``floor(q_j)`` or ``ceil(q_j)`` tokens (largest remainders first, ties to the
earlier image), ``sum = M`` exactly; every image keeps at least one (seats taken from the images with the most,
which happens only when some quota is below 1). ``M >= N`` keeps everything (logged at debug level).

The counts feed the shared selection (:func:`~sparse_cache.select.select_visual` with ``block_budgets``, as
SparseVLM's adaptive budget does): the kept tokens are the top-scored ``k`` of each image, as for fixed
budgets. Not combinable with ``schedule``/``adaptive_scale``; the per-call caps exclude ``recycle`` (recycled
tokens are entries no budget counted).
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

#: the targets a self-picking budget takes, in the order the errors list them
TARGETS = ("coverage", "max_kv_bytes", "max_visual_tokens")

#: relative tolerance on reaching the coverage target (float64 sums)
COVERAGE_RTOL = 1e-9


@dataclass(frozen=True)
class AutoBudget:
    """One validated target (see the module docstring)."""

    coverage: float | None = None
    max_kv_bytes: int | None = None
    max_visual_tokens: int | None = None

    def arguments(self) -> dict:
        out = {"keep_ratio": "auto"}
        for name in TARGETS:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    # ----------------------------------------------------------------- per call

    def plan(self, lifecycle, p) -> list[dict[int, int] | None]:
        """Per row of the pass ``p`` (first stage, every visual token a candidate): block -> tokens to keep.

        ``None`` for a row whose visual tokens the scorer could not rate (it keeps them all). Records the plan in
        ``p.extras["auto_budget"]``.
        """
        rows = []
        for row, visual in enumerate(p.visual_positions):
            scores = p.scores[row]
            blocks = p.visual_blocks[row].to(visual.device)
            rows.append((None if scores is None else scores.to(visual.device), blocks))
        if self.coverage is not None:
            name = lifecycle.scorer.name or type(lifecycle.scorer).__name__
            budgets = [
                None if scores is None else coverage_budgets(scores, blocks, self.coverage, name)
                for scores, blocks in rows
            ]
            p.extras["auto_budget"] = {"coverage": self.coverage}
            return budgets
        counts = [
            (row, block, count)
            for row, (scores, blocks) in enumerate(rows) if scores is not None
            for block, count in _block_counts(blocks)
        ]
        fixed = sum(blocks.numel() for scores, blocks in rows if scores is None)  # unrated rows keep everything
        total = sum(count for _, _, count in counts)
        if self.max_visual_tokens is not None:
            available = self.max_visual_tokens - fixed
            what = f"max_visual_tokens: {self.max_visual_tokens}"
            minimum = fixed + len(counts)
            if available < len(counts):
                raise ValueError(
                    f"{what} cannot keep one visual token of each of the call's {len(counts)} images/videos"
                    + (f" (plus the {fixed} of rows with no text to rate them)" if fixed else "")
                    + f"; give max_visual_tokens >= {minimum}"
                )
        else:
            per_token = _bytes_per_token(lifecycle.cache.layers)
            other = _other_entries(p)
            capacity = self.max_kv_bytes // per_token
            available = capacity - other - fixed
            needed = (other + fixed + len(counts)) * per_token
            if capacity < other:
                raise ValueError(
                    f"max_kv_bytes: {self.max_kv_bytes} bytes is smaller than the KV of the text this call always "
                    f"keeps ({other} entries x {per_token} bytes per token over every layer = {other * per_token} "
                    f"bytes, earlier turns included); give max_kv_bytes >= {needed} (text plus one visual token per "
                    "image)"
                )
            if available < len(counts):
                raise ValueError(
                    f"max_kv_bytes: {self.max_kv_bytes} bytes leaves room for {max(0, available)} visual tokens after "
                    f"the text's {other * per_token} bytes ({per_token} bytes per token over every layer), fewer "
                    f"than one per image/video ({len(counts)}); give max_kv_bytes >= {needed}"
                )
        kept = apportion([count for _, _, count in counts], min(available, total))
        if available >= total:
            logger.debug("%s: the budget (%d visual tokens) covers all %d of the call's visual tokens; keeping all",
                         "max_visual_tokens" if self.max_visual_tokens is not None else "max_kv_bytes",
                         available, total)
        budgets: list[dict[int, int] | None] = [None if scores is None else {} for scores, _ in rows]
        for (row, block, _), k in zip(counts, kept):
            budgets[row][block] = k
        p.extras["auto_budget"] = {"visual_tokens_available": int(available), "visual_tokens_total": int(total)}
        return budgets


def resolve_auto_budget(keep_ratio, keep_tokens, coverage=None, max_kv_bytes=None, max_visual_tokens=None):
    """The :class:`AutoBudget` the arguments ask for, or ``None`` for a fixed budget; clear errors otherwise."""
    given = {name: value for name, value in
             (("coverage", coverage), ("max_kv_bytes", max_kv_bytes), ("max_visual_tokens", max_visual_tokens))
             if value is not None}
    if isinstance(keep_ratio, str):
        if keep_ratio != "auto":
            raise TypeError(
                f"keep_ratio: expected a float in (0, 1] or 'auto' (with one of {', '.join(TARGETS)}), got str "
                f"{keep_ratio!r}"
            )
        if keep_tokens is not None:
            raise ValueError(f"keep_tokens: keep_ratio='auto' picks the counts itself; leave keep_tokens unset "
                             f"(got keep_tokens={keep_tokens!r})")
        if not given:
            raise ValueError(
                "keep_ratio: 'auto' needs a target: coverage=... (share of each image's score mass, e.g. 0.9), "
                "max_kv_bytes=... or max_visual_tokens=... (per call)"
            )
    elif given:
        if keep_ratio is not None or keep_tokens is not None:
            name = next(iter(given))
            raise ValueError(
                f"{name}: a self-picking budget sets how many tokens each image keeps; leave keep_ratio and "
                f"keep_tokens unset, or pass keep_ratio='auto' (got keep_ratio={keep_ratio!r}, "
                f"keep_tokens={keep_tokens!r})"
            )
    else:
        return None
    if len(given) > 1:
        raise ValueError(
            f"{'/'.join(given)}: give exactly one target of {', '.join(TARGETS)}; got "
            + ", ".join(f"{k}={v!r}" for k, v in given.items())
        )
    if coverage is not None:
        if isinstance(coverage, bool) or not isinstance(coverage, numbers.Real) or math.isnan(coverage) \
                or not 0 < coverage <= 1:
            raise ValueError(f"coverage: expected a share of the score mass in (0, 1], e.g. 0.9; got {coverage!r}")
        coverage = float(coverage)
    for name, value in (("max_kv_bytes", max_kv_bytes), ("max_visual_tokens", max_visual_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise ValueError(f"{name}: expected an int >= 1 (per call), got {value!r}")
    return AutoBudget(
        coverage=coverage,
        max_kv_bytes=None if max_kv_bytes is None else int(max_kv_bytes),
        max_visual_tokens=None if max_visual_tokens is None else int(max_visual_tokens),
    )


def check_auto_budget(auto: AutoBudget, scorer, *, schedule, adaptive_scale, recycle) -> None:
    """Refuse combinations a self-picking budget cannot serve, naming the argument and what would work."""
    target = next(name for name in TARGETS if getattr(auto, name) is not None)
    if schedule is not None:
        raise ValueError(f"{target}: a progressive schedule sets every stage's ratio; leave schedule unset "
                         f"(got schedule={schedule!r})")
    if adaptive_scale is not None:
        raise ValueError(f"{target}: adaptive_scale is another self-picking budget; pass one of them "
                         f"(got adaptive_scale={adaptive_scale!r})")
    if recycle and auto.coverage is None:
        raise ValueError(f"{target}: recycled tokens are cache entries the per-call budget does not count; "
                         "leave recycle unset, or use coverage=...")
    if auto.coverage is not None and not getattr(scorer, "score_mass", False):
        raise ValueError(
            f"coverage: needs scores that are a mass (non-negative attention shares); scorer "
            f"{scorer.name or type(scorer).__name__!r} does not give one. Scorers that support coverage: "
            f"{mass_scorers()}; with the others use keep_ratio, keep_tokens, max_visual_tokens or max_kv_bytes"
        )


def mass_scorers() -> list[str]:
    from .scorers import SCORERS

    return sorted(name for name, cls in SCORERS.items() if getattr(cls, "score_mass", False))


# --------------------------------------------------------------------------- the counts


def coverage_count(scores: torch.Tensor, coverage: float) -> int:
    """The least ``k`` such that the ``k`` largest ``scores`` hold ``>= coverage`` of their sum (at least 1)."""
    n = scores.numel()
    if n == 0:
        return 0
    values = scores.double()
    total = values.sum()
    if not float(total) > 0:
        return 1
    ordered = torch.sort(values, descending=True).values
    reached = torch.cumsum(ordered, 0) >= (coverage - COVERAGE_RTOL) * total
    return max(1, min(n, n - int(reached.sum()) + 1))


def coverage_budgets(scores: torch.Tensor, blocks: torch.Tensor, coverage: float, scorer_name: str) -> dict[int, int]:
    """Block -> coverage count for one row's candidates."""
    if not bool(torch.isfinite(scores).all()) or bool((scores < 0).any()):
        raise ValueError(
            f"coverage: scorer {scorer_name!r} returned negative or non-finite scores, which are not a mass; "
            "coverage needs non-negative scores (a scorer with score_mass = True)"
        )
    return {block: coverage_count(scores[blocks == block], coverage) for block, _ in _block_counts(blocks)}


def apportion(counts: list[int], seats: int) -> list[int]:
    """Split ``seats`` over blocks of ``counts`` tokens in proportion to the counts (module docstring).

    Largest remainder: ``floor(q_j)`` each, then one more for the largest remainders ``q_j - floor(q_j)`` (ties to
    the earlier block), with ``q_j = seats * n_j / N`` in exact integer arithmetic; then every block keeps at
    least one, the seats coming from the blocks with the most (ties to the later). Needs
    ``len(counts) <= seats <= sum(counts)``.
    """
    total = sum(counts)
    if not counts:
        return []
    if seats >= total:
        return list(counts)
    floors = [seats * n // total for n in counts]
    remainders = [seats * n % total for n in counts]
    left = seats - sum(floors)
    for j in sorted(range(len(counts)), key=lambda j: (-remainders[j], j))[:left]:
        floors[j] += 1
    for j in range(len(counts)):
        if floors[j] == 0:
            floors[j] = 1
            donor = max(range(len(counts)), key=lambda i: (floors[i], i))
            floors[donor] -= 1
    return floors


def _block_counts(blocks: torch.Tensor) -> list[tuple[int, int]]:
    if blocks.numel() == 0:
        return []
    ids, counts = torch.unique_consecutive(blocks, return_counts=True)
    return list(zip(ids.tolist(), counts.tolist()))


def _bytes_per_token(layers) -> int:
    from .stats import kv_bytes_per_token

    per_token = kv_bytes_per_token(layers)
    if per_token <= 0:
        raise RuntimeError("max_kv_bytes: no cache layer was allocated when the budget was computed")
    return per_token


def _other_entries(p) -> int:
    """Entries the call keeps whatever the budget: earlier turns' entries and this forward's non-visual tokens."""
    past = p.key_valid.shape[1] - p.seq_len
    past_entries = int(p.key_valid[:, :past].sum()) if past > 0 else 0
    new_valid = int(p.token_valid.sum())
    visual = sum(v.numel() for v in p.visual_positions)
    return past_entries + new_valid - visual
