"""Draw which visual tokens a :class:`~sparse_cache.PrunableDynamicCache` kept, on the image itself.

A Qwen-VL model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) turns an image into a grid of square patches (``14 x 14``
pixels for Qwen2/2.5-VL, ``16 x 16`` for Qwen3-VL: ``vision_config.patch_size``; ``image_grid_thw`` = (t, h, w)
in patches) and merges every ``m x m`` block of patches into one visual token (``m`` =
``vision_config.spatial_merge_size``, 2 for all of them), so an image holds ``t * h * w / m**2`` tokens laid
out row-major on an ``(h / m) x (w / m)`` grid per temporal slice. Nothing here depends on the patch's pixel
size: the grid is in patches and is stretched over the picture. The
tokens of the ``k``-th image are the ``k``-th run of ``<|image_pad|>`` placeholders (images consume
placeholders in order, across the rows of a batch); videos do the same with ``<|video_pad|>`` and
``video_grid_thw``. :func:`token_grid` recovers, for one image (or one temporal slice of a video), the
position in ``input_ids`` of the token at every grid cell; :func:`kept_overlay` and
:func:`score_heatmap` paint that grid over the picture::

    from sparse_cache.visualize import kept_overlay
    overlay = kept_overlay(image, cache.kept_visual_positions[0], inputs["input_ids"],
                           inputs["image_grid_thw"], model.config.image_token_id,
                           merge_size=model.config.vision_config.spatial_merge_size)
    overlay.save("kept.png")

The grid is stretched over the pixel size of the image you pass, so the original picture can be used
rather than the processor's resized copy (the Qwen2-VL processor resizes the whole image, no crop or
padding, so the mapping is a plain per-axis scaling).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["token_grid", "kept_mask", "kept_overlay", "score_heatmap", "views_overlay", "views_heatmap"]

RGB = tuple[int, int, int]

# Fallback colour ramp (dark blue -> purple -> orange -> yellow) when matplotlib is not installed.
_FALLBACK_RAMP = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64
)


# --------------------------------------------------------------------------- grid of positions


def _as_long_tensor(value, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.long)
    try:
        return torch.as_tensor(np.asarray(value), dtype=torch.long)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: expected a tensor or a sequence of ints, got {type(value).__name__}") from exc


def token_grid(
    input_ids,
    grid_thw,
    token_id: int,
    *,
    row: int = 0,
    image_index: int = 0,
    frame: int = 0,
    merge_size: int = 2,
) -> torch.Tensor:
    """Positions in ``input_ids`` of one image's visual tokens, as a ``(h / merge, w / merge)`` grid.

    Args:
        input_ids: the ``input_ids`` given to ``generate``: the whole ``(batch, seq)`` tensor (then
            ``row`` picks the row), or one row ``(seq,)`` whose own images are all of ``grid_thw``.
        grid_thw: ``image_grid_thw`` (or ``video_grid_thw``) of the same call, ``(num_images, 3)``.
        token_id: the placeholder id of that kind, ``model.config.image_token_id`` (or
            ``video_token_id`` with ``video_grid_thw``).
        row: batch row, when ``input_ids`` is 2-D.
        image_index: which image (or video) of the row, counted from 0 in placeholder order.
        frame: temporal index in the grid (``0 <= frame < t``). For a video, slice ``frame`` covers
            ``temporal_patch_size`` (2 for Qwen2.5-VL) consecutive frames of the clip; images have one.
        merge_size: side of the patch block merged into one token (``config.vision_config.spatial_merge_size``).

    Returns:
        A ``LongTensor`` of shape ``(h / merge, w / merge)``, row-major as the image.
    """
    ids = _as_long_tensor(input_ids, "input_ids")
    grids = _as_long_tensor(grid_thw, "grid_thw")
    if grids.ndim == 1:
        grids = grids[None]
    if grids.ndim != 2 or grids.shape[-1] != 3:
        raise ValueError(f"grid_thw: expected shape (num_images, 3), got {tuple(grids.shape)}")
    if merge_size < 1:
        raise ValueError(f"merge_size: expected a positive int, got {merge_size}")
    one_row = ids.ndim == 1
    if ids.ndim == 2:
        if not 0 <= row < ids.shape[0]:
            raise IndexError(f"row: {row} is outside the batch of {ids.shape[0]} rows")
        tokens_before = int((ids[:row] == token_id).sum())  # placeholders consumed by earlier rows
        ids = ids[row]
    elif one_row:
        tokens_before = 0
    else:
        raise ValueError(f"input_ids: expected a (batch, seq) or (seq,) tensor, got shape {tuple(ids.shape)}")
    positions = torch.nonzero(ids == token_id, as_tuple=False).flatten()
    if positions.numel() == 0:
        raise ValueError(f"input_ids: the row holds no token with id {token_id} (token_id)")

    t, h, w = (grids[:, i] for i in range(3))
    if bool(((h % merge_size) != 0).any() or ((w % merge_size) != 0).any()):
        raise ValueError(
            f"grid_thw: heights and widths must be multiples of merge_size={merge_size}, got {grids.tolist()}"
        )
    counts = (t * h * w) // merge_size**2
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    row_end = tokens_before + positions.numel()
    # The row's images are the grids whose token runs start at tokens_before and end at row_end exactly.
    first = int(torch.searchsorted(starts, torch.tensor(tokens_before)))
    last = int(torch.searchsorted(ends, torch.tensor(row_end)))
    if first >= len(counts) or int(starts[first]) != tokens_before or last >= len(counts) or int(ends[last]) != row_end:
        hint = " Pass the whole batch's input_ids with row=..., or this row's grids only." if one_row else ""
        raise ValueError(
            f"grid_thw: the grids {grids.tolist()} (tokens {counts.tolist()}) do not cover the row's "
            f"{positions.numel()} tokens with id {token_id} (after {tokens_before} in earlier rows) in whole "
            f"images.{hint}"
        )
    images_in_row = last - first + 1
    if not 0 <= image_index < images_in_row:
        raise IndexError(f"image_index: {image_index} is outside the row's {images_in_row} image(s) of this kind")
    k = first + image_index
    gt, gh, gw = int(t[k]), int(h[k]) // merge_size, int(w[k]) // merge_size
    if not 0 <= frame < gt:
        raise IndexError(f"frame: {frame} is outside the grid's {gt} temporal slice(s)")
    local_start = int(starts[k]) - tokens_before + frame * gh * gw
    return positions[local_start : local_start + gh * gw].view(gh, gw)


def kept_mask(kept_positions, grid: torch.Tensor) -> torch.Tensor:
    """``(rows, cols)`` bool: which cells of a :func:`token_grid` are among ``kept_positions``."""
    kept = _as_long_tensor(kept_positions, "kept_positions").flatten()
    return torch.isin(grid, kept)


# --------------------------------------------------------------------------- pixels


def _to_rgb_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"image: expected a PIL image or an (H, W, 3) array, got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"image: an array must be uint8, got {array.dtype}")
    return array[..., :3]


def _cell_of_pixels(size: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell index of every pixel along one axis, and the ``cells + 1`` pixel bounds of the cells."""
    if size < cells:
        raise ValueError(f"image: {size} pixels cannot show {cells} token cells; pass a larger image")
    bounds = np.rint(np.arange(cells + 1) * size / cells).astype(np.int64)
    return np.searchsorted(bounds, np.arange(size), side="right") - 1, bounds


