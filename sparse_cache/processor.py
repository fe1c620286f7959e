"""A Qwen2.5-VL processor that works without torchvision (offline checkpoints shipped or built here).

Importing :mod:`sparse_cache` registers it with ``AutoProcessor``, so ``AutoProcessor.from_pretrained``
loads the bundled toy VLM and the tiny test checkpoints saved by :mod:`sparse_cache.testing`.
"""

from __future__ import annotations

from transformers import AutoProcessor, Qwen2_5_VLProcessor


class TinyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without a video processor (so no torchvision is needed).

    ``ProcessorMixin`` type-checks every sub-processor, ``None`` included, against the video
    processor base class, which is only a torchvision dummy here, so ``Qwen2_5_VLProcessor``
    itself cannot be built with ``video_processor=None``. This subclass drops the argument
    (the attribute is always ``None``); everything else is inherited unchanged.
    """

    video_processor = None

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )


# Registered under a private key (not a real config class, so the processors of genuine
# Qwen2.5-VL checkpoints are untouched): lets ``AutoProcessor.from_pretrained`` resolve the
# saved ``"processor_class": "TinyQwen2_5_VLProcessor"`` once this module is imported.
AutoProcessor.register("sparse_cache_tiny_qwen2_5_vl", TinyQwen2_5_VLProcessor, exist_ok=True)
