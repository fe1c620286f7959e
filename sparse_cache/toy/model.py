"""The toy VLM: tokenizer, processor and config of a small Qwen2.5-VL, and loading of the shipped checkpoint.

The tokenizer is a byte-level BPE whose merges are learnt (in pure Python, deterministically) from the
task's own sentences until every word of them is one token, so each colour word is a single token;
any other text still tokenizes through the 256 byte-level symbols. The processor is the
:class:`~sparse_cache.testing.TinyQwen2_5_VLProcessor` (a ``Qwen2_5_VLProcessor`` without video
processor, so no torchvision) with the PIL Qwen2-VL image processor and the Qwen2.5-VL chat template.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

# Importing testing registers TinyQwen2_5_VLProcessor with AutoProcessor (the saved processor_config.json
# names it), so that AutoProcessor.from_pretrained(TOY_VLM_PATH) works in a fresh process.
from ..testing import (
    CHAT_TEMPLATE,
    DEFAULT_SYSTEM_PROMPT,
    SPECIAL_TOKENS,
    TinyQwen2_5_VLProcessor,
    bpe_tokenizer,
    byte_level_vocab,
    learn_bpe_merges,
)
from .task import ANSWERS, BACKGROUND_WORD, CELL_PX, COLOURS, GRID, QUESTION_TEMPLATE

logger = logging.getLogger(__name__)

__all__ = [
    "TOY_VLM_PATH",
    "TOY_MIN_PIXELS",
    "TOY_MAX_PIXELS",
    "toy_tokenizer",
    "toy_processor",
    "toy_config",
    "init_toy_model",
    "load_toy_vlm",
    "conversation_messages",
    "build_inputs",
    "followup_text",
]

#: Folder of the shipped checkpoint (model, processor, tokenizer, generation config).
TOY_VLM_PATH: str = str(Path(__file__).resolve().parent.parent / "assets" / "toy-vlm")

#: Pixel bounds of the toy image processor: a 4x4 board (112 px) up to an 8x8 board (224 px); larger
#: images are scaled down to at most 224 x 224 px (64 visual tokens).
TOY_MIN_PIXELS = (2 * CELL_PX) ** 2
TOY_MAX_PIXELS = (GRID * CELL_PX) ** 2

_PATCH_SIZE = 14
_MERGE_SIZE = 2
_TEMPORAL_PATCH_SIZE = 2


# --------------------------------------------------------------------------- tokenizer


def _corpus() -> list[str]:
    """Every sentence the toy model reads or writes (rendered chat turns without the special tokens)."""
    words = list(COLOURS) + [BACKGROUND_WORD] + list(ANSWERS)
    lines = [f"system\n{DEFAULT_SYSTEM_PROMPT}", "user\n", "assistant\n", "\n"]
    lines += [QUESTION_TEMPLATE.format(colour=c) for c in COLOURS]
    lines += words + [" " + w for w in words]
    return lines


@functools.lru_cache(maxsize=1)
def _merges() -> tuple[tuple[str, str], ...]:
    """BPE merges learnt until every word of the task is one token (deterministic)."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = [w for line in _corpus() for w, _ in byte_level.pre_tokenize_str(line)]
    return tuple(learn_bpe_merges(words))


def toy_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with every word of the task as one token, Qwen special tokens and chat template.

    Left padding, ``<|im_end|>`` as end of sequence, ``<|endoftext|>`` as padding (as Qwen2.5-VL).
    """
    merges = _merges()
    tokenizer = bpe_tokenizer(byte_level_vocab(merges), merges)
    for word in [f" {c}" for c in COLOURS] + [f" {BACKGROUND_WORD}"] + list(ANSWERS):
        if len(tokenizer(word, add_special_tokens=False)["input_ids"]) != 1:  # pragma: no cover - guard
            raise RuntimeError(f"toy tokenizer: {word!r} is not a single token")
    return tokenizer


def toy_processor(min_pixels: int = TOY_MIN_PIXELS, max_pixels: int = TOY_MAX_PIXELS) -> TinyQwen2_5_VLProcessor:
    """A Qwen2.5-VL processor for the toy model: :func:`toy_tokenizer` + PIL Qwen2-VL image processor."""
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=_PATCH_SIZE,
        temporal_patch_size=_TEMPORAL_PATCH_SIZE,
        merge_size=_MERGE_SIZE,
    )
    return TinyQwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=toy_tokenizer(), chat_template=CHAT_TEMPLATE
    )


# --------------------------------------------------------------------------- model


def toy_config(tokenizer=None, attn_implementation: str | None = None, num_layers: int = 4) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL config of the toy model (about 0.9 M parameters).

    Text: hidden 128, 4 layers, 4 heads (head_dim 32), 2 KV heads, MLP 256, M-RoPE sections [4, 6, 6].
    Vision: depth 2, hidden 64, 2 heads, MLP 128, patch 14, merge 2, window 112 px, full attention in
    block 1.
    """
    tokenizer = tokenizer if tokenizer is not None else toy_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        use_cache=True,
        initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=2,
        hidden_size=64,
        num_heads=2,
        intermediate_size=128,
        out_hidden_size=128,
        hidden_act="silu",
        in_channels=3,
        patch_size=_PATCH_SIZE,
        spatial_merge_size=_MERGE_SIZE,
        temporal_patch_size=_TEMPORAL_PATCH_SIZE,
        window_size=112,
        fullatt_block_indexes=[1],
        tokens_per_second=2,
        initializer_range=0.1,
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return config


