"""``PrunableDynamicCache``: a ``DynamicCache`` that drops the visual tokens the question does not need.

This module is the storage: logical vs physical lengths, the physical layout of a compacted prefix and the
2-D mask that describes it, the compaction primitives, and what must follow batch rows (beams, crop). The
per-call pruning (capture -> score -> select -> compact) is :class:`~sparse_cache.lifecycle.PruningLifecycle`,
which the hooks drive; everything family-specific is a model adapter (:mod:`sparse_cache.models`).

After compaction, ``get_seq_length()`` reports the logical length (tokens seen), so ``generate``'s slicing and
the model's positions continue from the full sequence; the masks use the physical length
(``get_query_offset``/``get_mask_sizes``), and the decoder receives a 2-D mask of the physical layout.
Decoding is then exact with respect to the kept tokens.
"""

from __future__ import annotations

import logging

import torch
import transformers
from transformers import DynamicCache

from . import hooks, spare
from ._compat import CACHE_KWARG
from .budget import check_auto_budget, resolve_auto_budget
from .lifecycle import PruningLifecycle
from .models import adapter_for as adapt
from .prellm import validate_pre_llm
from .scorers import Scorer, get_scorer
from .select import derive_schedule, validate_budget, validate_schedule
from .stats import PruningStats, StatsHistory

logger = logging.getLogger(__name__)

#: ``post-prefill``: the prefill runs on every token, the cache is compacted right after it (default).
#: ``in-prefill``: the layers after the scoring layer compute only the kept tokens (SparseVLM proper).
#: ``pre-llm``: visual tokens are dropped from the language model's input, before layer 0 (embedding scorers).
MODES = ("post-prefill", "in-prefill", "pre-llm")


