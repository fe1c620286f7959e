"""Offline, deterministic fixtures: a tiny random-weight Qwen2.5-VL and a matching processor.

Everything here is built locally (no hub access, no torchvision) and is meant for the
test-suite, benchmarks and toy examples. Weights are random, so generated text is
meaningless, but shapes, special tokens, the chat template and the processor outputs
(``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw``,
``mm_token_type_ids``) follow the real Qwen2.5-VL conventions exactly.

Sizes tests can rely on (default ``tiny_processor()``):

* a 112x112 image -> ``image_grid_thw == [1, 8, 8]`` -> 64 patches -> 16 image tokens;
* a 224x168 (width x height) image -> ``[1, 12, 16]`` -> 192 patches -> 48 image tokens;
* a video of ``2k`` frames of 112x112 -> ``video_grid_thw == [k, 8, 8]`` -> ``16k`` video tokens.

Video: the Qwen2-VL video processor of transformers needs torchvision, which is not
available here, and ``Qwen2_5_VLProcessor`` refuses ``video_processor=None`` without it;
so :func:`tiny_processor` returns a :class:`TinyQwen2_5_VLProcessor` (a subclass whose
``video_processor`` is ``None``) and :func:`make_video_inputs` builds
``pixel_values_videos`` / ``video_grid_thw`` / ``second_per_grid_ts`` by hand from the
image processor output (see its docstring).
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import (
    BatchFeature,
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    PreTrainedTokenizerFast,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

logger = logging.getLogger(__name__)

__all__ = [
    "TinyQwen2_5_VLProcessor",
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "TINY_MIN_PIXELS",
    "TINY_MAX_PIXELS",
    "tiny_tokenizer",
    "tiny_qwen2_5_vl_config",
    "tiny_qwen2_5_vl_model",
    "tiny_processor",
    "synthetic_image",
    "make_inputs",
    "make_video_inputs",
    "make_llava_video_inputs",
]

#: Special tokens of the tiny tokenizer, in id order (they follow the regular vocabulary).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

#: Qwen2.5-VL chat template (same structure as the released checkpoints).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Default pixel bounds of the tiny image processor (multiples of 28*28).
TINY_MIN_PIXELS = 28 * 28 * 4  # 56x56
TINY_MAX_PIXELS = 28 * 28 * 64  # e.g. 224x224

_PATCH_SIZE = 14
_MERGE_SIZE = 2
_TEMPORAL_PATCH_SIZE = 2

# Fixed corpus the BPE merges are learnt from (pure Python, so identical across
# `tokenizers` versions). Any text still tokenizes through the 256 byte-level symbols.
_BPE_CORPUS = """
you are a helpful assistant. describe the image. describe this image in detail.
what is in the picture? what is shown in the video? what colour is the square?
the image shows a red square, a green square, a blue square and a yellow block.
there is a cat and a dog on the table next to the window. count the objects.
answer the question with one word. answer yes or no. is there a person here?
the quick brown fox jumps over the lazy dog. one two three four five six seven.
left right top bottom center middle small large big colour color shape text.
please summarize the scene. which object is the largest? where is the ball?
"""
_NUM_MERGES = 160


# --------------------------------------------------------------------------- tokenizer


def learn_bpe_merges(
    words: Sequence[str], num_merges: int | None = None, min_count: int = 1
) -> list[tuple[str, str]]:
    """Learn BPE merges over pre-tokenized (byte-level) ``words``; ties break lexicographically.

    Stops after ``num_merges`` merges (``None``: until every word is one token) or when the most
    frequent pair occurs fewer than ``min_count`` times. Pure Python, so identical across versions.
    """
    freqs = Counter(words)
    splits = {w: list(w) for w in freqs}
    merges: list[tuple[str, str]] = []
    while num_merges is None or len(merges) < num_merges:
        pairs: Counter = Counter()
        for w, f in freqs.items():
            s = splits[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += f
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if best[1] < min_count:
            break
        a, b = best[0]
        merges.append((a, b))
        for w in freqs:
            s = splits[w]
            i, out = 0, []
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            splits[w] = out
    return merges


def byte_level_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """The 256 byte-level symbols (sorted), then every merged symbol, in merge order."""
    from tokenizers import pre_tokenizers

    vocab: dict[str, int] = {}
    for sym in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[sym] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return vocab


def bpe_tokenizer(vocab: dict[str, int], merges: Sequence[tuple[str, str]]):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with the Qwen special tokens and chat template.

    Special tokens get the ids right after ``vocab`` in :data:`SPECIAL_TOKENS` order; left padding,
    ``<|im_end|>`` ends a turn, ``<|endoftext|>`` pads (as Qwen2.5-VL).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges), fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Register the special tokens on the raw tokenizer first so that they get the ids
    # right after the base vocabulary, in SPECIAL_TOKENS order.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=list(SPECIAL_TOKENS),
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    expected = list(range(len(vocab), len(vocab) + len(SPECIAL_TOKENS)))
    if ids != expected:  # pragma: no cover - guards against tokenizers behaviour changes
        raise RuntimeError(f"unexpected special token ids {ids}, expected {expected}")
    return tokenizer


@functools.lru_cache(maxsize=1)
def _bpe_merges() -> tuple[tuple[str, str], ...]:
    """Merges learnt from the fixed corpus (cached: the tokenizer is built often in tests)."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = [w for w, _ in byte_level.pre_tokenize_str(_BPE_CORPUS.strip())]
    return tuple(learn_bpe_merges(words, _NUM_MERGES, min_count=2))


