"""LLaVA-1.5 (``LlavaForConditionalGeneration``): 1-D RoPE language model (Llama/Vicuna, Mistral, ...), a CLIP
tower whose patch features, projected, replace the ``<image>`` placeholders one token per patch.

Every image has the same number of tokens (``(image_size / patch_size)**2``, 576 for LLaVA-1.5-7B; one more
with ``vision_feature_select_strategy="full"``), laid out row-major on a square grid: per-image budgets count
each image's own tokens, and the ``uniform`` scorer strides that grid.
"""

from __future__ import annotations

import torch

from . import register
from .rope1d import Rope1DAdapter


def encoded_counts(kwargs: dict, kind: str) -> list[int] | None:
    """Tokens of each image (``kind="image"``) or video from the encoder outputs ``generate`` (transformers >= 5.23)
    computes before the prefill: ``mm_encoder_outputs[kind].pooler_output`` holds one feature tensor per item."""
    encoded = kwargs.get("mm_encoder_outputs")
    if not isinstance(encoded, dict) or encoded.get(kind) is None:
        return None
    features = getattr(encoded[kind], "pooler_output", None)
    if isinstance(features, torch.Tensor):
        return [int(f.shape[0]) for f in features.reshape(-1, *features.shape[-2:])] if features.ndim >= 3 else None
    if isinstance(features, (list, tuple)) and all(isinstance(f, torch.Tensor) for f in features):
        return [int(f.reshape(-1, f.shape[-1]).shape[0]) for f in features]
    return None


class LlavaFamilyAdapter(Rope1DAdapter):
    """What the LLaVA families share: ``<image>`` placeholders (``image_token_index``), 1-D RoPE."""

    visual_input_kwargs = ("pixel_values", "image_sizes")
    visual_feature_kwargs = ("pixel_values",)
    command_line = False  # the CLI's overlay and the bench's presets read Qwen-style grids: not yet for LLaVA

    def select_strategy(self, kwargs: dict) -> str:
        return kwargs.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy

    def patch_side(self) -> int:
        vision = self.config.vision_config
        return int(vision.image_size) // int(vision.patch_size)


@register
class LlavaAdapter(LlavaFamilyAdapter):
    family = "LLaVA-1.5"
    model_classes = ("LlavaForConditionalGeneration",)
    base_model_classes = ("LlavaModel",)
    example = "llava-hf/llava-1.5-7b-hf"

    def block_counts(self, kwargs: dict):
        counts = encoded_counts(kwargs, "image")
        side = self.patch_side()
        per_image = side * side + (1 if self.select_strategy(kwargs) == "full" else 0)
        if counts is None and isinstance(kwargs.get("pixel_values"), torch.Tensor):
            pixels = kwargs["pixel_values"]
            counts = [per_image] * int(pixels.shape[0])
        grids = [(1, side, side)] * len(counts) if counts and all(c == side * side for c in counts) else None
        return [(self.image_token_id, counts, grids)]
