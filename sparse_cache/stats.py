"""Per-call metrics of a pruning cache: what was kept, what the KV cache weighs, what the pruning cost.

After a call, ``cache.stats`` describes the latest *pruning pass* of the conversation: the forward that held
visual tokens (the prefill of a ``generate`` call, or a later turn that brought new images). Calls without
visual tokens (decode steps, a text-only follow-up turn) add no pass, so ``cache.stats`` still describes the
pass that pruned; ``cache.stats_history`` lists every pass of the conversation in order, and
:func:`conversation_totals` sums them. Both are ``None`` / empty before any pass.

What a pass records (:class:`PruningStats`, with one :class:`RowStats` per batch row and one
:class:`BlockStats` per image or video of a row):

* visual tokens kept / total, per image or video, per row, and after each in-prefill stage;
* KV bytes, all layers, keys and values, exact from the tensors' shapes and dtypes:
  ``kv_bytes_before`` is what the cache held (or, in in-prefill mode, would have held) with every token of the
  pass, ``kv_bytes_after`` what its tensors hold right after compaction (decoded tokens not included; padding
  slots of left-padded rows included). Per row, the bytes count that row's real entries (text, kept visual
  and recycled tokens, earlier turns included; padding slots excluded): ``entries x kv_bytes_per_token``;
* ``scoring_s`` (the scorer), ``selection_s`` (budgets and top-k) and ``compaction_s`` (the gather of every
  layer's cache; in in-prefill mode also the cut of the hidden states, its mask and recycling), from
  ``time.perf_counter`` around that prefill-time work only. On a GPU these measure the kernel *launches*
  unless the cache was built with ``sync_timing=True``, which synchronizes the device around each timed
  section (prefill only: a decode step is never timed nor synchronized);
* the mode, the scorer, its scoring layer and the budget that chose the counts.

Recording costs no host synchronization in a decode step: everything is gathered at the end of the pass (a few
small device-to-host reads during the prefill, which already has several) and batch rows follow beam reordering
through a list of row indices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from dataclasses import dataclass, field

import torch


@dataclass
class BlockStats:
    """One image or video of a row, in the pass that brought it."""

    index: int  # order of the image/video in the row's visual tokens of this pass (0 = first)
    kind: str  # "image" or "video"
    first_position: int  # logical position of its first visual token
    visual_tokens_total: int
    visual_tokens_kept: int
    stage_kept: list[int] = field(default_factory=list)  # kept after each pruning stage (one stage unless a schedule)
    #: share of the block's score mass held by the kept tokens (scorers whose scores are a mass, else None)
    score_mass_kept: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RowStats:
    """One batch row (after beam expansion and reordering, as ``cache.kept_visual_positions``)."""

    row: int
    visual_tokens_total: int
    visual_tokens_kept: int
    kv_entries_before: int  # real entries per layer before compaction (padding excluded; earlier turns included)
    kv_entries_after: int
    kv_bytes_before: int  # kv_entries x kv_bytes_per_token
    kv_bytes_after: int
    blocks: list[BlockStats] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PruningStats:
    """One pruning pass (see the module docstring). ``to_dict()`` gives a JSON-ready dict."""

    pass_index: int  # 0 for the conversation's first pass, 1 for a later turn's images, ...
    past_length: int  # logical tokens the cache held before the pass
    new_tokens: int  # tokens fed in the pass (its width, padding included)
    mode: str
    scorer: str
    scoring_layer: int | None
    budget: dict  # the arguments that set the counts: keep_ratio, keep_tokens, coverage, max_kv_bytes, ...
    visual_tokens_total: int
    visual_tokens_kept: int
    kv_bytes_per_token: int  # one entry in every layer, keys and values
    kv_bytes_before: int  # the cache's tensors with every token of the pass (batch x width x bytes per token)
    kv_bytes_after: int  # the cache's tensors right after compaction (padding slots included)
    scoring_s: float
    selection_s: float
    compaction_s: float
    timing_synchronized: bool  # sync_timing=True: device synchronized around each timed section
    stages: list[dict] = field(default_factory=list)  # per stage: {"after_layer": L, "visual_tokens_kept": [per row]}
    rows: list[RowStats] = field(default_factory=list)

    @property
    def kv_bytes_saved(self) -> int:
        return self.kv_bytes_before - self.kv_bytes_after

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["kv_bytes_saved"] = self.kv_bytes_saved
        return out


def conversation_totals(history: list[PruningStats]) -> dict:
    """Sums over every pass of a conversation (``cache.stats_history``): tokens, times; the latest KV size."""
    if not history:
        return {"passes": 0}
    last = history[-1]
    return {
        "passes": len(history),
        "visual_tokens_total": sum(s.visual_tokens_total for s in history),
        "visual_tokens_kept": sum(s.visual_tokens_kept for s in history),
        "kv_bytes_after": last.kv_bytes_after,  # the cache holds every pass's entries after the last one
        "scoring_s": sum(s.scoring_s for s in history),
        "selection_s": sum(s.selection_s for s in history),
        "compaction_s": sum(s.compaction_s for s in history),
    }


# --------------------------------------------------------------------------- timing


def _synchronize(device: torch.device | None) -> None:
    """Wait for the device's queued work (CUDA only; a no-op elsewhere)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