def tiny_tokenizer():
    """Build a tiny byte-level BPE ``PreTrainedTokenizerFast`` with Qwen special tokens.

    The vocabulary is the 256 byte-level symbols, a fixed set of merges learnt in pure
    Python from a small corpus, then the :data:`SPECIAL_TOKENS` (ids ``len(base)`` ...).
    Any text tokenizes (byte fallback through the byte-level alphabet). It carries the
    Qwen2.5-VL chat template and pads on the left.
    """
    merges = _bpe_merges()
    return bpe_tokenizer(byte_level_vocab(merges), merges)


def _special_ids(tokenizer=None) -> dict[str, int]:
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


# --------------------------------------------------------------------------- config / model

_TEXT_DEFAULTS: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    use_cache=True,
    initializer_range=0.02,
)
_VISION_DEFAULTS: dict[str, Any] = dict(
    depth=2,
    hidden_size=32,
    num_heads=2,
    intermediate_size=64,
    hidden_act="silu",
    in_channels=3,
    patch_size=_PATCH_SIZE,
    spatial_merge_size=_MERGE_SIZE,
    temporal_patch_size=_TEMPORAL_PATCH_SIZE,
    window_size=112,
    fullatt_block_indexes=[1],
    tokens_per_second=2,
)
_TOP_LEVEL_KEYS = {"tie_word_embeddings"}


def _default_mrope_section(head_dim: int) -> list[int]:
    """Split ``head_dim // 2`` rotary frequencies into (t, h, w) sections, like [16, 24, 24]."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def tiny_qwen2_5_vl_config(**overrides: Any):
    """Return a tiny :class:`transformers.Qwen2_5_VLConfig` matching :func:`tiny_tokenizer`.

    Text: hidden 64, 4 layers, 4 heads (head_dim 16), 2 KV heads, intermediate 128,
    mrope_section [2, 3, 3]. Vision: depth 2, hidden 32, 2 heads, intermediate 64,
    patch 14, merge 2, temporal patch 2, window 112, full attention in block 1.

    ``overrides``: text-config keys (``num_hidden_layers``, ``hidden_size``, ...,
    ``rope_theta``, ``mrope_section``), ``vision_``-prefixed keys for the vision config
    (``vision_depth=1``), ``tie_word_embeddings`` and ``attn_implementation``.
    """
    ids = _special_ids()
    attn_implementation = overrides.pop("attn_implementation", None)
    text = dict(_TEXT_DEFAULTS)
    vision = dict(_VISION_DEFAULTS)
    rope_theta = overrides.pop("rope_theta", 1_000_000.0)
    mrope_section = overrides.pop("mrope_section", None)
    top = _apply_overrides(overrides, text, vision)

    text.setdefault("vocab_size", max(ids.values()) + 1)
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    if mrope_section is None:
        mrope_section = _default_mrope_section(head_dim)
    if 2 * sum(mrope_section) != head_dim:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": rope_theta,
        "mrope_section": list(mrope_section),
    }
    text.setdefault("bos_token_id", ids["<|endoftext|>"])
    text.setdefault("eos_token_id", ids["<|im_end|>"])
    text.setdefault("pad_token_id", ids["<|endoftext|>"])
    vision.setdefault("out_hidden_size", text["hidden_size"])

    return _vlm_config(Qwen2_5_VLConfig, text, vision, top, attn_implementation)


def _apply_overrides(overrides: dict, text: dict, vision: dict) -> dict:
    """Sort ``overrides`` into the text config, the vision config (``vision_``-prefixed keys) and the top-level
    keys, which are returned."""
    top: dict[str, Any] = {}
    for key, value in overrides.items():
        if key.startswith("vision_"):
            vision[key[len("vision_"):]] = value
        elif key in _TOP_LEVEL_KEYS:
            top[key] = value
        else:
            text[key] = value
    return top


def _vlm_config(config_class, text: dict, vision: dict, top: dict, attn_implementation: str | None):
    """``config_class`` with the tiny tokenizer's special ids; ``attn_implementation`` reaches every sub-config."""
    ids = _special_ids()
    config = config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        **top,
    )
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation  # propagates to sub-configs
    return config


