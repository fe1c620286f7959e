"""Named VLM architectures with random weights, for benchmarks that must not download anything.

Speed and memory depend on the shapes, not on the weight values, so a preset builds the real
architecture (the published config numbers of the checkpoint it is named after) with random weights and
the offline tiny tokenizer/processor of :mod:`sparse_cache.testing` (patch 16 for Qwen3-VL, 14 otherwise).
Generated text is meaningless; timings and memory are those of the real shapes.

======================  ===============================================================================
``tiny``                the test-suite Qwen2.5-VL (:func:`sparse_cache.testing.tiny_qwen2_5_vl_model`).
``tiny-qwen2-vl``,      the test-suite model of each other family (:func:`sparse_cache.testing.tiny_vlm_model`):
``tiny-qwen3-vl``,      seconds on CPU.
``tiny-qwen3-vl-moe``
``small``               hidden 512, 8 layers, 8 heads, 2 KV heads, a 2-block vision tower: CPU timings of
                        1K-4K visual tokens in a few minutes.
``qwen2-vl-7b``         Qwen/Qwen2-VL-7B-Instruct shapes (8.29B parameters).
``qwen2.5-vl-3b``       Qwen/Qwen2.5-VL-3B-Instruct shapes (3.75B parameters, tied embeddings).
``qwen2.5-vl-7b``       Qwen/Qwen2.5-VL-7B-Instruct shapes (8.29B parameters).
``qwen3-vl-4b``         Qwen/Qwen3-VL-4B-Instruct shapes (4.44B parameters, tied embeddings, DeepStack).
``qwen3-vl-8b``         Qwen/Qwen3-VL-8B-Instruct shapes (8.77B parameters, DeepStack).
``tiny-llava``,         the test-suite LLaVA-1.5 / LLaVA-NeXT models (:func:`sparse_cache.testing.tiny_llava_model`):
``tiny-llava-next``     56 px tiles, 16 tokens per tile (seconds on CPU).
``llava-1.5-7b``        llava-hf/llava-1.5-7b-hf shapes (7.06B parameters): Vicuna-7B, CLIP ViT-L/14-336,
                        576 visual tokens per image (SparseVLM's published setting).
``llava-next-7b``       llava-hf/llava-v1.6-vicuna-7b-hf shapes (7.06B parameters): anyres 336 px tiles, a
                        672 x 672 image gives 576 + 48 x 48 + 48 newlines = 2,928 visual tokens.
======================  ===============================================================================

``llava-1.5-7b-quarter`` is llava-1.5-7b at a quarter of its width with all 32 layers (CPU validation of the
FLOPs model at the paper's schedule; not a published model).

LLaVA presets use the offline tiny tokenizer and the family's PIL image processor at the published tile size
(:func:`sparse_cache.testing.tiny_llava_processor` with ``tile=336``); their visual-token count is fixed by the
image size (``Preset.image_size``: the benchmark's default image), not chosen with ``--visual-tokens``.

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
import transformers

from . import testing

logger = logging.getLogger(__name__)

__all__ = [
    "Preset",
    "PRESETS",
    "preset_config",
    "build_preset_model",
    "preset_processor",
    "model_class_for_config",
    "supported_families_text",
]

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

# Qwen/Qwen2-VL-7B-Instruct config.json: the text model is Qwen2.5-VL-7B's (hidden 3584, 28 layers, 28 heads,
# 4 KV heads, intermediate 18944, vocab 152064, untied) with max_position_embeddings 32768; the vision tower is
# "embed_dim" 1280, depth 32, 16 heads, mlp_ratio 4, patch 14, merged to "hidden_size" 3584 (also the defaults
# of transformers' Qwen2VLVisionConfig).
_QWEN2_VL_7B = dict(
    hidden_size=3584,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    intermediate_size=18944,
    vocab_size=152064,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    mrope_section=[16, 24, 24],
    tie_word_embeddings=False,
    vision_depth=32,
    vision_embed_dim=1280,
    vision_num_heads=16,
    vision_mlp_ratio=4,
)
# Qwen/Qwen3-VL-4B-Instruct and -8B-Instruct config.json: text head_dim 128, 32 heads, 8 KV heads, 36 layers,
# vocab 151936, rope_theta 5e6, interleaved mrope_section [24, 20, 20], max_position_embeddings 262144; vision
# patch 16, merge 2, 2304 learned position embeddings, DeepStack features from three vision blocks.
_QWEN3_VL_TEXT = dict(
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    max_position_embeddings=262144,
    rms_norm_eps=1e-6,
    rope_theta=5_000_000.0,
    mrope_section=[24, 20, 20],
    vision_num_heads=16,
    vision_num_position_embeddings=2304,
)


@dataclass(frozen=True)
class Preset:
    """A named architecture: ``overrides`` go to :func:`sparse_cache.testing.tiny_vlm_config` of ``family``."""

    name: str
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)
    #: a family of :data:`sparse_cache.testing.FAMILIES`
    family: str = "qwen2_5_vl"
    #: std of the random Linear/Embedding weights (the tiny test model uses 0.2 for peaked attention).
    init_std: float = 0.02
    #: parameter count of the published checkpoint, when the preset mirrors one (checked by the tests).
    published_parameters: int | None = None
    #: families whose processor fixes the visual tokens by the image (LLaVA): the benchmark's default image
    #: ``(width, height)``; ``None``: the image is sized from ``--visual-tokens`` (Qwen-VL)
    image_size: tuple[int, int] | None = None


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "tiny",
        "the test-suite model: hidden 64, 4 layers, 4 heads, 2 KV heads, vision depth 2 (seconds on CPU)",
        init_std=0.2,
    ),
    **{
        f"tiny-{family.replace('_', '-')}": Preset(
            f"tiny-{family.replace('_', '-')}",
            f"the test-suite {family} model (sparse_cache.testing.tiny_vlm_model): hidden 64, 4 layers, 4 heads, "
            "2 KV heads, vision depth 2 (seconds on CPU)",
            init_std=0.2,
            family=family,
        )
        for family in ("qwen2_vl", "qwen3_vl", "qwen3_vl_moe")
    },
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
    "qwen2-vl-7b": Preset(
        "qwen2-vl-7b",
        "Qwen2-VL-7B-Instruct shapes: hidden 3584, 28 layers, 28 heads, 4 KV heads, intermediate 18944, "
        "vocab 152064; vision depth 32, embed 1280, mlp ratio 4, merged to 3584",
        overrides=_QWEN2_VL_7B,
        family="qwen2_vl",
        published_parameters=8_291_375_616,
    ),
    "qwen3-vl-4b": Preset(
        "qwen3-vl-4b",
        "Qwen3-VL-4B-Instruct shapes: hidden 2560, 36 layers, 32 heads (head_dim 128), 8 KV heads, intermediate "
        "9728, vocab 151936, tied embeddings; vision depth 24, hidden 1024, patch 16, DeepStack after blocks 5/11/17",
        overrides=dict(
            hidden_size=2560,
            intermediate_size=9728,
            tie_word_embeddings=True,
            vision_depth=24,
            vision_hidden_size=1024,
            vision_intermediate_size=4096,
            vision_deepstack_visual_indexes=[5, 11, 17],
            **_QWEN3_VL_TEXT,
        ),
        family="qwen3_vl",
        published_parameters=4_437_815_808,
    ),
    "qwen3-vl-8b": Preset(
        "qwen3-vl-8b",
        "Qwen3-VL-8B-Instruct shapes: hidden 4096, 36 layers, 32 heads (head_dim 128), 8 KV heads, intermediate "
        "12288, vocab 151936; vision depth 27, hidden 1152, patch 16, DeepStack after blocks 8/16/24",
        overrides=dict(
            hidden_size=4096,
            intermediate_size=12288,
            tie_word_embeddings=False,
            vision_depth=27,
            vision_hidden_size=1152,
            vision_intermediate_size=4304,
            vision_deepstack_visual_indexes=[8, 16, 24],
            **_QWEN3_VL_TEXT,
        ),
        family="qwen3_vl",
        published_parameters=8_767_123_696,
    ),
}


# llava-hf/llava-1.5-7b-hf config.json: Vicuna-7B text model (hidden 4096, 32 layers, 32 heads, MHA, intermediate
# 11008, vocab 32064, untied, rms_norm_eps 1e-5, max_position_embeddings 4096) and the CLIP ViT-L/14-336 tower
# (24 layers, width 1024, 16 heads, MLP 4096, 336 px / 14 px = 24 x 24 = 576 patches; vision_feature_layer -2,
# CLS dropped); a 2-layer GELU projector 1024 -> 4096 -> 4096. llava-hf/llava-v1.6-vicuna-7b-hf: the same shapes,
# the learned image_newline vector and anyres pinpoints up to 672 x 672 (2 x 2 tiles) and 1008 x 336 (3 x 1).
_LLAVA_7B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    intermediate_size=11008,
    vocab_size=32064,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    vision_hidden_size=1024,
    vision_intermediate_size=4096,
    vision_num_hidden_layers=24,
    vision_num_attention_heads=16,
    vision_image_size=336,
    vision_patch_size=14,
    vision_projection_dim=768,
)
_LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

PRESETS.update({
    "tiny-llava": Preset(
        "tiny-llava", "the test-suite LLaVA-1.5 model (sparse_cache.testing.tiny_llava_model): hidden 64, 4 layers, "
        "56 px tiles, 16 visual tokens per image (seconds on CPU)",
        init_std=0.2, family="llava", image_size=(56, 56),
    ),
    "tiny-llava-next": Preset(
        "tiny-llava-next", "the test-suite LLaVA-NeXT model: hidden 64, 4 layers, anyres 56 px tiles up to 2 x 2; "
        "a 112 x 112 image gives 16 + 8 x 8 + 8 newlines = 88 visual tokens (seconds on CPU)",
        init_std=0.2, family="llava_next", image_size=(112, 112),
    ),
    "llava-1.5-7b": Preset(
        "llava-1.5-7b",
        "llava-hf/llava-1.5-7b-hf shapes: Vicuna-7B (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab "
        "32064); CLIP ViT-L/14-336 (24 layers, width 1024): 576 visual tokens per image",
        overrides=dict(_LLAVA_7B),
        family="llava",
        published_parameters=7_063_427_072,
        image_size=(336, 336),
    ),
    "llava-1.5-7b-quarter": Preset(
        "llava-1.5-7b-quarter",
        "llava-1.5-7b scaled to a quarter of its width (hidden 1024, 8 heads of 128, intermediate 2752) at its full "
        "depth (32 layers) and vocabulary, same CLIP ViT-L/14-336 tower and 576 visual tokens: the paper's schedule "
        "at its own layers on a CPU (NOT a published model)",
        overrides=dict(_LLAVA_7B, hidden_size=1024, num_attention_heads=8, num_key_value_heads=8,
                       intermediate_size=2752),
        family="llava",
        image_size=(336, 336),
    ),
    "llava-next-7b": Preset(
        "llava-next-7b",
        "llava-hf/llava-v1.6-vicuna-7b-hf shapes: Vicuna-7B, CLIP ViT-L/14-336, anyres 336 px tiles up to 672 x 672; "
        "a 672 x 672 image: 576 base + 2 x 2 tiles (48 x 48) + 48 newlines = 2,928 visual tokens",
        overrides=dict(_LLAVA_7B, model_type="llama", image_grid_pinpoints=_LLAVA_NEXT_PINPOINTS),
        family="llava_next",
        published_parameters=7_063_431_168,
        image_size=(672, 672),
    ),
})


def _get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; valid presets are {sorted(PRESETS)}")
    return PRESETS[name]


def preset_config(name: str, attn_implementation: str = "sdpa", overrides: dict[str, Any] | None = None):
    """The config of preset ``name``, of its family's class (token ids are those of the tiny tokenizer).
    ``overrides`` (e.g. ``num_hidden_layers=4``) replace the preset's own values: the result is then *not* the
    published architecture (the benchmark's ``--layers`` validates the FLOPs model at the published width this way)."""
    preset = _get_preset(name)
    values = {**preset.overrides, **dict(overrides or {})}
    return testing.tiny_vlm_config(preset.family, attn_implementation=attn_implementation, **values)


def build_preset_model(
    name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    materialize: bool = True,
    overrides: dict[str, Any] | None = None,
):
    """Build preset ``name`` with random weights, in eval mode, on ``device`` in ``dtype``.

    ``tiny`` is exactly the test-suite model. Other presets are built on the meta device; with
    ``materialize=False`` they stay there (shapes and parameter counts only, no memory), otherwise every
    parameter is allocated on ``device`` in ``dtype`` and drawn from ``N(0, init_std)`` (norm weights 1,
    biases 0) with a generator seeded by ``seed`` on that device.
    """
    preset = _get_preset(name)
    device = torch.device(device)
    if name.startswith("tiny") and materialize:
        model = testing.tiny_vlm_model(preset.family, seed=seed, attn_implementation=attn_implementation, dtype=dtype,
                                       **dict(overrides or {}))
        return model.to(device)

    from accelerate import init_empty_weights  # a dependency of the package

    config = preset_config(name, attn_implementation, overrides)
    model_class = getattr(transformers, model_class_for_config(config))
    # Parameters on meta (no memory, initialisation is free); buffers (rotary inv_freq) are computed for real.
    with init_empty_weights(include_buffers=False):
        model = model_class(config)
    model.generation_config = testing.greedy_generation_config(config)
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


def preset_processor(min_pixels: int | None = None, max_pixels: int | None = None, name: str = "tiny"):
    """The offline processor of preset ``name`` (its family's patch size), with pixel bounds wide enough for the
    benchmark image (default: those of :func:`sparse_cache.testing.tiny_processor`, in patches of 14 pixels).
    LLaVA presets: the family's processor at the preset's tile size and pinpoints (no pixel bounds)."""
    preset = _get_preset(name)
    if preset.image_size is not None:
        config = preset_config(name)
        pinpoints = getattr(config, "image_grid_pinpoints", None)
        processor = testing.tiny_llava_processor(preset.family, tile=int(config.vision_config.image_size),
                                                 pinpoints=pinpoints)
        processor.tokenizer.model_max_length = 1 << 20
        return processor
    patch, merge = preset_patch_and_merge(name)
    scale = (patch * merge) ** 2 / 28**2
    processor = testing.tiny_processor(
        min_pixels=round(testing.TINY_MIN_PIXELS * scale) if min_pixels is None else min_pixels,
        max_pixels=round(testing.TINY_MAX_PIXELS * scale) if max_pixels is None else max_pixels,
    )
    processor.image_processor.patch_size = patch  # as testing.tiny_family_processor does for Qwen3-VL
    processor.image_processor.merge_size = merge
    # Visual tokens are expanded in the text: a 16K-token image is a legal prompt for the real models.
    processor.tokenizer.model_max_length = 1 << 20
    return processor


def preset_patch_and_merge(name: str) -> tuple[int, int]:
    """``(patch_size, spatial_merge_size)`` of preset ``name``'s vision tower (pixels per merged token: their product)."""
    vision = preset_config(name).vision_config
    return int(vision.patch_size), int(vision.spatial_merge_size)


# --------------------------------------------------------------------------- families (shared with the CLI)


def model_class_for_config(config) -> str | None:
    """The name of the generating class (``...ForConditionalGeneration``) sparse_cache supports for ``config``,
    found from its ``model_type`` (transformers' image-text-to-text mapping) or its ``architectures``; ``None``
    when the config is not of a family of :func:`sparse_cache.models.families`."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from .models import families

    supported = {name for family in families() if family.command_line for name in family.model_classes}
    candidates = [MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(getattr(config, "model_type", None))]
    candidates += list(getattr(config, "architectures", None) or ())
    for name in candidates:
        if name in supported and hasattr(transformers, name):
            return name
    return None


def supported_families_text() -> str:
    """``"Qwen2-VL (Qwen2VLForConditionalGeneration), ..."``: the families the command line handles, and the
    ones the Python API alone handles."""
    from .models import families

    tools = ", ".join(f"{family.family} ({', '.join(family.model_classes)})" for family in families() if family.command_line)
    api_only = [family.family for family in families() if not family.command_line]
    return tools + (f"; from Python only, not yet here: {', '.join(api_only)}" if api_only else "")
