"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): M-RoPE, image and video tokens; as Qwen2.5-VL for pruning."""

from __future__ import annotations

from . import register
from .mrope import MRopeAdapter


@register
class Qwen2VLAdapter(MRopeAdapter):
    family = "Qwen2-VL"
    model_classes = ("Qwen2VLForConditionalGeneration",)
    base_model_classes = ("Qwen2VLModel",)
    example = "Qwen/Qwen2-VL-7B-Instruct"