@torch.no_grad()
def init_toy_model(
    seed: int = 0, std: float = 0.1, tokenizer=None, num_layers: int = 4
) -> Qwen2_5_VLForConditionalGeneration:
    """A freshly initialised toy model (float32, train mode), identical across transformers versions.

    Linear and embedding weights ~ N(0, ``std``) from a private generator (the usual 0.02 leaves a model
    this small at chance for hundreds of steps), the patch-embedding convolution ~ N(0, 0.02), biases
    zero, norms one.
    """
    tokenizer = tokenizer if tokenizer is not None else toy_tokenizer()
    config = toy_config(tokenizer, attn_implementation="sdpa", num_layers=num_layers)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
        elif isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.02)
        elif "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
            module.weight.fill_(1.0)
        else:
            continue
        if isinstance(getattr(module, "bias", None), torch.Tensor):
            module.bias.zero_()
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
        do_sample=False,
        max_new_tokens=2,
    )
    return model.float()


def load_toy_vlm(
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
) -> tuple[Qwen2_5_VLForConditionalGeneration, TinyQwen2_5_VLProcessor]:
    """Load the shipped toy Qwen2.5-VL and its processor (offline), the model in eval mode.

    Args:
        attn_implementation: ``"sdpa"`` (default) or ``"eager"`` (the implementations
            :class:`~sparse_cache.PrunableDynamicCache` supports).
        dtype: weights dtype (float32 default; the model was trained in float32).
        path: another checkpoint folder (e.g. one written by ``python -m sparse_cache.toy.train``);
            default :data:`TOY_VLM_PATH`.
        device: where to put the model (default: CPU).
    """
    path = Path(path) if path is not None else Path(TOY_VLM_PATH)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"path: no toy VLM checkpoint in {path} (config.json and model.safetensors expected); train one "
            "with `python -m sparse_cache.toy.train --out DIR` or reinstall sparse-cache"
        )
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation: expected 'sdpa' or 'eager', got {attn_implementation!r}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype such as torch.float32, got {type(dtype).__name__} {dtype!r}")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(path), attn_implementation=attn_implementation, dtype=dtype, local_files_only=True
    )
    if device is not None:
        model = model.to(device)
    processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    return model.eval(), processor


# --------------------------------------------------------------------------- chat helpers


def conversation_messages(questions: Sequence[str], answers: Sequence[str] = ()) -> list[dict]:
    """Chat messages: the image and ``questions[0]`` in the first user turn, then the other turns.

    ``answers[i]`` is the assistant reply after ``questions[i]``; the conversation ends with a user turn
    when there is one answer fewer than questions.
    """
    if not questions:
        raise ValueError("questions: need at least one question")
    if not len(questions) - 1 <= len(answers) <= len(questions):
        raise ValueError(f"answers: expected {len(questions) - 1} or {len(questions)} answers, got {len(answers)}")
    messages = []
    for i, question in enumerate(questions):
        content = [{"type": "text", "text": question}]
        if i == 0:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user", "content": content})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    return messages


def build_inputs(
    processor,
    images: Sequence[Image.Image],
    questions: Sequence[str] | Sequence[Sequence[str]],
    answers: Sequence[Sequence[str]] | None = None,
    add_generation_prompt: bool = True,
):
    """A left-padded batch, one image per row, built by ``apply_chat_template`` and the processor.

    ``questions[i]`` is a string (one question) or a sequence of questions (a multi-turn conversation,
    with ``answers[i]`` the assistant replies between them). Returns the processor's ``BatchFeature``.
    """
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images but {len(questions)} questions")
    texts = []
    for i, q in enumerate(questions):
        qs = [q] if isinstance(q, str) else list(q)
        ans = list(answers[i]) if answers is not None else []
        messages = conversation_messages(qs, ans)
        texts.append(
            processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        )
    return processor(text=texts, images=list(images), return_tensors="pt", padding=True)


def followup_text(processor, previous_answer: str, question: str) -> str:
    """The text that follows a generated answer ``previous_answer`` (ending with ``<|im_end|>``) to ask
    ``question`` in a new user turn, as the chat template renders it: ``"\\n<|im_start|>user\\n...
    <|im_start|>assistant\\n"``.
    """
    one = processor.apply_chat_template(conversation_messages(["q"], [previous_answer]), tokenize=False)
    two = processor.apply_chat_template(
        conversation_messages(["q", question], [previous_answer]), add_generation_prompt=True, tokenize=False
    )
    end = processor.tokenizer.eos_token
    head = one.rstrip("\n")
    if not head.endswith(end) or not two.startswith(head):  # pragma: no cover - guards template changes
        raise RuntimeError("unexpected chat template: the follow-up turn does not extend the first turn")
    return two[len(head) :]