class PassTimer:
    """Exclusive wall time of named sections of one pass (a nested section's time is not counted twice)."""

    def __init__(self, sync: bool = False):
        self.sync = bool(sync)
        self.device: torch.device | None = None
        self.start()

    def start(self, device: torch.device | None = None) -> None:
        self.totals = {"scoring": 0.0, "selection": 0.0, "compaction": 0.0}
        self._nested: list[float] = []
        self.device = device

    @contextlib.contextmanager
    def section(self, name: str):
        if self.sync:
            _synchronize(self.device)
        begin = time.perf_counter()
        self._nested.append(0.0)
        try:
            yield
        finally:
            if self.sync:
                _synchronize(self.device)
            elapsed = time.perf_counter() - begin
            inner = self._nested.pop()
            self.totals[name] += elapsed - inner
            if self._nested:
                self._nested[-1] += elapsed


def timed(name: str, when=None):
    """Decorator for lifecycle methods: time the call as section ``name`` of the pass in progress.

    For methods that run only in a pruning pass (select, compact), or, with ``when(self)``, only when it holds (a
    per-layer hook: timed only while an in-prefill pass is in progress), so a decode step runs no timing code
    beyond that check.
    """

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            if when is not None and not when(self):
                return method(self, *args, **kwargs)
            with self.timer.section(name):
                return method(self, *args, **kwargs)

        return wrapper

    return decorate


# --------------------------------------------------------------------------- bytes


def layer_token_bytes(layer) -> int | None:
    """Bytes of one token entry of a cache layer (keys and values, every head), or None if not allocated."""
    if not getattr(layer, "is_initialized", False) or layer.keys is None or layer.keys.numel() == 0:
        return None
    keys, values = layer.keys, layer.values
    return (keys.shape[1] * keys.shape[3] * keys.element_size()
            + values.shape[1] * values.shape[3] * values.element_size())


def kv_bytes_per_token(layers) -> int:
    """Bytes of one token entry in every layer; a layer not allocated yet (in-prefill: the layers after the cut
    during the prefill) counts as the first allocated one (every layer of a supported family has the same)."""
    sizes = [layer_token_bytes(layer) for layer in layers]
    known = [s for s in sizes if s is not None]
    if not known:
        return 0
    return sum(known[0] if s is None else s for s in sizes)


def kv_tensor_bytes(layers) -> int:
    """Exact bytes of every allocated key and value tensor."""
    total = 0
    for layer in layers:
        if getattr(layer, "is_initialized", False) and layer.keys is not None:
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total


