"""The model-adapter interface: what the family-agnostic engine needs to know about a VLM family.

One subclass per family (one file each in this folder), registered with :func:`~sparse_cache.models.register`.
The engine (capture, scoring, selection, compaction, in-prefill pruning, masks, beams) talks to a model
only through an adapter, and never names a family.
"""

from __future__ import annotations

import torch

from .._compat import forward_arg_names
from ..select import scaled_layer

def expand_rope_deltas(deltas: torch.Tensor, batch: int) -> torch.Tensor:
    """``deltas`` for ``batch`` rows (beam search expands the batch after positions were prepared)."""
    if deltas.shape[0] == batch:
        return deltas
    if batch % deltas.shape[0]:
        raise ValueError(f"rope deltas of {deltas.shape[0]} rows cannot follow a batch of {batch}")
    return deltas.repeat_interleave(batch // deltas.shape[0], dim=0)


#: Attention implementations whose masks and positions are tested with the pruned cache.
SUPPORTED_ATTENTION = ("sdpa", "eager")


class VLMAdapter:
    """The handful of modules, ids and rules a pruning cache needs from one VLM family.

    Subclasses set the class attributes and, where the family differs, override the methods.

    Class attributes:
        family: display name ("Qwen2.5-VL").
        model_classes: names of the top-level classes (``...ForConditionalGeneration``) it adapts.
        base_model_classes: names of the bare VLM classes (``...Model``) it adapts.
        example: a checkpoint id, for error messages.
        supported_attention: attention implementations tested with the pruned cache.
        grid_kwargs: ``(token id attribute of the config, grid keyword of the forward)`` per visual kind,
            in the order the model consumes placeholders (images, then videos).
    """

    family: str = ""
    model_classes: tuple[str, ...] = ()
    base_model_classes: tuple[str, ...] = ()
    example: str = ""
    supported_attention: tuple[str, ...] = SUPPORTED_ATTENTION
    grid_kwargs: tuple[tuple[str, str], ...] = (("image_token_id", "image_grid_thw"), ("video_token_id", "video_grid_thw"))
    #: forward keywords that only the prompt's own forward needs (dropped from a later split-off forward)
    visual_input_kwargs: tuple[str, ...] = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw")
    #: forward keywords carrying visual features: a forward with visual token ids brings images only with one of
    #: these (or encoder outputs); a generated placeholder id in a decode step is a plain token
    visual_feature_kwargs: tuple[str, ...] = ("pixel_values", "pixel_values_videos")
    #: whether the command-line tools (``sparse-cache generate``, ``sparse-cache-bench``: grids, overlays,
    #: presets) handle this family yet; the Python API handles every registered family
    command_line: bool = True

    def __init__(self, model: torch.nn.Module):
        name = type(model).__name__
        self.top = model
        self.vlm = model if name in self.base_model_classes else model.model
        config = self.vlm.config
        self.config = config
        self.text_config = config.get_text_config(decoder=True)
        self.text_model = self.vlm.language_model
        self.layers = self.text_model.layers
        self.num_layers = len(self.layers)
        self.image_token_id = int(config.image_token_id)
        video = getattr(config, "video_token_id", None)
        self.video_token_id = int(video) if video is not None else None
        # M-RoPE families merge 2x2 patches into one token; LLaVA-style projectors map one patch to one token
        self.spatial_merge_size = int(getattr(config.vision_config, "spatial_merge_size", None) or 1)
        self.attn_implementation = getattr(self.text_config, "_attn_implementation", None) or "eager"
        self.vlm_args = forward_arg_names(self.vlm)
        self.text_args = forward_arg_names(self.text_model)
        self.validate()

    # ------------------------------------------------------------------ identity and checks
    @classmethod
    def handles(cls, model: torch.nn.Module) -> bool:
        return type(model).__name__ in cls.model_classes + cls.base_model_classes

    def validate(self) -> None:
        """Raise ``ValueError`` for configurations the pruned cache does not support."""
        text = self.text_config
        layer_types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
        if getattr(text, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
            raise ValueError(
                "model: sliding-window attention layers are not supported by PrunableDynamicCache (they assume "
                f"contiguous storage); got layer_types={sorted(set(layer_types))} and "
                f"use_sliding_window={getattr(text, 'use_sliding_window', False)}. "
                f"Load the model with use_sliding_window=False (the {self.family} default)."
            )
        if self.attn_implementation not in self.supported_attention:
            raise ValueError(
                f"model: attn_implementation={self.attn_implementation!r} is not supported by PrunableDynamicCache; "
                f"load the model with attn_implementation in {self.supported_attention}. "
                "(Flash-attention reads 2-D masks from the right and has not been validated on a pruned cache.)"
            )

    # ------------------------------------------------------------------ structure
    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        return tuple(i for i in (self.image_token_id, self.video_token_id) if i is not None)

    def attention(self, layer_idx: int) -> torch.nn.Module:
        return self.layers[layer_idx].self_attn

    def grid_sources(self) -> list[tuple[int, str]]:
        """``(token id, grid keyword)`` per visual kind present in this model."""
        out = []
        for attr, keyword in self.grid_kwargs:
            token_id = getattr(self, attr, None)
            if token_id is not None:
                out.append((token_id, keyword))
        return out

    def visual_blocks(self, input_ids: torch.Tensor, is_visual: torch.Tensor, kwargs: dict):
        """``(B, S)`` index of the image or video each visual token belongs to (budgets apply per block),
        and the merged ``(t, h, w)`` grid of each block index (``None`` when the grids are unusable).

        Placeholders of all rows are consumed in order by the images of ``image_grid_thw`` (then videos of
        ``video_grid_thw``), ``t*h*w/merge**2`` tokens each, as the model's ``masked_scatter`` does. If the
        grids are missing or do not match the placeholder count, contiguous runs of visual tokens are blocks.
        """
        block = torch.full_like(input_ids, -1)
        side = self.spatial_merge_size
        merge = side**2
        offset = 0
        consistent = True
        grids: list[tuple[int, int, int]] = []
        for token_id, grid_name in self.grid_sources():
            is_kind = (input_ids == token_id) & is_visual
            total = int(is_kind.sum())
            if total == 0:
                continue
            grid = kwargs.get(grid_name)
            if grid is None:
                consistent = False
                break
            counts = (grid.prod(-1) // merge).to(input_ids.device)
            if int(counts.sum()) != total:
                consistent = False
                break
            ends = torch.cumsum(counts, 0)
            rank = torch.cumsum(is_kind.flatten().long(), 0).view_as(input_ids) - 1  # running index over all rows
            ids = torch.searchsorted(ends, rank, right=True) + offset
            block = torch.where(is_kind, ids, block)
            offset += counts.numel()
            grids += [(int(t), int(h) // side, int(w) // side) for t, h, w in grid.tolist()]
        if consistent:
            return block, grids
        starts = is_visual.clone()
        starts[:, 1:] &= ~is_visual[:, :-1]
        # numbered over the whole batch (row-major), so that a block index names one block of one row
        runs = torch.cumsum(starts.flatten().long(), dim=0).view_as(input_ids) - 1
        return torch.where(is_visual, runs, torch.full_like(runs, -1)), None

    def default_scoring_layer(self, reference_layer: int | None) -> int | None:
        """A scorer's layer for a 32-layer model (the published setting), scaled to this model's depth."""
        return scaled_layer(reference_layer, self.num_layers)

    def rope_tables(self, attn_module, cos: torch.Tensor, sin: torch.Tensor):
        """``(B, S, head_dim)`` RoPE tables from the ``position_embeddings`` an attention module received."""
        return cos, sin

    # ------------------------------------------------------------------ positions (subclasses)
    def prefill_positions(self, input_ids, kwargs: dict, attention_mask):
        """Positions of a first forward called without ``position_ids`` (``None``: the model's default)."""
        return None

    def continuation_positions(self, deltas, past_logical: int, seq_len: int, attention_mask, device):
        """Positions of ``seq_len`` tokens fed after ``past_logical`` tokens seen, in the family's layout."""
        raise NotImplementedError

    def text_positions(self, deltas, past_logical: int, seq_len: int, attention_mask, device) -> torch.Tensor:
        """``(B, S)`` positions of ``seq_len`` text tokens fed after ``past_logical`` tokens seen, plus each row's
        offset: with a 2-D mask of the logical length the base is the row's count of real tokens (as
        ``generate`` counts), else ``past_logical`` onward (as the model counts without a mask)."""
        batch = deltas.shape[0] if attention_mask is None else attention_mask.shape[0]
        deltas = expand_rope_deltas(deltas, batch).to(device)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
            mask = attention_mask.to(device).long()
            base = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -seq_len:]
        else:
            base = torch.arange(past_logical, past_logical + seq_len, device=device).expand(batch, -1)
        return base + deltas

    def deltas_from_positions(self, position_ids, token_valid, valid_total) -> torch.Tensor:
        """``(B, 1)`` offsets (next position = real tokens seen + delta): the top position of this forward's
        real tokens + 1, minus ``valid_total`` ``(B,)``, the real tokens of the whole sequence so far. Equals
        ``get_rope_index``'s deltas on an M-RoPE prefill; 0 for plain 1-D positions."""
        rows = self.position_rows(position_ids).to(token_valid.device)
        rows = rows if rows.ndim == 3 else rows[None]  # (R, B or 1, S)
        rows = rows.expand(-1, token_valid.shape[0], -1) if rows.shape[1] == 1 else rows
        lowest = torch.iinfo(rows.dtype).min if not rows.is_floating_point() else float("-inf")
        top = rows.masked_fill(~token_valid[None], lowest).amax(dim=(0, 2))
        return (top + 1 - valid_total.to(top.device)).long().unsqueeze(1)

    def grids_from_positions(self, position_ids, block_of: torch.Tensor, is_visual: torch.Tensor):
        """Each visual block's merged ``(t, h, w)`` grid read from the positions, when the grids were not given
        (``None``: unknown)."""
        return None

    def position_rows(self, position_ids: torch.Tensor) -> torch.Tensor:
        """The rotary rows ``(R, B, S)`` of ``position_ids``."""
        return position_ids[None] if position_ids.ndim == 2 else position_ids

    def generation_positions(self, inputs_tensor, model_kwargs: dict, cache):
        """The model's ``_prepare_position_ids_for_generation`` for a pruning cache (no shared state)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ overlays
    def image_views(self, inputs: dict, row: int = 0, image_index: int = 0, image_size=None, image_processor=None):
        """Where image ``image_index`` of batch row ``row`` is in ``input_ids`` and in the picture: a list of views,
        each ``dict(name, grid, newlines, box)``: ``grid`` the ``(rows, cols)`` positions in ``input_ids[row]`` of
        a grid of tokens laid over the part ``box = (x0, y0, x1, y1)`` of the image (fractions of its width and
        height; beyond 0..1 where the processor padded it), ``newlines`` the positions of tokens that end each
        grid row and show no pixels (``None``: none). ``image_size`` (width, height) and ``image_processor`` tell
        families that crop or pad which part is seen. Qwen-VL: one grid (``image_grid_thw``) over the whole image."""
        from ..visualize import token_grid

        grid = token_grid(inputs["input_ids"], inputs["image_grid_thw"], self.image_token_id, row=row,
                          image_index=image_index, merge_size=self.spatial_merge_size)
        return [dict(name="image", grid=grid, newlines=None, box=(0.0, 0.0, 1.0, 1.0))]

    # ------------------------------------------------------------------ per-token extras
    def install(self) -> list:
        """Family-specific hooks or wrappers (returned as objects with ``remove()``); none by default."""
        return []

    def set_active_layout(self, layout: dict | None) -> None:
        """The in-prefill layout of the forward in progress changed (``None``: no cut in progress). Families
        with per-token features beyond the hidden states (DeepStack) follow it; a no-op by default."""

    # ------------------------------------------------------------------ pre-LLM pruning
    def gather_positions(self, position_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The position ids of the kept slots ``index`` ``(B, K)``: every leading row (M-RoPE's text and 3-D rows,
        or none for 1-D positions) gathered along the sequence axis; a batch axis of 1 is expanded first."""
        lead = position_ids.shape[:-2]
        batch = index.shape[0]
        if position_ids.ndim == 1:
            position_ids = position_ids[None]
            lead = ()
        rows = position_ids.expand(*lead, batch, position_ids.shape[-1])
        return rows.gather(-1, index.expand(*lead, *index.shape))

    def cut_text_inputs(self, kwargs: dict, index: torch.Tensor, valid: torch.Tensor) -> dict:
        """The text model's per-token keyword inputs beyond embeddings, positions and mask, cut to the kept slots
        ``index``/``valid`` ``(B, K)`` of a pre-LLM cut; none by default."""
        return kwargs
