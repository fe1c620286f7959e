"""Assisted decoding on a pruning cache: the first forward carries the prompt and draft tokens together.

A mixin of :class:`~sparse_cache.lifecycle.PruningLifecycle`. Scored that way, the drafts would rate the image
and see every visual token; instead the prompt runs alone first (scored and compacted exactly as a plain
prefill), then the call feeds only the drafts over the pruned cache. Greedy assisted decoding then equals greedy.
"""

from __future__ import annotations

import torch


class AssistedSplitMixin:
    """Uses the lifecycle's ``cache``, ``adapter``, ``_splitting`` and ``_prompt_logits``."""

    def on_top_forward(self, module, args, kwargs):
        """Assisted decoding feeds prompt + draft tokens in its first forward (``logits_to_keep`` > 1).

        Scored that way, the drafts would rate the image and see every visual token. Instead, run the
        prompt alone first (scored and compacted exactly as a plain prefill), then let the call feed only
        the drafts over the pruned cache; ``on_top_forward_end`` prepends the prompt's last logits, so the
        caller sees the ``logits_to_keep`` rows it asked for. Greedy assisted decoding then equals greedy.
        """
        self._prompt_logits = None
        keep = kwargs.get("logits_to_keep")
        input_ids = kwargs.get("input_ids")
        if (
            self._splitting
            or self.cache.get_seq_length() != 0
            or not isinstance(keep, int)
            or keep <= 1
            or not isinstance(input_ids, torch.Tensor)
            or input_ids.shape[1] < keep
        ):
            return None
        drafts = keep - 1
        visual = torch.isin(input_ids[:, -drafts:], torch.tensor(self.adapter.visual_token_ids, device=input_ids.device))
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
        for name in self.adapter.visual_input_kwargs + ("mm_encoder_outputs",):
            draft_kwargs.pop(name, None)
        self._splitting = True
        try:
            self._prompt_logits = module(*args, **prompt_kwargs).logits
        finally:
            self._splitting = False
        return args, draft_kwargs

    def on_top_forward_end(self, output):
        if self._prompt_logits is None or self._splitting:
            return None
        prompt_logits, self._prompt_logits = self._prompt_logits, None
        output.logits = torch.cat([prompt_logits.to(output.logits.dtype), output.logits], dim=1)
        return output
