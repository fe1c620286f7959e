"""Speed and memory of visual-token pruning against the unpruned baseline, measured in one run.

    python -m sparse_cache.bench --model small --visual-tokens 4096 --new-tokens 32
    sparse-cache-bench --model qwen2.5-vl-7b --device cuda --cases 16320:1,576:1,576:16 --new-tokens 256
    sparse-cache-bench --model llava-1.5-7b --keep-tokens 192,128,64 --mode in-prefill --schedule sparsevlm  # the paper's setting (bench_paper)

For one model (a preset of :mod:`sparse_cache.presets`, random weights and no download, or a hub id /
local path loaded with ``from_pretrained``) and one synthetic image per batch row, every configuration
(the unpruned baseline, a plain ``DynamicCache`` without the library's hooks, then a
:class:`~sparse_cache.PrunableDynamicCache` per keep ratio) is run ``warmup`` times, then ``repeats``
times **interleaved** (baseline, 1.0, 0.5, ..., then the reverse order, and so on), so that drift of
the machine hits every configuration alike. Each run generates exactly ``new_tokens`` tokens
(``min_new_tokens = max_new_tokens``, greedy) and records:

* ``prefill_s``: the decoder's prefill, i.e. the first forward of the language model (for a pruned cache
  with its scoring, selection and compaction), without the vision tower; ``vision_s``: the vision tower
  (``generate`` runs it before that forward); ``ttft_s``: from the call to the end of the prefill;
* ``score_s`` / ``select_s`` / ``compact_s``: ``PrunableDynamicCache._score``, ``_select`` and
  ``_compact`` (``_finish_in_prefill`` in ``in-prefill`` mode, ``_finish_pre_llm`` in ``pre-llm``), timed by
  wrapping those methods of the run's cache object (the class is untouched); ``compact_s`` is 0 when nothing
  was dropped (keep 1.0);
* ``decode_per_token_s``: (end of the call - end of the prefill) / (new_tokens - 1);
* ``e2e_s``: the whole ``generate`` call;
* ``peak_mem_bytes``: peak memory of the call above the memory held just before it: on CUDA
  ``max_memory_allocated`` (reset before each run); on CPU the peak of the running sum of the tensor
  allocations recorded by the torch profiler in one extra, untimed run per configuration. On CPU the
  growth of the peak RSS of the process (``peak_rss_delta_bytes``) is recorded too;
* ``kv_bytes``: keys plus values of every layer right after the prefill (after compaction).

A configuration with a keep ratio that drops tokens must have pruned: if its cache kept every visual
token (e.g. a transformers version whose ``generate`` hides the cache from the library), the run stops
with :class:`NothingPrunedError` (``sparse-cache-bench`` prints it as one line and exits 1) instead of
recording ratios of two unpruned runs. ``keep=1`` keeps everything by request: its row is marked
``"control": true`` (its ratios are the library's overhead and the timing noise, not a speed-up).

Times are medians over the repeats (CUDA times come from CUDA events around each region, resolved after
a ``torch.cuda.synchronize``). Ratios are against the baseline of the same run. The bytes model predicts
the decode time per token from the bytes one step must read: the weights the decoder reads (decoder
layers, final norm and ``lm_head``, not the embedding table) plus the KV cache averaged over the decode
steps, ``predicted(r) = t_base * (W + KV(r)) / (W + KV(base))``.

Outputs: a markdown table on stdout and, in ``--out-dir``, ``NAME.json`` (environment, settings, medians,
every repeat, bytes model, targets), ``NAME.csv`` (one row per configuration) and the plots
``NAME_time.png`` and ``NAME_memory.png``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import gc
import json
import logging
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from transformers import DynamicCache, GenerationConfig

from . import cache as _cache_module
from . import bench_paper, presets, testing
from ._compat import CACHE_KWARG, MAX_TRANSFORMERS_EXCLUSIVE, MIN_TRANSFORMERS
from .models import SUPPORTED_ATTENTION
from .models import adapter_for as adapt
from .cache import PrunableDynamicCache
from .hooks import uninstall
from .scorers import SCORERS
from .select import budget as _budget

logger = logging.getLogger(__name__)

__all__ = [
    "BenchSettings",
    "BenchResult",
    "DEFAULT_KEEP_RATIOS",
    "TARGETS",
    "image_size_for_visual_tokens",
    "kv_cache_bytes",
    "decode_weight_bytes",
    "load_model",
    "run_benchmark",
    "format_markdown",
    "write_outputs",
    "main",
    "NothingPrunedError",
]

DEFAULT_KEEP_RATIOS = (1.0, 0.5, 0.25, 0.1)
DEFAULT_PROMPT = "Describe this image in detail."
#: PrunableDynamicCache modes the benchmark can run (post-prefill compaction, or pruning inside the prefill)
MODES = tuple(getattr(_cache_module, "MODES", ("post-prefill",)))
#: ``--mode both`` interleaves every keep ratio in both modes in one run (issue 7's comparison)
MODE_CHOICES = MODES + ("both",)
BOTH_MODES = ("post-prefill", "in-prefill")
BASELINE = "baseline"

#: The targets of the project (issue 4) and the thresholds they are checked against.
TARGETS = {
    "scoring_overhead": ("scoring adds at most 2% to the prefill (stated for 4K visual tokens)", 0.02),
    "peak_memory": ("peak memory of a pruned call at most the baseline's + 5% (stated for 16K visual tokens)", 0.05),
    "compaction": ("compaction at most 5% of the prefill", 0.05),
    "decode_bytes_model": ("decode per-token time within 15% of the bytes model", 0.15),
    "prefill_flops_model": ("in-prefill prefill time ratio within 15% of the FLOPs model", 0.15),
    "pre_llm_prefill": ("pre-llm prefill at most 0.35x the baseline at keep 0.25 (stated for 4K visual tokens)", 0.35),
    "pre_llm_flops_model": ("pre-llm prefill time ratio within 10% of the FLOPs model", 0.10),
}

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_TIMED_METRICS = (
    "prefill_s",
    "vision_s",
    "ttft_s",
    "score_s",
    "select_s",
    "compact_s",
    "decode_per_token_s",
    "e2e_s",
)
#: Times a decode step moves the KV cache's bytes through memory with transformers' DynamicCache: each
#: layer's update is a torch.cat (reads the whole cache and writes it again), then attention reads it.
#: The bytes model of the targets counts the KV once; the "_kv3" variant counts it this many times.
KV_TRAFFIC_DYNAMIC_CACHE = 3

#: metric -> name of its ratio to the baseline of the same run
_RATIO_NAMES = {
    "prefill_s": "prefill_vs_base",
    "ttft_s": "ttft_vs_base",
    "decode_per_token_s": "decode_per_token_vs_base",
    "e2e_s": "e2e_vs_base",
    "peak_mem_bytes": "peak_mem_vs_base",
    "kv_bytes_prefill": "kv_vs_base",
    "peak_rss_delta_bytes": "peak_rss_delta_vs_base",
}


class NothingPrunedError(RuntimeError):
    """A configuration that asked to drop visual tokens kept them all: its times would be a false speed-up."""


# --------------------------------------------------------------------------- settings and validation


@dataclass
class BenchSettings:
    """What one benchmark run measures. See the module docstring and ``sparse-cache-bench --help``."""

    model: str = "small"
    visual_tokens: int | None = 1024
    image_size: tuple[int, int] | None = None  # (width, height); exclusive with visual_tokens
    batch_size: int = 1
    keep_ratios: tuple[float, ...] = DEFAULT_KEEP_RATIOS
    new_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    device: str = "cpu"
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on CUDA
    attn_implementation: str = "sdpa"
    scorer: str = "sparsevlm"
    mode: str = "post-prefill"  # PrunableDynamicCache mode: "post-prefill" or "in-prefill"
    prompt: str = DEFAULT_PROMPT
    seed: int = 0
    cpu_memory: str = "profiler"  # "profiler" (one extra untimed run per configuration) or "none"
    clock: str = "wall"  # CPU only: "wall" (perf_counter) or "process" (process_time: CPU seconds of the process)
    progress: bool = True
    #: absolute visual-token budgets per image (the paper's 192/128/64 of 576), measured next to the keep ratios
    keep_tokens: tuple[int, ...] = ()
    #: in-prefill progressive schedule: "sparsevlm" (the authors' layers 2/6/15 of 32 scaled to depth) or None
    schedule: str | None = None
    #: preset depth overrides (decoder layers, vision layers): NOT the published model; recorded in the results
    layers: int | None = None
    vision_layers: int | None = None

    def resolved_dtype(self) -> torch.dtype:
        name = self.dtype or ("bfloat16" if torch.device(self.device).type == "cuda" else "float32")
        return _DTYPES[name]

    def validate(self) -> "BenchSettings":
        """Raise ``ValueError`` naming the argument, the value and what is valid."""
        if (self.visual_tokens is None) == (self.image_size is None):
            raise ValueError(
                f"visual_tokens / image_size: give exactly one (got visual_tokens={self.visual_tokens!r}, "
                f"image_size={self.image_size!r})"
            )
        if self.visual_tokens is not None and (not isinstance(self.visual_tokens, int) or self.visual_tokens < 4):
            raise ValueError(
                f"visual_tokens: {self.visual_tokens!r} is not valid; give an int >= 4 (an image has at least "
                "2x2 merged tokens)"
            )
        if self.image_size is not None:
            width, height = self.image_size
            if width < 28 or height < 28:
                raise ValueError(f"image_size: {width}x{height} is too small; both sides must be >= 28 pixels")
        _positive_int("batch_size", self.batch_size)
        _positive_int("new_tokens", self.new_tokens)
        _positive_int("repeats", self.repeats)
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup: {self.warmup!r} is not valid; give an int >= 0")
        if not self.keep_ratios and not self.keep_tokens:
            raise ValueError("keep_ratios: give at least one keep ratio in (0, 1], e.g. 1.0,0.5,0.25,0.1 (or keep_tokens)")
        bench_paper.validate_settings(self)
        for ratio in self.keep_ratios:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
                raise ValueError(
                    f"keep_ratios: {ratio!r} is outside (0, 1]; give fractions of the visual tokens to keep, "
                    "e.g. 1.0,0.5,0.25,0.1"
                )
        if len(set(self.keep_ratios)) != len(self.keep_ratios):
            raise ValueError(f"keep_ratios: {list(self.keep_ratios)} repeats a value; give each ratio once")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not valid; valid dtypes are {sorted(_DTYPES)}")
        if self.attn_implementation not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"attn_implementation: {self.attn_implementation!r} is not supported by PrunableDynamicCache; "
                f"valid values are {list(SUPPORTED_ATTENTION)}"
            )
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer: unknown scorer {self.scorer!r}; valid names are {sorted(SCORERS)}")
        if self.mode not in MODE_CHOICES:
            raise ValueError(f"mode: {self.mode!r} is not valid; valid modes are {list(MODE_CHOICES)}")
        if self.mode == "pre-llm" and SCORERS[self.scorer].default_layer is not None:
            raise ValueError(
                f"scorer: {self.scorer!r} reads a decoder layer's attention inputs; mode 'pre-llm' needs one of "
                f"{sorted(n for n, s in SCORERS.items() if s.default_layer is None)}"
            )
        if self.cpu_memory not in ("profiler", "none"):
            raise ValueError(f"cpu_memory: {self.cpu_memory!r} is not valid; valid values are 'profiler', 'none'")
        _check_device(self.device)
        if self.clock not in ("wall", "process"):
            raise ValueError(f"clock: {self.clock!r} is not valid; valid values are 'wall', 'process'")
        if self.clock == "process" and torch.device(self.device).type != "cpu":
            raise ValueError(f"clock: 'process' measures CPU time and needs device 'cpu', got {self.device!r}")
        if not self.prompt:
            raise ValueError("prompt: give a non-empty prompt (the text after the image rates the visual tokens)")
        return self


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: {value!r} is not valid; give an int >= 1")


def _check_device(device: str) -> None:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: {device!r} is not a torch device; valid examples: 'cpu', 'cuda', 'cuda:1'") from err
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device: {device!r} is not supported by the benchmark; valid: 'cpu', 'cuda', 'cuda:N'")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} was requested but torch.cuda.is_available() is False on this machine")


# --------------------------------------------------------------------------- image sizes


def visual_grid_for_tokens(visual_tokens: int, max_aspect: float = 2.0) -> tuple[int, int]:
    """``(rows, cols)`` of merged visual tokens whose product is as close as possible to ``visual_tokens``.

    Among grids with ``1 <= cols/rows <= max_aspect``, the closest count wins, then the squarest one:
    16320 -> (120, 136), 576 -> (24, 24), 4096 -> (64, 64).
    """
    best: tuple[int, int, int, int] | None = None
    for rows in range(max(1, math.isqrt(visual_tokens)), 0, -1):
        cols = max(rows, round(visual_tokens / rows))
        if cols / rows > max_aspect:
            break
        key = (abs(rows * cols - visual_tokens), cols - rows, rows, cols)
        if best is None or key < best:
            best = key
    assert best is not None
    return best[2], best[3]


def image_size_for_visual_tokens(visual_tokens: int, patch_size: int = 14, merge_size: int = 2) -> tuple[int, int]:
    """``(width, height)`` in pixels of an image that a Qwen-VL model turns into about ``visual_tokens`` tokens.

    One merged token covers ``(patch_size * merge_size)`` pixels square (28 for Qwen2/2.5-VL, 32 for
    Qwen3-VL), so the image is exactly the grid of :func:`visual_grid_for_tokens` times that (landscape when
    not square).
    """
    rows, cols = visual_grid_for_tokens(visual_tokens)
    factor = patch_size * merge_size
    return cols * factor, rows * factor


def _rounded_area(width: int, height: int, factor: int) -> int:
    """Pixels of the image after the processor rounds each side to a multiple of ``factor``."""
    return max(factor, round(height / factor) * factor) * max(factor, round(width / factor) * factor)


def parse_image_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"image_size: {text!r} is not WIDTHxHEIGHT in pixels, e.g. 896x672")
    return int(match.group(1)), int(match.group(2))


def parse_cases(text: str) -> list[tuple[int, int]]:
    """``"16320:1,576:16"`` -> ``[(16320, 1), (576, 16)]`` (visual tokens, batch size)."""
    cases = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", item)
        if not match or int(match.group(1)) < 4 or int(match.group(2)) < 1:
            raise ValueError(
                f"cases: {item!r} is not VISUAL_TOKENS:BATCH_SIZE (visual tokens >= 4, batch >= 1); "
                "e.g. --cases 16320:1,576:1,576:16"
            )
        cases.append((int(match.group(1)), int(match.group(2))))
    return cases


def parse_keep_ratios(text: str) -> tuple[float, ...]:
    try:
        ratios = tuple(float(item) for item in text.split(",") if item.strip())
    except ValueError as err:
        raise ValueError(f"keep_ratios: {text!r} is not a comma-separated list of numbers, e.g. 1.0,0.5,0.25,0.1") from err
    return ratios


# --------------------------------------------------------------------------- model, processor, inputs


def model_config(model: str):
    """The config of a preset name, a local path or a hub id, checked to be of a supported family (``ValueError``
    otherwise, one line naming the supported families); nothing but ``config.json`` is read."""
    if model in presets.PRESETS:
        return presets.preset_config(model)
    if not (os.path.isdir(model) or "/" in model):
        raise ValueError(
            f"model: {model!r} is neither a preset ({', '.join(sorted(presets.PRESETS))}) nor an existing local "
            "directory; hub ids look like 'Qwen/Qwen2.5-VL-7B-Instruct'"
        )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError, KeyError) as err:
        message = " ".join(str(err).split())
        raise ValueError(f"model: cannot load a model config from {model!r}: {message[:300]}") from err
    if presets.model_class_for_config(config) is None:
        raise ValueError(
            f"model: {model!r} is a {getattr(config, 'model_type', None)!r} model ({type(config).__name__}); "
            f"sparse_cache supports {presets.supported_families_text()}"
        )
    return config


def patch_and_merge(config) -> tuple[int, int]:
    """``(patch_size, spatial_merge_size)`` of a VLM config's vision tower (14, 2 for Qwen2/2.5-VL; 16, 2 for Qwen3-VL)."""
    vision = config.vision_config
    return int(getattr(vision, "patch_size", 14)), int(getattr(vision, "spatial_merge_size", 2))