# --------------------------------------------------------------------------- the record of a pass


class StatsHistory:
    """The passes of one conversation, and which of their rows each current batch row is (beams reorder rows)."""

    def __init__(self):
        self.passes: list[PruningStats] = []
        self._row_maps: list[list[int]] = []

    def append(self, stats: PruningStats) -> None:
        stats.pass_index = len(self.passes)
        self.passes.append(stats)
        self._row_maps.append(list(range(len(stats.rows))))

    def select_rows(self, rows: list[int]) -> None:
        """Batch rows were selected/reordered (``reorder_cache``, ``batch_repeat_interleave``, ...)."""
        self._row_maps = [[mapping[i] for i in rows] for mapping in self._row_maps]

    def view(self, index: int) -> PruningStats:
        stats, mapping = self.passes[index], self._row_maps[index]
        if mapping == list(range(len(stats.rows))):
            return stats
        rows = [dataclasses.replace(stats.rows[source], row=row) for row, source in enumerate(mapping)]
        return dataclasses.replace(stats, rows=rows)

    def latest(self) -> PruningStats | None:
        return self.view(len(self.passes) - 1) if self.passes else None

    def all(self) -> list[PruningStats]:
        return [self.view(i) for i in range(len(self.passes))]


def budget_arguments(lifecycle) -> dict:
    """The arguments that set how many tokens each image keeps (only those given)."""
    out = {}
    for name in ("keep_ratio", "keep_tokens", "adaptive_scale"):
        value = getattr(lifecycle, name, None)
        if value is not None:
            out[name] = value
    if getattr(lifecycle, "schedule", None):
        out["schedule"] = [[int(layer), float(ratio)] for layer, ratio in lifecycle.schedule]
    auto = getattr(lifecycle, "auto_budget", None)
    if auto is not None:
        out.update(auto.arguments())
    return out


def _block_kinds(history: torch.Tensor | None, seq_len: int, visual_positions, visual_blocks, video_token_id) -> list:
    """Per row, per block index: "video" if its first token is the video token, else "image"."""
    kinds = []
    for row, (positions, blocks) in enumerate(zip(visual_positions, visual_blocks)):
        row_kinds = {}
        if positions.numel():
            ids = None if history is None else history[row, history.shape[1] - seq_len :]
            changes = torch.ones(blocks.numel(), dtype=torch.bool, device=blocks.device)
            changes[1:] = blocks[1:] != blocks[:-1]
            firsts = positions[changes.to(positions.device)]
            first_ids = [None] * firsts.numel() if ids is None else ids[firsts.to(ids.device)].tolist()
            for block, token in zip(blocks[changes].tolist(), first_ids):
                row_kinds[block] = "video" if video_token_id is not None and token == video_token_id else "image"
        kinds.append(row_kinds)
    return kinds


