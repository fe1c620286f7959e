"""Everything that depends on the transformers version lives here, found by feature detection.

Model families live in :mod:`sparse_cache.models`; this module keeps only what differs between
transformers releases: the cache keyword (``cache`` since 5.24, ``past_key_values`` before), argument
positions read from the hooked forwards' signatures, and the supported range.

Supported: transformers ``>=5.14.1,<6`` (5.14 is the first release whose ``Cache`` separates the
query offset used for masks, ``get_query_offset``, from ``get_seq_length``; a pruned cache needs
both: logical length for positions and ``generate``'s slicing, physical length for masks).
"""

from __future__ import annotations

import inspect
import logging

import torch
import transformers
from packaging import version

logger = logging.getLogger(__name__)

MIN_TRANSFORMERS = "5.14.1"
MAX_TRANSFORMERS_EXCLUSIVE = "6"


def check_transformers_version() -> None:
    """Raise ``RuntimeError`` if the installed transformers is outside the supported range."""
    installed = version.parse(transformers.__version__)
    if not (version.parse(MIN_TRANSFORMERS) <= installed < version.parse(MAX_TRANSFORMERS_EXCLUSIVE)):
        raise RuntimeError(
            f"sparse_cache supports transformers >={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS_EXCLUSIVE}; "
            f"found {transformers.__version__}. Install a supported version, e.g. "
            f"`pip install 'transformers>={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS_EXCLUSIVE}'`."
        )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE helper, identical to the modeling code's: (x1, x2) -> (-x2, x1) on the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _cache_keyword() -> str:
    """The keyword transformers itself uses to pass a cache down (feature-detected, not version-compared).

    transformers 5.24 renamed ``past_key_values`` to ``cache`` in every forward, in ``generate`` and in
    ``prepare_inputs_for_generation`` (the old name is still accepted, renamed inside the call by a
    ``deprecate_kwarg`` decorator, until 5.40).
    """
    from transformers.generation.utils import GenerationMixin

    parameters = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in parameters else "past_key_values"


#: The keyword this transformers passes caches under, and the one to pass ours under.
CACHE_KWARG = _cache_keyword()
#: Every spelling a hooked call may carry a cache under: transformers' own, and the old one a user may
#: still write on a top-level call (hooks see the caller's keywords, before the rename inside the call).
CACHE_KWARGS = ("cache", "past_key_values")


def forward_arg_names(module: torch.nn.Module) -> tuple[str, ...]:
    """Parameter names of ``module.forward`` in positional order (decorators with ``wraps`` are seen through)."""
    names = []
    for param in inspect.signature(module.forward).parameters.values():
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            names.append(param.name)
    return tuple(names)


def _index_of(names: tuple[str, ...], name: str) -> int | None:
    if name in CACHE_KWARGS:
        for alias in CACHE_KWARGS:
            if alias in names:
                return names.index(alias)
        return None
    return names.index(name) if name in names else None


def get_arg(args: tuple, kwargs: dict, names: tuple[str, ...], name: str):
    """Read argument ``name`` of a hooked forward whether it was passed by keyword or position.

    ``name`` ``"cache"`` (or ``"past_key_values"``) reads the cache under either spelling.
    """
    aliases = CACHE_KWARGS if name in CACHE_KWARGS else (name,)
    for alias in aliases:
        if kwargs.get(alias) is not None:
            return kwargs[alias]
    idx = _index_of(names, name)
    return args[idx] if idx is not None and idx < len(args) else None


def get_cache(args: tuple, kwargs: dict, names: tuple[str, ...] = ()):
    """The cache a hooked call carries, under either spelling, by keyword or (given ``names``) position."""
    return get_arg(args, kwargs, names, "cache")


def set_arg(args: tuple, kwargs: dict, names: tuple[str, ...], name: str, value) -> tuple[tuple, dict]:
    """Replace argument ``name`` of a hooked forward, keeping the caller's positional/keyword choice."""
    idx = _index_of(names, name)
    if name not in kwargs and idx is not None and idx < len(args):
        args = args[:idx] + (value,) + args[idx + 1 :]
    else:
        kwargs = dict(kwargs)
        kwargs[name] = value
    return args, kwargs
