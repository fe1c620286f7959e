"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): M-RoPE, image and video tokens, window-attention vision tower."""

from __future__ import annotations

from . import register
from .mrope import MRopeAdapter


@register
class Qwen2_5_VLAdapter(MRopeAdapter):
    family = "Qwen2.5-VL"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
    base_model_classes = ("Qwen2_5_VLModel",)
    example = "Qwen/Qwen2.5-VL-7B-Instruct"
    visual_input_kwargs = MRopeAdapter.visual_input_kwargs + ("second_per_grid_ts",)