def load_model(
    model: str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    seed: int = 0,
    overrides: dict | None = None,
):
    """``(model, processor, description)`` for a preset name, a local path or a hub id.

    Presets get random weights and the offline processor of their family; others are loaded with
    ``from_pretrained`` (the family's ``...ForConditionalGeneration`` class / ``AutoProcessor``, which needs the
    hub or a local copy) after :func:`model_config` checked the family. ``min_pixels``/``max_pixels`` are handed
    to the image processor so the benchmark image is not resized.
    """
    config = model_config(model)
    if model in presets.PRESETS:
        built = presets.build_preset_model(model, device, dtype, attn_implementation, seed=seed, overrides=overrides)
        processor = presets.preset_processor(min_pixels, max_pixels, name=model)
        changed = f" [OVERRIDDEN, not the published model: {overrides}]" if overrides else ""
        return built, processor, f"preset {model} (random weights): {presets.PRESETS[model].description}{changed}"
    import transformers
    from transformers import AutoProcessor

    model_class = getattr(transformers, presets.model_class_for_config(config))
    logger.info("loading %s as %s (%s, %s, %s)", model, model_class.__name__, device, dtype, attn_implementation)
    loaded = model_class.from_pretrained(
        model, dtype=dtype, attn_implementation=attn_implementation, device_map=device
    ).eval()
    pixel_kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    processor = AutoProcessor.from_pretrained(model, **pixel_kwargs)
    return loaded, processor, f"{model} (from_pretrained)"