def greedy_generation_config(config) -> GenerationConfig:
    """Greedy generation with the config's bos/eos/pad ids (what the tiny models and presets use)."""
    text_config = config.get_text_config()
    return GenerationConfig(
        bos_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,
        pad_token_id=text_config.pad_token_id,
        do_sample=False,
    )


@torch.no_grad()
def _reinit_weights(model: torch.nn.Module, std: float, seed: int) -> None:
    """Re-draw all weights from a private generator so models are identical across versions.

    Linear/Embedding weights ~ N(0, ``std``), the vision patch-embedding convolution
    ~ N(0, 0.02), biases zero, norm weights one.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal_(t: torch.Tensor, s: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).mul_(s).to(t.dtype))

    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            normal_(module.weight, std)
        elif isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            normal_(module.weight, 0.02)
        elif "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
            module.weight.fill_(1.0)
        else:
            continue
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.zero_()


def tiny_qwen2_5_vl_model(
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    init_std: float = 0.2,
    **overrides: Any,
):
    """Build a tiny random-weight ``Qwen2_5_VLForConditionalGeneration`` in eval mode.

    Weights depend only on ``seed`` (not on ``attn_implementation`` or the transformers
    version): Linear/Embedding weights are drawn with std ``init_std`` (default 0.2; with
    the usual 0.02, or even 0.1, attention is almost uniform and greedy decoding repeats one
    token), so attention patterns are peaked and greedy decoding varies.
    ``overrides`` go to :func:`tiny_qwen2_5_vl_config`.
    """
    config = tiny_qwen2_5_vl_config(attn_implementation=attn_implementation, **overrides)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    _reinit_weights(model, init_std, seed)
    model = model.to(dtype=dtype).eval()
    logger.debug(
        "built tiny Qwen2.5-VL (seed=%d, attn=%s, dtype=%s, %d params)",
        seed,
        attn_implementation,
        dtype,
        sum(p.numel() for p in model.parameters()),
    )
    model.generation_config = greedy_generation_config(config)
    return model


# --------------------------------------------------------------------------- processor / inputs


from .processor import TinyQwen2_5_VLProcessor  # noqa: E402  (re-exported; registered with AutoProcessor)


def tiny_processor(min_pixels: int = TINY_MIN_PIXELS, max_pixels: int = TINY_MAX_PIXELS):
    """Return a Qwen2.5-VL processor: tiny tokenizer + PIL Qwen2-VL image processor + chat template.

    The result is a :class:`TinyQwen2_5_VLProcessor`, a ``Qwen2_5_VLProcessor`` subclass
    with ``video_processor = None`` (the transformers Qwen2-VL video processor needs
    torchvision; use :func:`make_video_inputs` for video). Patch 14, merge 2, temporal
    patch 2; with the default pixel bounds a 112x112 image gives ``image_grid_thw
    [1, 8, 8]`` (16 image tokens) and a 224x168 (w x h) image ``[1, 12, 16]`` (48 tokens).
    ``save_pretrained`` / ``AutoProcessor.from_pretrained`` round-trip offline once this
    module is imported.
    """
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=_PATCH_SIZE,
        temporal_patch_size=_TEMPORAL_PATCH_SIZE,
        merge_size=_MERGE_SIZE,
    )
    return TinyQwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(),
        chat_template=CHAT_TEMPLATE,
    )


def synthetic_image(width: int = 112, height: int = 112, seed: int = 0) -> Image.Image:
    """Deterministic RGB image: a 4x4 grid of random coloured blocks plus a gradient."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(4, 4, 3))
    ys = np.minimum(np.arange(height) * 4 // max(height, 1), 3)
    xs = np.minimum(np.arange(width) * 4 // max(width, 1), 3)
    arr = colours[ys[:, None], xs[None, :]].astype(np.int64)
    arr += (np.arange(width)[None, :, None] * 32 // max(width, 1)).astype(np.int64)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")


def _user_message(images: Sequence[Any], prompt: str, video: bool = False) -> list[dict]:
    kind = "video" if video else "image"
    content = [{"type": kind} for _ in images]
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def make_inputs(
    processor,
    prompts: Sequence[str],
    images: Sequence[Sequence[Image.Image]],
    padding_side: str = "left",
):
    """Build a padded batch: one user turn per row (its images, then its prompt).

    ``images[i]`` is the (possibly empty) list of PIL images of row ``i``. Returns the
    processor's ``BatchFeature`` (``input_ids``, ``attention_mask``, ``mm_token_type_ids``
    and, if any row has images, ``pixel_values`` / ``image_grid_thw``) as torch tensors.
    """
    if len(prompts) != len(images):
        raise ValueError(f"got {len(prompts)} prompts but {len(images)} image lists")
    texts = [
        processor.apply_chat_template(_user_message(imgs, p), add_generation_prompt=True, tokenize=False)
        for p, imgs in zip(prompts, images)
    ]
    flat = [img for imgs in images for img in imgs]
    old_side = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = padding_side
    try:
        return processor(
            text=texts, images=flat or None, return_tensors="pt", padding=True, padding_side=padding_side
        )
    finally:
        processor.tokenizer.padding_side = old_side


def make_video_inputs(
    processor, prompt: str, frames: Sequence[Image.Image], fps: float = 2.0, frame_timestamps: bool = False
):
    """Build single-row inputs for a video given as a list of PIL frames (even count).

    Without torchvision there is no usable video processor, so this mirrors what the
    Qwen2-VL video processor does: every frame is resized/normalized by the image
    processor (all frames must share one size); the image processor repeats each frame
    ``temporal_patch_size`` times inside a patch, so the first temporal copy is kept and
    consecutive frame pairs are interleaved into ``(C, temporal, p, p)`` patches, in the
    ``(t, h/m, w/m, m, m)`` order of the video processor. ``<|video_pad|>`` is expanded to
    ``t*h*w/merge**2`` tokens, ``mm_token_type_ids`` is 2 there, and
    ``second_per_grid_ts = temporal_patch_size / fps``.

    ``frame_timestamps=True`` writes the prompt as the Qwen3-VL processor does: each temporal group of frames
    is its own ``<T seconds><|vision_start|><|video_pad|>...<|vision_end|>`` (``T`` the mean time of its
    frames), ``h*w/merge**2`` placeholders each.
    """
    if getattr(processor, "video_processor", None) is not None:
        messages = _user_message([None], prompt, video=True)
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return processor(text=[text], videos=[list(frames)], return_tensors="pt", padding=True)

    ip = processor.image_processor
    tps, merge = ip.temporal_patch_size, ip.merge_size
    if len(frames) == 0 or len(frames) % tps:
        raise ValueError(f"need a positive multiple of {tps} frames, got {len(frames)}")
    sizes = {f.size for f in frames}
    if len(sizes) != 1:
        raise ValueError(f"all frames must have the same size, got {sorted(sizes)}")

    out = ip(images=list(frames), return_tensors="pt")
    pv, grids = out["pixel_values"], out["image_grid_thw"]
    _, gh, gw = (int(x) for x in grids[0])
    n = gh * gw
    c, p = 3, ip.patch_size
    # (frames, n, C, tps, p, p) -> keep the first (duplicated) temporal copy of every frame
    per_frame = pv.reshape(len(frames), n, c, tps, p, p)[:, :, :, 0]
    grid_t = len(frames) // tps
    # (t, tps, n, C, p, p) -> (t, n, C, tps, p, p)
    video = per_frame.reshape(grid_t, tps, n, c, p, p).permute(0, 2, 3, 1, 4, 5)
    pixel_values_videos = video.reshape(grid_t * n, c * tps * p * p).contiguous()
    video_grid_thw = torch.tensor([[grid_t, gh, gw]], dtype=torch.long)

    messages = _user_message([None], prompt, video=True)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    video_token = processor.video_token
    num_tokens = grid_t * gh * gw // merge**2
    if text.count(video_token) != 1:
        raise ValueError("chat template must contain exactly one video placeholder")
    if frame_timestamps:
        per_group = gh * gw // merge**2
        times = [(i * tps + (i * tps + tps - 1)) / 2 / fps for i in range(grid_t)]
        start, end = "<|vision_start|>", "<|vision_end|>"
        groups = "".join(f"<{t:.1f} seconds>{start}{video_token * per_group}{end}" for t in times)
        text = text.replace(f"{start}{video_token}{end}", groups)
    else:
        text = text.replace(video_token, video_token * num_tokens)
    enc = processor.tokenizer([text], return_tensors="pt")
    input_ids = enc["input_ids"]
    mm_token_type_ids = torch.zeros_like(input_ids)
    mm_token_type_ids[input_ids == processor.video_token_id] = 2
    mm_token_type_ids[input_ids == processor.image_token_id] = 1
    return BatchFeature(
        data={
            "input_ids": input_ids,
            "attention_mask": enc["attention_mask"],
            "pixel_values_videos": pixel_values_videos,
            "video_grid_thw": video_grid_thw,
            "second_per_grid_ts": torch.tensor([tps / fps], dtype=torch.float32),
            "mm_token_type_ids": mm_token_type_ids,
        }
    )


# --------------------------------------------------------------------------- every supported family

#: Families :func:`tiny_vlm_model` builds (one per registered model adapter).
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
_QWEN3_PATCH_SIZE = 16


def tiny_vlm_config(family: str = "qwen2_5_vl", **overrides: Any):
    """A tiny config of ``family`` (see :data:`FAMILIES`) matching :func:`tiny_tokenizer`.

    Text as :func:`tiny_qwen2_5_vl_config` (hidden 64, 4 layers, 4 heads of 16, 2 KV heads); Qwen3-VL adds
    per-head q/k norms, interleaved M-RoPE, a patch-16 vision tower with 4x4 learned position embeddings and
    DeepStack features added after decoder layers 0 and 1; the MoE variant has 4 experts, 2 per token.
    ``overrides`` as for :func:`tiny_qwen2_5_vl_config` (text keys, ``vision_``-prefixed keys).
    """
    if family == "qwen2_5_vl":
        return tiny_qwen2_5_vl_config(**overrides)
    if family in LLAVA_FAMILIES:
        return tiny_llava_config(family, **overrides)
    if family not in FAMILIES:
        raise ValueError(f"family: unknown family {family!r}; valid: {FAMILIES}")
    from transformers import Qwen2VLConfig, Qwen3VLConfig, Qwen3VLMoeConfig

    ids = _special_ids()
    attn_implementation = overrides.pop("attn_implementation", None)
    rope_theta = overrides.pop("rope_theta", 1_000_000.0)
    mrope_section = overrides.pop("mrope_section", None)
    text = dict(_TEXT_DEFAULTS)
    text.update(vocab_size=max(ids.values()) + 1, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, in_channels=3, patch_size=_PATCH_SIZE,
                      spatial_merge_size=_MERGE_SIZE, temporal_patch_size=_TEMPORAL_PATCH_SIZE, hidden_act="quick_gelu")
    else:
        vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, in_channels=3,
                      patch_size=_QWEN3_PATCH_SIZE, spatial_merge_size=_MERGE_SIZE,
                      temporal_patch_size=_TEMPORAL_PATCH_SIZE, num_position_embeddings=16,
                      deepstack_visual_indexes=[0, 1], hidden_act="gelu_pytorch_tanh")
        text["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
    if family == "qwen3_vl_moe":
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                    mlp_only_layers=[])
    top = _apply_overrides(overrides, text, vision)
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    section = list(mrope_section or _default_mrope_section(head_dim))
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": section}
    if family == "qwen2_vl":
        vision["hidden_size"] = text["hidden_size"]
        config_class = Qwen2VLConfig
    else:
        text["rope_parameters"]["mrope_interleaved"] = True
        vision["out_hidden_size"] = text["hidden_size"]
        config_class = Qwen3VLConfig if family == "qwen3_vl" else Qwen3VLMoeConfig
    return _vlm_config(config_class, text, vision, top, attn_implementation)


def tiny_vlm_model(
    family: str = "qwen2_5_vl",
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    init_std: float = 0.2,
    **overrides: Any,
):
    """A tiny random-weight ``...ForConditionalGeneration`` of ``family`` in eval mode (weights as in
    :func:`tiny_qwen2_5_vl_model`: they depend only on ``seed``)."""
    if family == "qwen2_5_vl":
        return tiny_qwen2_5_vl_model(seed, attn_implementation, dtype, init_std, **overrides)
    if family in LLAVA_FAMILIES:
        return tiny_llava_model(family, seed, attn_implementation, dtype, init_std, **overrides)
    import transformers

    config = tiny_vlm_config(family, attn_implementation=attn_implementation, **overrides)
    model_class = {
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen3_vl": "Qwen3VLForConditionalGeneration",
        "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
    }[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config)
    _reinit_weights(model, init_std, seed)
    if family == "qwen3_vl_moe":  # fused expert weights are plain Parameters: draw them too
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".experts." in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * init_std)
    model = model.to(dtype=dtype).eval()
    model.generation_config = greedy_generation_config(config)
    return model


def tiny_family_processor(family: str = "qwen2_5_vl"):
    """:func:`tiny_processor` with the image processor of ``family`` (patch 16 for Qwen3-VL, 14 otherwise).

    The Qwen3-VL processor class itself needs torchvision (its video processor); its image inputs are those of
    the PIL Qwen2-VL image processor with patch 16, which is what this returns (images only: Qwen3-VL video
    prompts carry per-frame timestamps this processor does not write).
    """
    if family in LLAVA_FAMILIES:
        return tiny_llava_processor(family)
    if family not in ("qwen3_vl", "qwen3_vl_moe"):
        return tiny_processor()
    side = _QWEN3_PATCH_SIZE * _MERGE_SIZE
    processor = tiny_processor(min_pixels=side * side * 4, max_pixels=side * side * 64)
    processor.image_processor.patch_size = _QWEN3_PATCH_SIZE
    return processor


# --------------------------------------------------------------------------- LLaVA families (1-D RoPE)

#: LLaVA families :func:`tiny_vlm_model` builds. They are not (yet) in :data:`FAMILIES`, which the CLI, overlay and
#: benchmark presets iterate and which read ``image_grid_thw``; the oracle suite runs :data:`ORACLE_FAMILIES`.
LLAVA_FAMILIES = ("llava", "llava_next", "llava_onevision", "video_llava")
#: every family of the parametrized oracle suite (``tests/test_families.py``)
ORACLE_FAMILIES = FAMILIES + LLAVA_FAMILIES
#: placeholders the LLaVA processors expand (ids right after :data:`SPECIAL_TOKENS`)
LLAVA_SPECIAL_TOKENS = ("<image>", "<video>")
#: the ChatML template of :data:`CHAT_TEMPLATE` with LLaVA-OneVision's ``<image>`` + newline placeholders
LLAVA_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>\n").replace(
    "<|vision_start|><|video_pad|><|vision_end|>", "<video>\n"
)
_LLAVA_TILE = 56  # vision image_size: 4 x 4 patches of 14 px, 16 tokens per image (tile)
_LLAVA_PINPOINTS = [[56, 112], [112, 56], [112, 112]]  # LLaVA-NeXT anyres: up to 2 x 2 tiles


