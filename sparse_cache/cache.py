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
from ._compat import TEXT_FORWARD_ARGS, VLM_FORWARD_ARGS, adapt, get_arg, rope_tables, set_arg
from .scorers import Scorer, ScoringContext, get_scorer
from .select import select_visual, validate_budget

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
        mode: ``"post-prefill"`` (default): the prefill computes every token and the cache is compacted
            right after it. ``"in-prefill"``: right after the scoring layer its output keeps only the kept
            visual tokens plus all text, so the later layers of the prefill compute fewer tokens (with
            their original positions); the earlier layers' caches are compacted to the same set at the
            end of the prefill. In this mode a prefill forward returns logits for the kept tokens only
            (``generate`` reads the last one).

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
    ):
        validate_budget(keep_ratio, keep_tokens)
        if mode not in MODES:
            raise ValueError(f"mode: unknown mode {mode!r}; valid modes are {MODES}")
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
        if mode == "in-prefill" and scoring_layer is None:
            raise ValueError(
                f"mode: 'in-prefill' prunes after a scoring layer, but scorer {self.scorer.name!r} has none; "
                "pass scoring_layer=..."
            )
        self._adapter = adapter
        self._generator = torch.Generator().manual_seed(seed)
        hooks.install(adapter)
        self._reset_state()

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        self.kept_visual_positions: list[torch.Tensor] = []
        self.visual_scores: list[torch.Tensor] = []
        # Physical layout of the compacted prefix: every layer's first P0 entries. Entries after them
        # are the tokens fed since, in logical order, with validity given by the caller's 2-D mask.
        self._prefix_mask: torch.Tensor | None = None  # (B, P0) bool; None = never compacted
        self._prefix_positions: torch.Tensor | None = None  # (B, P0) logical position, -1 for a pad slot
        self._prefix_logical = 0  # logical length covered by the prefix (L0)
        self._prefix_all_valid = True
        self._dropped = 0  # logical minus physical length (L0 - P0)
        self._history: torch.Tensor | None = None  # (B, L) token ids seen, to refuse unrelated reuse
        self._pass: _Pass | None = None
        self._rope_deltas: torch.Tensor | None = None  # this conversation's M-RoPE offsets (model keeps the last call's)
        self._splitting = False  # inside the prompt-only forward of a split assisted-decoding prefill
        self._prompt_logits: torch.Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self._reset_state()

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
        rows = index.tolist()
        if self.kept_visual_positions:
            self.kept_visual_positions = [self.kept_visual_positions[i] for i in rows]
            self.visual_scores = [self.visual_scores[i] for i in rows]

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

    def _restore_rope_deltas(self) -> None:
        """Put this conversation's ``rope_deltas`` back on the model before it computes positions.

        Qwen2.5-VL keeps them on the model and uses them for calls without ``position_ids`` and for a
        continued ``generate``; another conversation on the same model would otherwise shift ours.
        """
        if self._rope_deltas is not None and hasattr(self._adapter.vlm, "rope_deltas"):
            self._adapter.vlm.rope_deltas = self._rope_deltas

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

    def _on_vlm_forward(self, module, args, kwargs) -> None:
        if module is not self._adapter.vlm:
            raise ValueError(
                "past_key_values: this PrunableDynamicCache was built for another model instance; build one "
                "with PrunableDynamicCache(model, ...) for the model you call"
            )
        input_ids = get_arg(args, kwargs, VLM_FORWARD_ARGS, "input_ids")
        if input_ids is None:
            raise ValueError(
                "input_ids: PrunableDynamicCache needs input_ids to find the visual tokens; calls with "
                "inputs_embeds only are not supported"
            )
        self._pass = None  # an earlier forward that raised must not leak into this one
        if self.get_seq_length() > 0:
            self._restore_rope_deltas()
        self._history = input_ids if self._history is None else torch.cat([self._history, input_ids.to(self._history.device)], 1)
        adapter = self._adapter
        is_visual = torch.isin(input_ids, torch.tensor(adapter.visual_token_ids, device=input_ids.device))
        if not bool(is_visual.any()):
            return
        batch, seq_len = input_ids.shape
        mask = get_arg(args, kwargs, VLM_FORWARD_ARGS, "attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:
            token_valid = mask[:, -seq_len:].to(input_ids.device).bool()
        else:
            token_valid = torch.ones_like(input_ids, dtype=torch.bool)
        is_visual &= token_valid
        block_of, block_grids = _visual_block_ids(input_ids, is_visual, adapter, kwargs)
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
            past_logical=self.get_seq_length(),
            seq_len=seq_len,
            token_valid=token_valid,
            visual_positions=visual_positions,
            visual_blocks=visual_blocks,
            block_grids=block_grids,
            text_positions=text_positions,
        )

    def _on_text_forward(self, args, kwargs):
        embeds = get_arg(args, kwargs, TEXT_FORWARD_ARGS, "inputs_embeds")
        mask = get_arg(args, kwargs, TEXT_FORWARD_ARGS, "attention_mask")
        if embeds is None:
            raise ValueError("inputs_embeds: PrunableDynamicCache expects the decoder to receive inputs_embeds")
        batch, q_len = embeds.shape[:2]
        past_logical = self.get_seq_length()
        if past_logical == 0:
            # set by generate's position preparation or by the model's own forward just before this point
            self._rope_deltas = getattr(self._adapter.vlm, "rope_deltas", None)
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
        return set_arg(args, kwargs, TEXT_FORWARD_ARGS, "attention_mask", physical_mask)

    def _on_attention(self, module, args, kwargs) -> None:
        p = self._pass
        if p is None or p.scores is not None or module.layer_idx != self.scoring_layer:
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
        context.past_length = keys.shape[2] - p.seq_len
        self._score(p, context)

    def _context(self, p: _Pass) -> ScoringContext:
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

    def _score(self, p: _Pass, context: ScoringContext) -> None:
        with torch.no_grad():
            scores = self.scorer.score(context)
        if len(scores) != context.batch_size:
            raise RuntimeError(f"scorer {self.scorer!r} returned {len(scores)} rows for {context.batch_size}")
        p.scores = scores
        p.context = context

    def _on_text_forward_end(self) -> None:
        p = self._pass
        if p is None:
            return
        self._pass = None
        if p.scores is None:
            if self.scoring_layer is not None:
                raise RuntimeError(f"scoring layer {self.scoring_layer} did not run during the forward")
            self._score(p, self._context(p))
        with torch.no_grad():
            if p.layout is not None:  # in-prefill: later layers already hold the kept layout
                self._finish_in_prefill(p)
                return
            dropped_local = self._select(p)
            if all(d.numel() == 0 for d in dropped_local):
                return  # nothing dropped: leave the cache exactly as a DynamicCache would hold it
            self._compact(p, dropped_local)

    # ------------------------------------------------------------------ select + compact
    def _select(self, p: _Pass) -> list[torch.Tensor]:
        """Pick the kept visual tokens of each row; record them; return each row's dropped positions."""
        batch = len(p.visual_positions)
        if not self.kept_visual_positions:
            empty = p.visual_positions[0].new_zeros(0)
            self.kept_visual_positions = [empty for _ in range(batch)]
            self.visual_scores = [empty.float() for _ in range(batch)]
        dropped_local = []
        for row in range(batch):
            visual = p.visual_positions[row]
            scores = p.scores[row]
            if visual.numel() == 0:
                dropped_local.append(visual)
                continue
            if scores is None:
                logger.warning(
                    "row %d: no text follows its visual tokens, so %s cannot rate them; keeping all %d",
                    row, self.scorer.name, visual.numel(),
                )
                scores = torch.full((visual.numel(),), float("nan"), device=visual.device)
                kept_idx = torch.arange(visual.numel(), device=visual.device)
            else:
                scores = scores.float().to(visual.device)
                kept_idx = select_visual(scores, p.visual_blocks[row], self.keep_ratio, self.keep_tokens)
                if self.keep_tokens is not None:
                    for block, count in zip(*torch.unique_consecutive(p.visual_blocks[row], return_counts=True)):
                        if count < self.keep_tokens:
                            logger.debug(
                                "row %d, visual block %d: keep_tokens=%d exceeds its %d tokens; keeping all",
                                row, int(block), self.keep_tokens, int(count),
                            )
            keep = torch.zeros(visual.numel(), dtype=torch.bool, device=visual.device)
            keep[kept_idx] = True
            dropped_local.append(visual[~keep])
            offset = p.past_logical
            self.kept_visual_positions[row] = torch.cat(
                [self.kept_visual_positions[row].to(visual.device), visual[keep] + offset]
            )
            self.visual_scores[row] = torch.cat([self.visual_scores[row].to(scores.device), scores])
            logger.debug("row %d: kept %d of %d visual tokens", row, int(keep.sum()), visual.numel())
        return dropped_local

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
        """Layers after the pruning layer compute only the kept tokens: mask and RoPE follow the kept set."""
        p = self._pass
        if p is None or p.layout is None or module.self_attn.layer_idx <= self.scoring_layer:
            return None
        layout = p.layout
        cos, sin = kwargs["position_embeddings"]
        if layout.get("rope_source") is not cos:
            # 5.14 hands (3, B, S, d) tables, later versions (B, S, d): gather along the sequence axis
            axis = cos.ndim - 2
            index = layout["index"].to(cos.device)
            if cos.ndim == 4:
                index = index.unsqueeze(0).expand(cos.shape[0], -1, -1)
            index = index.unsqueeze(-1).expand(*index.shape, cos.shape[-1])
            layout["rope"] = (cos.gather(axis, index), sin.gather(axis, index))
            layout["rope_source"] = cos
        kwargs = dict(kwargs)
        kwargs["position_embeddings"] = layout["rope"]
        kwargs["attention_mask"] = layout["mask"].to(cos.device) if layout["mask"] is not None else None
        kwargs["position_ids"] = None
        return args, kwargs

    def _on_layer_forward_end(self, module, output):
        """After the pruning layer: select, and cut its output to the kept tokens plus all text."""
        p = self._pass
        if p is None or self.mode != "in-prefill" or p.layout is not None or p.scores is None:
            return None
        if module.self_attn.layer_idx != self.scoring_layer:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        with torch.no_grad():
            dropped_local = self._select(p)
            keep = p.token_valid.clone()
            for row, dropped in enumerate(dropped_local):
                keep[row, dropped.to(keep.device)] = False
            index, valid = _left_packed(keep)
            past = p.key_valid.shape[1] - p.seq_len
            p.layout = {"index": index, "valid": valid, "mask": self._in_prefill_mask(p, valid, past, hidden)}
        index = index.to(hidden.device)
        hidden = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        logger.debug("in-prefill: layer %d output cut from %d to %d tokens per row", self.scoring_layer,
                     p.seq_len, index.shape[1])
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    def _in_prefill_mask(self, p: _Pass, valid: torch.Tensor, past: int, hidden: torch.Tensor):
        """4-D mask of the kept layout: past valid columns, causal over the kept tokens, pads masked."""
        batch, new = valid.shape
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
        """End of an in-prefill forward: layers up to the pruning layer adopt the later layers' layout."""
        layout = p.layout
        index, valid = layout["index"], layout["valid"]
        past = p.key_valid.shape[1] - p.seq_len
        full_index = torch.cat(
            [torch.arange(past, device=index.device).expand(index.shape[0], -1), index + past], dim=1
        )
        self._gather_layers(full_index, self.layers[: self.scoring_layer + 1])
        columns = self._column_positions(p, index.device).gather(1, full_index)
        new_mask = torch.cat([p.key_valid[:, :past].to(valid.device), valid], dim=1)
        self._set_prefix(p, new_mask, columns.masked_fill(~new_mask, -1))


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
    runs = torch.zeros_like(input_ids)
    starts = is_visual.clone()
    starts[:, 1:] &= ~is_visual[:, :-1]
    runs = torch.cumsum(starts.long(), dim=1)
    return torch.where(is_visual, runs, torch.full_like(runs, -1)), None