def _processor_factor(processor) -> tuple[int, int]:
    image_processor = processor.image_processor
    return int(getattr(image_processor, "patch_size", 14)), int(getattr(image_processor, "merge_size", 2))


def build_inputs(processor, image_size: tuple[int, int], batch_size: int, prompt: str, seed: int):
    """One user turn per row: a synthetic image (a different one per row, same size) and ``prompt``."""
    width, height = image_size
    images = [[testing.synthetic_image(width, height, seed=seed + row)] for row in range(batch_size)]
    return testing.make_inputs(processor, [prompt] * batch_size, images)


# --------------------------------------------------------------------------- byte counts


def kv_cache_bytes(cache) -> int:
    """Bytes of the keys and values of every layer of a ``DynamicCache`` (or subclass)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def _physical_length(cache) -> int:
    for layer in getattr(cache, "layers", []):
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.ndim == 4:
            return int(keys.shape[-2])
    return 0


def expected_kv_bytes(model, physical_length: int, batch_size: int, dtype: torch.dtype) -> int:
    """``layers * 2 * kv_heads * head_dim * dtype_size * physical_length * batch``."""
    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    size = torch.empty(0, dtype=dtype).element_size()
    return text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * size * physical_length * batch_size


def decode_weight_bytes(model) -> int:
    """Bytes of the weights one decode step reads: the decoder (layers, final norm) and ``lm_head``.

    The input embedding table is only gathered (one row per token) and the vision tower does not run
    while decoding, so neither counts, unless the embedding is tied to ``lm_head`` (then it is read as
    ``lm_head``).
    """
    adapter = adapt(model)
    embed = adapter.text_model.get_input_embeddings() if hasattr(adapter.text_model, "get_input_embeddings") else None
    skip = {id(p) for p in embed.parameters()} if embed is not None else set()
    params: dict[int, torch.Tensor] = {id(p): p for p in adapter.text_model.parameters() if id(p) not in skip}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        params.update({id(p): p for p in head.parameters()})
    return sum(p.numel() * p.element_size() for p in params.values())


# --------------------------------------------------------------------------- instrumentation


class _Probe:
    """Timestamps of one ``generate`` call: CUDA events on CUDA (no extra synchronisation), else perf_counter."""

    def __init__(self, device: torch.device, clock: str = "wall"):
        self.cuda = device.type == "cuda"
        # "process": CPU seconds of this process (time.process_time), immune to other processes sharing the
        # cores; with one torch thread it is the compute time of the run. "wall": time.perf_counter.
        self._now = time.process_time if clock == "process" else time.perf_counter
        self.active = False
        self.marks: list[tuple[str, Any]] = []
        self.cache = None
        self.forwards = 0
        self.kv_bytes_prefill: int | None = None
        self.physical_length_prefill: int | None = None

    def start(self, cache) -> None:
        self.active = True
        self.marks = []
        self.cache = cache
        self.forwards = 0
        self.kv_bytes_prefill = None
        self.physical_length_prefill = None
        self.mark("run_start")

    def stop(self) -> None:
        self.mark("run_end")
        self.active = False
        self.cache = None  # a pruning cache keeps the model's hooks while it lives

    def mark(self, label: str) -> None:
        if not self.active:
            return
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((label, event))
        else:
            self.marks.append((label, self._now()))

    def times(self) -> list[tuple[str, float]]:
        """``(label, seconds since run_start)`` of every mark."""
        if not self.marks:
            return []
        if self.cuda:
            torch.cuda.synchronize()
            first = self.marks[0][1]
            return [(label, first.elapsed_time(event) / 1e3) for label, event in self.marks]
        first = self.marks[0][1]
        return [(label, t - first) for label, t in self.marks]

    # hooks ------------------------------------------------------------------
    def forward_pre(self, module, args, kwargs):
        self.mark("forward_start")

    def forward_post(self, module, args, kwargs, output):
        if not self.active:
            return None
        self.mark("forward_end")
        self.forwards += 1
        if self.forwards == 1 and self.cache is not None:  # right after the prefill (and its compaction)
            self.kv_bytes_prefill = kv_cache_bytes(self.cache)
            self.physical_length_prefill = _physical_length(self.cache)
        return None

    def wrap(self, cache, method: str, label: str) -> None:
        """Time ``cache.<method>`` of this run's cache (an instance attribute: the class is untouched)."""
        original = getattr(cache, method, None) if cache is not None else None
        if original is None:
            logger.warning("PrunableDynamicCache has no %s: %s is not timed", method, label)
            return

        def timed(*args, **kwargs):
            self.mark(f"{label}_start")
            try:
                return original(*args, **kwargs)
            finally:
                self.mark(f"{label}_end")

        setattr(cache, method, timed)


def _spans(times: list[tuple[str, float]], label: str) -> list[tuple[float, float]]:
    starts = [t for name, t in times if name == f"{label}_start"]
    ends = [t for name, t in times if name == f"{label}_end"]
    return list(zip(starts, ends))


def _intervals(times: list[tuple[str, float]], label: str) -> list[float]:
    return [end - start for start, end in _spans(times, label)]


def _run_metrics(times: list[tuple[str, float]], new_tokens: int) -> dict[str, float | None]:
    stamps = dict()
    for name, t in times:
        stamps.setdefault(name, []).append(t)
    first_start, first_end = _spans(times, "forward")[0]
    vision = _spans(times, "vision")
    # transformers 5.x generate runs the vision tower before the first forward; should it run inside that
    # forward instead, it is taken out, so that prefill_s is the decoder's prefill in every version.
    vision_inside = sum(end - start for start, end in vision if start >= first_start and end <= first_end)
    run_end = stamps["run_end"][-1]
    score = _intervals(times, "score")
    select = _intervals(times, "select")
    compact = _intervals(times, "compact")
    return {
        "prefill_s": first_end - first_start - vision_inside,
        "vision_s": sum(end - start for start, end in vision),
        "ttft_s": first_end,
        "score_s": sum(score) if score else None,
        "select_s": sum(select) if select else None,
        "compact_s": sum(compact) if (select or compact) else None,  # 0.0: selected, nothing dropped
        "decode_per_token_s": (run_end - first_end) / (new_tokens - 1) if new_tokens > 1 else None,
        "e2e_s": run_end,
    }


def _check_pruned(config, cache, record: dict, visual_per_row: list[int], sequence_length: int) -> None:
    """Mark ``record["pruned"]``; raise :class:`NothingPrunedError` if ``config`` asked to drop tokens and did not.

    Pruning happened iff the cache recorded its kept positions, fewer than the visual tokens in every row
    whose budget drops some, and stored fewer entries after the prefill than the prompt is long.
    """
    tokens = getattr(config, "keep_tokens", None)
    expects = [_budget(v, None if tokens else config.keep_ratio, tokens) < v for v in visual_per_row]
    record["pruned"] = any(expects)
    if not record["pruned"]:
        return  # keep=1 (or a ratio that rounds to every token): a control, by request
    kept = getattr(cache, "kept_visual_positions", None)
    physical = record.get("physical_length_prefill")
    rows_kept = [int(k.numel()) for k in kept] if kept else None
    if rows_kept is not None and physical is not None and physical < sequence_length and all(
        n < v for n, v, e in zip(rows_kept, visual_per_row, expects) if e
    ):
        return
    import transformers

    what = (
        "the cache recorded no selection (sparse_cache never saw its cache inside generate)" if rows_kept is None
        else f"the cache kept {rows_kept} of {visual_per_row} visual tokens per row"
    )
    raise NothingPrunedError(
        f"nothing was pruned with transformers {transformers.__version__}: {config.label} ({config.mode}) asked to keep "
        f"{config.keep_ratio:g} of the visual tokens, but {what}; {physical} of {sequence_length} entries stored after "
        f"the prefill. No ratio is recorded for a run that pruned nothing (sparse_cache supports transformers "
        f">={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS_EXCLUSIVE})."
    )