def tiny_llava_tokenizer():
    """:func:`tiny_tokenizer` plus the ``<image>`` and ``<video>`` special tokens (ids ``len(base) + 7``, ``+ 8``)."""
    from tokenizers import AddedToken

    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in LLAVA_SPECIAL_TOKENS],
                         special_tokens=True)
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    return tokenizer


def tiny_llava_config(family: str = "llava", **overrides: Any):
    """A tiny config of a LLaVA family matching :func:`tiny_llava_tokenizer`.

    Text hidden 64, 4 layers, 4 heads of 16: LLaVA-1.5 a Llama backbone with GQA (2 KV heads), LLaVA-NeXT a
    Mistral backbone (4 KV heads, ``sliding_window=None`` as llava-v1.6-mistral ships). Vision: a 2-layer CLIP
    tower, 56 px tiles of 14 px patches (16 tokens per tile; ``vision_feature_layer=-2``, CLS dropped); NeXT
    anyres pinpoints up to 2 x 2 tiles. ``overrides``: text keys, ``vision_``-prefixed keys, top-level keys.
    """
    from transformers import LlavaConfig, LlavaNextConfig

    tokenizer = tiny_llava_tokenizer()
    ids = _special_ids()
    attn_implementation = overrides.pop("attn_implementation", None)
    rope_theta = overrides.pop("rope_theta", 10_000.0)
    text = dict(_TEXT_DEFAULTS)
    text.update(model_type="llama", vocab_size=len(tokenizer), bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=_LLAVA_TILE, patch_size=_PATCH_SIZE, projection_dim=32,
                  hidden_act="quick_gelu")
    top: dict[str, Any] = dict(vision_feature_layer=-2, vision_feature_select_strategy="default",
                               projector_hidden_act="gelu")
    if family == "llava_next":
        text.update(model_type="mistral", num_key_value_heads=4, sliding_window=None)
        top["image_grid_pinpoints"] = [list(p) for p in _LLAVA_PINPOINTS]
    if family in _LLAVA_EXTRA:
        _LLAVA_EXTRA[family](text, vision, top)
    for key, value in overrides.items():
        if key.startswith("vision_"):
            vision[key[len("vision_"):]] = value
        elif key in _TOP_LEVEL_KEYS or key in top:
            top[key] = value
        else:
            text[key] = value
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta}
    config_class = {"llava": LlavaConfig, "llava_next": LlavaNextConfig}.get(family) or _llava_config_class(family)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    if family in _LLAVA_EXTRA:
        top["video_token_index"] = tokenizer.convert_tokens_to_ids("<video>")
    config = config_class(text_config=text, vision_config=vision, image_token_index=image_token, **top)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return config