def _cell_maps(height: int, width: int, rows: int, cols: int):
    ys, y_bounds = _cell_of_pixels(height, rows)
    xs, x_bounds = _cell_of_pixels(width, cols)
    return ys, xs, y_bounds, x_bounds


def _border_pixels(height, width, ys, xs, y_bounds, x_bounds, cells: np.ndarray, line_width: int) -> np.ndarray:
    """``(H, W)`` bool: the ``line_width`` innermost-border pixels of every selected cell."""
    dy = np.minimum(np.arange(height) - y_bounds[ys], y_bounds[ys + 1] - 1 - np.arange(height))
    dx = np.minimum(np.arange(width) - x_bounds[xs], x_bounds[xs + 1] - 1 - np.arange(width))
    on_border = (dy[:, None] < line_width) | (dx[None, :] < line_width)
    return on_border & cells[ys[:, None], xs[None, :]]


def _auto_line_width(height: int, width: int, rows: int, cols: int) -> int:
    return max(1, min(height // rows, width // cols) // 16)


def _parse_colour(colour, name: str) -> np.ndarray:
    array = np.asarray(colour)
    if array.shape != (3,) or not np.all((array >= 0) & (array <= 255)):
        raise ValueError(f"{name}: expected an (r, g, b) triple of ints in 0..255, got {colour!r}")
    return array.astype(np.uint8)


def kept_overlay(
    image,
    kept_positions,
    input_ids,
    grid_thw,
    token_id: int,
    *,
    row: int = 0,
    image_index: int = 0,
    frame: int = 0,
    merge_size: int = 2,
    dim: float = 0.35,
    outline: RGB | None = (255, 0, 0),
    line_width: int | None = None,
) -> Image.Image:
    """The image with its pruned token cells dimmed and its kept ones outlined.

    Args:
        image: the picture (PIL image or ``(H, W, 3)`` uint8 array), original or processor-resized: the
            token grid is stretched over its pixel size. For a video, pass the frame to draw on.
        kept_positions: positions kept in that row, e.g. ``cache.kept_visual_positions[row]``.
        input_ids, grid_thw, token_id, row, image_index, frame, merge_size: which image, as in
            :func:`token_grid`.
        dim: brightness factor of pruned cells, in ``[0, 1]`` (0 = black, 1 = unchanged).
        outline: colour of the border drawn inside every kept cell, or ``None`` for no border.
        line_width: border width in pixels; default about 1/16 of a cell (at least 1).

    Returns:
        A new RGB ``PIL.Image`` of the same size as ``image``. Inside a kept cell (away from its border)
        the pixels are unchanged; a pruned cell's pixels are ``round(dim * value)``.
    """
    if not 0.0 <= float(dim) <= 1.0:
        raise ValueError(f"dim: expected a brightness factor in [0, 1], got {dim}")
    grid = token_grid(
        input_ids, grid_thw, token_id, row=row, image_index=image_index, frame=frame, merge_size=merge_size
    )
    kept = kept_mask(kept_positions, grid).numpy()
    pixels = _to_rgb_array(image)
    height, width = pixels.shape[:2]
    rows, cols = kept.shape
    ys, xs, y_bounds, x_bounds = _cell_maps(height, width, rows, cols)
    pixel_kept = kept[ys[:, None], xs[None, :]]
    dimmed = np.rint(pixels.astype(np.float64) * float(dim)).astype(np.uint8)
    out = np.where(pixel_kept[..., None], pixels, dimmed)
    if outline is not None:
        colour = _parse_colour(outline, "outline")
        width_px = line_width if line_width is not None else _auto_line_width(height, width, rows, cols)
        if width_px < 1:
            raise ValueError(f"line_width: expected a positive int, got {line_width}")
        out[_border_pixels(height, width, ys, xs, y_bounds, x_bounds, kept, width_px)] = colour
    logger.debug("overlay: %d of %d cells kept on a %dx%d grid", int(kept.sum()), kept.size, rows, cols)
    return Image.fromarray(np.ascontiguousarray(out), mode="RGB")


def _colour_map(cmap) -> Callable[[np.ndarray], np.ndarray]:
    """``values in [0, 1] -> (..., 3)`` uint8 colours from a matplotlib name, a callable, or the fallback."""
    if callable(cmap):
        return lambda v: np.asarray(cmap(v))[..., :3]
    try:
        import matplotlib

        table = matplotlib.colormaps[cmap]
    except ImportError:
        logger.debug("matplotlib is not installed; using the built-in colour ramp instead of %r", cmap)
        positions = np.linspace(0.0, 1.0, len(_FALLBACK_RAMP))
        return lambda v: np.stack(
            [np.interp(v, positions, _FALLBACK_RAMP[:, c]) for c in range(3)], axis=-1
        ) / 255.0
    except KeyError as exc:
        raise ValueError(f"cmap: unknown matplotlib colour map {cmap!r}") from exc
    return lambda v: np.asarray(table(v))[..., :3]


def score_heatmap(
    image,
    scores,
    input_ids,
    grid_thw,
    token_id: int,
    *,
    row: int = 0,
    image_index: int = 0,
    frame: int = 0,
    merge_size: int = 2,
    scored_token_ids: Sequence[int] | None = None,
    kept_positions=None,
    alpha: float = 0.6,
    cmap="inferno",
    vmin: float | None = None,
    vmax: float | None = None,
    scale: str = "robust",
    colorbar: bool = False,
    outline: RGB | None = (255, 255, 255),
    line_width: int | None = None,
) -> Image.Image:
    """The image blended with a heat map of the visual-token scores (optionally outlining kept cells).

    Args:
        image: as in :func:`kept_overlay`.
        scores: one score per visual token of the row, in position order, e.g. ``cache.visual_scores[row]``.
        input_ids, grid_thw, token_id, row, image_index, frame, merge_size: which image, as in
            :func:`token_grid`.
        scored_token_ids: the placeholder ids whose positions ``scores`` follows; default ``(token_id,)``.
            For a row that mixes images and videos, ``cache.visual_scores`` covers both kinds: pass
            ``(config.image_token_id, config.video_token_id)``.
        kept_positions: if given, the kept cells get an ``outline`` border.
        alpha: opacity of the heat map in ``[0, 1]``.
        cmap: matplotlib colour-map name or a callable ``values in [0, 1] -> RGB(A) floats`` (a built-in
            ramp replaces the name when matplotlib is not installed).
        vmin, vmax: score range mapped to the ends of the colour map (scores outside are clipped); default
            from ``scale``. Cells with a NaN score (the scorer could not rate them) are left uncoloured.
        scale: how the default range is set: ``"robust"`` (default) the 5th to 95th percentile of the image's
            finite scores, so that one outlier (attention scores often have one) does not make every other
            cell look alike; ``"minmax"`` their min and max.
        colorbar: append a colour bar with the score range on the right (the picture then is wider than
            ``image``; the heat map part keeps its size).

    Returns:
        A new RGB ``PIL.Image`` of the same size as ``image`` (wider with ``colorbar``); its ``info`` holds
        the range used, ``info["vmin"]`` and ``info["vmax"]``.
    """
    if scale not in SCALES:
        raise ValueError(f"scale: expected one of {SCALES}, got {scale!r}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha: expected an opacity in [0, 1], got {alpha}")
    grid = token_grid(
        input_ids, grid_thw, token_id, row=row, image_index=image_index, frame=frame, merge_size=merge_size
    )
    ids = _as_long_tensor(input_ids, "input_ids")
    if ids.ndim == 2:
        ids = ids[row]
    scored_ids = torch.tensor(list(scored_token_ids) if scored_token_ids is not None else [token_id])
    scored_positions = torch.nonzero(torch.isin(ids, scored_ids), as_tuple=False).flatten()
    values = scores.detach().float().cpu() if isinstance(scores, torch.Tensor) else torch.as_tensor(scores).float()
    values = values.flatten()
    if values.numel() != scored_positions.numel():
        raise ValueError(
            f"scores: got {values.numel()} values but the row has {scored_positions.numel()} tokens with id(s) "
            f"{scored_ids.tolist()}; for a row that mixes images and videos pass "
            "scored_token_ids=(image_token_id, video_token_id)"
        )
    lookup = torch.full((ids.numel(),), float("nan"))
    lookup[scored_positions] = values
    cell_scores = lookup[grid].numpy().astype(np.float64)
    finite = np.isfinite(cell_scores)
    low, high = _score_range(cell_scores[finite], scale)
    low = float(vmin) if vmin is not None else low
    high = float(vmax) if vmax is not None else high
    span = high - low
    normalised = np.where(finite, (cell_scores - low) / span if span > 0 else 1.0, 0.0)
    normalised = np.clip(normalised, 0.0, 1.0)
    colours = np.clip(np.rint(_colour_map(cmap)(normalised) * 255.0), 0, 255)  # (rows, cols, 3)

    pixels = _to_rgb_array(image)
    height, width = pixels.shape[:2]
    rows, cols = grid.shape
    ys, xs, y_bounds, x_bounds = _cell_maps(height, width, rows, cols)
    pixel_colour = colours[ys[:, None], xs[None, :]]
    pixel_alpha = np.where(finite[ys[:, None], xs[None, :]], float(alpha), 0.0)[..., None]
    out = np.rint(pixels * (1.0 - pixel_alpha) + pixel_colour * pixel_alpha).astype(np.uint8)
    if kept_positions is not None and outline is not None:
        kept = kept_mask(kept_positions, grid).numpy()
        colour = _parse_colour(outline, "outline")
        width_px = line_width if line_width is not None else _auto_line_width(height, width, rows, cols)
        out[_border_pixels(height, width, ys, xs, y_bounds, x_bounds, kept, width_px)] = colour
    picture = Image.fromarray(np.ascontiguousarray(out), mode="RGB")
    if colorbar:
        finite_scores = cell_scores[finite]
        picture = _with_colorbar(
            picture, _colour_map(cmap), low, high,
            clipped_low=bool(finite_scores.size and finite_scores.min() < low),
            clipped_high=bool(finite_scores.size and finite_scores.max() > high),
        )
    picture.info["vmin"], picture.info["vmax"] = low, high
    return picture


#: the ways :func:`score_heatmap` sets its default score range
SCALES = ("robust", "minmax")
ROBUST_PERCENTILES = (5.0, 95.0)


def _score_range(finite_scores: np.ndarray, scale: str) -> tuple[float, float]:
    if finite_scores.size == 0:
        return 0.0, 1.0
    if scale == "robust":
        # scores that occur (no interpolation towards an outlier): with 16 cells, the 95th percentile is the 2nd largest
        low = np.percentile(finite_scores, ROBUST_PERCENTILES[0], method="higher")
        high = np.percentile(finite_scores, ROBUST_PERCENTILES[1], method="lower")
        if high > low:
            return float(low), float(high)
    return float(finite_scores.min()), float(finite_scores.max())


def _format_score(value: float) -> str:
    return f"{value:.3g}"


def _with_colorbar(picture: Image.Image, colour_map, low: float, high: float, *, clipped_low: bool,
                   clipped_high: bool) -> Image.Image:
    """``picture`` with a vertical colour bar (``high`` at the top) and its range written next to it."""
    from PIL import ImageDraw, ImageFont

    height = picture.height
    font = ImageFont.load_default()
    labels = [(">= " if clipped_high else "") + _format_score(high), _format_score((low + high) / 2),
              ("<= " if clipped_low else "") + _format_score(low)]
    draw_probe = ImageDraw.Draw(picture)
    text_width = max(int(draw_probe.textlength(label, font=font)) for label in [*labels, "score"])
    bar_width, margin = max(10, height // 20), max(4, height // 60)
    canvas = Image.new("RGB", (picture.width + 3 * margin + bar_width + text_width, height), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    top, bottom = margin + 12, height - margin
    ramp = np.linspace(1.0, 0.0, max(1, bottom - top))
    column = np.clip(np.rint(colour_map(ramp) * 255.0), 0, 255).astype(np.uint8)  # (n, 3)
    bar = np.repeat(column[:, None, :], bar_width, axis=1)
    left = picture.width + margin
    canvas.paste(Image.fromarray(np.ascontiguousarray(bar), mode="RGB"), (left, top))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([left - 1, top - 1, left + bar_width, bottom], outline=(0, 0, 0))
    draw.text((left, 0), "score", fill=(0, 0, 0), font=font)
    text_x = left + bar_width + margin
    for label, y in zip(labels, (top, (top + bottom) // 2, bottom)):
        draw.line([left + bar_width, y, left + bar_width + margin // 2, y], fill=(0, 0, 0))
        draw.text((text_x, min(max(0, y - 6), height - 12)), label, fill=(0, 0, 0), font=font)
    return canvas


# --------------------------------------------------------------------------- several views (anyres layouts)
#
# An anyres image is shown to the model twice: a base tile (the whole image squeezed to one tile) and the tile map
# of its high-resolution tiles, each map row followed by a learned newline token that shows no pixels; a fixed-size
# CLIP-style image is one square grid over a centre crop (or the image padded to a square). The model adapter
# says where each view's tokens are (``adapter.image_views(inputs, image_size=..., image_processor=...)``, a list
# of ``dict(name, grid, newlines, box)``); the functions below draw every view side by side, the newline tokens
# as a narrow column right of their grid (one cell per grid row).

_VIEW_GAP = 8  # white pixels between views
_MIN_CELL = 8  # a view is upscaled so that a token cell is at least this many pixels


def _view_pixels(image, box, rows: int, cols: int) -> np.ndarray:
    """The part ``box`` (fractions, may extend past the image: black there) of ``image``, at least ``_MIN_CELL``
    pixels per cell."""
    picture = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(_to_rgb_array(image))
    width, height = picture.size
    x0, y0, x1, y1 = (float(v) for v in box)
    crop = picture.crop((round(x0 * width), round(y0 * height), round(x1 * width), round(y1 * height)))
    scale = max(1.0, _MIN_CELL * rows / max(1, crop.height), _MIN_CELL * cols / max(1, crop.width))
    if scale > 1.0:
        crop = crop.resize((int(np.ceil(crop.width * scale)), int(np.ceil(crop.height * scale))),
                           Image.Resampling.NEAREST)
    return np.asarray(crop).copy()


def _newline_strip(height: int, rows: int, values: np.ndarray, kept: np.ndarray | None, outline, line_width):
    """``(height, w, 3)`` column of ``rows`` cells coloured ``values`` ``(rows, 3)``, kept ones outlined."""
    strip_width = max(6, height // max(1, rows) // 2)
    ys, y_bounds = _cell_of_pixels(height, rows)
    out = np.repeat(values[ys][:, None, :], strip_width, axis=1).astype(np.uint8)
    if kept is not None and outline is not None:
        xs, x_bounds = _cell_of_pixels(strip_width, 1)
        width_px = line_width or max(1, min(height // rows, strip_width) // 8)
        out[_border_pixels(height, strip_width, ys, xs, y_bounds, x_bounds, kept[:, None], width_px)] = outline
    return out


def _side_by_side(panels: list[np.ndarray]) -> Image.Image:
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + _VIEW_GAP * (len(panels) - 1)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    x = 0
    for panel in panels:
        canvas[: panel.shape[0], x : x + panel.shape[1]] = panel
        x += panel.shape[1] + _VIEW_GAP
    return Image.fromarray(canvas, mode="RGB")


def _dim_and_outline(pixels: np.ndarray, kept: np.ndarray, dim: float, outline, line_width) -> np.ndarray:
    height, width = pixels.shape[:2]
    rows, cols = kept.shape
    ys, xs, y_bounds, x_bounds = _cell_maps(height, width, rows, cols)
    dimmed = np.rint(pixels.astype(np.float64) * float(dim)).astype(np.uint8)
    out = np.where(kept[ys[:, None], xs[None, :]][..., None], pixels, dimmed)
    if outline is not None:
        width_px = line_width if line_width is not None else _auto_line_width(height, width, rows, cols)
        out[_border_pixels(height, width, ys, xs, y_bounds, x_bounds, kept, width_px)] = outline
    return out


def views_overlay(
    image,
    views: Sequence[dict],
    kept_positions,
    *,
    dim: float = 0.35,
    outline: RGB | None = (255, 0, 0),
    line_width: int | None = None,
    newline_colour: RGB = (230, 230, 230),
) -> Image.Image:
    """Every view of an image (see :meth:`sparse_cache.models.base.VLMAdapter.image_views`) side by side, pruned
    cells dimmed by ``dim`` and kept ones outlined, as :func:`kept_overlay` does for one grid; a view's newline
    tokens are a column of ``newline_colour`` cells right of it (dimmed when pruned, outlined when kept)."""
    if not 0.0 <= float(dim) <= 1.0:
        raise ValueError(f"dim: expected a brightness factor in [0, 1], got {dim}")
    if not views:
        raise ValueError("views: expected at least one view")
    colour = None if outline is None else _parse_colour(outline, "outline")
    base_colour = _parse_colour(newline_colour, "newline_colour").astype(np.float64)
    panels = []
    for view in views:
        grid = _as_long_tensor(view["grid"], "grid")
        kept = kept_mask(kept_positions, grid).numpy()
        pixels = _view_pixels(image, view["box"], *kept.shape)
        panel = _dim_and_outline(pixels, kept, dim, colour, line_width)
        if view.get("newlines") is not None:
            newlines = _as_long_tensor(view["newlines"], "newlines").flatten()
            kept_newline = kept_mask(kept_positions, newlines).numpy()
            values = np.where(kept_newline[:, None], base_colour, np.rint(base_colour * float(dim)))
            strip = _newline_strip(panel.shape[0], newlines.numel(), values, kept_newline, colour, line_width)
            panel = np.concatenate([panel, strip], axis=1)
        panels.append(panel)
    return _side_by_side(panels)


def views_heatmap(
    image,
    views: Sequence[dict],
    scores,
    scored_positions,
    *,
    kept_positions=None,
    alpha: float = 0.6,
    cmap="inferno",
    scale: str = "robust",
    colorbar: bool = False,
    outline: RGB | None = (255, 255, 255),
    line_width: int | None = None,
) -> Image.Image:
    """Every view side by side with a heat map of the token scores (one range over all views), as
    :func:`score_heatmap` does for one grid; newline tokens are a column of their own score colours.
    ``scores[i]`` is the score of the token at ``scored_positions[i]`` (``cache.visual_scores[row]`` and the row's
    visual-token positions)."""
    if scale not in SCALES:
        raise ValueError(f"scale: expected one of {SCALES}, got {scale!r}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha: expected an opacity in [0, 1], got {alpha}")
    positions = _as_long_tensor(scored_positions, "scored_positions").flatten()
    values = scores.detach().float().cpu().flatten() if isinstance(scores, torch.Tensor) else torch.as_tensor(
        scores, dtype=torch.float32).flatten()
    if values.numel() != positions.numel():
        raise ValueError(f"scores: got {values.numel()} values for {positions.numel()} scored positions")
    lookup = torch.full((int(positions.max()) + 2 if positions.numel() else 1,), float("nan"))
    lookup[positions] = values

    def cell_scores(index: torch.Tensor) -> np.ndarray:
        index = _as_long_tensor(index, "grid").clamp(max=lookup.numel() - 1)
        return lookup[index].numpy().astype(np.float64)

    all_scores = [cell_scores(v["grid"]).ravel() for v in views]
    all_scores += [cell_scores(v["newlines"]).ravel() for v in views if v.get("newlines") is not None]
    joined = np.concatenate(all_scores) if all_scores else np.zeros(0)
    low, high = _score_range(joined[np.isfinite(joined)], scale)
    colour_map = _colour_map(cmap)
    colour = None if outline is None else _parse_colour(outline, "outline")

    def colours_of(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        finite = np.isfinite(values)
        span = high - low
        normalised = np.clip(np.where(finite, (values - low) / span if span > 0 else 1.0, 0.0), 0.0, 1.0)
        return np.clip(np.rint(colour_map(normalised) * 255.0), 0, 255), finite

    panels = []
    for view in views:
        grid = _as_long_tensor(view["grid"], "grid")
        pixels = _view_pixels(image, view["box"], *grid.shape).astype(np.float64)
        height, width = pixels.shape[:2]
        ys, xs, y_bounds, x_bounds = _cell_maps(height, width, *grid.shape)
        colours, finite = colours_of(cell_scores(grid))
        pixel_alpha = np.where(finite[ys[:, None], xs[None, :]], float(alpha), 0.0)[..., None]
        panel = np.rint(pixels * (1.0 - pixel_alpha) + colours[ys[:, None], xs[None, :]] * pixel_alpha).astype(np.uint8)
        if kept_positions is not None and colour is not None:
            kept = kept_mask(kept_positions, grid).numpy()
            width_px = line_width if line_width is not None else _auto_line_width(height, width, *grid.shape)
            panel[_border_pixels(height, width, ys, xs, y_bounds, x_bounds, kept, width_px)] = colour
        if view.get("newlines") is not None:
            newlines = _as_long_tensor(view["newlines"], "newlines").flatten()
            line_colours, _ = colours_of(cell_scores(newlines))
            kept_newline = None if kept_positions is None else kept_mask(kept_positions, newlines).numpy()
            strip = _newline_strip(height, newlines.numel(), line_colours, kept_newline, colour, line_width)
            panel = np.concatenate([panel, strip], axis=1)
        panels.append(panel)
    picture = _side_by_side(panels)
    if colorbar:
        finite_scores = joined[np.isfinite(joined)]
        picture = _with_colorbar(picture, colour_map, low, high,
                                 clipped_low=bool(finite_scores.size and finite_scores.min() < low),
                                 clipped_high=bool(finite_scores.size and finite_scores.max() > high))
    picture.info["vmin"], picture.info["vmax"] = low, high
    return picture
