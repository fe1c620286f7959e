"""lmms-eval model classes that prune: lmms-eval's own class of each family, with a pruning cache per call.

``Sparse_<family>_Simple`` / ``Sparse_<family>_Chat`` (built on first access, so that importing one family
does not import the others' lmms-eval modules) subclass the lmms-eval class named in
:data:`sparse_cache.eval.FAMILIES`. Their ``__init__`` takes this package's arguments out of ``--model_args``
(:data:`OWN_ARGS`), hands every other one to lmms-eval's class unchanged, and then wraps the loaded model's
``generate`` so that each call gets a fresh :class:`~sparse_cache.PrunableDynamicCache`: lmms-eval's prompts,
chat template, image preprocessing, batching and generation settings are untouched. What each call kept is
recorded in ``self.pruning_stats`` (and, with ``pruning_log=PATH``, one JSON line per call).

Model arguments added to lmms-eval's (``--model_args name=value,...``):

- ``keep_ratio`` (e.g. ``0.25``; ``1.0`` is the unpruned baseline on the same code path), or
  ``keep_tokens``, or ``adaptive_scale``, or ``schedule=sparsevlm`` with ``mode=in-prefill``: the budget;
- ``scorer`` (default ``sparsevlm``), ``scoring_layer``, ``seed``, ``mode`` (``post-prefill`` or
  ``in-prefill``), ``recycle``: as :class:`~sparse_cache.PrunableDynamicCache`;
- ``dtype`` (``float32``, ``float16``, ``bfloat16``): load the weights in this dtype instead of the lmms-eval
  class's own choice (bfloat16 for the Qwen classes), e.g. for float32 runs on CPU; the LLaVA class has its
  own ``dtype`` argument, which it keeps;
- ``pruning_log``: a file (started afresh when the model is built) to append one JSON line per ``generate``
  call to (visual tokens and kept tokens per row, seconds).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import json
import logging
import sys
import threading
import time

logger = logging.getLogger(__name__)

#: --model_args this package reads (everything else goes to the lmms-eval class)
CACHE_ARGS = ("keep_ratio", "keep_tokens", "scorer", "scoring_layer", "seed", "mode", "schedule", "adaptive_scale",
              "recycle")
OWN_ARGS = CACHE_ARGS + ("dtype", "pruning_log")
_DTYPES = ("float32", "float16", "bfloat16")

_fallback_lock = threading.Lock()


class PruningStats:
    """What the pruning caches of one model kept, call by call (thread-safe; written after each call)."""

    def __init__(self, log_path: str | None = None):
        self.log_path = log_path
        if log_path:
            open(log_path, "w", encoding="utf-8").close()  # each model starts its own log
        self.calls = 0
        self.rows = 0
        self.visual_tokens = 0
        self.kept_tokens = 0
        self._lock = threading.Lock()

    def record(self, cache, input_ids, visual_token_ids, seconds: float) -> dict:
        if input_ids is not None and visual_token_ids:
            is_visual = sum((input_ids == i) for i in visual_token_ids).bool()
            visual = [int(n) for n in is_visual.sum(dim=-1).tolist()]
        else:
            visual = [int(s.numel()) for s in cache.visual_scores]
        kept = [int(k.numel()) for k in cache.kept_visual_positions] if cache.kept_visual_positions else list(visual)
        with self._lock:
            self.calls += 1
            self.rows += len(visual)
            self.visual_tokens += sum(visual)
            self.kept_tokens += sum(kept)
            entry = {"call": self.calls, "visual": visual, "kept": kept, "seconds": round(seconds, 6)}
            if self.log_path:
                with open(self.log_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(entry) + "\n")
        logger.debug("sparse_cache.eval: call %d kept %s of %s visual tokens", entry["call"], kept, visual)
        return entry

    def pruned_nothing(self) -> bool:
        """Whether calls were made and every visual token of every one was kept."""
        return self.calls > 0 and self.kept_tokens == self.visual_tokens

    def summary(self) -> str:
        share = f" ({self.kept_tokens / self.visual_tokens:.1%})" if self.visual_tokens else ""
        return (f"{self.calls} generate calls, {self.rows} rows: kept {self.kept_tokens} of {self.visual_tokens} "
                f"visual tokens{share}")


#: every model built in this process, for ``sparse-cache eval``'s closing summary
LIVE_STATS: list[tuple[str, PruningStats, dict]] = []


def _check_dtype(value):
    if value is None or value == "auto":
        return None
    if value not in _DTYPES:
        raise ValueError(f"dtype: expected one of {_DTYPES} or 'auto', got {value!r}")
    import torch

    return getattr(torch, value)


@contextlib.contextmanager
def _loading_dtype(dtype):
    """Make ``from_pretrained`` load in ``dtype`` while an lmms-eval class that hard-codes its dtype loads.

    The lmms-eval Qwen classes pass ``torch_dtype="bfloat16"`` (or ``"auto"``) and take no dtype argument;
    a float32 checkpoint rounded to bfloat16 and cast back is not the float32 model. Only in effect during
    the wrapped ``__init__`` (model loading is not concurrent in lmms-eval).
    """
    if dtype is None:
        yield
        return
    from transformers import PreTrainedModel

    original = PreTrainedModel.__dict__["from_pretrained"]
    load = original.__func__

    def from_pretrained(cls, *args, **kwargs):
        kwargs.pop("torch_dtype", None)
        kwargs["dtype"] = dtype
        return load(cls, *args, **kwargs)

    PreTrainedModel.from_pretrained = classmethod(from_pretrained)
    try:
        yield
    finally:
        PreTrainedModel.from_pretrained = original


def _install_vision_fallback(cls) -> None:
    """Give lmms-eval's Qwen modules the image-only ``process_vision_info`` when qwen-vl-utils is missing."""
    from . import vision

    with _fallback_lock:
        for klass in cls.__mro__:
            module = sys.modules.get(klass.__module__)
            if module is not None and "process_vision_info" in vars(module) and module.process_vision_info is None:
                module.process_vision_info = vision.process_vision_info
                logger.warning(
                    "sparse_cache.eval: qwen_vl_utils cannot be imported (it needs torchvision); %s prepares images "
                    "with sparse_cache.eval.vision (the same resize), and video inputs raise", module.__name__)


