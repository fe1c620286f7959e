"""Named Qwen2.5-VL architectures with random weights, for benchmarks that must not download anything.

Speed and memory depend on the shapes, not on the weight values, so a preset builds the real
architecture (the published config numbers for ``qwen2.5-vl-3b`` and ``qwen2.5-vl-7b``) with random
weights and the offline tiny tokenizer/processor of :mod:`sparse_cache.testing`. Generated text is
meaningless; timings and memory are those of the real shapes.

=================  ====================================================================================
``tiny``           the test-suite model (:func:`sparse_cache.testing.tiny_qwen2_5_vl_model`): seconds.
``small``          hidden 512, 8 layers, 8 heads, 2 KV heads, a 2-block vision tower: CPU timings of
                   1K-4K visual tokens in a few minutes.
``qwen2.5-vl-3b``  Qwen/Qwen2.5-VL-3B-Instruct shapes (3.75B parameters, tied embeddings).
``qwen2.5-vl-7b``  Qwen/Qwen2.5-VL-7B-Instruct shapes (8.29B parameters).
=================  ====================================================================================

Large presets are built on the ``meta`` device (no memory, no initialisation), then every parameter is
allocated once, directly on the target device and in the target dtype, and drawn there from a seeded
generator: the 7B preset is ready in seconds on a GPU. The rotary ``inv_freq`` buffers are computed
normally and stay float32, as ``from_pretrained`` leaves them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

from . import testing

logger = logging.getLogger(__name__)

__all__ = ["Preset", "PRESETS", "preset_config", "build_preset_model", "preset_processor"]

# Vision tower shared by the 3B and 7B checkpoints (their config.json "vision_config").
_QWEN2_5_VL_VISION = dict(
    vision_depth=32,
    vision_hidden_size=1280,
    vision_num_heads=16,
    vision_intermediate_size=3420,
    vision_window_size=112,
    vision_fullatt_block_indexes=[7, 15, 23, 31],
)
_QWEN2_5_VL_TEXT = dict(max_position_embeddings=128000, rms_norm_eps=1e-6, mrope_section=[16, 24, 24])


@dataclass(frozen=True)
class Preset:
    """A named architecture: ``overrides`` go to :func:`sparse_cache.testing.tiny_qwen2_5_vl_config`."""

    name: str
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)
    #: std of the random Linear/Embedding weights (the tiny test model uses 0.2 for peaked attention).
    init_std: float = 0.02
    #: parameter count of the published checkpoint, when the preset mirrors one (checked by the tests).
    published_parameters: int | None = None


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "tiny",
        "the test-suite model: hidden 64, 4 layers, 4 heads, 2 KV heads, vision depth 2 (seconds on CPU)",
        init_std=0.2,
    ),
    "small": Preset(
        "small",
        "hidden 512, 8 layers, 8 heads, 2 KV heads, intermediate 1536, vocab 32000, vision depth 2 hidden 128 "
        "(CPU-sized: 1K-4K visual tokens in minutes)",
        overrides=dict(
            hidden_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=1536,
            vocab_size=32000,
            max_position_embeddings=32768,
            vision_depth=2,
            vision_hidden_size=128,
            vision_num_heads=2,
            vision_intermediate_size=256,
            vision_fullatt_block_indexes=[1],
        ),
    ),
    "qwen2.5-vl-3b": Preset(
        "qwen2.5-vl-3b",
        "Qwen2.5-VL-3B-Instruct shapes: hidden 2048, 36 layers, 16 heads, 2 KV heads, intermediate 11008, "
        "vocab 151936, tied embeddings; vision depth 32, hidden 1280, out 2048",
        overrides=dict(
            hidden_size=2048,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            intermediate_size=11008,
            vocab_size=151936,
            tie_word_embeddings=True,
            vision_out_hidden_size=2048,
            **_QWEN2_5_VL_TEXT,
            **_QWEN2_5_VL_VISION,
        ),
        published_parameters=3_754_622_976,
    ),
    "qwen2.5-vl-7b": Preset(
        "qwen2.5-vl-7b",
        "Qwen2.5-VL-7B-Instruct shapes: hidden 3584, 28 layers, 28 heads, 4 KV heads, intermediate 18944, "
        "vocab 152064; vision depth 32, hidden 1280, out 3584",
        overrides=dict(
            hidden_size=3584,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            intermediate_size=18944,
            vocab_size=152064,
            tie_word_embeddings=False,
            vision_out_hidden_size=3584,
            **_QWEN2_5_VL_TEXT,
            **_QWEN2_5_VL_VISION,
        ),
        published_parameters=8_292_166_656,
    ),
}


def _get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; valid presets are {sorted(PRESETS)}")
    return PRESETS[name]


def preset_config(name: str, attn_implementation: str = "sdpa"):
    """The ``Qwen2_5_VLConfig`` of preset ``name`` (token ids are those of the tiny tokenizer)."""
    preset = _get_preset(name)
    return testing.tiny_qwen2_5_vl_config(attn_implementation=attn_implementation, **preset.overrides)


def build_preset_model(
    name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    materialize: bool = True,
):
    """Build preset ``name`` with random weights, in eval mode, on ``device`` in ``dtype``.

    ``tiny`` is exactly the test-suite model. Other presets are built on the meta device; with
    ``materialize=False`` they stay there (shapes and parameter counts only, no memory), otherwise every
    parameter is allocated on ``device`` in ``dtype`` and drawn from ``N(0, init_std)`` (norm weights 1,
    biases 0) with a generator seeded by ``seed`` on that device.
    """
    preset = _get_preset(name)
    device = torch.device(device)
    if name == "tiny" and materialize:
        model = testing.tiny_qwen2_5_vl_model(seed=seed, attn_implementation=attn_implementation, dtype=dtype)
        return model.to(device)

    from accelerate import init_empty_weights  # a dependency of the package

    config = preset_config(name, attn_implementation)
    # Parameters on meta (no memory, initialisation is free); buffers (rotary inv_freq) are computed for real.
    with init_empty_weights(include_buffers=False):
        model = Qwen2_5_VLForConditionalGeneration(config)
    text_config = config.get_text_config()
    model.generation_config = GenerationConfig(
        bos_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,
        pad_token_id=text_config.pad_token_id,
        do_sample=False,
    )
    if not materialize:
        model.tie_weights()
        return model.eval()
    _materialize(model, device, dtype, preset.init_std, seed)
    model.eval()
    logger.info(
        "built preset %s on %s (%s, %s): %.3fB parameters",
        name, device, dtype, attn_implementation, _count_parameters(model) / 1e9,
    )
    return model


def _count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def _materialize(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, std: float, seed: int) -> None:
    """Allocate every meta parameter on ``device`` in ``dtype`` and fill it with seeded random values."""
    generator = torch.Generator(device=device).manual_seed(seed)
    replaced: dict[int, torch.nn.Parameter] = {}  # shared (tied) parameters stay shared
    for module in model.modules():
        for pname, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in replaced:
                target_dtype = dtype if param.is_floating_point() else param.dtype
                replaced[id(param)] = torch.nn.Parameter(
                    torch.empty(param.shape, dtype=target_dtype, device=device), requires_grad=False
                )
            module._parameters[pname] = replaced[id(param)]
        for bname, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[bname] = buffer.to(device)  # float32 rotary tables, as from_pretrained keeps them
    model.tie_weights()
    for module in model.modules():
        kind = type(module).__name__.lower()
        weight = module._parameters.get("weight")
        bias = module._parameters.get("bias")
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv3d, torch.nn.Conv2d)):
            weight.normal_(0.0, std, generator=generator)
        elif "norm" in kind and weight is not None:
            weight.fill_(1.0)
        elif weight is not None:
            weight.normal_(0.0, std, generator=generator)
        if bias is not None:
            bias.zero_()
        for pname, param in module._parameters.items():
            if pname not in ("weight", "bias") and param is not None and param.is_floating_point():
                param.normal_(0.0, std, generator=generator)
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:  # pragma: no cover - would mean a parameter registered outside module._parameters
        raise RuntimeError(f"parameters left on the meta device: {leftover[:5]}")


def preset_processor(min_pixels: int | None = None, max_pixels: int | None = None):
    """The offline Qwen2.5-VL processor of the presets, with pixel bounds wide enough for the benchmark image."""
    processor = testing.tiny_processor(
        min_pixels=testing.TINY_MIN_PIXELS if min_pixels is None else min_pixels,
        max_pixels=testing.TINY_MAX_PIXELS if max_pixels is None else max_pixels,
    )
    # Visual tokens are expanded in the text: a 16K-token image is a legal prompt for the real models.
    processor.tokenizer.model_max_length = 1 << 20
    return processor