def _read_proc_status(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


#: lines the torch profiler's native code prints to stderr on every start and stop (kineto's log)
_PROFILER_CHATTER = re.compile(r"profiler_(start|stop)|ActivityProfiler|^STAGE:|^USDT:")


class _native_stderr_filtered:
    """Send file descriptor 2 to a temporary file for a block, then write back to stderr only the lines that do not
    match ``pattern`` (native code writes to the descriptor directly, past ``sys.stderr`` and logging)."""

    def __init__(self, pattern: re.Pattern):
        self.pattern = pattern

    def __enter__(self):
        import tempfile

        self.saved = None
        try:
            sys.stderr.flush()
            self.capture = tempfile.TemporaryFile(mode="w+b")
            self.saved = os.dup(2)
            os.dup2(self.capture.fileno(), 2)
        except (OSError, AttributeError, ValueError):  # no real descriptor 2 (e.g. some notebook kernels)
            self.saved = None
        return self

    def __exit__(self, *exc):
        if self.saved is None:
            return False
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.capture.seek(0)
        kept = [line for line in self.capture.read().decode(errors="replace").splitlines()
                if line.strip() and not self.pattern.search(line)]
        self.capture.close()
        if kept:
            sys.stderr.write("\n".join(kept) + "\n")
        return False


def _profiled_peak_bytes(fn: Callable[[], Any]) -> int | None:
    """Peak of the running sum of CPU tensor allocations (bytes) recorded by the torch profiler during ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_filtered(_PROFILER_CHATTER):  # kineto's start/stop lines would break the progress bar
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:  # pragma: no cover - profiler internals moved
        logger.warning("this torch profiler exposes no allocation events; CPU peak memory is not measured")
        return None
    allocations = sorted(
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    )
    running = peak = 0
    for _, nbytes in allocations:
        running += nbytes
        peak = max(peak, running)
    return peak


# --------------------------------------------------------------------------- the run


@dataclass
class _Config:
    label: str
    keep_ratio: float | None  # None: the baseline (plain DynamicCache, library hooks removed)
    mode: str = "post-prefill"
    keep_tokens: int | None = None  # an absolute budget per image (keep_ratio is then keep_tokens / visual tokens)


def prefill_flops(text_config, tokens_per_layer: list[float]) -> float:
    """Decoder prefill FLOPs when layer ``i`` computes ``tokens_per_layer[i]`` tokens (per row).

    Linear layers: ``2 * (2 D^2 + 2 D * kv_heads * head_dim + 3 D * I)`` per token (q, o, k, v, MLP);
    attention: ``2 * n^2 * D`` for ``n`` tokens (QK^T and AV, causal half). The FLOPs model of in-prefill
    pruning at layer ``s`` of ``L`` keeping ``r`` of ``V`` visual tokens is then
    ``prefill_flops([N] * (s + 1) + [N - V + rV] * (L - s - 1)) / prefill_flops([N] * L)``, i.e.
    ``(s + (L - s) r) / L`` on the visual share plus the quadratic term.
    """
    d = text_config.hidden_size
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or d // heads
    kv = text_config.num_key_value_heads * head_dim
    linear = 2 * (2 * d * d + 2 * d * kv + 3 * d * text_config.intermediate_size)
    return float(sum(n * linear + 2 * n * n * d for n in tokens_per_layer))


@dataclass
class BenchResult:
    """Everything a run measured; ``to_dict()`` is the JSON written to disk."""

    environment: dict
    settings: dict
    rows: list[dict]  # one per configuration, baseline first: medians, ratios, bytes model
    runs: list[dict]  # every timed run
    targets: dict
    name: str = ""
    files: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "environment": self.environment,
            "settings": self.settings,
            "results": self.rows,
            "targets": self.targets,
            "runs": self.runs,
        }


def collect_environment(device: torch.device, dtype: torch.dtype, attn_implementation: str) -> dict:
    import transformers

    from . import __version__

    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sparse_cache": __version__,
        "git_commit": _git_commit(),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "attn_implementation": attn_implementation,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
        "cuda": torch.version.cuda,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["gpu_memory_bytes"] = props.total_memory
    return env


def environment_summary(env: dict) -> str:
    """``"cpu float32 sdpa, transformers 5.24.0, torch 2.13.0+cpu"``: where a report's numbers come from."""
    return (f"{env['device']} {env['dtype']} {env['attn_implementation']}, transformers {env['transformers']}, "
            f"torch {env['torch']}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True, text=True, timeout=5, check=False,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(present) if present else None


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def _snake_order(configs: list[_Config], repeat: int) -> list[_Config]:
    return configs if repeat % 2 == 0 else list(reversed(configs))


def run_benchmark(
    model,
    processor,
    settings: BenchSettings,
    *,
    model_description: str = "",
    image_size: tuple[int, int] | None = None,
    command: str | None = None,
) -> BenchResult:
    """Measure the baseline and every keep ratio of ``settings`` on ``model`` (already on its device).

    ``image_size`` overrides the size derived from ``settings`` (width, height in pixels); ``command``
    (the command line, when run from the CLI) is recorded in the settings.
    """
    settings.validate()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    adapter = adapt(model)
    patch, merge = _processor_factor(processor)
    if image_size is None:
        image_size = settings.image_size or image_size_for_visual_tokens(settings.visual_tokens, patch, merge)
    inputs = build_inputs(processor, image_size, settings.batch_size, settings.prompt, settings.seed).to(device)
    image_token_id = adapter.image_token_id
    visual_per_row = [int(n) for n in (inputs["input_ids"] == image_token_id).sum(dim=1)]
    if settings.visual_tokens is not None and settings.image_size is None:
        rows, cols = visual_grid_for_tokens(settings.visual_tokens)
        if visual_per_row[0] != rows * cols:
            raise RuntimeError(
                f"the processor turned a {image_size[0]}x{image_size[1]} image into {visual_per_row[0]} visual "
                f"tokens, not the {rows * cols} expected: its min_pixels/max_pixels resize the image "
                f"(min_pixels={getattr(processor.image_processor, 'min_pixels', '?')}, "
                f"max_pixels={getattr(processor.image_processor, 'max_pixels', '?')})"
            )
    sequence_length = int(inputs["input_ids"].shape[1])
    logger.info(
        "image %dx%d -> %d visual tokens per row, batch %d, %d tokens per row, %d new tokens",
        image_size[0], image_size[1], visual_per_row[0], settings.batch_size, sequence_length, settings.new_tokens,
    )

    text_config = model.config.get_text_config(decoder=True)
    generation_config = GenerationConfig(
        max_new_tokens=settings.new_tokens,
        min_new_tokens=settings.new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        eos_token_id=getattr(model.generation_config, "eos_token_id", None) or text_config.eos_token_id,
        pad_token_id=getattr(model.generation_config, "pad_token_id", None) or text_config.pad_token_id,
        bos_token_id=getattr(model.generation_config, "bos_token_id", None),
    )
    modes = BOTH_MODES if settings.mode == "both" else (settings.mode,)
    configs = [_Config(BASELINE, None)] + [
        _Config(f"keep={r:g}" if len(modes) == 1 else f"{mode} keep={r:g}", float(r), mode)
        for mode in modes
        for r in settings.keep_ratios
    ] + bench_paper.token_configs(_Config, settings, modes, visual_per_row[0])
    probe = _Probe(device, settings.clock)
    handles = [
        model.register_forward_pre_hook(probe.forward_pre, with_kwargs=True),
        model.register_forward_hook(probe.forward_post, with_kwargs=True),
    ]
    vision = next((getattr(adapter.vlm, name) for name in ("visual", "vision_tower", "image_tower")  # Qwen / LLaVA
                   if getattr(adapter.vlm, name, None) is not None), None)
    if vision is not None:
        handles.append(vision.register_forward_pre_hook(lambda *a: probe.mark("vision_start")))
        handles.append(vision.register_forward_hook(lambda *a: probe.mark("vision_end")))

    environment = collect_environment(device, dtype, settings.attn_implementation)
    measure_profiler = device.type == "cpu" and settings.cpu_memory == "profiler"
    total = len(configs) * (settings.warmup + settings.repeats + (1 if measure_profiler else 0))
    bar = _progress(total, settings.progress)

    def make_cache(config: _Config):
        if config.keep_ratio is None:
            gc.collect()  # pruned runs' caches go, and with the last one the hooks
            uninstall(model)  # the baseline runs as without the library
            return DynamicCache(config=model.config)
        extra = {} if config.mode == "post-prefill" else {"mode": config.mode}
        extra.update(bench_paper.cache_budget(config, settings))  # keep_tokens / schedule, if any
        extra.setdefault("keep_ratio", config.keep_ratio)
        cache = PrunableDynamicCache(model, scorer=settings.scorer, seed=settings.seed, **extra)
        lifecycle = getattr(cache, "sparse_cache_lifecycle", None)  # the per-call pruning steps live there
        probe.wrap(lifecycle, "_score", "score")
        probe.wrap(lifecycle, "_select", "select")
        probe.wrap(lifecycle, "_compact", "compact")
        if config.mode == "in-prefill":  # the early layers' gather of in-prefill pruning is its compaction
            probe.wrap(lifecycle, "_finish_in_prefill", "compact")
        if config.mode == "pre-llm":  # the prefix bookkeeping after the forward (the cut itself scores and selects)
            probe.wrap(lifecycle, "_finish_pre_llm", "compact")
        return cache

    def generate(cache):
        output = model.generate(**inputs, **{CACHE_KWARG: cache}, generation_config=generation_config)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        if sequences.shape[1] != sequence_length + settings.new_tokens:
            raise RuntimeError(
                f"generate produced {sequences.shape[1] - sequence_length} new tokens, not {settings.new_tokens}"
            )
        return sequences

    def timed_run(config: _Config, repeat: int | None) -> dict:
        cache = make_cache(config)
        gc.collect()
        rss_reset = False
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            allocated_before = torch.cuda.memory_allocated(device)
        else:
            rss_before = _read_proc_status("VmRSS")
            rss_reset = rss_before is not None and _reset_peak_rss()
        probe.start(cache)
        try:
            generate(cache)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        finally:
            probe.stop()
        record = {"config": config.label, "keep_ratio": config.keep_ratio, "mode": config.mode, "repeat": repeat}
        record["scoring_layer"] = getattr(cache, "scoring_layer", None)
        record["keep_tokens"] = getattr(config, "keep_tokens", None)
        record["schedule"] = [list(stage) for stage in getattr(cache, "schedule", None) or []] or None
        if probe.forwards != settings.new_tokens:
            logger.warning("%s: %d forwards for %d new tokens", config.label, probe.forwards, settings.new_tokens)
        record.update(_run_metrics(probe.times(), settings.new_tokens))
        record["forwards"] = probe.forwards
        record["kv_bytes_prefill"] = probe.kv_bytes_prefill
        record["physical_length_prefill"] = probe.physical_length_prefill
        record["kv_bytes_final"] = kv_cache_bytes(cache)
        kept = getattr(cache, "kept_visual_positions", None)
        record["kept_visual_per_row"] = [int(k.numel()) for k in kept] if kept else list(visual_per_row)
        if config.keep_ratio is not None:
            _check_pruned(config, cache, record, visual_per_row, sequence_length)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            record["peak_mem_bytes"] = peak - allocated_before
            record["peak_mem_abs_bytes"] = peak
            record["peak_rss_delta_bytes"] = None
        else:
            record["peak_mem_bytes"] = None
            record["peak_mem_abs_bytes"] = None
            hwm = _read_proc_status("VmHWM") if rss_reset else None
            record["peak_rss_delta_bytes"] = (hwm - rss_before) if hwm is not None else None
        return record

    runs: list[dict] = []
    profiled: dict[str, int | None] = {}
    try:
        for w in range(settings.warmup):
            for config in _snake_order(configs, w):
                bar.set_postfix_str(f"warm-up {config.label}")
                timed_run(config, None)
                bar.update(1)
        for repeat in range(settings.repeats):
            for config in _snake_order(configs, repeat):
                bar.set_postfix_str(f"repeat {repeat + 1}/{settings.repeats} {config.label}")
                runs.append(timed_run(config, repeat))
                bar.update(1)
        if measure_profiler:
            for config in configs:
                bar.set_postfix_str(f"memory {config.label}")
                cache = make_cache(config)
                gc.collect()
                profiled[config.label] = _profiled_peak_bytes(lambda: generate(cache))
                bar.update(1)
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
    environment["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    weight_bytes = decode_weight_bytes(model)
    rows = _summarise(
        configs, runs, profiled, settings, weight_bytes, device,
        text_config=text_config, sequence_length=sequence_length, visual_per_row=visual_per_row[0],
    )
    resolved = dataclasses.asdict(settings)
    resolved.update(
        image_size=list(image_size),
        visual_tokens_per_row=visual_per_row[0],
        sequence_length=sequence_length,
        dtype=environment["dtype"],
        model_description=model_description,
        decode_weight_bytes=weight_bytes,
        model_parameters=sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        peak_memory_method=(
            "torch.cuda.max_memory_allocated minus memory_allocated before the call"
            if device.type == "cuda"
            else ("torch profiler (profile_memory=True): peak running sum of CPU tensor allocations, one untimed run"
                  if measure_profiler else "not measured")
        ),
        baseline="transformers DynamicCache, library hooks removed",
        command=command,
    )
    targets = evaluate_targets(rows, visual_per_row[0])
    name = default_name(settings, visual_per_row[0], device, environment["dtype"])
    return BenchResult(environment, resolved, rows, runs, targets, name=name)


def _progress(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the bench extra
        tqdm = None
    if tqdm is None or not enabled:
        return _NoBar()
    return tqdm(total=total, desc="sparse-cache-bench", unit="run", file=sys.stderr, leave=False)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def _summarise(
    configs, runs, profiled, settings, weight_bytes, device, *, text_config=None, sequence_length=0, visual_per_row=0
) -> list[dict]:
    rows = []
    for config in configs:
        mine = [r for r in runs if r["config"] == config.label]
        row: dict[str, Any] = {
            "config": config.label, "keep_ratio": config.keep_ratio, "repeats": len(mine),
            "mode": None if config.keep_ratio is None else config.mode,
            "scoring_layer": mine[0].get("scoring_layer"),
            "keep_tokens": mine[0].get("keep_tokens"), "schedule": mine[0].get("schedule"),
        }
        for metric in _TIMED_METRICS:
            values = [r[metric] for r in mine]
            row[metric] = _median(values)
            present = [v for v in values if v is not None]
            row[metric + "_min"] = min(present) if present else None
            row[metric + "_max"] = max(present) if present else None
        kept = mine[0]["kept_visual_per_row"]
        row["kept_visual_per_row"] = kept[0] if len(set(kept)) == 1 else statistics.mean(kept)
        if config.keep_ratio is not None:
            row["pruned"] = all(r.get("pruned", False) for r in mine)
            row["control"] = not row["pruned"]  # kept every visual token by request: not a speed-up
        else:
            row["pruned"] = row["control"] = None
        row["kv_bytes_prefill"] = mine[0]["kv_bytes_prefill"]
        row["physical_length_prefill"] = mine[0]["physical_length_prefill"]
        row["kv_bytes_final"] = mine[0]["kv_bytes_final"]
        if device.type == "cuda":
            row["peak_mem_bytes"] = _median([r["peak_mem_bytes"] for r in mine])
            row["peak_mem_abs_bytes"] = _median([r["peak_mem_abs_bytes"] for r in mine])
        else:
            row["peak_mem_bytes"] = profiled.get(config.label)
            row["peak_mem_abs_bytes"] = None
        row["peak_rss_delta_bytes"] = _median([r["peak_rss_delta_bytes"] for r in mine])
        rows.append(row)

    base = rows[0]
    batch = settings.batch_size
    for row in rows:
        for metric, name in _RATIO_NAMES.items():
            row[name] = _ratio(row[metric], base[metric])
        row["score_pct_of_base_prefill"] = _pct(row["score_s"], base["prefill_s"])
        row["compact_pct_of_prefill"] = _pct(row["compact_s"], row["prefill_s"])
        # Bytes model: KV read per decode step, averaged over the steps (the cache grows by one entry per
        # step per row), plus the decoder weights.
        per_entry = row["kv_bytes_prefill"] / (batch * row["physical_length_prefill"]) if row["physical_length_prefill"] else 0
        row["kv_bytes_decode_avg"] = row["kv_bytes_prefill"] + per_entry * batch * settings.new_tokens / 2
    for row in rows:
        row["flops_model_prefill_vs_base"] = None
        row["prefill_measured_over_flops_model"] = None
        if text_config is None:
            continue
        layers = text_config.num_hidden_layers
        total = sequence_length
        if row["mode"] == "in-prefill" and row.get("schedule"):  # progressive: each stage's budget from its layer on
            per_layer = bench_paper.schedule_tokens_per_layer(row["schedule"], layers, total, visual_per_row)
        elif row["mode"] == "in-prefill":
            s = row["scoring_layer"]
            kept_total = total - visual_per_row + row["kept_visual_per_row"]
            per_layer = [total] * (s + 1) + [kept_total] * (layers - s - 1)
        elif row["mode"] == "pre-llm":  # every layer computes the kept tokens only
            per_layer = [total - visual_per_row + row["kept_visual_per_row"]] * layers
        else:
            per_layer = [total] * layers  # post-prefill (and the baseline) compute every token in the prefill
        row["flops_model_prefill_vs_base"] = prefill_flops(text_config, per_layer) / prefill_flops(text_config, [total] * layers)
        row["prefill_tflops_model"] = prefill_flops(text_config, per_layer) * settings.batch_size / 1e12
        row["prefill_measured_over_flops_model"] = _ratio(row["prefill_vs_base"], row["flops_model_prefill_vs_base"])
    for row in rows:
        t_base = base["decode_per_token_s"]
        for suffix, kv_factor in (("", 1), ("_kv3", KV_TRAFFIC_DYNAMIC_CACHE)):
            if t_base is None:
                predicted = None
            else:
                predicted = t_base * (weight_bytes + kv_factor * row["kv_bytes_decode_avg"]) / (
                    weight_bytes + kv_factor * base["kv_bytes_decode_avg"])
            row[f"bytes_model{suffix}_decode_per_token_s"] = predicted
            row[f"decode_measured_over_model{suffix}"] = _ratio(row["decode_per_token_s"], predicted)
    return rows


def _pct(value: float | None, base: float | None) -> float | None:
    ratio = _ratio(value, base)
    return None if ratio is None else 100.0 * ratio


def evaluate_targets(rows: list[dict], visual_tokens: int) -> dict:
    """Check the project's targets on this run's medians (worst pruned configuration of each)."""
    base, pruned = rows[0], rows[1:]
    dropping = [r for r in pruned if r["keep_ratio"] is not None and r["keep_ratio"] < 1]
    out: dict[str, dict] = {}

    def record(key: str, value: float | None, worst: str | None, extra: dict | None = None) -> None:
        text, limit = TARGETS[key]
        out[key] = {
            "target": text,
            "limit": limit,
            "value": value,
            "worst_config": worst,
            "met": None if value is None else bool(value <= limit),
            "measured_at_visual_tokens": visual_tokens,
            **(extra or {}),
        }

    def worst(candidates: list[dict], fn) -> tuple[float | None, str | None]:
        scored = [(fn(r), r["config"]) for r in candidates if fn(r) is not None]
        return max(scored) if scored else (None, None)

    value, label = worst(pruned, lambda r: _ratio(r["score_s"], base["prefill_s"]))
    keep_one = next((r for r in pruned if r["keep_ratio"] == 1.0), None)
    record(
        "scoring_overhead", value, label,
        {"prefill_keep1_over_base_minus_1": None if keep_one is None or keep_one["prefill_vs_base"] is None
         else keep_one["prefill_vs_base"] - 1},
    )
    value, label = worst(pruned, lambda r: None if r["peak_mem_vs_base"] is None else r["peak_mem_vs_base"] - 1)
    record("peak_memory", value, label)
    value, label = worst(dropping, lambda r: _ratio(r["compact_s"], r["prefill_s"]))
    record("compaction", value, label)
    def off_model(key):
        return lambda r: None if r[key] is None else abs(r[key] - 1)

    value, label = worst(pruned, off_model("decode_measured_over_model"))
    kv3_value, kv3_label = worst(pruned, off_model("decode_measured_over_model_kv3"))
    record("decode_bytes_model", value, label, {"value_kv3": kv3_value, "worst_config_kv3": kv3_label})
    in_prefill = [r for r in pruned if r.get("mode") == "in-prefill"]
    value, label = worst(in_prefill, off_model("prefill_measured_over_flops_model"))  # (None, None) without any
    record("prefill_flops_model", value, label)
    pre_llm = [r for r in pruned if r.get("mode") == "pre-llm"]
    value, label = worst([r for r in pre_llm if r["keep_ratio"] == 0.25], lambda r: r["prefill_vs_base"])
    record("pre_llm_prefill", value, label)
    value, label = worst(pre_llm, off_model("prefill_measured_over_flops_model"))
    record("pre_llm_flops_model", value, label)
    return out


def default_name(settings: BenchSettings, visual_tokens: int, device: torch.device, dtype: str) -> str:
    model = os.path.basename(os.path.normpath(settings.model)) if settings.model not in presets.PRESETS else settings.model
    raw = f"{model}-v{visual_tokens}-b{settings.batch_size}-n{settings.new_tokens}-{device.type}-{dtype}"
    if settings.mode != "post-prefill":
        raw += f"-{settings.mode}"
    if settings.clock == "process":
        raw += "-cputime"
    if settings.layers is not None or settings.vision_layers is not None:
        raw += f"-L{settings.layers or ''}v{settings.vision_layers or ''}"
    if settings.schedule:
        raw += f"-{settings.schedule}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw)


# --------------------------------------------------------------------------- outputs


def _fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.1f}"


def _fmt_ratio(ratio: float | None) -> str:
    return "" if ratio is None else f" (x{ratio:.2f})"


def _fmt_mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def _timer_text(settings: dict, env: dict) -> str:
    if env["gpu"]:
        return "CUDA events"
    clock = "process CPU time" if settings.get("clock") == "process" else "wall clock"
    load = env.get("load_average")
    load_text = f", load average {load[0]:.1f} at start" if load else ""
    return f"{clock}, {env['torch_threads']} torch thread(s){load_text}"


def format_markdown(result: BenchResult) -> str:
    """The run as a markdown table (ratios against the baseline of the same run) plus the targets."""
    s, env = result.settings, result.environment
    lines = [
        f"### {result.name}",
        "",
        f"{s['model_description'] or s['model']}; {s['visual_tokens_per_row']} visual tokens per row "
        f"({s['image_size'][0]}x{s['image_size'][1]} image), batch {s['batch_size']}, {s['sequence_length']} prompt "
        f"tokens per row, {s['new_tokens']} new tokens; {env['device']} ({env['gpu'] or env['cpu']}), {env['dtype']}, "
        f"{env['attn_implementation']}, torch {env['torch']}, transformers {env['transformers']}; scorer "
        f"{s['scorer']} ({s['mode']}); medians of {s['repeats']} interleaved repeats after {s['warmup']} warm-up; "
        f"{_timer_text(s, env)}; {env['date_utc']}.",
        "",
        "Speed (ratios against the baseline of this run):",
        "",
        "| config | kept visual/row | prefill ms | vision ms | decode ms/token | end-to-end s | prefill FLOPs model |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    memory = [
        "",
        "Memory, overheads and the decode bytes model:",
        "",
        "| config | KV MiB after prefill | peak MiB | score ms (% base prefill) | compact ms (% prefill) "
        "| bytes model ms/token | measured/model | measured/model, KV x3 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result.rows:
        score = "-" if row["score_s"] is None else f"{_fmt_ms(row['score_s'])} ({row['score_pct_of_base_prefill']:.2f}%)"
        compact = "-" if row["compact_s"] is None else f"{_fmt_ms(row['compact_s'])} ({row['compact_pct_of_prefill']:.2f}%)"
        kept = row["kept_visual_per_row"]
        kept_text = f"{kept:g}" if isinstance(kept, float) else str(kept)
        e2e = "n/a" if row["e2e_s"] is None else f"{row['e2e_s']:.3f}"
        measured_over_model, measured_over_kv3 = (
            "n/a" if row[key] is None else f"{row[key]:.3f}"
            for key in ("decode_measured_over_model", "decode_measured_over_model_kv3")
        )
        flops = row.get("flops_model_prefill_vs_base")
        lines.append(
            f"| {row['config']} | {kept_text} "
            f"| {_fmt_ms(row['prefill_s'])}{_fmt_ratio(row['prefill_vs_base'])} | {_fmt_ms(row['vision_s'])} "
            f"| {_fmt_ms(row['decode_per_token_s'])}{_fmt_ratio(row['decode_per_token_vs_base'])} "
            f"| {e2e}{_fmt_ratio(row['e2e_vs_base'])} | {'n/a' if flops is None else format(flops, '.3f')} |"
        )
        memory.append(
            f"| {row['config']} | {_fmt_mib(row['kv_bytes_prefill'])}{_fmt_ratio(row['kv_vs_base'])} "
            f"| {_fmt_mib(row['peak_mem_bytes'])}{_fmt_ratio(row['peak_mem_vs_base'])} | {score} | {compact} "
            f"| {_fmt_ms(row['bytes_model_decode_per_token_s'])} | {measured_over_model} | {measured_over_kv3} |"
        )
    lines += memory
    lines.append("")
    lines += bench_paper.comparison_lines(result)
    controls = [row["config"] for row in result.rows if row.get("control")]
    if controls:
        lines.append(f"{', '.join(controls)}: every visual token kept by request, so its ratios are a control (the "
                     "library's overhead and the timing noise of this machine), not a speed-up.")
        lines.append("")
    lines.append(f"Peak memory: {s['peak_memory_method']}. Bytes model: decode weights "
                 f"{s['decode_weight_bytes'] / 2**20:.1f} MiB + KV averaged over the decode steps; \"KV x3\" counts "
                 "the KV bytes three times (DynamicCache's torch.cat reads and writes the cache, attention reads it).")
    lines.append("")
    lines.append("Targets (worst pruned configuration):")
    for key, target in result.targets.items():
        verdict = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
        value = "n/a" if target["value"] is None else f"{100 * target['value']:.2f}%"
        lines.append(
            f"- {target['target']}: {value} ({target['worst_config']}) vs {100 * target['limit']:.0f}% -> {verdict}"
            f" at {target['measured_at_visual_tokens']} visual tokens"
        )
    return "\n".join(lines) + "\n"


_CSV_FIELDS = [
    "config", "keep_ratio", "repeats", "kept_visual_per_row", "physical_length_prefill", "kv_bytes_prefill",
    "kv_vs_base", "kv_bytes_final", "prefill_s", "prefill_s_min", "prefill_s_max", "prefill_vs_base", "vision_s",
    "ttft_s", "ttft_vs_base", "score_s", "score_pct_of_base_prefill", "select_s", "compact_s",
    "compact_pct_of_prefill", "decode_per_token_s", "decode_per_token_s_min", "decode_per_token_s_max",
    "decode_per_token_vs_base", "kv_bytes_decode_avg", "bytes_model_decode_per_token_s",
    "decode_measured_over_model", "bytes_model_kv3_decode_per_token_s", "decode_measured_over_model_kv3", "e2e_s",
    "e2e_s_min", "e2e_s_max", "e2e_vs_base", "flops_model_prefill_vs_base", "prefill_measured_over_flops_model",
    "mode", "scoring_layer", "keep_tokens", "prefill_tflops_model", "pruned", "control", "peak_mem_bytes", "peak_mem_vs_base", "peak_mem_abs_bytes", "peak_rss_delta_bytes", "peak_rss_delta_vs_base",
]
_CSV_CONTEXT = ["model", "device", "dtype", "attn_implementation", "visual_tokens_per_row", "batch_size", "new_tokens"]


def write_outputs(result: BenchResult, out_dir: str, plots: bool = True) -> dict[str, str]:
    """Write ``NAME.json``, ``NAME.csv`` and (``plots``) ``NAME_time.png`` / ``NAME_memory.png``; return paths."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, result.name)
    files = {"json": base + ".json", "csv": base + ".csv"}
    with open(files["json"], "w") as handle:
        json.dump(result.to_dict(), handle, indent=2, default=_json_default)
        handle.write("\n")
    context = {
        "model": result.settings["model"],
        "device": result.environment["device"],
        "dtype": result.environment["dtype"],
        "attn_implementation": result.environment["attn_implementation"],
        "visual_tokens_per_row": result.settings["visual_tokens_per_row"],
        "batch_size": result.settings["batch_size"],
        "new_tokens": result.settings["new_tokens"],
    }
    with open(files["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_CSV_FIELDS + _CSV_CONTEXT, extrasaction="ignore")
        writer.writeheader()
        for row in result.rows:
            writer.writerow({**{k: ("" if row.get(k) is None else row.get(k)) for k in _CSV_FIELDS}, **context})
    if plots:
        files.update(write_plots(result, base))
    result.files = files
    logger.info("wrote %s", ", ".join(files.values()))
    return files


def _json_default(value):
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_plots(result: BenchResult, base: str) -> dict[str, str]:
    """Time and memory against keep ratio (the baseline as a dashed line), as PNG (Agg backend)."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            "plots need matplotlib: pip install 'sparse-cache[bench]' (or pass --no-plots)"
        ) from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    base_row = result.rows[0]
    modes = sorted({r.get("mode") or "post-prefill" for r in result.rows[1:]})
    groups = {m: sorted([r for r in result.rows[1:] if (r.get("mode") or "post-prefill") == m],
                        key=lambda r: r["keep_ratio"]) for m in modes}
    ratios = sorted({r["keep_ratio"] for r in result.rows[1:]})
    title = (f"{result.settings['model']}: {result.settings['visual_tokens_per_row']} visual tokens, batch "
             f"{result.settings['batch_size']}, {result.environment['device']} {result.environment['dtype']}")

    def plot(ax, key, scale, style, label, color):
        """One line per mode (in-prefill dash-dotted); returns whether anything was drawn."""
        drawn = False
        for mode, rows in groups.items():
            values = [None if r[key] is None else r[key] * scale for r in rows]
            if all(v is None or v == 0 for v in values):
                continue
            suffix = f" ({mode})" if len(groups) > 1 else ""
            line = style if mode != "in-prefill" else style.replace("-", "-.").replace(":", "-.")
            ax.plot([r["keep_ratio"] for r in rows], values, line, label=label + suffix, color=color,
                    alpha=1.0 if mode != "in-prefill" else 0.8)
            drawn = True
        return drawn

    def baseline_line(ax, value, label, color):
        if value is not None:
            ax.axhline(value, linestyle="--", color=color, alpha=0.7, label=label)

    def finish(ax, ylabel):
        ax.set_xlabel("keep ratio")
        ax.set_ylabel(ylabel)
        ax.set_xticks(ratios)
        ax.set_xticklabels([f"{r:g}" for r in ratios])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)

    paths = {}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    plot(ax, "prefill_s", 1e3, "o-", "prefill", "C0")
    plot(ax, "vision_s", 1e3, "^-", "vision tower (runs before the prefill)", "C4")
    plot(ax, "score_s", 1e3, "s-", "scoring", "C1")
    plot(ax, "compact_s", 1e3, "d-", "compaction", "C2")
    if any(r.get("flops_model_prefill_vs_base") not in (None, 1.0) for r in result.rows[1:]) and base_row["prefill_s"]:
        for r in result.rows[1:]:
            r["_flops_ms"] = (r["flops_model_prefill_vs_base"] or 1.0) * base_row["prefill_s"]
        plot(ax, "_flops_ms", 1e3, "x:", "prefill, FLOPs model", "C3")
        for r in result.rows[1:]:
            r.pop("_flops_ms", None)
    baseline_line(ax, base_row["prefill_s"] and base_row["prefill_s"] * 1e3, "prefill, baseline", "C0")
    ax.set_yscale("log")
    ax.set_title("prefill (ms, log scale)")
    finish(ax, "ms")
    ax = axes[1]
    plot(ax, "decode_per_token_s", 1e3, "o-", "measured", "C0")
    plot(ax, "bytes_model_decode_per_token_s", 1e3, "x:", "bytes model (KV read once)", "C3")
    plot(ax, "bytes_model_kv3_decode_per_token_s", 1e3, "+:", "bytes model, KV x3", "C5")
    baseline_line(ax, base_row["decode_per_token_s"] and base_row["decode_per_token_s"] * 1e3, "baseline", "C0")
    ax.set_title("decode per token (ms)")
    finish(ax, "ms / token")
    ax = axes[2]
    plot(ax, "e2e_s", 1.0, "o-", f"{result.settings['new_tokens']} new tokens", "C0")
    baseline_line(ax, base_row["e2e_s"], "baseline", "C0")
    ax.set_title("end-to-end generate (s)")
    finish(ax, "s")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    paths["plot_time"] = base + "_time.png"
    fig.savefig(paths["plot_time"], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    ax = axes[0]
    if plot(ax, "peak_mem_bytes", 2**-20, "o-", "pruned", "C0"):
        baseline_line(ax, base_row["peak_mem_bytes"] and base_row["peak_mem_bytes"] / 2**20, "baseline", "C0")
    ax.set_title("peak memory of the call above its start (MiB)")
    ax.set_ylim(bottom=0)
    finish(ax, "MiB")
    ax = axes[1]
    plot(ax, "kv_bytes_prefill", 2**-20, "o-", "KV cache after prefill", "C2")
    baseline_line(ax, base_row["kv_bytes_prefill"] / 2**20, "baseline", "C2")
    ax.set_title("KV cache after prefill (MiB)")
    ax.set_ylim(bottom=0)
    finish(ax, "MiB")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    paths["plot_memory"] = base + "_memory.png"
    fig.savefig(paths["plot_memory"], dpi=110)
    plt.close(fig)
    return paths


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-cache-bench",
        description=(
            "Measure prefill, scoring, compaction, decode, end-to-end time, peak memory and KV cache bytes of "
            "visual-token pruning against the unpruned baseline, interleaved in one run."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model", default="small",
        help=f"a preset ({', '.join(sorted(presets.PRESETS))}: real architecture, random weights, no download) or "
             f"a hub id / local path of a checkpoint of a supported family: {presets.supported_families_text()} "
             "(from_pretrained)",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--visual-tokens", type=int, default=argparse.SUPPRESS,
                      help="pick an image size giving this many visual tokens per row (1024 if no size option is given)")
    size.add_argument("--image-size", default=argparse.SUPPRESS,
                      help="synthetic image size WIDTHxHEIGHT in pixels, e.g. 896x672")
    size.add_argument("--cases", default=argparse.SUPPRESS,
                      help="several runs on one loaded model: VISUAL_TOKENS:BATCH_SIZE pairs, e.g. 16320:1,576:1,576:16")
    parser.add_argument("--batch-size", type=int, default=1, help="rows per generate call, one image each (--cases gives its own)")
    parser.add_argument("--keep-ratios", default=None,
                        help="comma-separated keep ratios in (0, 1]; the baseline is always measured too (default "
                             f"{','.join(f'{r:g}' for r in DEFAULT_KEEP_RATIOS)}, none when --keep-tokens is given)")
    bench_paper.add_arguments(parser)
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per call (exactly)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per configuration (medians reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per configuration")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--attn", dest="attn_implementation", default="sdpa", choices=list(SUPPORTED_ATTENTION),
                        help="attention implementation")
    parser.add_argument("--scorer", default="sparsevlm", choices=sorted(SCORERS), help="PrunableDynamicCache scorer")
    parser.add_argument("--mode", default="post-prefill", choices=list(MODE_CHOICES),
                        help="PrunableDynamicCache mode: compact after the prefill, prune inside it, or drop visual "
                             "tokens before the language model (pre-llm: an embedding scorer, e.g. --scorer cosine); "
                             "both: post-prefill and in-prefill")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="text after the image in every row")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights, images and scorer")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--cpu-memory", default="profiler", choices=["profiler", "none"],
                        help="CPU peak memory: one extra untimed run per configuration under the torch profiler")
    parser.add_argument("--clock", default="wall", choices=["wall", "process"],
                        help="CPU timer: wall clock, or the process's CPU time (robust on a machine shared with other "
                             "jobs; use with --threads 1 so that CPU time equals compute time)")
    parser.add_argument("--out-dir", default="bench_results", help="folder of the JSON, CSV and PNG files")
    parser.add_argument("--name", default=None, help="file name stem (default: model-vTOKENS-bBATCH-nNEW-device-dtype)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    batch = parser.add_argument_group("batch mode (sparse_cache.bench_batch): throughput and capacity")
    batch.add_argument("--batches", default=None,
                       help="comma-separated batch sizes, e.g. 1,4,16: tokens per second at each, every keep ratio")
    batch.add_argument("--memory-budget", default=None,
                       help="with --batches: the largest batch whose weights + peak memory fit, e.g. 80GiB")
    batch.add_argument("--no-verify-capacity", action="store_true",
                       help="do not run each configuration once at its predicted capacity")
    batch.add_argument("--max-verify-batch", type=int, default=256, help="largest predicted capacity that is verified")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.batches is not None or args.memory_budget is not None:  # batch mode: throughput and capacity
        if args.batches is None:
            parser.error("memory_budget: --memory-budget needs --batches (at least two batch sizes)")
        from .bench_batch import main_batch

        return main_batch(parser, args, argv)
    try:
        if "cases" in args:
            cases = [(tokens, batch, None) for tokens, batch in parse_cases(args.cases)]
        elif "image_size" in args:
            cases = [(None, args.batch_size, parse_image_size(args.image_size))]
        else:
            cases = [(getattr(args, "visual_tokens", 1024), args.batch_size, None)]
        if args.threads is not None:
            _positive_int("threads", args.threads)
        keep_tokens = bench_paper.parse_keep_tokens(args.keep_tokens)
        if args.keep_ratios is None:
            keep_ratios = () if keep_tokens else DEFAULT_KEEP_RATIOS
        else:
            keep_ratios = parse_keep_ratios(args.keep_ratios)
        cases = bench_paper.preset_cases(args, cases)
        all_settings = []
        for tokens, batch, image_size in cases:
            settings = BenchSettings(
                model=args.model, visual_tokens=tokens, image_size=image_size, batch_size=batch,
                keep_ratios=keep_ratios, new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup,
                device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation,
                scorer=args.scorer, mode=args.mode, prompt=args.prompt, seed=args.seed, cpu_memory=args.cpu_memory,
                clock=args.clock,
                progress=not args.no_progress,
                keep_tokens=keep_tokens, schedule=args.schedule, layers=args.layers, vision_layers=args.vision_layers,
            )
            all_settings.append(settings.validate())
        if args.name is not None and len(all_settings) > 1:
            raise ValueError("name: --name names one run; leave it out with --cases (each case gets its own name)")
        if args.name is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", args.name):
            raise ValueError(f"name: {args.name!r} may hold only letters, digits, '.', '_' and '-'")
    except ValueError as err:
        parser.error(str(err))
    # Optional dependencies, checked before minutes of work rather than after them.
    if not args.no_plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            sys.stderr.write(f"{parser.prog}: error: the plots need matplotlib: pip install 'sparse-cache[bench]', "
                             "or pass --no-plots\n")
            raise SystemExit(2) from None
    if not args.no_progress:
        try:
            import tqdm  # noqa: F401
        except ImportError:
            logger.warning("tqdm is not installed: no progress bar (pip install 'sparse-cache[bench]', or pass "
                           "--no-progress)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    first = all_settings[0]
    dtype = first.resolved_dtype()
    try:
        patch, merge = patch_and_merge(model_config(first.model))  # refuses a model of no supported family
    except ValueError as err:  # one line, without the usage block: the message lists what is supported
        sys.stderr.write(f"{parser.prog}: error: {err}\n")
        raise SystemExit(2) from None
    # One processor for every case: pixel bounds that keep each benchmark image at its own size.
    factor = patch * merge
    sizes = [s.image_size or image_size_for_visual_tokens(s.visual_tokens, patch, merge) for s in all_settings]
    areas = [_rounded_area(w, h, factor) for w, h in sizes]
    min_pixels = min(min(areas), testing.TINY_MIN_PIXELS * factor**2 // 28**2)
    max_pixels = max(areas)
    try:
        model, processor, description = load_model(
            first.model, first.device, dtype, first.attn_implementation, min_pixels, max_pixels, first.seed,
            overrides=bench_paper.depth_overrides(first),
        )
    except ValueError as err:
        parser.error(str(err))

    command = "sparse-cache-bench " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    for done, (settings, image_size) in enumerate(zip(all_settings, sizes)):
        try:
            result = run_benchmark(
                model, processor, settings, model_description=description, image_size=image_size, command=command
            )
        except KeyboardInterrupt:
            logger.error("interrupted: %d of %d case(s) finished and written to %s", done, len(all_settings),
                         args.out_dir)
            return 130
        except (RuntimeError, ValueError) as err:  # NothingPrunedError, the library refusing a call or a budget
            if logger.isEnabledFor(logging.DEBUG):
                logger.exception("run failed")
            message = " ".join(str(err).split()) or type(err).__name__
            if not isinstance(err, NothingPrunedError):
                import transformers

                message = f"{type(err).__name__}: {message} (transformers {transformers.__version__})"
            finished = f"; {done} earlier case(s) written to {args.out_dir}" if done else ""
            sys.stderr.write(f"sparse-cache-bench: error: {message}{finished}\n")
            return 1
        if args.name is not None:
            result.name = args.name
        write_outputs(result, args.out_dir, plots=not args.no_plots)
        sys.stdout.write(format_markdown(result) + "\n")
        sys.stdout.flush()
    logger.info("results in %s", os.path.abspath(args.out_dir))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