def record_pass(lifecycle, p) -> PruningStats:
    """Build the stats of the pass ``p`` that just ended (called once per pass, at the end of the prefill)."""
    cache = lifecycle.cache
    layers = cache.layers
    per_token = kv_bytes_per_token(layers)
    width_before = p.key_valid.shape[1] if p.key_valid is not None else p.seq_len
    batch = p.token_valid.shape[0]
    entries_before = (p.key_valid.sum(1) if p.key_valid is not None else p.token_valid.sum(1)).tolist()
    compacted = cache._prefix_mask is not None and cache._prefix_logical == p.past_logical + p.seq_len
    entries_after = cache._prefix_mask.sum(1).tolist() if compacted else list(entries_before)
    survivors = p.survivors or [torch.ones(v.numel(), dtype=torch.bool, device=v.device) for v in p.visual_positions]
    stage_sets = cache.stage_kept_visual_positions  # per stage, per row: logical positions after the stage
    scores = cache.visual_scores
    mass = getattr(lifecycle.scorer, "score_mass", False)
    adapter = lifecycle.adapter
    kinds = _block_kinds(cache._history, p.seq_len, p.visual_positions, p.visual_blocks,
                         getattr(adapter, "video_token_id", None))
    rows, stage_rows = [], [[] for _ in stage_sets]
    for row in range(batch):
        visual = p.visual_positions[row]
        blocks = p.visual_blocks[row].to(visual.device)
        alive = survivors[row].to(visual.device)
        block_stats = []
        if visual.numel():
            ids, counts = torch.unique_consecutive(blocks, return_counts=True)
            ids, counts = ids.tolist(), counts.tolist()
            kept_per_block = _count_per_block(blocks[alive], ids)
            logical = visual + p.past_logical
            per_stage = []
            for s, stage in enumerate(stage_sets):
                in_stage = torch.isin(logical, stage[row].to(visual.device)) if row < len(stage) else alive
                per_stage.append(_count_per_block(blocks[in_stage], ids))
                stage_rows[s].append(int(in_stage.sum()))
            masses = [None] * len(ids)
            if mass and row < len(scores) and scores[row].numel() >= visual.numel():
                row_scores = scores[row][-visual.numel():].double().to(visual.device)
                for i, block in enumerate(ids):
                    in_block = blocks == block
                    total = float(row_scores[in_block].sum())
                    masses[i] = float(row_scores[in_block & alive].sum()) / total if total > 0 else None
            firsts = torch.cat([torch.ones(1, dtype=torch.bool, device=visual.device), blocks[1:] != blocks[:-1]])
            first_positions = (visual[firsts] + p.past_logical).tolist()
            for i, block in enumerate(ids):
                block_stats.append(BlockStats(
                    index=i, kind=kinds[row].get(block, "image"), first_position=int(first_positions[i]),
                    visual_tokens_total=int(counts[i]), visual_tokens_kept=int(kept_per_block[i]),
                    stage_kept=[int(stage[i]) for stage in per_stage], score_mass_kept=masses[i],
                ))
        else:
            for s in range(len(stage_sets)):
                stage_rows[s].append(0)
        rows.append(RowStats(
            row=row,
            visual_tokens_total=int(visual.numel()),
            visual_tokens_kept=sum(b.visual_tokens_kept for b in block_stats),
            kv_entries_before=int(entries_before[row]),
            kv_entries_after=int(entries_after[row]),
            kv_bytes_before=int(entries_before[row]) * per_token,
            kv_bytes_after=int(entries_after[row]) * per_token,
            blocks=block_stats,
        ))
    timer = lifecycle.timer
    stage_layers = list(getattr(lifecycle, "_stage_layers", []) or [])
    stages = [
        {"after_layer": stage_layers[s] if s < len(stage_layers) else None, "visual_tokens_kept": kept}
        for s, kept in enumerate(stage_rows)
    ]
    return PruningStats(
        pass_index=0,
        past_length=int(p.past_logical),
        new_tokens=int(p.seq_len),
        mode=lifecycle.mode,
        scorer=lifecycle.scorer.name or type(lifecycle.scorer).__name__,
        scoring_layer=lifecycle.scoring_layer,
        budget=budget_arguments(lifecycle),
        visual_tokens_total=sum(r.visual_tokens_total for r in rows),
        visual_tokens_kept=sum(r.visual_tokens_kept for r in rows),
        kv_bytes_per_token=per_token,
        kv_bytes_before=batch * width_before * per_token,
        kv_bytes_after=kv_tensor_bytes(layers),
        scoring_s=timer.totals["scoring"],
        selection_s=timer.totals["selection"],
        compaction_s=timer.totals["compaction"],
        timing_synchronized=timer.sync,
        stages=stages,
        rows=rows,
    )


def _count_per_block(blocks: torch.Tensor, ids: list[int]) -> list[int]:
    if not ids:
        return []
    lookup = torch.tensor(ids, device=blocks.device)
    return (blocks[:, None] == lookup[None, :]).sum(0).tolist()
