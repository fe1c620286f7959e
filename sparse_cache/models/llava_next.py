"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, "LLaVA-1.6"): anyres images.

Each image's tokens, all with the ``<image>`` id and contiguous in the prompt, are (``pack_image_features``):
the base image resized to one tile (``side x side`` tokens, 576 for 336px / 14), then the tiles of the best
``image_grid_pinpoints`` resolution stitched into one feature map, un-padded to the image's aspect ratio
(``unpad_image``), row-major, with the learned ``image_newline`` vector appended after each row. Per-image
budgets count all of them (base, tiles and newlines) as one block: an image's count follows from
``image_sizes`` exactly as the model computes it, or from the encoder outputs ``generate`` hands the prefill.

Newline tokens are ordinary candidates: their features are one learned vector at a row's end, the scorer
rates them like any other token, and keeping them all would take ~5-10% of each image's tokens out of the
budget before any content is kept. The tile layout is not one rectangular grid, so no grid is reported
(the ``uniform`` scorer strides the tokens as a line).
"""

from __future__ import annotations

import torch

from . import register
from .llava import LlavaFamilyAdapter, encoded_counts, map_views


def anyres_map_shape(image_size, grid_pinpoints, tile: int, side: int) -> tuple[int, int]:
    """``(height, width)`` in tokens of the un-padded tile map of an anyres image of ``image_size`` (height, width)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    size = [int(v) for v in (image_size.tolist() if isinstance(image_size, torch.Tensor) else image_size)]
    rows, cols = get_anyres_image_grid_shape(size, grid_pinpoints, tile)
    unpadded = unpad_image(torch.empty(0, rows * side, cols * side), size)
    return int(unpadded.shape[1]), int(unpadded.shape[2])


def anyres_token_count(image_size, grid_pinpoints, tile: int, side: int, base: int) -> int:
    """Tokens of one anyres image of ``image_size`` (height, width), as ``LlavaNextModel.pack_image_features``
    lays them out: ``base`` tokens of the base image, then the un-padded tile map with a newline per row."""
    height, width = anyres_map_shape(image_size, grid_pinpoints, tile, side)
    return base + height * (width + 1)


@register
class LlavaNextAdapter(LlavaFamilyAdapter):
    family = "LLaVA-NeXT"
    model_classes = ("LlavaNextForConditionalGeneration",)
    base_model_classes = ("LlavaNextModel",)
    example = "llava-hf/llava-v1.6-vicuna-7b-hf"

    def block_counts(self, kwargs: dict):
        counts = encoded_counts(kwargs, "image")
        sizes = kwargs.get("image_sizes")
        if counts is None and sizes is not None and kwargs.get("pixel_values") is not None:
            side = self.patch_side()
            base = side * side + (1 if self.select_strategy(kwargs) == "full" else 0)
            tile = int(self.config.vision_config.image_size)
            counts = [anyres_token_count(s, self.config.image_grid_pinpoints, tile, side, base) for s in sizes]
        return [(self.image_token_id, counts, None)]

    def image_views(self, inputs: dict, row: int = 0, image_index: int = 0, image_size=None, image_processor=None):
        """Two views: the base tile (the whole image squeezed to one tile) and the un-padded tile map over the whole
        image, each map row followed by its ``image_newline`` token (the tile map's padding is cut off, so the map
        covers the image)."""
        k, positions = self.image_positions(inputs, row, image_index)
        side = self.patch_side()
        height, width = anyres_map_shape(inputs["image_sizes"][k], self.config.image_grid_pinpoints,
                                         int(self.config.vision_config.image_size), side)
        return map_views(positions, positions.numel() - height * (width + 1), side, height, width)
