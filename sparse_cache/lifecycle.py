"""The per-call pruning lifecycle: capture -> score -> select -> compact.

One :class:`PruningLifecycle` per :class:`~sparse_cache.PrunableDynamicCache`. The hooks call its ``on_*``
methods (and nothing else); it reads and writes the cache's storage through the cache's own methods.
Everything family-specific is asked of the model adapter (:mod:`sparse_cache.models`).

Flow of one forward that holds visual tokens:

1. capture (``on_vlm_forward``): where the visual tokens are, each image's grid, the positions;
2. score (``on_attention`` at the scoring layer, or at the end for scorers without one): the scorer
   computes only the few attention rows it needs;
3. select: per image (or video) of each row, the top-scored visual tokens are kept;
4. compact (``on_text_forward_end``): every layer keeps the kept tokens, rows re-padded, and the cache
   records the physical layout. In in-prefill mode the cut happens right after the pruning layer instead
   (:mod:`sparse_cache.inprefill`).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

import torch

from ._compat import CACHE_KWARG, get_arg, set_arg
from .assisted import AssistedSplitMixin
from .distributed import tensor_parallel_of
from .inprefill import InPrefillMixin, left_packed
from .prellm import PreLLMMixin
from .scorers import ScoringContext
from .select import adaptive_keep_count, budget, select_visual
from .stats import PassTimer, record_pass, timed

logger = logging.getLogger(__name__)


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
    pre_llm: dict | None = None  # pre-llm mode: the cut handed to the language model (prellm.py)


class PruningLifecycle(AssistedSplitMixin, InPrefillMixin, PreLLMMixin):
    """Capture, score, select and compact for one cache (one conversation), one forward at a time."""

    def __init__(self, cache, adapter, options):
        self.cache = weakref.proxy(cache)  # no reference cycle: a cache is freed (and its hooks released) at once
        self.adapter = adapter
        for name, value in options.items():  # scorer, mode, schedule, budgets, ... validated by the cache
            setattr(self, name, value)
        self._generator = torch.Generator().manual_seed(self.seed)
        # under tensor parallelism (tp_plan): the group every rank scores with and agrees with (sparse_cache.distributed)
        self.tensor_parallel = tensor_parallel_of(adapter.top)
        self.timer = PassTimer(sync=options.get("sync_timing", False))  # prefill-time work, for cache.stats
        self.reset()

    def reset(self) -> None:
        self._pass: _Pass | None = None
        # where the current forward is: None between forwards, "vlm" after the model's pre-hook, "text" inside
        # the decoder; the self-check reads it (a hook that did not fire must not go unnoticed)
        self.stage: str | None = None
        self._splitting = False  # inside the prompt-only forward of a split assisted-decoding prefill
        self._prompt_logits: torch.Tensor | None = None
        self._verify_positions = True  # the next continued forward's given positions are checked

    @property
    def pass_layout(self) -> dict | None:
        """The in-prefill layout of the forward in progress (for adapters that carry per-token extras)."""
        return None if self._pass is None else self._pass.layout

    def on_generate_prefill(self, input_ids: torch.Tensor | None) -> None:
        """Start of a ``generate`` call: a non-empty cache must be continued, not reused."""
        self.cache.check_continuation(input_ids)
        self._verify_positions = True

    def on_vlm_forward(self, module, args, kwargs):
        """Start of a forward of the VLM: capture the visual tokens; positions from this conversation only."""
        if module is not self.adapter.vlm:
            raise ValueError(
                f"{CACHE_KWARG}: this PrunableDynamicCache was built for another model instance; build one "
                "with PrunableDynamicCache(model, ...) for the model you call"
            )
        names = self.adapter.vlm_args
        input_ids = get_arg(args, kwargs, names, "input_ids")
        if input_ids is None:
            raise ValueError(
                "input_ids: PrunableDynamicCache needs input_ids to find the visual tokens; calls with "
                "inputs_embeds only are not supported"
            )
        self._pass = None  # an earlier forward that raised must not leak into this one
        self.stage = "vlm"
        past_logical = self.cache.get_seq_length()
        self.cache.record_tokens(input_ids)
        adapter = self.adapter
        batch, seq_len = input_ids.shape
        # visual tokens count where the forward brings their features (a prefill, or a later turn's image); a
        # generated or drafted image-placeholder id in a decode step is just a token. A decode step does no
        # work here that grows with the sequence and no host sync.
        brings_visual = _brings_visual_inputs(kwargs, self.adapter.visual_feature_kwargs)
        is_visual = None
        if brings_visual:
            is_visual = torch.isin(input_ids, torch.tensor(adapter.visual_token_ids, device=input_ids.device))
        has_visual = brings_visual and bool(is_visual.any())
        mask = get_arg(args, kwargs, names, "attention_mask")
        position_ids, result = self._positions(args, kwargs, input_ids, mask, past_logical, has_visual)
        if past_logical > 0 and not has_visual:
            return result
        mask_2d = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
        if mask_2d is not None:
            token_valid = mask_2d[:, -seq_len:].to(input_ids.device).bool()
            valid_total = mask_2d.to(input_ids.device).bool().sum(-1)
        else:
            token_valid = torch.ones_like(input_ids, dtype=torch.bool)
            valid_total = torch.full((batch,), past_logical + seq_len, device=input_ids.device)
        if position_ids is not None:
            self.cache.rope_deltas = adapter.deltas_from_positions(position_ids, token_valid, valid_total)
        else:
            self.cache.rope_deltas = torch.zeros(batch, 1, dtype=torch.long, device=input_ids.device)  # plain positions
        if not has_visual:
            return result
        is_visual &= token_valid
        block_of, block_grids = adapter.visual_blocks(input_ids, is_visual, kwargs)
        if block_grids is None:
            block_grids = adapter.grids_from_positions(position_ids, block_of, is_visual)
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
        self.timer.start(input_ids.device)
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
        names = self.adapter.vlm_args
        position_ids = get_arg(args, kwargs, names, "position_ids")
        seq_len = input_ids.shape[1]
        if position_ids is not None:
            # checked once per generate call (its later steps extend these positions by one) and on multi-token
            # forwards (a new turn): one host sync per call, none per decode step
            verify = self._verify_positions or seq_len > 1
            if past_logical > 0 and not has_visual and self.cache.rope_deltas is not None and verify:
                self._verify_positions = False
                expected = self.adapter.continuation_positions(self.cache.rope_deltas, past_logical, seq_len, mask, input_ids.device)
                given = self.adapter.position_rows(position_ids).to(input_ids.device)
                if given.shape[-2:] == expected.shape[-2:] and not torch.equal(given, expected[: given.shape[0]]):
                    raise ValueError(
                        "position_ids: the positions given do not continue this conversation (its M-RoPE offsets "
                        f"are {self.cache.rope_deltas.flatten().tolist()}, tokens seen {past_logical}); they were "
                        "probably computed from another conversation's offsets. Pass positions that continue this "
                        "conversation, or none."
                    )
            return position_ids, None
        if past_logical == 0:
            computed = self.adapter.prefill_positions(input_ids, kwargs, mask)
            if computed is None:
                return None, None  # the model falls back to plain positions, as without the library
            position_ids = computed
        else:
            if has_visual:
                raise ValueError(
                    "position_ids: a forward that brings new images or videos onto a non-empty "
                    "PrunableDynamicCache needs explicit position_ids (the model's get_rope_index over the whole "
                    "conversation); computed from the previous turn's offsets they would be wrong"
                )
            position_ids = self.adapter.continuation_positions(self.cache.rope_deltas, past_logical, seq_len, mask, input_ids.device)
        return position_ids, set_arg(args, kwargs, names, "position_ids", position_ids)

    def on_text_forward(self, args, kwargs):
        if self.stage != "vlm":
            self.cache.hooks_did_not_fire(
                "the decoder ran without the VLM's forward hook having seen the call (was the cache passed to the "
                "language model directly, or did the VLM's hook not fire?)"
            )
        self.stage = "text"
        names = self.adapter.text_args
        embeds = get_arg(args, kwargs, names, "inputs_embeds")
        mask = get_arg(args, kwargs, names, "attention_mask")
        if embeds is None:
            raise ValueError("inputs_embeds: PrunableDynamicCache expects the decoder to receive inputs_embeds")
        batch, q_len = embeds.shape[:2]
        physical_mask = self.cache.physical_mask(mask, batch, q_len)
        if self._pass is not None:
            p = self._pass
            p.inputs_embeds = embeds
            physical_len = self.cache.get_physical_length() + q_len
            if physical_mask is None:
                p.key_valid = torch.ones(batch, physical_len, dtype=torch.bool, device=embeds.device)
            else:
                p.key_valid = physical_mask.to(embeds.device).bool()
            if self.mode == "pre-llm":
                return self._cut_before_llm(p, args, kwargs, physical_mask)
        if physical_mask is mask:
            return None
        return set_arg(args, kwargs, names, "attention_mask", physical_mask)

    def on_attention(self, module, args, kwargs) -> None:
        p = self._pass
        if (
            p is None
            or p.scores is not None
            or p.stage >= len(self._stage_layers)
            or module.layer_idx != self._stage_layers[p.stage]
        ):
            return
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = self.adapter.rope_tables(module, *kwargs["position_embeddings"])
        keys = self.cache.layers[module.layer_idx].keys
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
            tensor_parallel=self.tensor_parallel,
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
            tensor_parallel=self.tensor_parallel,
        )

    def _keep_limit(self, p: _Pass) -> list[dict[int, int]] | None:
        """Per row, block -> the most tokens this stage's selection keeps, when a fixed budget decides it."""
        if self.adaptive_scale is not None or getattr(self, "auto_budget", None) is not None:
            return None  # the counts depend on the scores (adaptive) or are planned at selection (auto budgets)
        keep_ratio, keep_tokens = self._stage_budget(p.stage)
        limits = []
        for row in range(len(p.visual_positions)):
            ids, counts = torch.unique_consecutive(p.visual_blocks[row], return_counts=True)
            limits.append({int(b): budget(int(c), keep_ratio, keep_tokens) for b, c in zip(ids.tolist(), counts.tolist())})
        return limits

    def _score(self, p: _Pass, context: ScoringContext) -> None:
        context.keep_limit = self._keep_limit(p)
        with torch.no_grad(), self.timer.section("scoring"):
            scores = self.scorer.score(context)
        if len(scores) != context.batch_size:
            raise RuntimeError(f"scorer {self.scorer!r} returned {len(scores)} rows for {context.batch_size}")
        if self.tensor_parallel is not None:
            scores = self.tensor_parallel.agree_on_scores(scores, context.extras)
        p.scores = scores
        # keep only positions and blocks: holding the layer's inputs until the end of the prefill would cost
        # one (tokens x hidden) tensor of peak memory (measured by the benchmark)
        context.hidden_states = context.cos = context.sin = context.keys = context.attn_module = None
        p.context = context

    def on_text_forward_end(self, failed: bool = False) -> None:
        """End of the decoder's forward: select and compact, then check that what had to happen did."""
        p, stage = self._pass, self.stage
        self._pass, self.stage = None, None
        if p is not None and p.cuts:
            self.adapter.set_active_layout(None)
        if failed or p is None:
            return
        self._end_pass(p, stage)
        self.cache.record_stats(record_pass(self, p))

    def _end_pass(self, p: _Pass, stage: str | None) -> None:
        """Check that what had to happen did, then select and compact (or finish the in-prefill cut)."""
        if stage != "text":
            self.cache.hooks_did_not_fire("the decoder's pre-hook did not run for a forward that holds visual tokens")
        if p.pre_llm is not None:  # pre-llm: the language model already computed only the kept tokens
            with torch.no_grad():
                self._finish_pre_llm(p)
            return
        if self.mode == "in-prefill" and not p.cuts and p.scores is not None:
            self.cache.hooks_did_not_fire(
                f"in-prefill mode scored at layer {self._stage_layers[p.stage]} but the decoder layer's hook did not "
                "cut its output"
            )
        if p.cuts:  # in-prefill: later layers already hold the kept layout
            if p.stage != len(self._stage_layers):
                self.cache.hooks_did_not_fire(
                    f"in-prefill mode ran {p.stage} of its {len(self._stage_layers)} pruning stages"
                )
            with torch.no_grad():
                self._finish_in_prefill(p)
            self._check_group_agrees()
            return
        if p.scores is None:
            if self.scoring_layer is not None:
                self.cache.hooks_did_not_fire(
                    f"the scoring layer {self.scoring_layer}'s attention hook did not run during a forward that "
                    "holds visual tokens"
                )
            self._score(p, self._context(p))
        with torch.no_grad():
            keeps = self._select(p)
            dropped_local = [v[~k] for v, k in zip(p.visual_positions, keeps)]
            if any(d.numel() for d in dropped_local):  # nothing dropped: the cache stays as a DynamicCache holds it
                self._compact(p, dropped_local)
                self.cache.check_compacted(p.key_valid, dropped_local)
        self._check_group_agrees()

    def _check_group_agrees(self) -> None:
        """Under tensor parallelism: every rank kept the same visual tokens (one all-gathered digest), or raise."""
        if self.tensor_parallel is not None:
            self.tensor_parallel.check_agreement(self.cache)

    # ------------------------------------------------------------------ select + compact

    def _stage_budget(self, stage: int) -> tuple[float | None, int | None]:
        if self.schedule is None:
            return self.keep_ratio, self.keep_tokens
        return self.schedule[stage][1], None

    @timed("selection")
    def _select(self, p: _Pass) -> list[torch.Tensor]:
        """Pick the kept visual tokens of each row at the current stage; record them.

        Returns, per row, a bool over the stage's candidates (the visual tokens still computed, in
        position order, i.e. ``p.context.visual_positions``): True = kept.
        """
        batch = len(p.visual_positions)
        if p.survivors is None:
            p.survivors = [torch.ones(v.numel(), dtype=torch.bool, device=v.device) for v in p.visual_positions]
        if not self.cache.kept_visual_positions:
            empty = p.visual_positions[0].new_zeros(0)
            self.cache.kept_visual_positions = [empty for _ in range(batch)]
            self.cache.visual_scores = [empty.float() for _ in range(batch)]
        keep_ratio, keep_tokens = self._stage_budget(p.stage)
        final = self.schedule is None or p.stage == len(self.schedule) - 1
        auto = getattr(self, "auto_budget", None)
        auto_budgets = auto.plan(self, p) if auto is not None else None
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
                elif auto_budgets is not None:
                    budgets = auto_budgets[row]  # coverage or a per-call budget (sparse_cache.budget)
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
                self.cache.visual_scores[row] = torch.cat([self.cache.visual_scores[row].to(scores.device), scores])
            new_alive = alive.clone()
            new_alive[alive] = keep
            p.survivors[row] = new_alive
            if final:
                self.cache.kept_visual_positions[row] = torch.cat(
                    [self.cache.kept_visual_positions[row].to(visual.device), visual[new_alive] + p.past_logical]
                )
            logger.debug("row %d, stage %d: kept %d of %d visual tokens", row, p.stage, int(keep.sum()), visual.numel())
        if p.stage == 0:
            self.cache.stage_kept_visual_positions = []
        self.cache.stage_kept_visual_positions.append(
            [v[a] + p.past_logical for v, a in zip(p.visual_positions, p.survivors)]
        )
        return keeps

    def _column_positions(self, p: _Pass, device) -> torch.Tensor:
        """``(B, P + S)`` logical position of every physical column after this forward's update."""
        return self.cache.column_positions(p.past_logical + p.seq_len, p.token_valid.shape[0], device)

    @timed("compaction")
    def _compact(self, p: _Pass, dropped_local: list[torch.Tensor]) -> None:
        physical = self.cache.get_physical_length()
        past_physical = physical - p.seq_len
        keep = p.key_valid.clone()  # (B, physical): padding and masked slots go too
        for row, dropped in enumerate(dropped_local):
            keep[row, dropped.to(keep.device) + past_physical] = False
        index, new_mask = left_packed(keep)
        positions = self._column_positions(p, keep.device).gather(1, index).masked_fill(~new_mask, -1)
        self.cache.gather_layers(index, self.cache.layers)
        self.cache.set_prefix(p.past_logical + p.seq_len, new_mask, positions)


def _brings_visual_inputs(kwargs: dict, names: tuple[str, ...]) -> bool:
    """Whether a forward carries visual features (pixels, or encoder outputs with an entry)."""
    if any(kwargs.get(name) is not None for name in names):
        return True
    encoded = kwargs.get("mm_encoder_outputs")
    if isinstance(encoded, dict):
        return any(value is not None for value in encoded.values())
    return encoded is not None

