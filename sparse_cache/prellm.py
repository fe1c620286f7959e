"""Pre-LLM pruning: visual tokens are dropped from the language model's input, before layer 0.

A mixin of :class:`~sparse_cache.lifecycle.PruningLifecycle`, as the production systems prune (NVIDIA
TensorRT-Edge-LLM's DART, OpenVINO GenAI's CDPruner): the scorer reads only the decoder's input
embeddings, so the selection happens in the text model's pre-hook, and the text model is handed

- the input embeddings of the kept tokens (every text token, the kept visual tokens, in original order;
  rows that keep different numbers are left-padded to the longest row, and the pads masked);
- their original position ids (all M-RoPE rows for Qwen families, the 1-D positions for LLaVA families),
  gathered from the positions the model would have used (:meth:`~sparse_cache.models.base.VLMAdapter.gather_positions`);
- a 2-D mask of the physical layout (earlier entries of the cache, then the kept slots);
- the family's per-token extras cut the same way (Qwen3-VL's DeepStack features and their visual mask:
  :meth:`~sparse_cache.models.base.VLMAdapter.cut_text_inputs`).

Every layer then computes only the kept tokens. At the end of the forward the cache records the new
entries as a compacted prefix (logical length: every token seen; physical: what was computed), the same
bookkeeping as a post-prefill or in-prefill compaction, so decoding continues at the logical positions.
A prefill forward returns logits for the kept slots only (``generate`` reads the last one).
"""

from __future__ import annotations

import logging

import torch
import transformers

from ._compat import get_arg, set_arg
from .inprefill import left_packed
from .stats import timed

logger = logging.getLogger(__name__)

#: the modes a scorer that reads a decoder layer's attention inputs supports
ATTENTION_SCORER_MODES = ("post-prefill", "in-prefill")


def validate_pre_llm(scorer, scoring_layer) -> None:
    """Refuse what ``mode="pre-llm"`` cannot do: a scorer that needs a decoder layer, or a scoring layer."""
    if scorer.default_layer is not None:
        hint = " (scorer='dart_embed' is DART on the input embeddings)" if scorer.name == "dart" else ""
        raise ValueError(
            f"scorer: {scorer.name!r} scores from decoder layer {scorer.default_layer}'s attention inputs, which do "
            f"not exist before the language model; mode='pre-llm' needs a scorer that reads only the input "
            f"embeddings (cosine, divprune, cdpruner, uniform, random, dart_embed){hint}. "
            f"{scorer.name!r} supports mode in {ATTENTION_SCORER_MODES}"
        )
    if scoring_layer is not None:
        raise ValueError(
            f"scoring_layer: mode='pre-llm' scores the input embeddings before layer 0; got scoring_layer="
            f"{scoring_layer!r}, leave it unset"
        )


class PreLLMMixin:
    """The pre-LLM half of the lifecycle (uses its ``_pass``, ``cache``, ``adapter`` and options)."""

    def _cut_before_llm(self, p, args, kwargs, physical_mask):
        """Text model pre-hook, ``mode="pre-llm"``: score, select and hand the model the kept tokens only."""
        names = self.adapter.text_args
        embeds = p.inputs_embeds
        batch, seq_len = embeds.shape[:2]
        with torch.no_grad():
            self._score(p, self._context(p))
            keeps = self._select(p)
        # under tensor parallelism the ranks must agree before the sharded LM runs on the cut (their collectives
        # would otherwise see different shapes): the embedding scores are replicated and agreed in _score
        self._check_group_agrees()
        dropped = [v[~k] for v, k in zip(p.visual_positions, keeps)]
        if all(d.numel() == 0 for d in dropped):  # nothing dropped: the forward runs as without the library
            p.pre_llm = {"cut": False}
            if physical_mask is get_arg(args, kwargs, names, "attention_mask"):
                return None
            return set_arg(args, kwargs, names, "attention_mask", physical_mask)
        slots_valid = p.token_valid.clone()  # padding goes too: rows are re-packed to their own kept tokens
        for row, gone in enumerate(dropped):
            slots_valid[row, gone.to(slots_valid.device)] = False
        index, valid = left_packed(slots_valid)
        device = embeds.device
        index_dev = index.to(device)
        kept_embeds = embeds.gather(1, index_dev[..., None].expand(-1, -1, embeds.shape[-1]))
        position_ids = get_arg(args, kwargs, names, "position_ids")
        if position_ids is None:  # the decoder's own default: the logical length onward
            position_ids = torch.arange(p.past_logical, p.past_logical + seq_len, device=device).expand(batch, -1)
        kept_positions = self.adapter.gather_positions(position_ids, index_dev.to(position_ids.device))
        past_physical = p.key_valid.shape[1] - seq_len
        past_valid = p.key_valid[:, :past_physical].to(valid.device)
        new_mask = torch.cat([past_valid, valid], dim=1)
        mask = get_arg(args, kwargs, names, "attention_mask")
        if mask is None and bool(new_mask.all()):
            model_mask = None  # plainly causal over the physical layout
        else:
            dtype = mask.dtype if isinstance(mask, torch.Tensor) else torch.bool
            model_mask = new_mask.to(device=device, dtype=dtype)
        args, kwargs = set_arg(args, kwargs, names, "inputs_embeds", kept_embeds)
        args, kwargs = set_arg(args, kwargs, names, "position_ids", kept_positions)
        args, kwargs = set_arg(args, kwargs, names, "attention_mask", model_mask)
        kwargs = self.adapter.cut_text_inputs(dict(kwargs), index_dev, valid.to(device))
        p.pre_llm = {"cut": True, "index": index, "valid": valid, "new_mask": new_mask, "past_physical": past_physical}
        logger.debug(
            "pre-llm: the language model computes %d of %d token slots per row (rows hold %s)",
            index.shape[1], seq_len, valid.sum(1).tolist(),
        )
        return args, kwargs

    @timed("compaction")  # recording the kept prefix, as _finish_in_prefill is timed (cache.stats)
    def _finish_pre_llm(self, p) -> None:
        """End of a pre-LLM forward: the new entries become the compacted prefix, at their logical positions."""
        state = p.pre_llm
        if not state["cut"]:
            return
        index, valid, new_mask = state["index"], state["valid"], state["new_mask"]
        batch = index.shape[0]
        past_columns = self.cache.column_positions(p.past_logical, batch, index.device)
        columns = torch.cat([past_columns, index + p.past_logical], dim=1).masked_fill(~new_mask, -1)
        physical = self.cache.get_physical_length()
        layers = [layer for layer in self.cache.layers if layer.is_initialized and layer.keys is not None]
        lengths = {layer.keys.shape[2] for layer in layers}
        if lengths != {new_mask.shape[1]} or physical != new_mask.shape[1]:
            raise RuntimeError(
                "PrunableDynamicCache self-check failed: in pre-llm mode the layers hold "
                f"{sorted(lengths)} entries after the forward, expected {new_mask.shape[1]} (earlier "
                f"{state['past_physical']} + kept {index.shape[1]}): the language model did not run on the cut "
                f"input; transformers {transformers.__version__}"
            )
        self.cache.set_prefix(p.past_logical + p.seq_len, new_mask, columns)
        self._check_group_agrees()  # and on the layout the cache records

