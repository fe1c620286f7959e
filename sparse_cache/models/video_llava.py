"""Video-LLaVA (``VideoLlavaForConditionalGeneration``): a Llama/Vicuna language model (1-D RoPE), separate CLIP
image and video towers sharing one projector.

Images (``pixel_values``; ``pixel_values_images`` before transformers 5.23, and what its image processor still
returns by default): ``(image_size / patch_size)**2`` tokens each (CLS dropped by the ``default`` strategy, 256
for Video-LLaVA-7B), a square grid as in LLaVA-1.5. Videos (``pixel_values_videos``, ``(videos, frames, C, H,
W)``): every frame's features *with* its CLS token (the video path keeps it whatever the strategy), frames one
after the other: ``frames x (side**2 + 1)`` tokens (8 x 257 for Video-LLaVA-7B), all with ``video_token_index``.

Per-image and per-video budgets count each one's own tokens: a video's budget is spread over its frames by the
scorer, like a Qwen video's. Counts from the encoder outputs ``generate`` passes, otherwise from the pixel
tensors' shapes. Images report their square grid (``uniform`` strides it); videos have no rectangular grid
(one CLS per frame), so a prompt with a video reports none.
"""

from __future__ import annotations

import torch

from . import register
from .llava import LlavaFamilyAdapter, encoded_counts


@register
class VideoLlavaAdapter(LlavaFamilyAdapter):
    family = "Video-LLaVA"
    model_classes = ("VideoLlavaForConditionalGeneration",)
    base_model_classes = ("VideoLlavaModel",)
    example = "LanguageBind/Video-LLaVA-7B-hf"
    visual_input_kwargs = ("pixel_values", "pixel_values_images", "pixel_values_videos")
    visual_feature_kwargs = ("pixel_values", "pixel_values_images", "pixel_values_videos")

    def block_counts(self, kwargs: dict):
        side = self.patch_side()
        images = encoded_counts(kwargs, "image")
        pixels = kwargs.get("pixel_values")
        pixels = kwargs.get("pixel_values_images") if pixels is None else pixels
        if images is None and isinstance(pixels, torch.Tensor):
            per_image = side * side + (1 if self.select_strategy(kwargs) == "full" else 0)
            images = [per_image] * int(pixels.shape[0])
        videos = self._encoded_video_counts(kwargs)
        video_pixels = kwargs.get("pixel_values_videos")
        if videos is None and isinstance(video_pixels, torch.Tensor) and video_pixels.ndim == 5:
            videos = [int(video_pixels.shape[1]) * (side * side + 1)] * int(video_pixels.shape[0])
        image_grids = [(1, side, side)] * len(images) if images and all(c == side * side for c in images) else None
        return [(self.image_token_id, images, image_grids), (self.video_token_id, videos, None)]

    def visual_blocks(self, input_ids, is_visual, kwargs: dict):
        self._input_ids = input_ids  # the encoded-video path groups frames by the prompt's runs of <video> tokens
        try:
            return super().visual_blocks(input_ids, is_visual, kwargs)
        finally:
            self._input_ids = None

    def _encoded_video_counts(self, kwargs: dict) -> list[int] | None:
        """Tokens of each video from the encoder outputs: they hold one ``(side**2 + 1, D)`` feature map per frame
        (``(videos * frames, side**2 + 1, D)``), without the video count; every ``<video>`` expands to one run of
        placeholders, so each run (row-major, as ``masked_scatter`` consumes them) is one video when it is a whole
        number of frames. Two videos with no text between them are one block on this path only."""
        encoded = kwargs.get("mm_encoder_outputs")
        if not isinstance(encoded, dict) or encoded.get("video") is None:
            return None
        features = getattr(encoded["video"], "pooler_output", None)
        input_ids = getattr(self, "_input_ids", None)
        if not isinstance(features, torch.Tensor) or features.ndim != 3 or input_ids is None:
            return None
        per_frame = int(features.shape[1])
        is_video = (input_ids == self.video_token_id).long()
        runs = []
        for row in is_video:
            edges = torch.diff(torch.nn.functional.pad(row, (1, 1)))
            starts, ends = torch.nonzero(edges == 1).flatten(), torch.nonzero(edges == -1).flatten()
            runs += [int(e - s) for s, e in zip(starts, ends)]
        if any(run % per_frame for run in runs) or sum(runs) != per_frame * int(features.shape[0]):
            return None
        return runs
