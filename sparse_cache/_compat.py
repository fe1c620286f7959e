"""Everything that depends on the transformers version or on a model family's internals lives here.

The rest of the package talks to a model through :class:`ModelAdapter` only, so supporting a new
transformers release or a new VLM family means touching this file (and its tests), nothing else.

Supported: transformers ``>=5.14.1,<6`` (5.14 is the first release whose ``Cache`` separates the
query offset used for masks, ``get_query_offset``, from ``get_seq_length``; a pruned cache needs
both: logical length for positions and ``generate``'s slicing, physical length for masks).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
import transformers
from packaging import version

logger = logging.getLogger(__name__)

MIN_TRANSFORMERS = "5.14.1"
MAX_TRANSFORMERS_EXCLUSIVE = "6"

#: Model classes a :class:`~sparse_cache.PrunableDynamicCache` can be built for.
SUPPORTED_MODEL_CLASSES = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")
#: Attention implementations whose masks and positions are tested with the pruned cache.
SUPPORTED_ATTENTION = ("sdpa", "eager")


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


def rope_tables(attn_module: torch.nn.Module, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, S, head_dim)`` RoPE tables from the ``position_embeddings`` an attention module received.

    transformers >= 5.15 hands Qwen2.5-VL attention the M-RoPE tables already recomposed per head
    dimension ``(B, S, d)``; 5.14 hands the three ``(3, B, S, d)`` tables and recomposes them inside the
    attention (``apply_multimodal_rotary_pos_emb``): do the same recomposition here.
    """
    if cos.ndim == 3:
        return cos, sin
    sections = list(attn_module.config.rope_parameters["mrope_section"]) * 2

    def recompose(table: torch.Tensor) -> torch.Tensor:
        return torch.cat([m[i % 3] for i, m in enumerate(table.split(sections, dim=-1))], dim=-1)

    return recompose(cos), recompose(sin)


@dataclass
class ModelAdapter:
    """The handful of modules and ids a pruning cache needs from a supported VLM.

    Attributes:
        top: the module the user calls ``generate`` on (or the bare ``Qwen2_5_VLModel``).
        vlm: the ``Qwen2_5_VLModel`` that receives ``input_ids`` and grids and builds the decoder inputs.
        text_model: the decoder stack (receives ``inputs_embeds``, masks and positions).
        layers: the decoder layers, in order.
        visual_token_ids: ids whose positions in ``input_ids`` are visual tokens (image, video).
        spatial_merge_size: side of the patch block merged into one visual token (2 for Qwen2.5-VL).
    """

    top: torch.nn.Module
    vlm: torch.nn.Module
    text_model: torch.nn.Module
    layers: torch.nn.ModuleList
    image_token_id: int
    video_token_id: int | None
    spatial_merge_size: int
    num_layers: int
    attn_implementation: str
    vlm_args: tuple[str, ...] = ()
    text_args: tuple[str, ...] = ()

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        ids = [self.image_token_id]
        if self.video_token_id is not None:
            ids.append(self.video_token_id)
        return tuple(ids)

    def attention(self, layer_idx: int) -> torch.nn.Module:
        return self.layers[layer_idx].self_attn


def adapt(model: torch.nn.Module) -> ModelAdapter:
    """Return the :class:`ModelAdapter` of ``model``, or raise ``TypeError`` naming what is supported."""
    check_transformers_version()
    name = type(model).__name__
    if name == "Qwen2_5_VLForConditionalGeneration":
        vlm = model.model
    elif name == "Qwen2_5_VLModel":
        vlm = model
    else:
        raise TypeError(
            f"model: {name} is not supported yet; supported models are {', '.join(SUPPORTED_MODEL_CLASSES)} "
            "(Qwen2.5-VL, e.g. Qwen/Qwen2.5-VL-3B-Instruct or -7B-Instruct)."
        )
    config = vlm.config
    text_config = config.get_text_config(decoder=True)
    layer_types = getattr(text_config, "layer_types", None) or ["full_attention"] * text_config.num_hidden_layers
    if getattr(text_config, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
        raise ValueError(
            "model: sliding-window attention layers are not supported by PrunableDynamicCache (they assume "
            f"contiguous storage); got layer_types={sorted(set(layer_types))} and "
            f"use_sliding_window={getattr(text_config, 'use_sliding_window', False)}. "
            "Load the model with use_sliding_window=False (the Qwen2.5-VL default)."
        )
    attn_implementation = getattr(text_config, "_attn_implementation", None) or "eager"
    if attn_implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"model: attn_implementation={attn_implementation!r} is not supported by PrunableDynamicCache; "
            f"load the model with attn_implementation in {SUPPORTED_ATTENTION}. "
            "(Flash-attention reads 2-D masks from the right and has not been validated on a pruned cache.)"
        )
    text_model = vlm.language_model
    video_token_id = getattr(config, "video_token_id", None)
    return ModelAdapter(
        top=model,
        vlm=vlm,
        text_model=text_model,
        layers=text_model.layers,
        image_token_id=int(config.image_token_id),
        video_token_id=int(video_token_id) if video_token_id is not None else None,
        spatial_merge_size=int(config.vision_config.spatial_merge_size),
        num_layers=len(text_model.layers),
        attn_implementation=attn_implementation,
        vlm_args=forward_arg_names(vlm),
        text_args=forward_arg_names(text_model),
    )


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