def _wrap_generate(model, cache_kwargs: dict, stats: PruningStats, model_id: str) -> None:
    """Every ``model.generate`` call gets a fresh pruning cache (as :func:`sparse_cache.enable`), and its
    kept counts go to ``stats``."""
    from .._compat import CACHE_KWARG, CACHE_KWARGS
    from ..cache import PrunableDynamicCache

    original = model.generate
    visual_ids = tuple(sorted({  # LLaVA configs may carry both spellings of one id
        int(i) for i in (getattr(model.config, name, None) for name in (
            "image_token_id", "image_token_index", "video_token_id", "video_token_index")) if i is not None
    }))

    @functools.wraps(original)
    def generate(*args, **kwargs):
        if any(kwargs.get(name) is not None for name in CACHE_KWARGS):
            raise ValueError(f"{model_id}: generate was given its own cache; this model makes one pruning cache per call")
        if kwargs.get("use_cache", True) is False:
            raise ValueError(f"{model_id}: use_cache=False leaves no KV cache to prune; drop use_cache=False from "
                             "--model_args")
        cache = PrunableDynamicCache(model, **cache_kwargs)
        kwargs[CACHE_KWARG] = cache
        start = time.perf_counter()
        out = original(*args, **kwargs)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        stats.record(cache, input_ids, visual_ids, time.perf_counter() - start)
        return out

    model.generate = generate


class SparseCacheModel:
    """Mixin placed before an lmms-eval model class: pruning arguments out, a pruning cache per call in."""

    sparse_family = ""
    model_id = ""

    def __init__(self, *args, keep_ratio=None, keep_tokens=None, scorer="sparsevlm", scoring_layer=None, seed=0,
                 mode="post-prefill", schedule=None, adaptive_scale=None, recycle=False, dtype=None, pruning_log=None,
                 **kwargs):
        if keep_ratio is None and keep_tokens is None and adaptive_scale is None and schedule is None:
            raise ValueError(
                f"{self.model_id}: no budget in --model_args: give keep_ratio= (e.g. keep_ratio=0.25; 1.0 for the "
                "unpruned baseline), keep_tokens=, adaptive_scale= or schedule=sparsevlm"
            )
        from ..cache import MODES
        from ..scorers import SCORERS

        # the cheap checks before the weights load (the cache checks everything once the model is there)
        if isinstance(scorer, str) and scorer not in SCORERS:
            raise ValueError(f"scorer: unknown scorer {scorer!r}; valid names are {sorted(SCORERS)}")
        if mode not in MODES:
            raise ValueError(f"mode: unknown mode {mode!r}; valid modes are {MODES}")
        if isinstance(keep_ratio, int) and not isinstance(keep_ratio, bool):
            keep_ratio = float(keep_ratio)  # lmms-eval parses "keep_ratio=1" as an int
        cache_kwargs = dict(keep_ratio=keep_ratio, keep_tokens=keep_tokens, scorer=scorer, scoring_layer=scoring_layer,
                            seed=seed, mode=mode, schedule=schedule, adaptive_scale=adaptive_scale, recycle=recycle)
        base_takes_dtype = "dtype" in inspect.signature(super().__init__).parameters
        if base_takes_dtype and dtype is not None:
            kwargs["dtype"] = dtype
            load_dtype = None
        else:
            load_dtype = _check_dtype(dtype)
        _install_vision_fallback(type(self))
        # registers the torchvision-free processor class that the bundled toy VLM's processor_config.json names
        from .. import processor  # noqa: F401
        with _loading_dtype(load_dtype):
            super().__init__(*args, **kwargs)

        from ..cache import PrunableDynamicCache

        model = self.model
        PrunableDynamicCache(model, **cache_kwargs)  # validates the arguments now, not on the first sample
        self.pruning_kwargs = cache_kwargs
        self.pruning_stats = PruningStats(pruning_log)
        LIVE_STATS.append((self.model_id, self.pruning_stats, cache_kwargs))
        _wrap_generate(model, cache_kwargs, self.pruning_stats, self.model_id)
        logger.info("sparse_cache.eval: %s prunes every generate call with %s", self.model_id,
                    ", ".join(f"{k}={v}" for k, v in cache_kwargs.items() if v is not None))


def _build(name: str):
    from . import FAMILIES, PREFIX

    family, _, kind = name[len("Sparse_"):].rpartition("_")
    if family not in FAMILIES or kind not in ("Simple", "Chat"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    simple, chat = FAMILIES[family]
    path = chat if kind == "Chat" else simple
    if path is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}: lmms-eval has no chat class for {family}")
    module_name, class_name = path.rsplit(".", 1)
    base = getattr(importlib.import_module(module_name), class_name)
    cls = type(name, (SparseCacheModel, base), {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"lmms-eval's {path} with a pruning cache per generate call (sparse_cache.eval.models).",
        "sparse_family": family,
        "model_id": PREFIX + family,
    })
    globals()[name] = cls
    return cls


def __getattr__(name: str):
    if name.startswith("Sparse_"):
        return _build(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