def tiny_llava_model(family: str = "llava", seed: int = 0, attn_implementation: str = "sdpa",
                     dtype: torch.dtype = torch.float32, init_std: float = 0.2, **overrides: Any):
    """A tiny random-weight LLaVA-family model in eval mode (weights depend only on ``seed``, as
    :func:`tiny_qwen2_5_vl_model`'s; CLIP's class embedding and NeXT's ``image_newline`` drawn too)."""
    import transformers

    config = tiny_llava_config(family, attn_implementation=attn_implementation, **overrides)
    model_class = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                   "llava_onevision": "LlavaOnevisionForConditionalGeneration",
                   "video_llava": "VideoLlavaForConditionalGeneration"}[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config)
    _reinit_weights(model, init_std, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("class_embedding", "image_newline")):
                param.copy_(torch.randn(param.shape, generator=gen) * init_std)
    model = model.to(dtype=dtype).eval()
    model.generation_config = greedy_generation_config(config)
    return model


def tiny_llava_processor(family: str = "llava", tile: int = _LLAVA_TILE, pinpoints=None):
    """The transformers processor of a LLaVA family with :func:`tiny_llava_tokenizer` and its PIL image processor
    (no torchvision): 56 px tiles, patch 14, CLS counted then dropped (``num_additional_image_tokens=1``,
    ``vision_feature_select_strategy="default"``), as the llava-hf checkpoints ship. ``tile`` and ``pinpoints``
    (LLaVA-1.5 / NeXT only): another tile size and anyres resolutions (the 7B benchmark presets: 336 px)."""
    from transformers import LlavaNextProcessor, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    size = dict(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile})
    common = dict(tokenizer=tiny_llava_tokenizer(), patch_size=_PATCH_SIZE, vision_feature_select_strategy="default",
                  num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    if family == "llava":
        return LlavaProcessor(image_processor=LlavaImageProcessorPil(**size), **common)
    if family == "llava_next":
        pinpoints = _LLAVA_PINPOINTS if pinpoints is None else pinpoints
        image_processor = LlavaNextImageProcessorPil(image_grid_pinpoints=[list(p) for p in pinpoints], **size)
        return LlavaNextProcessor(image_processor=image_processor, **common)
    if family in _LLAVA_EXTRA:
        return _extra_llava_processor(family)
    raise ValueError(f"family: unknown LLaVA family {family!r}; valid: {LLAVA_FAMILIES}")


# --------------------------------------------------------------------------- LLaVA-OneVision, Video-LLaVA

#: LLaVA-OneVision's tiny ``vision_aspect_ratio``: ``anyres_max_2`` shrinks tile maps of more than 2.2 tiles' worth of
#: tokens (a 2 x 2-tile image here), as ``anyres_max_9`` does for large images on the released checkpoints
_ONEVISION_ASPECT = "anyres_max_2"


def _onevision_extra(text: dict, vision: dict, top: dict) -> None:
    """LLaVA-OneVision: Qwen2 backbone (GQA, no sliding window), SigLIP tower (no CLS: every patch a token),
    last-layer features, ``full`` strategy, as llava-hf/llava-onevision-qwen2-*-ov-hf ship."""
    text.update(model_type="qwen2", use_sliding_window=False, sliding_window=None)
    vision.clear()
    vision.update(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=_LLAVA_TILE, patch_size=_PATCH_SIZE, vision_use_head=False,
                  hidden_act="gelu_pytorch_tanh")
    top.update(vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio=_ONEVISION_ASPECT,
               image_grid_pinpoints=[list(p) for p in _LLAVA_PINPOINTS])


def _video_llava_extra(text: dict, vision: dict, top: dict) -> None:
    """Video-LLaVA: Llama backbone (4 KV heads), the CLIP tower of LLaVA-1.5 (layer -2, CLS dropped for images,
    kept for video frames)."""
    text.update(num_key_value_heads=4)


_LLAVA_EXTRA = {"llava_onevision": _onevision_extra, "video_llava": _video_llava_extra}


def _llava_config_class(family: str):
    from transformers import LlavaOnevisionConfig, VideoLlavaConfig

    return {"llava_onevision": LlavaOnevisionConfig, "video_llava": VideoLlavaConfig}[family]


def _video_llava_processor():
    """Video-LLaVA's processor with its (numpy/PIL) image processor: 56 px crops, patch 14, CLS counted then dropped
    for images; no video processor (it needs torchvision): :func:`make_llava_video_inputs` builds the videos."""
    from transformers import VideoLlavaProcessor
    from transformers.models.video_llava.image_processing_video_llava import VideoLlavaImageProcessor

    class TinyVideoLlavaProcessor(VideoLlavaProcessor):
        """``VideoLlavaProcessor`` without a video processor (as :class:`TinyLlavaOnevisionProcessor`)."""

        video_processor = None

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, patch_size=14,
                     vision_feature_select_strategy="default", num_additional_image_tokens=1, **kwargs):
            # VideoLlavaProcessor.__init__ passes (image_processor, video_processor, tokenizer) positionally, which
            # does not fit a signature without the video processor: set its attributes, then ProcessorMixin's
            from transformers.processing_utils import ProcessorMixin

            self.patch_size = patch_size
            self.num_additional_image_tokens = num_additional_image_tokens
            self.vision_feature_select_strategy = vision_feature_select_strategy
            self.image_token, self.video_token = "<image>", "<video>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        def __call__(self, *args, padding_side=None, **kwargs):
            # transformers < 5.2x: VideoLlavaProcessor.__call__ has a fixed signature without padding_side (the
            # tokenizer's own padding_side, which make_inputs sets, applies)
            return super().__call__(*args, **kwargs)

    image_processor = VideoLlavaImageProcessor(size={"shortest_edge": _LLAVA_TILE},
                                               crop_size={"height": _LLAVA_TILE, "width": _LLAVA_TILE})
    return TinyVideoLlavaProcessor(image_processor=image_processor, tokenizer=tiny_llava_tokenizer(),
                                   patch_size=_PATCH_SIZE, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)