def gather_rope_tables(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather ``index`` ``(B, K)`` along the sequence axis of a ``(B, S, d)`` or ``(3, B, S, d)`` table."""
    index = index.to(table.device)
    if table.ndim == 4:
        index = index.unsqueeze(0).expand(table.shape[0], -1, -1)
    return table.gather(table.ndim - 2, index.unsqueeze(-1).expand(*index.shape, table.shape[-1]))


def grids_from_positions(position_ids, block_of: torch.Tensor, is_visual: torch.Tensor):
    """Merged ``(t, h, w)`` grid of every block, read from the M-RoPE positions; ``None`` if unusable.

    transformers >= 5.2x's ``generate`` encodes the images before the prefill and calls the model with
    ``mm_encoder_outputs`` and no ``image_grid_thw``; the positions still carry each block's extent.
    """
    if not isinstance(position_ids, torch.Tensor) or position_ids.ndim != 3 or position_ids.shape[0] not in (3, 4):
        return None
    rope = position_ids[-3:].to(block_of.device)  # (3, B, S): t, h, w
    if rope.shape[1:] != block_of.shape:
        return None
    grids = []
    for block in range(int(block_of.max()) + 1):
        member = (block_of == block) & is_visual
        count = int(member.sum())
        if count == 0:
            return None
        h_pos, w_pos = rope[1][member], rope[2][member]
        h = int(h_pos.max() - h_pos.min()) + 1
        w = int(w_pos.max() - w_pos.min()) + 1
        if count % (h * w):
            return None
        grids.append((count // (h * w), h, w))
    return grids


# ----------------------------------------------------------------------------- M-RoPE positions
# Qwen2.5-VL keeps the M-RoPE offsets of the last call (``rope_deltas``) on the model and reads them for
# calls without ``position_ids`` and for a continued ``generate``: shared state that threads and
# interleaved conversations overwrite. A pruned conversation never reads nor writes it: its offsets live
# in its cache, derived from the positions its own forwards receive, and the functions below compute, from
# those offsets, exactly what the model would have computed from its attribute.


def rope_rows(position_ids: torch.Tensor) -> torch.Tensor:
    """The rotary rows ``(R, B, S)`` of ``position_ids``: the 3 M-RoPE rows of a ``(4|3, B, S)`` tensor (the
    text row of a 4-row tensor dropped), the one row of a ``(1, B, S)`` tensor, or a ``(B, S)`` tensor as one row."""
    if position_ids.ndim == 2:
        return position_ids[None]
    return position_ids[-3:] if position_ids.shape[0] >= 3 else position_ids


def rope_deltas_from_positions(
    position_ids: torch.Tensor, token_valid: torch.Tensor, valid_total: torch.Tensor
) -> torch.Tensor:
    """``(B, 1)`` M-RoPE offsets in the model's convention (next position = valid tokens seen + delta).

    ``token_valid`` ``(B, S)`` marks this forward's real tokens, ``valid_total`` ``(B,)`` counts the real tokens
    of the whole sequence up to and including this forward. Equals ``get_rope_index``'s deltas on a prefill.
    """
    rows = rope_rows(position_ids).to(token_valid.device)
    lowest = torch.iinfo(rows.dtype).min if not rows.is_floating_point() else float("-inf")
    top = rows.masked_fill(~token_valid[None], lowest).amax(dim=(0, 2))
    return (top + 1 - valid_total.to(top.device)).long().unsqueeze(1)


def expand_rope_deltas(deltas: torch.Tensor, batch: int) -> torch.Tensor:
    """``deltas`` for ``batch`` rows (beam search expands the batch after positions were prepared)."""
    if deltas.shape[0] == batch:
        return deltas
    if batch % deltas.shape[0]:
        raise ValueError(f"rope deltas of {deltas.shape[0]} rows cannot follow a batch of {batch}")
    return deltas.repeat_interleave(batch // deltas.shape[0], dim=0)


def continuation_positions(
    deltas: torch.Tensor, past_logical: int, seq_len: int, attention_mask: torch.Tensor | None, device
) -> torch.Tensor:
    """``(3, B, S)`` positions of ``seq_len`` text tokens fed after ``past_logical`` tokens seen.

    What Qwen2.5-VL computes for a call without ``position_ids`` (its ``compute_3d_position_ids``), with the
    conversation's own offsets. With a 2-D mask of the logical length the base is each row's count of real
    tokens (as ``generate`` does; transformers itself fails on that case, see transformers-notes).
    """
    batch = deltas.shape[0] if attention_mask is None else attention_mask.shape[0]
    deltas = expand_rope_deltas(deltas, batch).to(device)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        mask = attention_mask.to(device).long()
        base = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -seq_len:]
    else:
        base = torch.arange(past_logical, past_logical + seq_len, device=device).expand(batch, -1)
    return (base + deltas).unsqueeze(0).expand(3, -1, -1)


def prefill_positions(vlm: torch.nn.Module, input_ids: torch.Tensor, kwargs: dict, attention_mask):
    """``(3, B, S)`` M-RoPE positions and ``(B, 1)`` deltas of a prefill called without ``position_ids``, as the
    model's ``get_rope_index`` computes them (a pure function of the inputs), or ``None`` where the model
    itself would fall back to plain positions (no grids or no ``mm_token_type_ids``)."""
    token_types = kwargs.get("mm_token_type_ids")
    image_grid, video_grid = kwargs.get("image_grid_thw"), kwargs.get("video_grid_thw")
    if token_types is None or (image_grid is None and video_grid is None) or not hasattr(vlm, "get_rope_index"):
        return None
    return vlm.get_rope_index(
        input_ids,
        mm_token_type_ids=token_types,
        image_grid_thw=image_grid,
        video_grid_thw=video_grid,
        second_per_grid_ts=kwargs.get("second_per_grid_ts"),
        attention_mask=attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 else None,
    )


def generation_positions(top: torch.nn.Module, vlm: torch.nn.Module, inputs_tensor, model_kwargs: dict, cache):
    """``Qwen2_5_VLForConditionalGeneration._prepare_position_ids_for_generation`` for a pruning cache.

    The same computation as the model's (transformers 5.24's, which also re-positions new images of a
    continued conversation), except that the offsets of a continued conversation come from ``cache`` and the
    model's ``rope_deltas`` attribute is neither read nor written.
    """
    from transformers.generation.utils import GenerationMixin

    text_positions = GenerationMixin._prepare_position_ids_for_generation(top, inputs_tensor, model_kwargs)
    past_length = cache.get_seq_length()
    token_types = model_kwargs.get("mm_token_type_ids")
    has_new_visual = token_types is not None and bool(token_types[:, past_length:].any())
    deltas = cache.rope_deltas
    if past_length != 0 and deltas is not None and not has_new_visual:
        return text_positions[None, ...] + expand_rope_deltas(deltas, text_positions.shape[0]).to(text_positions.device)
    if "input_ids" in model_kwargs and model_kwargs["input_ids"].shape[1] > 0:
        inputs_tensor = model_kwargs["input_ids"]
    is_input_ids = inputs_tensor.ndim == 2 and inputs_tensor.dtype in (torch.int, torch.long)
    if (
        is_input_ids
        and token_types is not None
        and (model_kwargs.get("image_grid_thw") is not None or model_kwargs.get("video_grid_thw") is not None)
    ):
        rope_kwargs = {k: v for k, v in model_kwargs.items() if k not in ("input_ids",) + CACHE_KWARGS}
        vision_positions, _ = vlm.get_rope_index(inputs_tensor, **rope_kwargs)
    else:
        vision_positions = text_positions.unsqueeze(0).expand(3, -1, -1)
    return torch.cat([text_positions[None, ...], vision_positions], dim=0)
