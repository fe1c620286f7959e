"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): a Qwen2 language model (1-D RoPE), a SigLIP tower,
anyres-max images and pooled video frames.

Images (``pack_image_features``): an image alone in its row (``batch_num_images`` 1, or not given) is, as in
LLaVA-NeXT, the base image (``side x side`` tokens, 729 for 384 px / 14 px) then the un-padded tile map with
the ``image_newline`` vector after each row; if the map has more than 1.1 x ``anyres_max_N`` tiles' worth of
tokens it is bilinearly shrunk first (``vision_aspect_ratio``). An image of a row with several images
(``batch_num_images`` > 1) is one tile: ``side x side`` tokens plus one newline. Videos (``get_video_features``):
every frame's ``side x side`` features pooled to ``ceil(side/2)**2``, all frames one after the other, then one
newline for the whole video (``video_token_index``).

Per-image and per-video budgets count each one's own tokens (newlines included, ordinary candidates as in
LLaVA-NeXT). The counts come from the encoder outputs ``generate`` passes, otherwise from ``image_sizes`` /
``batch_num_images`` / ``pixel_values_videos`` exactly as the model computes them. No rectangular grid is
reported (images: base + tile map; videos: the trailing newline), so ``uniform`` strides the tokens as a line.
"""

from __future__ import annotations

import math

import torch

from . import register
from .llava import LlavaFamilyAdapter, encoded_counts, map_views


def onevision_image_token_count(image_size, grid_pinpoints, tile: int, side: int, aspect_ratio: str) -> int:
    """Tokens of one single-image-row image of ``image_size`` (height, width), as
    ``LlavaOnevisionModel.pack_image_features`` lays them out (base, un-padded and maybe shrunk tile map, newlines)."""
    height, width = onevision_map_shape(image_size, grid_pinpoints, tile, side, aspect_ratio)
    return side * side + height * (width + 1)


def onevision_map_shape(image_size, grid_pinpoints, tile: int, side: int, aspect_ratio: str) -> tuple[int, int]:
    """``(height, width)`` in tokens of the tile map of a single-image-row image (un-padded, maybe shrunk)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape, unpad_image

    size = [int(v) for v in (image_size.tolist() if isinstance(image_size, torch.Tensor) else image_size)]
    rows, cols = get_anyres_image_grid_shape(size, grid_pinpoints, tile)
    unpadded = unpad_image(torch.empty(0, rows * side, cols * side), size)
    height, width = unpadded.shape[1:]
    max_num_patches = int(aspect_ratio.strip("anyres_max_"))
    ratio = math.sqrt(height * width / (max_num_patches * side**2))
    if ratio > 1.1:
        height, width = int(height // ratio), int(width // ratio)
    return int(height), int(width)


@register
class LlavaOnevisionAdapter(LlavaFamilyAdapter):
    family = "LLaVA-OneVision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    base_model_classes = ("LlavaOnevisionModel",)
    example = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
    visual_input_kwargs = ("pixel_values", "image_sizes", "batch_num_images", "pixel_values_videos",
                           "image_sizes_videos")
    visual_feature_kwargs = ("pixel_values", "pixel_values_videos")

    def image_counts(self, kwargs: dict) -> list[int] | None:
        sizes = kwargs.get("image_sizes")
        if sizes is None or kwargs.get("pixel_values") is None:
            return None
        side = self.patch_side()
        tile = int(self.config.vision_config.image_size)
        aspect = kwargs.get("vision_aspect_ratio") or self.config.vision_aspect_ratio
        per_row = kwargs.get("batch_num_images")
        alone = [True] * len(sizes) if per_row is None else [int(n) == 1 for n in per_row for _ in range(int(n))]
        if len(alone) != len(sizes):
            return None
        return [onevision_image_token_count(s, self.config.image_grid_pinpoints, tile, side, aspect) if single
                else side * side + 1 for s, single in zip(sizes, alone)]

    def video_counts(self, kwargs: dict) -> list[int] | None:
        videos = kwargs.get("pixel_values_videos")
        if not isinstance(videos, torch.Tensor) or videos.ndim != 5:
            return None
        pooled = math.ceil(self.patch_side() / 2)
        return [int(videos.shape[1]) * pooled * pooled + 1] * int(videos.shape[0])

    def block_counts(self, kwargs: dict):
        images = encoded_counts(kwargs, "image") or self.image_counts(kwargs)
        videos = encoded_counts(kwargs, "video") or self.video_counts(kwargs)
        return [(self.image_token_id, images, None), (self.video_token_id, videos, None)]

    def image_views(self, inputs: dict, row: int = 0, image_index: int = 0, image_size=None, image_processor=None):
        """An image alone in its row: the base tile (the whole image resized to one tile) and the tile map over the
        whole image (un-padded, shrunk past ``anyres_max_N``), a newline after each map row. An image of a row with
        several images: one tile and its newline."""
        k, positions = self.image_positions(inputs, row, image_index)
        side = self.patch_side()
        if positions.numel() == side * side + 1:  # one tile + newline (several images in the row)
            return [dict(name="image", grid=positions[:-1].view(side, side), newlines=positions[-1:],
                         box=(0.0, 0.0, 1.0, 1.0))]
        aspect = inputs.get("vision_aspect_ratio") or self.config.vision_aspect_ratio
        height, width = onevision_map_shape(inputs["image_sizes"][k], self.config.image_grid_pinpoints,
                                            int(self.config.vision_config.image_size), side, aspect)
        return map_views(positions, positions.numel() - height * (width + 1), side, height, width)
