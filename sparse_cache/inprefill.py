"""In-prefill pruning: after a pruning layer, the later layers of the prefill compute only the kept tokens.

A mixin of :class:`~sparse_cache.lifecycle.PruningLifecycle`: right after each pruning layer its output keeps
the kept visual tokens plus all text (optionally with recycled tokens, SparseVLM v1), and the later layers
get the matching mask and RoPE tables, with the tokens' original positions. At the end of the forward every
layer's cache adopts the last stage's layout.
"""

from __future__ import annotations

import logging

import torch

from .recycle import cluster_count, density_peak_clusters, recycled_candidates
from .stats import timed

logger = logging.getLogger(__name__)


def gather_rope_tables(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather ``index`` ``(B, K)`` along the sequence axis of a ``(B, S, d)`` or ``(3, B, S, d)`` table."""
    index = index.to(table.device)
    if table.ndim == 4:
        index = index.unsqueeze(0).expand(table.shape[0], -1, -1)
    return table.gather(table.ndim - 2, index.unsqueeze(-1).expand(*index.shape, table.shape[-1]))


class InPrefillMixin:
    """The in-prefill half of the lifecycle (uses its ``_pass``, ``cache``, ``adapter`` and options)."""

    def on_layer_forward(self, module, args, kwargs):
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

    @timed("compaction", when=lambda self: self._pass is not None and self.mode == "in-prefill")
    def on_layer_forward_end(self, module, output):
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
                local, valid, overrides = packed_with_recycled(slots_valid, plan)
            else:
                local, valid = left_packed(slots_valid)
            index = local if p.index is None else p.index.gather(1, local)
            past = p.key_valid.shape[1] - p.seq_len
            p.cuts.append((index, valid, layer))
            p.index, p.valid = index, valid
            p.layout = {
                "index": index, "valid": valid, "after_layer": layer,
                "mask": self._in_prefill_mask(p, valid, past, hidden),
                "recycled_slots": [(row, slot) for row, slot, _, _ in overrides],
            }
            self.adapter.set_active_layout(p.layout)  # per-token extras of the family follow the cut
            p.stage += 1
            p.scores = None
        width = hidden.shape[1]
        hidden = hidden.gather(1, local.to(hidden.device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        if overrides:
            hidden = hidden.clone()
            self.cache.recycled_groups = [[] for _ in range(hidden.shape[0])]
            for row, slot, vector, members in overrides:
                hidden[row, slot] = vector.to(hidden.dtype)
                originals = members.to(index.device) if len(p.cuts) == 1 else p.cuts[-2][0][row, members.to(index.device)]
                p.recycled.append((row, slot, originals))
                self.cache.recycled_groups[row].append(
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
        if self.adapter.attn_implementation == "sdpa" and past == 0 and bool(valid.all()):
            return None
        past_valid = p.key_valid[:, :past].to(valid.device)
        causal = torch.ones(new, new, dtype=torch.bool, device=valid.device).tril()
        allowed_new = causal[None] & valid[:, None, :]
        # a pad row attends to itself only, so that its (unused) hidden state stays finite
        allowed_new |= torch.eye(new, dtype=torch.bool, device=valid.device)[None] & ~valid[:, :, None]
        allowed = torch.cat([past_valid[:, None, :].expand(batch, new, past) & valid[:, :, None], allowed_new], -1)
        allowed = allowed[:, None]
        if self.adapter.attn_implementation == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=hidden.dtype, device=valid.device).masked_fill(
            ~allowed, torch.finfo(hidden.dtype).min
        )

    @timed("compaction")
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
            group = self.cache.layers[group_start : last_layer + 1]
            # recycled tokens never ran through these layers: they hold the mean of their members' entries
            means = [
                [(row, slot, layer.keys[row, :, past + slot_of[row, members]].mean(-2),
                  layer.values[row, :, past + slot_of[row, members]].mean(-2)) for row, slot, members in p.recycled]
                for layer in group
            ]
            self.cache.gather_layers(torch.cat([past_columns, local + past], 1), group)
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
        self.cache.set_prefix(p.past_logical + p.seq_len, new_mask, columns)


def packed_with_recycled(slots_valid: torch.Tensor, plan: list[dict]):
    """Like :func:`left_packed`, with each image's recycled tokens inserted after its last kept slot.

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


def left_packed(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
