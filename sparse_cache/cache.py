"""``PrunableDynamicCache``: a ``DynamicCache`` that drops the visual tokens the question does not need.

Flow of one ``generate`` call (capture -> score -> select -> compact -> decode):

1. capture: the ``Qwen2_5_VLModel`` pre-hook reads ``input_ids`` and the image/video grids of any
   forward that holds visual tokens (the prefill, or a later turn that brings a new image);
2. score: at the scoring layer, the attention post-hook hands the layer's inputs and fresh keys to the
   scorer (SparseVLM by default), which computes only the few query rows it needs;
3. select: per image (or video) of each row, the top-scored visual tokens are kept
   (``keep_ratio`` or ``keep_tokens``); text tokens are never dropped;
4. compact: right after that forward, every layer's keys and values keep only the kept tokens (and
   lose the row's padding), rows are left-padded to a common length, and the cache records the
   physical layout;
5. decode: ``get_seq_length()`` reports the logical length (tokens seen), so ``generate``'s slicing and
   the model's positions continue from the full sequence; the masks use the physical length
   (``get_query_offset``/``get_mask_sizes``), and the text-model pre-hook hands the model a 2-D mask of
   the physical layout. Decoding is then exact with respect to the kept tokens (oracle 2).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from . import hooks
import transformers

from ._compat import (
    CACHE_KWARG,
    adapt,
    continuation_positions,
    expand_rope_deltas,
    gather_rope_tables,
    get_arg,
    grids_from_positions,
    prefill_positions,
    rope_deltas_from_positions,
    rope_rows,
    rope_tables,
    set_arg,
)
from .scorers import Scorer, ScoringContext, get_scorer
from .recycle import cluster_count, density_peak_clusters, recycled_candidates
from .select import adaptive_keep_count, derive_schedule, select_visual, validate_budget, validate_schedule

logger = logging.getLogger(__name__)

#: ``post-prefill``: the prefill runs on every token, the cache is compacted right after it (default).
#: ``in-prefill``: the layers after the scoring layer compute only the kept tokens (SparseVLM proper).
MODES = ("post-prefill", "in-prefill")


@dataclass
class _Pass:
    """What one forward holding visual tokens captured, until it is compacted."""

    past_logical: int  # logical cache length before this forward
    seq_len: int  # tokens fed in this forward
    token_valid: torch.Tensor  # (B, S) bool
    visual_positions: list[torch.Tensor]
    visual_blocks: list[torch.Tensor]  # per row, image/video index of each visual token
    block_grids: list[tuple[int, int, int]] | None  # merged (t, h, w) grid of each block index
    text_positions: list[torch.Tensor]
    inputs_embeds: torch.Tensor | None = None
    key_valid: torch.Tensor | None = None  # (B, P + S) bool physical validity of every key column
    scores: list[torch.Tensor | None] | None = None
    context: ScoringContext | None = None
    layout: dict | None = None  # in-prefill: gather index, validity, mask and RoPE of the kept tokens
    stage: int = 0  # next stage of the schedule to score
    index: torch.Tensor | None = None  # (B, S_cur) this forward's token behind each current slot
    valid: torch.Tensor | None = None  # (B, S_cur) validity of the current slots
    survivors: list[torch.Tensor] | None = None  # per row, bool over visual_positions: still computed
    cuts: list = field(default_factory=list)  # (index, valid, layer) after each in-prefill stage
    recycled: list = field(default_factory=list)  # (row, final slot, member tokens) of recycled tokens
    extras: dict = field(default_factory=dict)


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
        model: a ``Qwen2_5_VLForConditionalGeneration`` (or ``Qwen2_5_VLModel``) loaded with
            ``attn_implementation="sdpa"`` or ``"eager"``. Hooks are installed on it once; they do nothing
            for calls that do not use a ``PrunableDynamicCache``.
        keep_ratio: fraction in (0, 1] of each image's (or video's) visual tokens to keep,
            ``round(keep_ratio * n)`` with at least one. Exactly one of ``keep_ratio``/``keep_tokens``.
        keep_tokens: number of visual tokens to keep per image (or video); all of them if it has fewer.
        scorer: a registered scorer name (``"sparsevlm"`` default, ``"fastv"``, ``"random"``) or a
            :class:`~sparse_cache.scorers.Scorer` instance.
        scoring_layer: decoder layer whose attention scores the tokens; defaults to the scorer's own
            (2 for SparseVLM, 1 for FastV, none for random).
        seed: seed of the generator handed to stochastic scorers (default 0).
        adaptive_scale: SparseVLM's rank-based budget (paper section 3.2) instead of keep_ratio/keep_tokens:
            each image keeps ``n - round(adaptive_scale * (n - rank(P)))`` tokens, ``P`` being the raters'
            head-averaged attention to its visual tokens (scorers ``sparsevlm``/``sparsevlm_plus``).
        mode: ``"post-prefill"`` (default): the prefill computes every token and the cache is compacted
            right after it. ``"in-prefill"``: right after the scoring layer its output keeps only the kept
            visual tokens plus all text, so the later layers of the prefill compute fewer tokens (with
            their original positions); the earlier layers' caches are compacted to the same set at the
            end of the prefill. In this mode a prefill forward returns logits for the kept tokens only
            (``generate`` reads the last one).
        schedule: in-prefill only, a progressive schedule: ``"sparsevlm"`` derives the authors' three
            pruning layers (2/6/15 of 32, scaled to the model's depth) and budgets so that the average
            over layers of the visual tokens computed is ``keep_ratio``; or an explicit
            ``[(layer, keep_ratio_after_it), ...]`` (ratios of each image's own count, non-increasing;
            leave keep_ratio unset). Every layer's cache ends with the last stage's set.

    After a call, per batch row (following beam reordering):
        kept_visual_positions: ascending positions, in that row of the ``input_ids`` given to
            ``generate``, of the visual tokens kept (a later turn's images are numbered in the whole
            conversation).
        visual_scores: the score of every visual token of the row, in position order.
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
    ):
        if mode not in MODES:
            raise ValueError(f"mode: unknown mode {mode!r}; valid modes are {MODES}")
        explicit_schedule = schedule is not None and not isinstance(schedule, str)
        if adaptive_scale is not None:
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
        if scoring_layer is None:
            scoring_layer = self.scorer.default_layer
        if scoring_layer is not None:
            if isinstance(scoring_layer, bool) or not isinstance(scoring_layer, int):
                raise TypeError(f"scoring_layer: expected an int, got {type(scoring_layer).__name__}")
            if not 0 <= scoring_layer < adapter.num_layers:
                raise ValueError(
                    f"scoring_layer: {scoring_layer} is outside the model's decoder layers "
                    f"0..{adapter.num_layers - 1}"
                )
        super().__init__(config=adapter.vlm.config)
        self.keep_ratio = keep_ratio
        self.keep_tokens = keep_tokens
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
        self._generator = torch.Generator().manual_seed(seed)
        self._reset_state()
        hooks.hold_for_cache(adapter, self)

    # ------------------------------------------------------------------ state
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
        self._history: torch.Tensor | None = None  # (B, L) token ids seen, to refuse unrelated reuse
        self._pass: _Pass | None = None
        self._rope_deltas: torch.Tensor | None = None  # (B, 1) this conversation's M-RoPE offsets
        # where the current forward is: None between forwards, "vlm" after the model's pre-hook, "text" inside the
        # decoder; the self-check reads it (a hook that did not fire must not go unnoticed)
        self._stage: str | None = None
        self._splitting = False  # inside the prompt-only forward of a split assisted-decoding prefill
        self._prompt_logits: torch.Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self._reset_state()

    @property
    def rope_deltas(self) -> torch.Tensor | None:
        """``(B, 1)`` M-RoPE offsets of this conversation (next position = real tokens seen + delta), derived from
        the positions its own forwards received; the model's shared ``rope_deltas`` attribute is never used."""
        return self._rope_deltas

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self._stage != "text":
            self._hooks_did_not_fire(
                f"the cache was written (layer {layer_idx}) by a forward in which sparse_cache's hooks did not run"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _hooks_did_not_fire(self, what: str) -> None:
        """The self-check: a pruning cache that cannot prune raises instead of returning unpruned results."""
        self._stage = None
        self._pass = None
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
        if tokens_to_remove < 0 and self._history is not None:
            self._history = self._history[:, :tokens_to_remove]

    def _select_rows(self, index: torch.Tensor) -> None:
        if self._prefix_mask is not None:
            self._prefix_mask = self._prefix_mask[index.to(self._prefix_mask.device)]
            self._prefix_positions = self._prefix_positions[index.to(self._prefix_positions.device)]
        if self._history is not None:
            self._history = self._history[index.to(self._history.device)]
        if self._rope_deltas is not None:
            self._rope_deltas = self._rope_deltas[index.to(self._rope_deltas.device)]
        rows = index.tolist()
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
        batch = self._history.shape[0] if self._history is not None else len(self.kept_visual_positions)
        self._select_rows(torch.arange(batch).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select_rows(torch.as_tensor(indices).flatten())

    # ------------------------------------------------------------------ hook callbacks
    def _on_generate_prefill(self, input_ids: torch.Tensor | None) -> None:
        """Start of a ``generate`` call: a non-empty cache must be continued, not reused."""
        if self._history is None or input_ids is None:
            return
        seen = self._history
        if (
            input_ids.shape[0] != seen.shape[0]
            or input_ids.shape[1] <= seen.shape[1]
            or not torch.equal(input_ids[:, : seen.shape[1]].to(seen.device), seen)
        ):
            raise ValueError(
                "past_key_values: this PrunableDynamicCache already holds another conversation "
                f"({seen.shape[0]} row(s), {seen.shape[1]} tokens); a cache is single-use. Create a new "
                "PrunableDynamicCache for each unrelated generate call, or continue the same conversation by "
                "passing its previous output followed by the new turn."
            )

    def _on_top_forward(self, module, args, kwargs):
        """Assisted decoding feeds prompt + draft tokens in its first forward (``logits_to_keep`` > 1).

        Scored that way, the drafts would rate the image and see every visual token. Instead, run the
        prompt alone first (scored and compacted exactly as a plain prefill), then let the call feed only
        the drafts over the pruned cache; ``_on_top_forward_end`` prepends the prompt's last logits, so the
        caller sees the ``logits_to_keep`` rows it asked for. Greedy assisted decoding then equals greedy.
        """
        self._prompt_logits = None
        keep = kwargs.get("logits_to_keep")
        input_ids = kwargs.get("input_ids")
        if (
            self._splitting
            or self.get_seq_length() != 0
            or not isinstance(keep, int)
            or keep <= 1
            or not isinstance(input_ids, torch.Tensor)
            or input_ids.shape[1] < keep
        ):
            return None
        drafts = keep - 1
        visual = torch.isin(input_ids[:, -drafts:], torch.tensor(self._adapter.visual_token_ids, device=input_ids.device))
        if bool(visual.any()):
            return None
        prompt_kwargs, draft_kwargs = dict(kwargs), dict(kwargs)
        for name in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"):
            value = kwargs.get(name)
            if isinstance(value, torch.Tensor) and value.ndim == 2:
                prompt_kwargs[name] = value[:, :-drafts]
                draft_kwargs[name] = value[:, -drafts:] if name != "attention_mask" else value
        positions = kwargs.get("position_ids")
        if isinstance(positions, torch.Tensor):
            prompt_kwargs["position_ids"] = positions[..., :-drafts]
            draft_kwargs["position_ids"] = positions[..., -drafts:]
        prompt_kwargs["logits_to_keep"] = 1
        draft_kwargs["logits_to_keep"] = drafts
        for name in ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "second_per_grid_ts",
                     "mm_encoder_outputs"):
            draft_kwargs.pop(name, None)
        self._splitting = True
        try:
            self._prompt_logits = module(*args, **prompt_kwargs).logits
        finally:
            self._splitting = False
        return args, draft_kwargs

    def _on_top_forward_end(self, output):
        if self._prompt_logits is None or self._splitting:
            return None
        prompt_logits, self._prompt_logits = self._prompt_logits, None
        output.logits = torch.cat([prompt_logits.to(output.logits.dtype), output.logits], dim=1)
        return output

    def _on_vlm_forward(self, module, args, kwargs):
        """Start of a forward of the VLM: capture the visual tokens; positions from this conversation only."""
        if module is not self._adapter.vlm:
            raise ValueError(
                f"{CACHE_KWARG}: this PrunableDynamicCache was built for another model instance; build one "
                "with PrunableDynamicCache(model, ...) for the model you call"
            )
        names = self._adapter.vlm_args
        input_ids = get_arg(args, kwargs, names, "input_ids")
        if input_ids is None:
            raise ValueError(
                "input_ids: PrunableDynamicCache needs input_ids to find the visual tokens; calls with "
                "inputs_embeds only are not supported"
            )
        self._pass = None  # an earlier forward that raised must not leak into this one
        self._stage = "vlm"
        past_logical = self.get_seq_length()
        self._history = input_ids if self._history is None else torch.cat([self._history, input_ids.to(self._history.device)], 1)
        adapter = self._adapter
        batch, seq_len = input_ids.shape
        is_visual = torch.isin(input_ids, torch.tensor(adapter.visual_token_ids, device=input_ids.device))
        has_visual = bool(is_visual.any())
        mask = get_arg(args, kwargs, names, "attention_mask")
        mask_2d = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
        if mask_2d is not None:
            token_valid = mask_2d[:, -seq_len:].to(input_ids.device).bool()
            valid_total = mask_2d.to(input_ids.device).bool().sum(-1)
        else:
            token_valid = torch.ones_like(input_ids, dtype=torch.bool)
            valid_total = torch.full((batch,), past_logical + seq_len, device=input_ids.device)
        position_ids, result = self._positions(args, kwargs, input_ids, mask, past_logical, has_visual)
        if position_ids is not None and (past_logical == 0 or has_visual):
            self._rope_deltas = rope_deltas_from_positions(position_ids, token_valid, valid_total)
        elif past_logical == 0:
            self._rope_deltas = torch.zeros(batch, 1, dtype=torch.long, device=input_ids.device)  # plain positions
        if not has_visual:
            return result
        is_visual &= token_valid
        block_of, block_grids = _visual_block_ids(input_ids, is_visual, adapter, kwargs)
        if block_grids is None:
            block_grids = grids_from_positions(position_ids, block_of, is_visual)
        visual_positions, visual_blocks, text_positions = [], [], []
        positions = torch.arange(seq_len, device=input_ids.device)
        for row in range(batch):
            visual = positions[is_visual[row]]
            visual_positions.append(visual)
            visual_blocks.append(block_of[row][is_visual[row]])
            if visual.numel():
                text_positions.append(positions[(positions > visual[-1]) & token_valid[row]])
            else:
                text_positions.append(positions[:0])
        self._pass = _Pass(
            past_logical=past_logical,
            seq_len=seq_len,
            token_valid=token_valid,
            visual_positions=visual_positions,
            visual_blocks=visual_blocks,
            block_grids=block_grids,
            text_positions=text_positions,
        )
        return result

    def _positions(self, args, kwargs, input_ids, mask, past_logical: int, has_visual: bool):
        """This forward's position ids, and the ``(args, kwargs)`` to hand the model (``None``: unchanged).

        Given ones are used as they are, after checking that a continued text-only forward continues this
        conversation's offsets. Missing ones are computed here, as the model would, but from this
        conversation's offsets: the model's shared ``rope_deltas`` attribute is never read nor written.
        """
        names = self._adapter.vlm_args
        position_ids = get_arg(args, kwargs, names, "position_ids")
        seq_len = input_ids.shape[1]
        if position_ids is not None:
            if past_logical > 0 and not has_visual and self._rope_deltas is not None:
                expected = continuation_positions(self._rope_deltas, past_logical, seq_len, mask, input_ids.device)
                given = rope_rows(position_ids).to(input_ids.device)
                if given.shape[-2:] == expected.shape[-2:] and not torch.equal(given, expected[: given.shape[0]]):
                    raise ValueError(
                        "position_ids: the positions given do not continue this conversation (its M-RoPE offsets "
                        f"are {self._rope_deltas.flatten().tolist()}, tokens seen {past_logical}); they were "
                        "probably computed from another conversation's offsets. Pass positions that continue this "
                        "conversation, or none."
                    )
            return position_ids, None
        if past_logical == 0:
            computed = prefill_positions(self._adapter.vlm, input_ids, kwargs, mask)
            if computed is None:
                return None, None  # the model falls back to plain positions, as without the library
            position_ids = computed[0]
        else:
            if has_visual:
                raise ValueError(
                    "position_ids: a forward that brings new images or videos onto a non-empty "
                    "PrunableDynamicCache needs explicit position_ids (the model's get_rope_index over the whole "
                    "conversation); computed from the previous turn's offsets they would be wrong"
                )
            position_ids = continuation_positions(self._rope_deltas, past_logical, seq_len, mask, input_ids.device)
        return position_ids, set_arg(args, kwargs, names, "position_ids", position_ids)

    def _on_text_forward(self, args, kwargs):
        if self._stage != "vlm":
            self._hooks_did_not_fire(
                "the decoder ran without the VLM's forward hook having seen the call (was the cache passed to the "
                "language model directly, or did the VLM's hook not fire?)"
            )
        self._stage = "text"
        names = self._adapter.text_args
        embeds = get_arg(args, kwargs, names, "inputs_embeds")
        mask = get_arg(args, kwargs, names, "attention_mask")
        if embeds is None:
            raise ValueError("inputs_embeds: PrunableDynamicCache expects the decoder to receive inputs_embeds")
        batch, q_len = embeds.shape[:2]
        past_logical = self.get_seq_length()
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.ndim == 2):
            if self._prefix_mask is not None:
                raise ValueError(
                    "attention_mask: a pruned PrunableDynamicCache needs a 2-D (batch, length) mask or none; "
                    f"got {type(mask).__name__}{tuple(getattr(mask, 'shape', ()))}"
                )
            physical_mask = None
        elif self._prefix_mask is None:
            physical_mask = mask
        else:
            expected = past_logical + q_len
            if mask is not None and mask.shape[-1] != expected:
                raise ValueError(
                    f"attention_mask: expected the logical length {expected} (tokens seen {past_logical} + new "
                    f"{q_len}), got {mask.shape[-1]}"
                )
            if mask is None and self._prefix_all_valid:
                physical_mask = None
            else:
                tail_len = past_logical - self._prefix_logical + q_len
                if mask is None:
                    tail = torch.ones(batch, tail_len, dtype=torch.bool, device=self._prefix_mask.device)
                else:
                    tail = mask[:, self._prefix_logical :].to(self._prefix_mask.device).bool()
                physical_mask = torch.cat([self._prefix_mask, tail], dim=1)
                if mask is not None:
                    physical_mask = physical_mask.to(mask.dtype)
        if self._pass is not None:
            p = self._pass
            p.inputs_embeds = embeds
            physical_len = self.get_physical_length() + q_len
            if physical_mask is None:
                p.key_valid = torch.ones(batch, physical_len, dtype=torch.bool, device=embeds.device)
            else:
                p.key_valid = physical_mask.to(embeds.device).bool()
        if physical_mask is mask:
            return None
        return set_arg(args, kwargs, names, "attention_mask", physical_mask)

    def _on_attention(self, module, args, kwargs) -> None:
        p = self._pass
        if (
            p is None
            or p.scores is not None
            or p.stage >= len(self._stage_layers)
            or module.layer_idx != self._stage_layers[p.stage]
        ):
            return
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = rope_tables(module, *kwargs["position_embeddings"])
        keys = self.layers[module.layer_idx].keys
        context = self._context(p)
        context.layer_idx = module.layer_idx
        context.attn_module = module
        context.hidden_states = hidden
        context.cos, context.sin = cos, sin
        context.keys = keys
        context.past_length = keys.shape[2] - hidden.shape[1]
        self._score(p, context)

    def _context(self, p: _Pass) -> ScoringContext:
        if p.index is not None:
            return self._stage_context(p)
        return ScoringContext(
            inputs_embeds=p.inputs_embeds,
            token_valid=p.token_valid,
            visual_positions=p.visual_positions,
            text_positions=p.text_positions,
            visual_blocks=p.visual_blocks,
            block_grids=p.block_grids,
            key_valid=p.key_valid,
            generator=self._generator,
            extras=p.extras,
        )

    def _stage_context(self, p: _Pass) -> ScoringContext:
        """Context of a later stage of a progressive schedule: positions are slots of the current layout."""
        index, valid = p.index, p.valid
        embeds = p.inputs_embeds.gather(1, index.to(p.inputs_embeds.device)[..., None].expand(-1, -1, p.inputs_embeds.shape[-1]))
        visual, text, blocks = [], [], []
        for row in range(index.shape[0]):
            slot_of = torch.full((p.seq_len,), -1, dtype=torch.long, device=index.device)
            slots = torch.nonzero(valid[row], as_tuple=False).flatten()
            slot_of[index[row, slots]] = slots
            alive = p.survivors[row].to(index.device)
            visual.append(slot_of[p.visual_positions[row].to(index.device)[alive]])
            text.append(slot_of[p.text_positions[row].to(index.device)])
            blocks.append(p.visual_blocks[row].to(index.device)[alive])
        past = p.key_valid.shape[1] - p.seq_len
        return ScoringContext(
            inputs_embeds=embeds,
            token_valid=valid,
            visual_positions=visual,
            text_positions=text,
            visual_blocks=blocks,
            block_grids=p.block_grids,
            key_valid=torch.cat([p.key_valid[:, :past], valid.to(p.key_valid.device)], dim=1),
            generator=self._generator,
            extras=p.extras,
            original_positions=index,
        )

    def _score(self, p: _Pass, context: ScoringContext) -> None:
        with torch.no_grad():
            scores = self.scorer.score(context)
        if len(scores) != context.batch_size:
            raise RuntimeError(f"scorer {self.scorer!r} returned {len(scores)} rows for {context.batch_size}")
        p.scores = scores
        # keep only positions and blocks: holding the layer's inputs until the end of the prefill would cost
        # one (tokens x hidden) tensor of peak memory (measured by the benchmark)
        context.hidden_states = context.cos = context.sin = context.keys = context.attn_module = None
        p.context = context

    def _on_text_forward_end(self, failed: bool = False) -> None:
        """End of the decoder's forward: select and compact, then check that what had to happen did."""
        p, stage = self._pass, self._stage
        self._pass, self._stage = None, None
        if failed or p is None:
            return
        if stage != "text":
            self._hooks_did_not_fire("the decoder's pre-hook did not run for a forward that holds visual tokens")
        if self.mode == "in-prefill" and not p.cuts and p.scores is not None:
            self._hooks_did_not_fire(
                f"in-prefill mode scored at layer {self._stage_layers[p.stage]} but the decoder layer's hook did not "
                "cut its output"
            )
        if p.cuts:  # in-prefill: later layers already hold the kept layout
            if p.stage != len(self._stage_layers):
                self._hooks_did_not_fire(
                    f"in-prefill mode ran {p.stage} of its {len(self._stage_layers)} pruning stages"
                )
            with torch.no_grad():
                self._finish_in_prefill(p)
            return
        if p.scores is None:
            if self.scoring_layer is not None:
                self._hooks_did_not_fire(
                    f"the scoring layer {self.scoring_layer}'s attention hook did not run during a forward that "
                    "holds visual tokens"
                )
            self._score(p, self._context(p))
        with torch.no_grad():
            keeps = self._select(p)
            dropped_local = [v[~k] for v, k in zip(p.visual_positions, keeps)]
            if all(d.numel() == 0 for d in dropped_local):
                return  # nothing dropped: leave the cache exactly as a DynamicCache would hold it
            self._compact(p, dropped_local)
            self._check_compacted(p, dropped_local)

    # ------------------------------------------------------------------ select + compact
    def _stage_budget(self, stage: int) -> tuple[float | None, int | None]:
        if self.schedule is None:
            return self.keep_ratio, self.keep_tokens
        return self.schedule[stage][1], None

    def _select(self, p: _Pass) -> list[torch.Tensor]:
        """Pick the kept visual tokens of each row at the current stage; record them.

        Returns, per row, a bool over the stage's candidates (the visual tokens still computed, in
        position order, i.e. ``p.context.visual_positions``): True = kept.
        """
        batch = len(p.visual_positions)
        if p.survivors is None:
            p.survivors = [torch.ones(v.numel(), dtype=torch.bool, device=v.device) for v in p.visual_positions]
        if not self.kept_visual_positions:
            empty = p.visual_positions[0].new_zeros(0)
            self.kept_visual_positions = [empty for _ in range(batch)]
            self.visual_scores = [empty.float() for _ in range(batch)]
        keep_ratio, keep_tokens = self._stage_budget(p.stage)
        final = self.schedule is None or p.stage == len(self.schedule) - 1
        keeps = []
        for row in range(batch):
            visual = p.visual_positions[row]
            alive = p.survivors[row]
            candidates, blocks = visual[alive], p.visual_blocks[row][alive]
            scores = p.scores[row]
            if candidates.numel() == 0:
                keeps.append(torch.zeros(0, dtype=torch.bool, device=visual.device))
                continue
            if scores is None:
                logger.warning(
                    "row %d: no text follows its visual tokens, so %s cannot rate them; keeping all %d",
                    row, self.scorer.name, candidates.numel(),
                )
                scores = torch.full((candidates.numel(),), float("nan"), device=visual.device)
                kept_idx = torch.arange(candidates.numel(), device=visual.device)
            else:
                scores = scores.float().to(visual.device)
                ids, counts = torch.unique_consecutive(p.visual_blocks[row], return_counts=True)
                reference = {int(b): int(c) for b, c in zip(ids, counts)}
                budgets = None
                if self.adaptive_scale is not None:
                    attention = p.extras["rater_attention"][row]  # (raters, candidates)
                    budgets = {
                        int(b): adaptive_keep_count(attention[:, blocks == b], self.adaptive_scale)
                        for b in torch.unique_consecutive(blocks)
                    }
                kept_idx = select_visual(scores, blocks, keep_ratio, keep_tokens, reference, budgets)
                if keep_tokens is not None:
                    for block, count in reference.items():
                        if count < keep_tokens:
                            logger.debug(
                                "row %d, visual block %d: keep_tokens=%d exceeds its %d tokens; keeping all",
                                row, block, keep_tokens, count,
                            )
            keep = torch.zeros(candidates.numel(), dtype=torch.bool, device=visual.device)
            keep[kept_idx] = True
            keeps.append(keep)
            if p.stage == 0:
                self.visual_scores[row] = torch.cat([self.visual_scores[row].to(scores.device), scores])
            new_alive = alive.clone()
            new_alive[alive] = keep
            p.survivors[row] = new_alive
            if final:
                self.kept_visual_positions[row] = torch.cat(
                    [self.kept_visual_positions[row].to(visual.device), visual[new_alive] + p.past_logical]
                )
            logger.debug("row %d, stage %d: kept %d of %d visual tokens", row, p.stage, int(keep.sum()), visual.numel())
        if p.stage == 0:
            self.stage_kept_visual_positions = []
        self.stage_kept_visual_positions.append(
            [v[a] + p.past_logical for v, a in zip(p.visual_positions, p.survivors)]
        )
        return keeps

    def _column_positions(self, p: _Pass, device) -> torch.Tensor:
        """``(B, P + S)`` logical position of every physical column after this forward's update."""
        tail_positions = torch.arange(self._prefix_logical, p.past_logical + p.seq_len, device=device)
        column_positions = tail_positions.expand(p.token_valid.shape[0], -1)
        if self._prefix_positions is not None:
            column_positions = torch.cat([self._prefix_positions.to(device), column_positions], dim=1)
        return column_positions

    def _compact(self, p: _Pass, dropped_local: list[torch.Tensor]) -> None:
        physical = self.get_physical_length()
        past_physical = physical - p.seq_len
        keep = p.key_valid.clone()  # (B, physical): padding and masked slots go too
        for row, dropped in enumerate(dropped_local):
            keep[row, dropped.to(keep.device) + past_physical] = False
        index, new_mask = _left_packed(keep)
        positions = self._column_positions(p, keep.device).gather(1, index).masked_fill(~new_mask, -1)
        self._gather_layers(index, self.layers)
        self._set_prefix(p, new_mask, positions)

    def _check_compacted(self, p: _Pass, dropped_local: list[torch.Tensor]) -> None:
        """Every layer holds the compacted layout, and each row lost exactly its dropped visual tokens."""
        physical = self.get_physical_length()
        lengths = {layer.keys.shape[2] for layer in self.layers if layer.is_initialized and layer.keys is not None}
        expected = p.key_valid.sum(1).cpu() - torch.tensor([d.numel() for d in dropped_local])
        if lengths != {physical} or not torch.equal(self._prefix_mask.sum(1).cpu(), expected):
            raise RuntimeError(
                "PrunableDynamicCache self-check failed: after compaction the layers hold "
                f"{sorted(lengths)} entries (expected {physical} each) and the rows hold "
                f"{self._prefix_mask.sum(1).tolist()} real entries (expected {expected.tolist()}); "
                f"transformers {transformers.__version__}"
            )

    def _gather_layers(self, index: torch.Tensor, layers) -> None:
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

    def _set_prefix(self, p: _Pass, new_mask: torch.Tensor, positions: torch.Tensor) -> None:
        self._prefix_mask = new_mask
        self._prefix_positions = positions
        self._prefix_logical = p.past_logical + p.seq_len
        self._prefix_all_valid = bool(new_mask.all())
        self._dropped = self._prefix_logical - new_mask.shape[1]
        logger.debug(
            "compacted cache: logical %d -> physical %d entries per row (rows hold %s)",
            self._prefix_logical, new_mask.shape[1], new_mask.sum(1).tolist(),
        )

    # ------------------------------------------------------------------ in-prefill pruning
    def _on_layer_forward(self, module, args, kwargs):
        """Layers after a pruning layer compute only the kept tokens: mask and RoPE follow the kept set."""
        p = self._pass
        if p is None or p.layout is None or module.self_attn.layer_idx <= p.layout["after_layer"]:
            return None
        layout = p.layout
        cos, sin = kwargs["position_embeddings"]
        if layout.get("rope_source") is not cos:
            # the text model computes full-sequence tables once for all layers: gather the kept slots
            # (5.14 hands (3, B, S, d) tables, later versions (B, S, d))
            layout["rope"] = (gather_rope_tables(cos, layout["index"]), gather_rope_tables(sin, layout["index"]))
            layout["rope_source"] = cos
        kwargs = dict(kwargs)
        kwargs["position_embeddings"] = layout["rope"]
        kwargs["attention_mask"] = None if layout["mask"] is None else layout["mask"].to(cos.device)
        kwargs["position_ids"] = None
        return args, kwargs

    def _on_layer_forward_end(self, module, output):
        """After a pruning layer: select, and cut its output to the kept tokens plus all text."""
        p = self._pass
        layer = module.self_attn.layer_idx
        if (
            p is None
            or self.mode != "in-prefill"
            or p.scores is None
            or p.stage >= len(self._stage_layers)
            or layer != self._stage_layers[p.stage]
        ):
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        with torch.no_grad():
            keeps = self._select(p)
            slots_valid = (p.valid if p.index is not None else p.token_valid).clone()
            for row, keep in enumerate(keeps):
                slots_valid[row, p.context.visual_positions[row].to(slots_valid.device)[~keep]] = False
            overrides = []
            if self.recycle and p.stage == len(self._stage_layers) - 1:
                plan = self._recycle_plan(p, keeps, hidden)
                local, valid, overrides = _packed_with_recycled(slots_valid, plan)
            else:
                local, valid = _left_packed(slots_valid)
            index = local if p.index is None else p.index.gather(1, local)
            past = p.key_valid.shape[1] - p.seq_len
            p.cuts.append((index, valid, layer))
            p.index, p.valid = index, valid
            p.layout = {
                "index": index, "valid": valid, "after_layer": layer,
                "mask": self._in_prefill_mask(p, valid, past, hidden),
            }
            p.stage += 1
            p.scores = None
        width = hidden.shape[1]
        hidden = hidden.gather(1, local.to(hidden.device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        if overrides:
            hidden = hidden.clone()
            self.recycled_groups = [[] for _ in range(hidden.shape[0])]
            for row, slot, vector, members in overrides:
                hidden[row, slot] = vector.to(hidden.dtype)
                originals = members.to(index.device) if len(p.cuts) == 1 else p.cuts[-2][0][row, members.to(index.device)]
                p.recycled.append((row, slot, originals))
                self.recycled_groups[row].append(
                    (int(index[row, slot]) + p.past_logical, originals.sort().values + p.past_logical)
                )
        logger.debug("in-prefill: layer %d output cut from %d to %d tokens per row", layer, width, hidden.shape[1])
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    def _recycle_plan(self, p: _Pass, keeps: list[torch.Tensor], hidden: torch.Tensor) -> list[dict]:
        """Per row: after which slot each image's recycled tokens go, and their representative/members.

        Of an image's pruned tokens, the best-scored 30% (+1) are clustered by density-peak clustering on
        their hidden states (the pruning layer's output); each cluster becomes one token: the mean hidden
        state, at the 3-D position of its best-scored member (the representative), placed right after the
        image's last kept token.
        """
        plan = []
        for row, keep in enumerate(keeps):
            row_plan: dict[int, list] = {}
            scores = p.scores[row]
            slots = p.context.visual_positions[row]
            if scores is None or slots.numel() == 0:
                plan.append(row_plan)
                continue
            blocks = p.context.visual_blocks[row].to(slots.device)
            scores = scores.float().to(slots.device)
            for block in torch.unique_consecutive(blocks):
                in_block = blocks == block
                dropped = torch.nonzero(in_block & ~keep, as_tuple=False).flatten()
                kept = torch.nonzero(in_block & keep, as_tuple=False).flatten()
                m = recycled_candidates(dropped.numel())
                if m == 0 or kept.numel() == 0:
                    continue
                best = dropped[torch.argsort(scores[dropped], descending=True, stable=True)[:m]]
                member_slots = slots[best].to(hidden.device)
                labels = density_peak_clusters(hidden[row, member_slots].float(), cluster_count(m))
                groups = []
                for cluster in range(int(labels.max()) + 1):
                    members = best[(labels == cluster).to(best.device)]
                    if members.numel() == 0:
                        continue
                    representative = members[torch.argmax(scores[members])]
                    member_slots = slots[members]
                    vector = hidden[row, member_slots.to(hidden.device)].float().mean(dim=0)
                    groups.append((int(slots[representative]), member_slots, vector))
                row_plan[int(slots[kept].max())] = groups
            plan.append(row_plan)
        return plan

    def _in_prefill_mask(self, p: _Pass, valid: torch.Tensor, past: int, hidden: torch.Tensor):
        """4-D mask of the kept layout: past valid columns, causal over the kept tokens, pads masked.

        ``None`` under sdpa when it would be plainly causal (no past, no padding): sdpa's ``is_causal``
        kernels are faster and never materialise the ``N x N`` mask.
        """
        batch, new = valid.shape
        if self._adapter.attn_implementation == "sdpa" and past == 0 and bool(valid.all()):
            return None
        past_valid = p.key_valid[:, :past].to(valid.device)
        causal = torch.ones(new, new, dtype=torch.bool, device=valid.device).tril()
        allowed_new = causal[None] & valid[:, None, :]
        # a pad row attends to itself only, so that its (unused) hidden state stays finite
        allowed_new |= torch.eye(new, dtype=torch.bool, device=valid.device)[None] & ~valid[:, :, None]
        allowed = torch.cat([past_valid[:, None, :].expand(batch, new, past) & valid[:, :, None], allowed_new], -1)
        allowed = allowed[:, None]
        if self._adapter.attn_implementation == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=hidden.dtype, device=valid.device).masked_fill(
            ~allowed, torch.finfo(hidden.dtype).min
        )

    def _finish_in_prefill(self, p: _Pass) -> None:
        """End of an in-prefill forward: every layer's cache adopts the last stage's layout.

        Layers up to the first pruning layer computed every token; layers between two pruning layers
        computed the earlier stage's survivors. Each keeps the final set, so decoding sees one layout.
        """
        final_index, final_valid = p.index, p.valid
        batch = final_index.shape[0]
        past = p.key_valid.shape[1] - p.seq_len
        past_columns = torch.arange(past, device=final_index.device).expand(batch, -1)
        group_start = 0
        layouts = [(None, None)] + [(index, valid) for index, valid, _ in p.cuts[:-1]]
        for (index, valid), (_, _, last_layer) in zip(layouts, p.cuts):
            if index is None:
                slot_of = torch.arange(p.seq_len, device=final_index.device).expand(batch, -1)
            else:
                slot_of = torch.full((batch, p.seq_len), 0, dtype=torch.long, device=index.device)
                for row in range(batch):
                    slots = torch.nonzero(valid[row], as_tuple=False).flatten()
                    slot_of[row, index[row, slots]] = slots
            local = slot_of.gather(1, final_index)
            group = self.layers[group_start : last_layer + 1]
            # recycled tokens never ran through these layers: they hold the mean of their members' entries
            means = [
                [(row, slot, layer.keys[row, :, past + slot_of[row, members]].mean(-2),
                  layer.values[row, :, past + slot_of[row, members]].mean(-2)) for row, slot, members in p.recycled]
                for layer in group
            ]
            self._gather_layers(torch.cat([past_columns, local + past], 1), group)
            for layer, layer_means in zip(group, means):
                for row, slot, key, value in layer_means:
                    layer.keys[row, :, past + slot] = key
                    layer.values[row, :, past + slot] = value
            group_start = last_layer + 1
        full_index = torch.cat([past_columns, final_index + past], dim=1)
        columns = self._column_positions(p, final_index.device).gather(1, full_index)
        new_mask = torch.cat([p.key_valid[:, :past].to(final_valid.device), final_valid], dim=1)
        columns = columns.masked_fill(~new_mask, -1)
        for row, slot, _ in p.recycled:
            columns[row, past + slot] = -2  # a recycled token: no logical token of its own
        self._set_prefix(p, new_mask, columns)


def _packed_with_recycled(slots_valid: torch.Tensor, plan: list[dict]):
    """Like :func:`_left_packed`, with each image's recycled tokens inserted after its last kept slot.

    A recycled slot points at its representative (for RoPE); returns the gather index, validity and
    ``(row, new slot, mean hidden state, member slots)`` for every recycled token.
    """
    rows, overrides = [], []
    for row in range(slots_valid.shape[0]):
        entries = []
        for slot in torch.nonzero(slots_valid[row], as_tuple=False).flatten().tolist():
            entries.append(slot)
            for representative, members, vector in plan[row].get(slot, []):
                overrides.append([row, len(entries), vector, members])
                entries.append(representative)
        rows.append(entries)
    width = max((len(e) for e in rows), default=0)
    index = torch.zeros(len(rows), width, dtype=torch.long, device=slots_valid.device)
    valid = torch.zeros(len(rows), width, dtype=torch.bool, device=slots_valid.device)
    for row, entries in enumerate(rows):
        start = width - len(entries)
        index[row, start:] = torch.tensor(entries, dtype=torch.long, device=slots_valid.device)
        valid[row, start:] = True
    for item in overrides:
        item[1] += width - len(rows[item[0]])
    return index, valid, [tuple(item) for item in overrides]


def _left_packed(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather index ``(B, K)`` of each row's kept columns, left-padded to the longest row, and validity.

    Pad slots point at column 0 (finite values) and are masked out by the returned validity.
    """
    counts = keep.sum(dim=1)
    new_len = int(counts.max()) if keep.shape[0] else 0
    index = torch.zeros(keep.shape[0], new_len, dtype=torch.long, device=keep.device)
    valid = torch.zeros(keep.shape[0], new_len, dtype=torch.bool, device=keep.device)
    for row in range(keep.shape[0]):
        columns = torch.nonzero(keep[row], as_tuple=False).flatten()
        start = new_len - columns.numel()
        index[row, start:] = columns
        valid[row, start:] = True
    return index, valid


def _visual_block_ids(input_ids: torch.Tensor, is_visual: torch.Tensor, adapter, kwargs):
    """``(B, S)`` index of the image or video each visual token belongs to (budgets apply per block),
    and the merged ``(t, h, w)`` grid of each block index (``None`` when the grids are unusable).

    Placeholders of all rows are consumed in order by the images of ``image_grid_thw`` (then videos of
    ``video_grid_thw``), ``t*h*w/merge**2`` tokens each, as the model's ``masked_scatter`` does. If the
    grids are missing or do not match the placeholder count, contiguous runs of visual tokens are blocks.
    """
    block = torch.full_like(input_ids, -1)
    side = adapter.spatial_merge_size
    merge = side**2
    offset = 0
    consistent = True
    grids: list[tuple[int, int, int]] = []
    for token_id, grid_name in ((adapter.image_token_id, "image_grid_thw"), (adapter.video_token_id, "video_grid_thw")):
        if token_id is None:
            continue
        is_kind = (input_ids == token_id) & is_visual
        total = int(is_kind.sum())
        if total == 0:
            continue
        grid = kwargs.get(grid_name)
        if grid is None:
            consistent = False
            break
        counts = (grid.prod(-1) // merge).to(input_ids.device)
        if int(counts.sum()) != total:
            consistent = False
            break
        ends = torch.cumsum(counts, 0)
        rank = torch.cumsum(is_kind.flatten().long(), 0).view_as(input_ids) - 1  # running index over all rows
        ids = torch.searchsorted(ends, rank, right=True) + offset
        block = torch.where(is_kind, ids, block)
        offset += counts.numel()
        grids += [(int(t), int(h) // side, int(w) // side) for t, h, w in grid.tolist()]
    if consistent:
        return block, grids
    starts = is_visual.clone()
    starts[:, 1:] &= ~is_visual[:, :-1]
    # numbered over the whole batch (row-major), so that a block index names one block of one row
    runs = torch.cumsum(starts.flatten().long(), dim=0).view_as(input_ids) - 1
    return torch.where(is_visual, runs, torch.full_like(runs, -1)), None