class PrunableDynamicCache(DynamicCache):
    """A drop-in ``DynamicCache`` that prunes visual tokens right after the prefill.

    Build one per ``generate`` call (or per conversation) and pass it as ``past_key_values``::

        cache = PrunableDynamicCache(model, keep_ratio=0.25)
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=256)

    Based on SparseVLM (Zhang et al., ICML 2025) for the default scorer. A forward hook on the scoring
    layer computes the text raters' attention to the visual tokens (only those rows, never the ``N x N``
    matrix); right after the prefill every layer keeps the top-scored visual tokens plus all text. Positions
    stay those of the full sequence, so decoding is exact with respect to the kept tokens.

    Args:
        model: a supported VLM (``sparse_cache.SUPPORTED_MODEL_CLASSES``: every registered family, top-level or bare
            model) loaded with ``attn_implementation="sdpa"`` or ``"eager"``. Hooks are installed on it while a
            pruning cache is alive; they do nothing for calls that do not use one.
        keep_ratio: fraction in (0, 1] of each image's (or video's) visual tokens to keep,
            ``round(keep_ratio * n)`` with at least one. Exactly one of ``keep_ratio``/``keep_tokens``.
        keep_tokens: number of visual tokens to keep per image (or video); all of them if it has fewer.
        scorer: a registered scorer name (``"sparsevlm"`` default, ``"fastv"``, ``"random"``) or a
            :class:`~sparse_cache.scorers.Scorer` instance.
        scoring_layer: decoder layer whose attention scores the tokens; defaults to the scorer's published
            layer for a 32-layer model (2 for SparseVLM, 1 for FastV, none for random) scaled to the model's
            depth: 2 for Qwen2.5-VL-3B/7B and Qwen3-VL-8B, 0 for a 4-layer model.
        seed: seed of the generator handed to stochastic scorers (default 0).
        adaptive_scale: SparseVLM's rank-based budget (paper section 3.2) instead of keep_ratio/keep_tokens:
            each image keeps ``n - round(adaptive_scale * (n - rank(P)))`` tokens, ``P`` being the raters'
            head-averaged attention to its visual tokens (scorers ``sparsevlm``/``sparsevlm_plus``).
        mode: ``"post-prefill"`` (default): the prefill computes every token and the cache is compacted
            right after it. ``"in-prefill"``: right after the scoring layer its output keeps only the kept
            visual tokens plus all text, so the later layers of the prefill compute fewer tokens (with
            their original positions); the earlier layers' caches are compacted to the same set at the
            end of the prefill. In this mode a prefill forward returns logits for the kept tokens only
            (``generate`` reads the last one). ``"pre-llm"``: the scorer reads the input embeddings and the
            dropped visual tokens never enter the language model (every layer computes the kept tokens only,
            at their original positions); embedding scorers only (``cosine``, ``divprune``, ``cdpruner``,
            ``uniform``, ``random``, ``dart_embed``), logits for the kept tokens only, as in-prefill.
        schedule: in-prefill only, a progressive schedule: ``"sparsevlm"`` derives the authors' three
            pruning layers (2/6/15 of 32, scaled to the model's depth) and budgets so that the average
            over layers of the visual tokens computed is ``keep_ratio``; or an explicit
            ``[(layer, keep_ratio_after_it), ...]`` (ratios of each image's own count, non-increasing;
            leave keep_ratio unset). Every layer's cache ends with the last stage's set.
        coverage, max_kv_bytes, max_visual_tokens: a budget that picks itself (``keep_ratio="auto"``, exactly one
            target; :mod:`sparse_cache.budget`): per image, the smallest set holding ``coverage`` of its score mass
            (scorers whose scores are a mass: sparsevlm, sparsevlm_plus, fastv); or, per call, at most
            ``max_visual_tokens`` visual tokens / ``max_kv_bytes`` bytes of KV after the prefill, split over the
            call's images in proportion to their token counts (text always kept).
        sync_timing: synchronize the device around the timed prefill work so that ``cache.stats`` times kernels,
            not launches (GPU; prefill only, never a decode step). Default False.

    After a call, per batch row (following beam reordering):
        kept_visual_positions: ascending positions, in that row of the ``input_ids`` given to
            ``generate``, of the visual tokens kept (a later turn's images are numbered in the whole
            conversation).
        visual_scores: the score of every visual token of the row, in position order.
        stats: :class:`~sparse_cache.stats.PruningStats` of the latest pruning pass (kept/total per row and
            image, KV bytes before/after, scoring and compaction time, mode, scorer, budget); ``stats_history``
            every pass of the conversation.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        keep_ratio: float | None = None,
        keep_tokens: int | None = None,
        *,
        scorer: str | Scorer = "sparsevlm",
        scoring_layer: int | None = None,
        seed: int = 0,
        mode: str = "post-prefill",
        schedule: str | list[tuple[int, float]] | None = None,
        adaptive_scale: float | None = None,
        recycle: bool = False,
        coverage: float | None = None,
        max_kv_bytes: int | None = None,
        max_visual_tokens: int | None = None,
        sync_timing: bool = False,
    ):
        if mode not in MODES:
            raise ValueError(f"mode: unknown mode {mode!r}; valid modes are {MODES}")
        if not isinstance(sync_timing, bool):
            raise TypeError(f"sync_timing: expected True or False, got {type(sync_timing).__name__} {sync_timing!r}")
        explicit_schedule = schedule is not None and not isinstance(schedule, str)
        auto_budget = resolve_auto_budget(keep_ratio, keep_tokens, coverage, max_kv_bytes, max_visual_tokens)
        if auto_budget is not None:
            keep_ratio = None  # the lifecycle selects with the per-block counts the target picks
        elif adaptive_scale is not None:
            if isinstance(adaptive_scale, bool) or not isinstance(adaptive_scale, (int, float)) or not adaptive_scale > 0:
                raise ValueError(f"adaptive_scale: expected a number > 0 (SparseVLM's lambda), got {adaptive_scale!r}")
            if keep_ratio is not None or keep_tokens is not None or schedule is not None:
                raise ValueError(
                    "adaptive_scale: the rank-based budget sets how many tokens each image keeps; leave keep_ratio, "
                    "keep_tokens and schedule unset"
                )
        elif explicit_schedule:
            if keep_ratio is not None or keep_tokens is not None:
                raise ValueError(
                    "schedule: an explicit schedule sets every stage's keep ratio; leave keep_ratio and "
                    f"keep_tokens unset (got keep_ratio={keep_ratio!r}, keep_tokens={keep_tokens!r})"
                )
        else:
            validate_budget(keep_ratio, keep_tokens)
        adapter = adapt(model)
        self.scorer = get_scorer(scorer)
        if mode == "pre-llm":
            validate_pre_llm(self.scorer, scoring_layer)
        if auto_budget is not None:
            check_auto_budget(auto_budget, self.scorer, schedule=schedule, adaptive_scale=adaptive_scale, recycle=recycle)
        if scoring_layer is None and schedule is None:
            scoring_layer = adapter.default_scoring_layer(self.scorer.default_layer)
        if scoring_layer is not None:
            if isinstance(scoring_layer, bool) or not isinstance(scoring_layer, int):
                raise TypeError(f"scoring_layer: expected an int, got {type(scoring_layer).__name__}")
            if not 0 <= scoring_layer < adapter.num_layers:
                raise ValueError(
                    f"scoring_layer: {scoring_layer} is outside the model's decoder layers "
                    f"0..{adapter.num_layers - 1}"
                )
        super().__init__(config=adapter.vlm.config)
        self.keep_ratio = "auto" if auto_budget is not None else keep_ratio
        self.keep_tokens = keep_tokens
        self.auto_budget = auto_budget
        self.scoring_layer = scoring_layer
        self.seed = seed
        self.mode = mode
        self.adaptive_scale = adaptive_scale
        if recycle and mode != "in-prefill":
            raise ValueError(
                "recycle: recycled tokens are new hidden states that only the layers after the pruning layer can "
                "compute; pass mode='in-prefill'"
            )
        self.recycle = bool(recycle)
        if adaptive_scale is not None and not getattr(self.scorer, "provides_rater_attention", False):
            raise ValueError(
                f"adaptive_scale: the rank-based budget needs the raters' attention, which scorer "
                f"{self.scorer.name!r} does not compute; use scorer='sparsevlm' or 'sparsevlm_plus'"
            )
        self.schedule = None
        if schedule is not None:
            if mode != "in-prefill":
                raise ValueError("schedule: a progressive schedule prunes inside the prefill; pass mode='in-prefill'")
            if isinstance(schedule, str):
                if schedule != "sparsevlm":
                    raise ValueError(f"schedule: unknown schedule {schedule!r}; valid: 'sparsevlm' or [(layer, ratio), ...]")
                if keep_ratio is None:
                    raise ValueError(
                        "schedule: 'sparsevlm' derives its stages from keep_ratio (the layer-average share of visual "
                        "tokens); pass keep_ratio instead of keep_tokens"
                    )
                self.schedule = derive_schedule(keep_ratio, adapter.num_layers)
            else:
                self.schedule = validate_schedule(schedule, adapter.num_layers)
            self.scoring_layer = scoring_layer = self.schedule[0][0]
            logger.debug("in-prefill schedule (layer, keep ratio after it): %s", self.schedule)
        self._stage_layers = (
            [layer for layer, _ in self.schedule] if self.schedule else ([] if scoring_layer is None else [scoring_layer])
        )
        if mode == "in-prefill" and scoring_layer is None:
            raise ValueError(
                f"mode: 'in-prefill' prunes after a scoring layer, but scorer {self.scorer.name!r} has none; "
                "pass scoring_layer=..."
            )
        self._adapter = adapter
        options = dict(
            scorer=self.scorer, mode=mode, schedule=self.schedule, keep_ratio=keep_ratio, keep_tokens=keep_tokens,
            adaptive_scale=adaptive_scale, recycle=self.recycle, scoring_layer=self.scoring_layer, seed=seed,
            _stage_layers=self._stage_layers, auto_budget=auto_budget, sync_timing=sync_timing,
        )
        self.sparse_cache_lifecycle = PruningLifecycle(self, adapter, options)
        self._reset_state()
        hooks.hold_for_cache(adapter, self)

    def _reset_state(self) -> None:
        self.kept_visual_positions: list[torch.Tensor] = []
        self.visual_scores: list[torch.Tensor] = []
        #: per stage of the last pruning forward, per row: the visual positions still computed after it
        self.stage_kept_visual_positions: list[list[torch.Tensor]] = []
        #: with ``recycle=True``, per row: ``(representative position, member positions)`` of each recycled token
        self.recycled_groups: list[list[tuple[int, torch.Tensor]]] = []
        # Physical layout of the compacted prefix: every layer's first P0 entries. Entries after them
        # are the tokens fed since, in logical order, with validity given by the caller's 2-D mask.
        self._prefix_mask: torch.Tensor | None = None  # (B, P0) bool; None = never compacted
        self._prefix_positions: torch.Tensor | None = None  # (B, P0) logical position, -1 for a pad slot
        self._prefix_logical = 0  # logical length covered by the prefix (L0)
        self._prefix_all_valid = True
        self._dropped = 0  # logical minus physical length (L0 - P0)
        self._history_chunks: list[torch.Tensor] = []  # token ids seen, per forward, to refuse unrelated reuse
        self._rope_deltas: torch.Tensor | None = None  # (B, 1) this conversation's position offsets
        # the physical 2-D mask handed to the model, in a buffer with spare capacity (a decode step appends a
        # column in O(1)); valid for the logical length _mask_logical, dropped when the layout changes
        self._mask_buffer: torch.Tensor | None = None
        self._mask_logical = -1
        self._stats = StatsHistory()  # per pruning pass of the conversation (sparse_cache.stats)
        # per layer index: (keys, values) buffers with free slots after a layer's entries (spare.py): made at
        # compaction, or at a layer's first continued write (a decode step) when it was not compacted
        self._spare: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # layers whose tensors were replaced behind the buffers' back (beam reordering, batch selection,
        # offloading): transformers' own update from then on, no buffer is made for them again
        self._spare_declined: set[int] = set()
        self.sparse_cache_lifecycle.reset()

    def reset(self) -> None:
        super().reset()
        self._reset_state()

    @property
    def stats(self) -> PruningStats | None:
        """Metrics of the latest pruning pass (:mod:`sparse_cache.stats`); ``None`` before any call with visual
        tokens. ``stats.to_dict()`` is JSON-ready."""
        return self._stats.latest()

    @property
    def stats_history(self) -> list[PruningStats]:
        """Metrics of every pruning pass of this conversation, in order (rows follow beam reordering)."""
        return self._stats.all()

    def record_stats(self, stats: PruningStats) -> None:  # by the lifecycle, at the end of a pruning pass
        self._stats.append(stats)

    @property
    def rope_deltas(self) -> torch.Tensor | None:
        """``(B, 1)`` M-RoPE offsets of this conversation (next position = real tokens seen + delta), derived from
        the positions its own forwards received; the model's shared ``rope_deltas`` attribute is never used."""
        return self._rope_deltas

    @rope_deltas.setter
    def rope_deltas(self, deltas: torch.Tensor | None) -> None:  # set by the lifecycle from a forward's positions
        self._rope_deltas = deltas

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.sparse_cache_lifecycle.stage != "text":
            self.hooks_did_not_fire(
                f"the cache was written (layer {layer_idx}) by a forward in which sparse_cache's hooks did not run"
            )
        buffers = self._spare.get(layer_idx)
        if (buffers is None and layer_idx not in self._spare_declined and layer_idx < len(self.layers)
                and getattr(self.layers[layer_idx], "keys", None) is not None and self.layers[layer_idx].keys.numel()):
            # a layer continued for the first time (uncompacted: keep_ratio=1.0, a text-only prompt, an auto
            # budget that kept everything): moved into a buffer with free slots, one copy of the layer as
            # transformers' torch.cat would make, then written in place
            buffers = spare.grow(self.layers[layer_idx], key_states)
            if buffers is None:
                self._spare_declined.add(layer_idx)  # not a plain, filled DynamicLayer: transformers' update
        if buffers is not None:  # written in place, no copy of the whole layer per step
            written = spare.write(self.layers[layer_idx], buffers, key_states, value_states)
            if written is not None:
                self._spare[layer_idx] = written[2]
                return written[0], written[1]
            self._spare.pop(layer_idx, None)  # its tensors were replaced (beams, batch selection): transformers'
            self._spare_declined.add(layer_idx)  # update from now on
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def use_transformers_update(self) -> None:
        """Hand every layer back to transformers' own ``DynamicLayer.update`` (``torch.cat`` per step) for the rest
        of the conversation: the layers become contiguous tensors without free slots. For comparisons (the
        decode benchmark's ``torch.cat update`` column); results are the same either way."""
        self._spare.clear()
        self._spare_declined = set(range(len(self.layers)))
        for layer in self.layers:
            if getattr(layer, "keys", None) is not None:
                layer.keys, layer.values = layer.keys.contiguous(), layer.values.contiguous()

    def hooks_did_not_fire(self, what: str) -> None:
        """The self-check: a pruning cache that cannot prune raises instead of returning unpruned results."""
        self.sparse_cache_lifecycle.reset()
        raise RuntimeError(
            f"PrunableDynamicCache self-check failed: {what}. With transformers {transformers.__version__} "
            f"(cache passed as {CACHE_KWARG!r}) the pruning hooks did not see this call, so nothing would be "
            "pruned. Pass the cache to the model it was built for (model.generate / model(...) with "
            f"{CACHE_KWARG}=cache or past_key_values=cache); if you did, this transformers version changed an "
            "interface sparse_cache relies on: please report it with the version above."
        )

    # ------------------------------------------------------------------ lengths
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Logical length: tokens the sequence has seen, dropped ones included (positions continue from it)."""
        physical = super().get_seq_length(layer_idx)
        return physical + self._dropped if physical > 0 else 0

    def get_physical_length(self, layer_idx: int = 0) -> int:
        """Entries stored per row (kept tokens plus re-padding)."""
        return super().get_seq_length(layer_idx)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        # Masks index keys physically: the new queries sit right after the stored entries.
        return super().get_seq_length(layer_idx)

    # ------------------------------------------------------------------ cache API that must follow rows
    def _physical_tail_length(self) -> int:
        return self.get_seq_length() - self._prefix_logical

    def crop(self, tokens_to_remove: int) -> None:
        self._mask_logical = -1  # the physical mask is rebuilt at the next forward
        if tokens_to_remove > 0:
            raise ValueError(f"tokens_to_remove: pass a negative count to crop, got {tokens_to_remove}")
        into_prefix = -tokens_to_remove - self._physical_tail_length()
        if tokens_to_remove < 0 and self._prefix_mask is not None and into_prefix > 0:
            # Assisted decoding prefills prompt + draft tokens in one forward, then rolls back rejected drafts:
            # the prefix's last entries can go if they are the last logical tokens, stored contiguously.
            expected = torch.arange(self._prefix_logical - into_prefix, self._prefix_logical)
            last = self._prefix_positions[:, -into_prefix:].cpu()
            if into_prefix > self._prefix_positions.shape[1] or not torch.equal(last, expected.expand_as(last)):
                raise ValueError(
                    f"tokens_to_remove: cannot crop {-tokens_to_remove} tokens: that reaches into the pruned "
                    "visual tokens of the prompt"
                )
            self._prefix_mask = self._prefix_mask[:, :-into_prefix]
            self._prefix_positions = self._prefix_positions[:, :-into_prefix]
            self._prefix_logical -= into_prefix
            self._prefix_all_valid = bool(self._prefix_mask.all())
            self._dropped = self._prefix_logical - self._prefix_mask.shape[1]
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0 and self._history_chunks:
            self._history_chunks = [self._history[:, :tokens_to_remove]]

    def _select_rows(self, index: torch.Tensor) -> None:
        self._mask_logical = -1
        if self._prefix_mask is not None:
            self._prefix_mask = self._prefix_mask[index.to(self._prefix_mask.device)]
            self._prefix_positions = self._prefix_positions[index.to(self._prefix_positions.device)]
        if self._history_chunks:
            history = self._history
            self._history_chunks = [history[index.to(history.device)]]
        if self._rope_deltas is not None:
            self._rope_deltas = self._rope_deltas[index.to(self._rope_deltas.device)]
        rows = index.tolist()
        self._stats.select_rows(rows)
        if self.kept_visual_positions:
            self.kept_visual_positions = [self.kept_visual_positions[i] for i in rows]
            self.visual_scores = [self.visual_scores[i] for i in rows]
        self.stage_kept_visual_positions = [[stage[i] for i in rows] for stage in self.stage_kept_visual_positions]
        if self.recycled_groups:
            self.recycled_groups = [self.recycled_groups[i] for i in rows]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        batch = self._history_chunks[0].shape[0] if self._history_chunks else len(self.kept_visual_positions)
        self._select_rows(torch.arange(batch).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select_rows(torch.as_tensor(indices).flatten())

    # ------------------------------------------------------------------ what the lifecycle asks of the storage
    def check_continuation(self, input_ids: torch.Tensor | None) -> None:
        """Start of a ``generate`` call: a non-empty cache must be continued, not reused."""
        if not self._history_chunks or input_ids is None:
            return
        seen = self._history
        if (
            input_ids.shape[0] != seen.shape[0]
            or input_ids.shape[1] <= seen.shape[1]
            or not torch.equal(input_ids[:, : seen.shape[1]].to(seen.device), seen)
        ):
            raise ValueError(
                f"{CACHE_KWARG}: this PrunableDynamicCache already holds another conversation "
                f"({seen.shape[0]} row(s), {seen.shape[1]} tokens); a cache is single-use. Create a new "
                "PrunableDynamicCache for each unrelated generate call, or continue the same conversation by "
                "passing its previous output followed by the new turn."
            )

    def record_tokens(self, input_ids: torch.Tensor) -> None:
        # appended, not concatenated: a decode step costs O(1) here; joined once per generate call when checked
        self._history_chunks.append(input_ids)

    @property
    def _history(self) -> torch.Tensor | None:
        """``(B, L)`` token ids seen (joined from the appended chunks, which it then replaces)."""
        if not self._history_chunks:
            return None
        if len(self._history_chunks) > 1:
            device = self._history_chunks[0].device
            self._history_chunks = [torch.cat([c.to(device) for c in self._history_chunks], 1)]
        return self._history_chunks[0]

    def physical_mask(self, mask, batch: int, q_len: int):
        """The 2-D mask of the physical layout for a forward of ``q_len`` tokens given the caller's ``mask``
        (logical length, or ``None``); ``mask`` itself when the cache was never compacted."""
        past_logical = self.get_seq_length()
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.ndim == 2):
            if self._prefix_mask is not None:
                raise ValueError(
                    "attention_mask: a pruned PrunableDynamicCache needs a 2-D (batch, length) mask or none; "
                    f"got {type(mask).__name__}{tuple(getattr(mask, 'shape', ()))}"
                )
            return None
        if self._prefix_mask is None:
            return mask
        expected = past_logical + q_len
        if mask is not None and mask.shape[-1] != expected:
            raise ValueError(
                f"attention_mask: expected the logical length {expected} (tokens seen {past_logical} + new "
                f"{q_len}), got {mask.shape[-1]}"
            )
        if mask is None and self._prefix_all_valid:
            return None
        dtype = torch.bool if mask is None else mask.dtype
        buffer = self._mask_buffer
        width = self._prefix_mask.shape[1] + past_logical - self._prefix_logical + q_len
        continuing = (
            q_len == 1  # a decode step extends the last mask by one column; anything longer is rebuilt
            and buffer is not None
            and self._mask_logical == past_logical
            and buffer.dtype == dtype
            and buffer.shape[0] == batch
        )
        if continuing:
            # O(1) per step: the new column is written into spare capacity and a view is handed out
            if buffer.shape[1] < width:
                grown = buffer.new_zeros(batch, 2 * width)
                grown[:, : width - 1] = buffer[:, : width - 1]
                buffer = self._mask_buffer = grown
            new = buffer.new_ones(batch, 1) if mask is None else mask[:, -1:].to(buffer.device, dtype)
            buffer[:, width - 1 : width] = new
        else:
            tail_len = width - self._prefix_mask.shape[1]
            device = self._prefix_mask.device
            buffer = self._mask_buffer = torch.zeros(batch, 2 * width, dtype=dtype, device=device)
            buffer[:, : self._prefix_mask.shape[1]] = self._prefix_mask.to(dtype)
            if mask is None:
                buffer[:, self._prefix_mask.shape[1] : width] = 1
            else:
                buffer[:, self._prefix_mask.shape[1] : width] = mask[:, mask.shape[1] - tail_len :].to(device, dtype)
        self._mask_logical = past_logical + q_len
        return buffer[:, :width]

    def column_positions(self, logical_end: int, batch: int, device) -> torch.Tensor:
        """``(B, P)`` logical position of every physical column once ``logical_end`` tokens have been seen."""
        tail_positions = torch.arange(self._prefix_logical, logical_end, device=device)
        column_positions = tail_positions.expand(batch, -1)
        if self._prefix_positions is not None:
            column_positions = torch.cat([self._prefix_positions.to(device), column_positions], dim=1)
        return column_positions

    def check_compacted(self, key_valid: torch.Tensor, dropped_local: list[torch.Tensor]) -> None:
        """Every layer holds the compacted layout, and each row lost exactly its dropped visual tokens."""
        physical = self.get_physical_length()
        lengths = {layer.keys.shape[2] for layer in self.layers if layer.is_initialized and layer.keys is not None}
        expected = key_valid.sum(1).cpu() - torch.tensor([d.numel() for d in dropped_local])
        if lengths != {physical} or not torch.equal(self._prefix_mask.sum(1).cpu(), expected):
            raise RuntimeError(
                "PrunableDynamicCache self-check failed: after compaction the layers hold "
                f"{sorted(lengths)} entries (expected {physical} each) and the rows hold "
                f"{self._prefix_mask.sum(1).tolist()} real entries (expected {expected.tolist()}); "
                f"transformers {transformers.__version__}"
            )

    def gather_layers(self, index: torch.Tensor, layers) -> None:
        """Every given layer keeps the physical columns ``index`` ``(B, P')`` of its keys and values."""
        by_device: dict[torch.device, torch.Tensor] = {}
        for layer in layers:
            if not layer.is_initialized or layer.keys is None or layer.keys.numel() == 0:
                continue
            device = layer.keys.device
            idx = by_device.setdefault(device, index.to(device))
            b, h, _, d = layer.keys.shape
            layer.keys = layer.keys.gather(2, idx[:, None, :, None].expand(b, h, idx.shape[1], d))
            dv = layer.values.shape[-1]
            layer.values = layer.values.gather(2, idx[:, None, :, None].expand(b, h, idx.shape[1], dv))

    def set_prefix(self, logical: int, new_mask: torch.Tensor, positions: torch.Tensor) -> None:
        self._mask_logical = -1
        self._prefix_mask = new_mask
        self._prefix_positions = positions
        self._prefix_logical = logical
        self._prefix_all_valid = bool(new_mask.all())
        self._dropped = self._prefix_logical - new_mask.shape[1]
        for idx, layer in enumerate(self.layers):  # spare capacity after every compacted layer (spare.py)
            if layer.is_initialized and layer.keys is not None and layer.keys.ndim == 4:
                layer.keys, kbuf = spare.allocate(layer.keys)
                layer.values, vbuf = spare.allocate(layer.values, kbuf.shape[2] - layer.keys.shape[2])
                self._spare[idx] = (kbuf, vbuf)
        logger.debug(
            "compacted cache: logical %d -> physical %d entries per row (rows hold %s)",
            self._prefix_logical, new_mask.shape[1], new_mask.sum(1).tolist(),
        )
