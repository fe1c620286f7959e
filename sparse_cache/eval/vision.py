"""An image-only stand-in for ``qwen_vl_utils.process_vision_info``, used when qwen-vl-utils cannot be imported.

lmms-eval's Qwen-VL model classes prepare images with ``qwen_vl_utils.process_vision_info``. That module
imports torchvision at the top (for video decoding), and torchvision has no build for a CPU-only torch such
as the one this package's CI pins, so on such a machine lmms-eval's Qwen classes cannot prepare any input.
This module restates what ``qwen_vl_utils`` 0.0.14 does to *images* (convert to RGB, RGBA over white; round
height and width to multiples of ``patch * 2`` within the pixel bounds, aspect ratio kept; PIL's default
bicubic resize) so that images are prepared the same way; a video raises with what to install. On a GPU
machine, install ``qwen-vl-utils`` and a torchvision that matches torch: lmms-eval then uses the real one
and this module is not used.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any

from PIL import Image

#: qwen_vl_utils 0.0.14's constants for images
SPATIAL_MERGE_SIZE = 2
IMAGE_MIN_TOKEN_NUM = 4
IMAGE_MAX_TOKEN_NUM = 16384
MAX_RATIO = 200


def smart_resize(height: int, width: int, factor: int, min_pixels: int | None = None, max_pixels: int | None = None):
    """``(height, width)`` rounded to multiples of ``factor``, the pixel count within ``[min_pixels, max_pixels]``."""
    max_pixels = max_pixels if max_pixels is not None else IMAGE_MAX_TOKEN_NUM * factor**2
    min_pixels = min_pixels if min_pixels is not None else IMAGE_MIN_TOKEN_NUM * factor**2
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels: {max_pixels} is below min_pixels {min_pixels}")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"image: aspect ratio {max(height, width) / min(height, width):.1f} is above {MAX_RATIO}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _open(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, str):
        if image.startswith(("http://", "https://")):
            raise ValueError(f"image: {image[:80]!r} is a URL; this offline stand-in for qwen_vl_utils reads local files only")
        if image.startswith("file://"):
            return Image.open(image[7:])
        if image.startswith("data:image") and "base64," in image:
            return Image.open(io.BytesIO(base64.b64decode(image.split("base64,", 1)[1])))
        return Image.open(image)
    raise ValueError(f"image: expected a PIL image, a path or a data URL, got {type(image).__name__}")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGBA":
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.split()[3])
        return white
    return image.convert("RGB")


def fetch_image(element: dict, image_patch_size: int = 14) -> Image.Image:
    """The image of one message element, resized as ``qwen_vl_utils.fetch_image`` does."""
    image = _to_rgb(_open(element["image"] if "image" in element else element["image_url"]))
    factor = image_patch_size * SPATIAL_MERGE_SIZE
    if "resized_height" in element and "resized_width" in element:
        height, width = smart_resize(element["resized_height"], element["resized_width"], factor=factor)
    else:
        width, height = image.size
        height, width = smart_resize(
            height,
            width,
            factor=factor,
            min_pixels=element.get("min_pixels", IMAGE_MIN_TOKEN_NUM * factor**2),
            max_pixels=element.get("max_pixels", IMAGE_MAX_TOKEN_NUM * factor**2),
        )
    return image.resize((width, height))


def process_vision_info(conversations, return_video_kwargs: bool = False, return_video_metadata: bool = False,
                        image_patch_size: int = 14):
    """``qwen_vl_utils.process_vision_info`` for conversations with images only (same signature and returns)."""
    if conversations and isinstance(conversations[0], dict):
        conversations = [conversations]
    images = []
    for conversation in conversations:
        for message in conversation:
            content = message.get("content")
            if not isinstance(content, list):
                continue
            for element in content:
                kind = element.get("type", "text")
                if "video" in element or kind == "video":
                    raise RuntimeError(
                        "video input needs qwen-vl-utils, which imports torchvision: install qwen-vl-utils and the "
                        "torchvision build that matches your torch (sparse_cache's image-only stand-in is in use)"
                    )
                if "image" in element or "image_url" in element or kind in ("image", "image_url"):
                    images.append(fetch_image(element, image_patch_size=image_patch_size))
    video_kwargs: dict = {"do_sample_frames": False}
    if not return_video_metadata:
        video_kwargs["fps"] = []
    images = images or None
    if return_video_kwargs:
        return images, None, video_kwargs
    return images, None