def make_llava_video_inputs(processor, prompt: str, frames: Sequence[Image.Image], images=(), videos: int = 1):
    """Single-row inputs of a LLaVA-OneVision or Video-LLaVA prompt with one video (then ``images``, if any).

    Their video processors need torchvision, so ``pixel_values_videos`` ``(1, frames, 3, 56, 56)`` is built with
    the family's image processor, frame by frame, in the layout the video processor returns: every frame resized
    to the tile (OneVision: the image processor's un-patched multi-image path, i.e. resized to 56 x 56; Video-LLaVA:
    shortest edge 56 then a 56 x 56 center crop), rescaled and normalized with the CLIP mean and std, as both
    video processors do. ``<video>`` is expanded as the processors do: OneVision ``frames * ceil(side/2)**2 + 1``
    (pooled frames, one newline), Video-LLaVA ``frames * (side**2 + 1)`` (every frame with its CLS token).
    """
    import math

    side = _LLAVA_TILE // _PATCH_SIZE
    onevision = "Onevision" in type(processor).__name__
    if onevision:
        out = processor.image_processor(images=[list(frames)], return_tensors="pt")  # one row: no anyres patching
        video = out["pixel_values"][:, 0]  # (frames, 3, 56, 56): the single (un-patched) tile of each frame
        count = len(frames) * math.ceil(side / 2) ** 2 + 1
    else:
        out = processor.image_processor(images=list(frames), return_tensors="pt")
        video = out.get("pixel_values_images", out.get("pixel_values"))
        count = len(frames) * (side * side + 1)
    content = []
    for index in range(videos):  # ``videos`` copies of the clip, each its own <video> (then its number as text)
        content += [{"type": "video"}] + ([{"type": "text", "text": f"clip {index + 1}. "}] if videos > 1 else [])
    messages = [{"role": "user", "content": content + [{"type": "image"} for _ in images]
                 + [{"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # the processor refuses <video> without its video processor; <video> is a special token, so the text on either
    # side tokenizes on its own: the part before it (no image), the placeholders, the part after (with the images)
    *pieces, after = text.split("<video>")
    tokenizer = processor.tokenizer
    placeholders = torch.full((1, count), tokenizer.convert_tokens_to_ids("<video>"), dtype=torch.long)
    parts = []
    for piece in pieces:
        parts += [tokenizer([piece], add_special_tokens=False, return_tensors="pt")["input_ids"], placeholders]
    if images:
        inputs = dict(processor(text=[after], images=list(images), return_tensors="pt"))
    else:
        inputs = dict(tokenizer([after], add_special_tokens=False, return_tensors="pt"))
    inputs["input_ids"] = torch.cat(parts + [inputs["input_ids"]], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["pixel_values_videos"] = video.unsqueeze(0).repeat(videos, 1, 1, 1, 1).contiguous()
    return BatchFeature(data=inputs)


def _extra_llava_processor(family: str):
    if family == "video_llava":
        return _video_llava_processor()
    """LLaVA-OneVision's processor with its PIL image processor (56 px tiles, the tiny pinpoints); no video
    processor (it needs torchvision): :func:`make_llava_video_inputs` builds ``pixel_values_videos`` itself."""
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    image_processor = LlavaOnevisionImageProcessorPil(size={"height": _LLAVA_TILE, "width": _LLAVA_TILE},
                                                      image_grid_pinpoints=[list(p) for p in _LLAVA_PINPOINTS])
    side = _LLAVA_TILE // _PATCH_SIZE
    class TinyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
        """``LlavaOnevisionProcessor`` without a video processor (``ProcessorMixin`` type-checks the sub-processors
        named in ``__init__``, and the video processor class is a torchvision dummy here)."""

        video_processor = None

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                             chat_template=chat_template, **kwargs)

    return TinyLlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tiny_llava_tokenizer(),
                                   num_image_tokens=side * side, vision_feature_select_strategy="full",
                                   chat_template=LLAVA_CHAT_TEMPLATE, vision_aspect_ratio=_ONEVISION_ASPECT)
