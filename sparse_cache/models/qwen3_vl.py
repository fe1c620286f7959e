"""Qwen3-VL, dense and MoE (``Qwen3VLForConditionalGeneration``, ``Qwen3VLMoeForConditionalGeneration``).

Differences from Qwen2.5-VL that pruning must respect:

- interleaved M-RoPE: the rotary module already hands attention ``(B, S, d)`` tables, used as they are;
- per-head ``q_norm``/``k_norm`` inside attention: the scorer's recomputed query rows apply ``q_norm`` (keys
  come normed from the cache);
- DeepStack: after each of the first decoder layers the text model adds the vision tower's intermediate
  features to the visual positions (``_deepstack_process(hidden, visual_pos_masks, embeds)``). After an
  in-prefill cut the hidden states hold only the kept tokens, so the visual mask and the features must be
  cut to the same layout: this adapter wraps ``_deepstack_process`` of the text model to do so (recycled
  tokens, which are not any one visual token, get no DeepStack feature).
"""

from __future__ import annotations

import contextvars
import functools

import torch

from . import register
from .mrope import MRopeAdapter

#: the in-prefill layout of the forward in progress in this thread/task (set by the text-model pre-hook)
ACTIVE_LAYOUT: contextvars.ContextVar = contextvars.ContextVar("sparse_cache_deepstack_layout", default=None)


class _Wrapper:
    """Restores the text model's ``_deepstack_process`` on ``remove()`` (installed like a hook)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def remove(self) -> None:
        if "_deepstack_process" in vars(self.module):
            del self.module._deepstack_process


def cut_deepstack(layout: dict, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor):
    """``visual_pos_masks`` ``(B, S)`` and ``visual_embeds`` ``(N, D)`` (rows in row-major order of the mask)
    cut to the layout's kept slots ``index``/``valid`` ``(B, K)``; recycled slots get no feature."""
    index = layout["index"].to(visual_pos_masks.device)
    valid = layout["valid"].to(visual_pos_masks.device)
    rank = torch.cumsum(visual_pos_masks.flatten().long(), 0).view_as(visual_pos_masks) - 1
    kept_mask = visual_pos_masks.gather(1, index) & valid
    for row, slot in layout.get("recycled_slots", ()):
        kept_mask[row, slot] = False
    kept_rank = rank.gather(1, index)[kept_mask]
    return kept_mask, visual_embeds[kept_rank.to(visual_embeds.device)]


@register
class Qwen3VLAdapter(MRopeAdapter):
    family = "Qwen3-VL"
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    base_model_classes = ("Qwen3VLModel", "Qwen3VLMoeModel")
    example = "Qwen/Qwen3-VL-8B-Instruct"

    def install(self) -> list:
        text_model = self.text_model
        original = text_model._deepstack_process

        @functools.wraps(original)
        def _deepstack_process(hidden_states, visual_pos_masks, visual_embeds):
            layout = ACTIVE_LAYOUT.get()
            if layout is not None and visual_pos_masks is not None and hidden_states.shape[1] != visual_pos_masks.shape[1]:
                visual_pos_masks, visual_embeds = cut_deepstack(layout, visual_pos_masks, visual_embeds)
            return original(hidden_states, visual_pos_masks, visual_embeds)

        text_model._deepstack_process = _deepstack_process
        return [_Wrapper(text_model)]

    def set_active_layout(self, layout: dict | None):
        """Called by the lifecycle when an in-prefill cut changes the layout of the forward in progress."""
        return ACTIVE_LAYOUT.set(layout)

    def cut_text_inputs(self, kwargs: dict, index: torch.Tensor, valid: torch.Tensor) -> dict:
        """Pre-LLM cut: the DeepStack visual mask and every layer's features follow the kept slots."""
        masks, features = kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds")
        if masks is None or features is None:
            return kwargs
        layout = {"index": index, "valid": valid}
        cut = [cut_deepstack(layout, masks, layer_features) for layer_features in features]
        if cut:
            kwargs["visual_pos_masks"] = cut[0][0]
        else:
            kwargs["visual_pos_masks"] = masks.gather(1, index.to(masks.device)) & valid.to(masks.device)
        kwargs["deepstack_visual_embeds"] = [layer_features for _, layer_features in cut]
        return kwargs
