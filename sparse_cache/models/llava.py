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


def square_box(image_size, image_processor) -> tuple[float, float, float, float]:
    """The part of an image of ``image_size`` (width, height) that a CLIP-style processor turns into one square
    tile, as fractions of the image (``x0, y0, x1, y1``): the image padded to a square (``do_pad``, LLaVA's
    ``pad_to_square``), its centre square (``do_center_crop`` after a shortest-edge resize), else all of it."""
    if image_size is None or image_processor is None:
        return (0.0, 0.0, 1.0, 1.0)
    width, height = (int(v) for v in image_size)
    if getattr(image_processor, "do_pad", None) and hasattr(image_processor, "pad_to_square"):
        side = max(width, height)
    elif getattr(image_processor, "do_center_crop", None):
        side = min(width, height)
    else:
        return (0.0, 0.0, 1.0, 1.0)
    return ((width - side) / 2 / width, (height - side) / 2 / height, (width + side) / 2 / width,
            (height + side) / 2 / height)


def map_views(positions: torch.Tensor, base: int, side: int, height: int, width: int) -> list[dict]:
    """Views of an anyres image's tokens: ``base`` tokens of the whole image squeezed to one tile (the last
    ``side**2`` of them a square grid), then the ``height x width`` tile map, each row followed by its newline."""
    tiles = positions[base:].view(height, width + 1)
    return [dict(name="base", grid=positions[base - side * side:base].view(side, side), newlines=None,
                 box=(0.0, 0.0, 1.0, 1.0)),
            dict(name="tiles", grid=tiles[:, :width], newlines=tiles[:, width], box=(0.0, 0.0, 1.0, 1.0))]


class LlavaFamilyAdapter(Rope1DAdapter):
    """What the LLaVA families share: ``<image>`` placeholders (``image_token_index``), 1-D RoPE."""

    visual_input_kwargs = ("pixel_values", "image_sizes")
    visual_feature_kwargs = ("pixel_values",)

    # ------------------------------------------------------------------ where an image's tokens are (overlays)
    def image_positions(self, inputs: dict, row: int = 0, image_index: int = 0) -> tuple[int, torch.Tensor]:
        """``(k, positions)``: the index of image ``image_index`` of batch row ``row`` among all the batch's images
        (the order ``masked_scatter`` consumes them) and the positions of its tokens in ``input_ids[row]``."""
        ids = inputs["input_ids"]
        ids = ids if ids.ndim == 2 else ids[None]
        counts = next((c for token, c, _ in self.block_counts(dict(inputs)) if token == self.image_token_id), None)
        is_image = ids == self.image_token_id
        if not counts or sum(counts) != int(is_image.sum()):
            raise ValueError(
                f"inputs: cannot tell each image's tokens ({int(is_image.sum())} image tokens, per-image counts "
                f"{counts}); pass the processor's outputs for the whole batch"
            )
        if not 0 <= row < ids.shape[0]:
            raise IndexError(f"row: {row} is outside the batch of {ids.shape[0]} rows")
        before = int(is_image[:row].sum())
        ends = torch.cumsum(torch.tensor(counts), 0)
        starts = ends - torch.tensor(counts)
        first = int(torch.searchsorted(starts, torch.tensor(before)))
        in_row = int(is_image[row].sum())
        images = int(((starts >= before) & (ends <= before + in_row)).sum())
        if not 0 <= image_index < images:
            raise IndexError(f"image_index: {image_index} is outside the row's {images} image(s)")
        k = first + image_index
        row_positions = torch.nonzero(is_image[row]).flatten().cpu()
        return k, row_positions[int(starts[k]) - before:int(ends[k]) - before]

    def image_views(self, inputs: dict, row: int = 0, image_index: int = 0, image_size=None, image_processor=None):
        """The pictures an image's tokens show (see :meth:`VLMAdapter.image_views`): LLaVA-1.5 one square grid over
        the part of the image the processor keeps (a centre crop, or the image padded to a square)."""
        k, positions = self.image_positions(inputs, row, image_index)
        side = self.patch_side()
        extra = positions.numel() - side * side  # the CLS feature first with the "full" strategy
        return [dict(name="image", grid=positions[extra:].view(side, side), newlines=None,
                     box=square_box(image_size, image_processor))]

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
