"""sparse_cache.visualize: token grids and pixel checks of the overlay and the heat map."""

import numpy as np
import pytest
import torch
from PIL import Image

from sparse_cache import testing
from sparse_cache.visualize import kept_overlay, score_heatmap, token_grid

DIM = 0.5
RED = (255, 0, 0)


@pytest.fixture(scope="module")
def ids(processor):
    cfg = testing.tiny_qwen2_5_vl_config()
    return cfg.image_token_id, cfg.video_token_id


def noise_image(width, height, seed=0):
    """Bright random pixels (so that dimming is visible and no pixel equals the outline colour)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(60, 250, size=(height, width, 3), dtype=np.uint8), mode="RGB")


def cell_box(r, c, rows, cols, width, height):
    """(y0, y1, x0, x1) of a token cell on an image of that size: the grid stretched per axis."""
    return (
        round(r * height / rows),
        round((r + 1) * height / rows),
        round(c * width / cols),
        round((c + 1) * width / cols),
    )


def check_cells(original, overlay, rows, cols, kept_cells, line=1, outline=RED, dim=DIM):
    """Kept cells: original inside, outline on the border; pruned cells: dimmed by ``dim`` everywhere."""
    src = np.asarray(original).astype(np.int64)
    out = np.asarray(overlay).astype(np.int64)
    assert out.shape == src.shape
    height, width = src.shape[:2]
    for r in range(rows):
        for c in range(cols):
            y0, y1, x0, x1 = cell_box(r, c, rows, cols, width, height)
            cell_src, cell_out = src[y0:y1, x0:x1], out[y0:y1, x0:x1]
            if (r, c) in kept_cells:
                np.testing.assert_array_equal(cell_out[line:-line, line:-line], cell_src[line:-line, line:-line])
                for edge in (cell_out[:line], cell_out[-line:], cell_out[:, :line], cell_out[:, -line:]):
                    assert (edge == np.array(outline)).all(), f"cell {(r, c)}: border is not the outline colour"
            else:
                np.testing.assert_array_equal(cell_out, np.rint(cell_src * dim).astype(np.int64))


def image_positions(inputs, token_id, row=0):
    return torch.nonzero(inputs["input_ids"][row] == token_id).flatten()


# --------------------------------------------------------------------------- token grid conventions


def test_token_grid_matches_processor_patch_order(processor, ids):
    """A lone white 28x28 block lands in the pixel_values of the token token_grid puts at that cell."""
    array = np.zeros((168, 224, 3), dtype=np.uint8)  # 6 x 8 cells of 28 px, no resize
    r, c = 2, 5
    array[r * 28 : (r + 1) * 28, c * 28 : (c + 1) * 28] = 255
    inputs = testing.make_inputs(processor, ["count the objects."], [[Image.fromarray(array)]])
    assert inputs["image_grid_thw"].tolist() == [[1, 12, 16]]
    grid = token_grid(inputs["input_ids"], inputs["image_grid_thw"], ids[0])
    assert grid.shape == (6, 8)
    positions = image_positions(inputs, ids[0])
    assert torch.equal(grid.flatten(), positions)
    # pixel_values hold 4 patches (2x2 merge) per token, in token order
    brightness = inputs["pixel_values"].view(-1, 4, inputs["pixel_values"].shape[-1]).mean(dim=(1, 2))
    brightest_token = int(brightness.argmax())
    assert int(positions[brightest_token]) == int(grid[r, c])


# --------------------------------------------------------------------------- kept_overlay


def test_overlay_one_image(processor, ids):
    image = noise_image(112, 112)
    inputs = testing.make_inputs(processor, ["what is in the picture?"], [[image]])
    positions = image_positions(inputs, ids[0])  # 16 tokens on a 4 x 4 grid
    kept = positions[[0, 5, 15]]
    overlay = kept_overlay(image, kept, inputs["input_ids"], inputs["image_grid_thw"], ids[0], dim=DIM, line_width=2)
    assert overlay.size == image.size and overlay.mode == "RGB"
    check_cells(image, overlay, 4, 4, {(0, 0), (1, 1), (3, 3)}, line=2)


def test_overlay_maps_grid_onto_the_original_size(processor, ids):
    """The processor resizes 300x200 to 252x168 (9 x 6 cells); the overlay is drawn on the 300x200 original."""
    image = noise_image(300, 200, seed=1)
    inputs = testing.make_inputs(processor, ["describe the image."], [[image]])
    assert inputs["image_grid_thw"].tolist() == [[1, 12, 18]]
    positions = image_positions(inputs, ids[0])
    kept = positions[[0, 13, 53]]  # cells (0, 0), (1, 4), (5, 8)
    overlay = kept_overlay(image, kept.tolist(), inputs["input_ids"][0], inputs["image_grid_thw"], ids[0], dim=DIM)
    assert overlay.size == (300, 200)
    check_cells(image, overlay, 6, 9, {(0, 0), (1, 4), (5, 8)}, line=2)  # auto width: 33 // 16 = 2


def test_overlay_two_images_in_a_row(processor, ids):
    first, second = noise_image(112, 112, seed=2), noise_image(224, 168, seed=3)
    inputs = testing.make_inputs(processor, ["which object is the largest?"], [[first, second]])
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8], [1, 12, 16]]
    positions = image_positions(inputs, ids[0])  # 16 then 48 tokens
    kept = positions[[1, 16 + 0, 16 + 9, 16 + 47]]  # image 0: cell (0, 1); image 1: (0, 0), (1, 1), (5, 7)
    args = (kept, inputs["input_ids"], inputs["image_grid_thw"], ids[0])
    overlay = kept_overlay(second, *args, image_index=1, dim=DIM, line_width=1)
    check_cells(second, overlay, 6, 8, {(0, 0), (1, 1), (5, 7)})
    overlay = kept_overlay(first, *args, image_index=0, dim=DIM, line_width=1)
    check_cells(first, overlay, 4, 4, {(0, 1)})
    with pytest.raises(IndexError, match="image_index"):
        kept_overlay(first, *args, image_index=2)


def test_overlay_second_row_of_a_batch(processor, ids):
    """Images consume placeholders across rows: row 1's image is the second grid of image_grid_thw."""
    images = [noise_image(224, 168, seed=4), noise_image(112, 112, seed=5)]
    inputs = testing.make_inputs(processor, ["count the objects.", "answer yes or no."], [[images[0]], [images[1]]])
    positions = image_positions(inputs, ids[0], row=1)
    kept = positions[[2, 12]]  # cells (0, 2), (3, 0)
    overlay = kept_overlay(images[1], kept, inputs["input_ids"], inputs["image_grid_thw"], ids[0], row=1, dim=DIM,
                           line_width=1)
    check_cells(images[1], overlay, 4, 4, {(0, 2), (3, 0)})
    # one row with the whole batch's grids does not add up: a clear error, not a wrong picture
    with pytest.raises(ValueError, match="row=..."):
        kept_overlay(images[1], kept, inputs["input_ids"][1], inputs["image_grid_thw"], ids[0])


def test_overlay_video_frames(processor, ids):
    frames = [noise_image(112, 112, seed=10 + i) for i in range(4)]
    inputs = testing.make_video_inputs(processor, "what is shown in the video?", frames)
    assert inputs["video_grid_thw"].tolist() == [[2, 8, 8]]  # 2 temporal slices of 4 x 4 tokens
    positions = image_positions(inputs, ids[1])
    kept = positions[[3, 16 + 6, 16 + 9]]  # slice 0: cell (0, 3); slice 1: (1, 2), (2, 1)
    args = (kept, inputs["input_ids"], inputs["video_grid_thw"], ids[1])
    check_cells(frames[2], kept_overlay(frames[2], *args, frame=1, dim=DIM, line_width=1), 4, 4, {(1, 2), (2, 1)})
    check_cells(frames[0], kept_overlay(frames[0], *args, frame=0, dim=DIM, line_width=1), 4, 4, {(0, 3)})
    with pytest.raises(IndexError, match="frame"):
        kept_overlay(frames[0], *args, frame=2)


def test_overlay_options(processor, ids):
    image = noise_image(112, 112)
    inputs = testing.make_inputs(processor, ["what is in the picture?"], [[image]])
    positions = image_positions(inputs, ids[0])
    args = (inputs["input_ids"], inputs["image_grid_thw"], ids[0])
    # nothing dimmed, no outline: the image itself; everything kept with dim 0 and no outline: also
    assert np.array_equal(np.asarray(kept_overlay(image, [], *args, dim=1.0, outline=None)), np.asarray(image))
    assert np.array_equal(np.asarray(kept_overlay(image, positions, *args, dim=0.0, outline=None)), np.asarray(image))
    black = np.asarray(kept_overlay(np.asarray(image), positions[:0], *args, dim=0.0))
    assert not black.any()
    for bad, match in [(dict(dim=1.5), "dim"), (dict(outline=(1, 2)), "outline"), (dict(line_width=0), "line_width")]:
        with pytest.raises(ValueError, match=match):
            kept_overlay(image, positions[:2], *args, **bad)


# --------------------------------------------------------------------------- score_heatmap


def red_blue(values):
    """Colour map for exact checks: 0 -> blue, 1 -> red."""
    values = np.asarray(values, dtype=np.float64)
    return np.stack([values, np.zeros_like(values), 1.0 - values], axis=-1)


def test_heatmap_pixels(processor, ids):
    image = noise_image(112, 112, seed=6)
    inputs = testing.make_inputs(processor, ["what is in the picture?"], [[image]])
    positions = image_positions(inputs, ids[0])
    scores = torch.arange(16, dtype=torch.float32)
    scores[7] = float("nan")  # a token the scorer could not rate stays uncoloured
    args = (inputs["input_ids"], inputs["image_grid_thw"], ids[0])
    heat = np.asarray(score_heatmap(image, scores, *args, alpha=1.0, cmap=red_blue, outline=None))
    src = np.asarray(image)
    for k, expected in [(0, (0, 0, 255)), (15, (255, 0, 0))]:
        y0, y1, x0, x1 = cell_box(k // 4, k % 4, 4, 4, 112, 112)
        assert (heat[y0:y1, x0:x1] == np.array(expected)).all()
    y0, y1, x0, x1 = cell_box(1, 3, 4, 4, 112, 112)
    np.testing.assert_array_equal(heat[y0:y1, x0:x1], src[y0:y1, x0:x1])
    # alpha 0 leaves the image; kept cells get the outline on top of the heat map
    assert np.array_equal(np.asarray(score_heatmap(image, scores, *args, alpha=0.0, outline=None)), src)
    outlined = np.asarray(score_heatmap(image, scores, *args, alpha=1.0, cmap=red_blue, kept_positions=positions[[15]],
                                        outline=(0, 255, 0), line_width=1))
    y0, y1, x0, x1 = cell_box(3, 3, 4, 4, 112, 112)
    assert (outlined[y0, x0:x1] == np.array([0, 255, 0])).all()
    assert (outlined[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1] == np.array([255, 0, 0])).all()
    # a named matplotlib colour map works too
    assert score_heatmap(image, scores, *args, cmap="viridis").size == image.size


def test_heatmap_mixed_images_and_videos(ids):
    """visual_scores covers image and video tokens together: scored_token_ids says which ones."""
    image_id, video_id = ids
    text = 7
    input_ids = torch.tensor([[text] * 3 + [image_id] * 4 + [text] * 2 + [video_id] * 8 + [text] * 3])
    image_grid, video_grid = torch.tensor([[1, 4, 4]]), torch.tensor([[2, 4, 4]])
    scores = torch.arange(12, dtype=torch.float32)  # 4 image tokens, then 8 video tokens
    frame = noise_image(56, 56)
    heat = score_heatmap(frame, scores, input_ids, video_grid, video_id, frame=1, alpha=1.0, cmap=red_blue,
                         scored_token_ids=(image_id, video_id), outline=None)
    grid = token_grid(input_ids, video_grid, video_id, frame=1)
    assert grid.tolist() == [[13, 14], [15, 16]]
    heat = np.asarray(heat)
    assert (heat[:28, :28] == np.array([0, 0, 255])).all()  # score 8: the min of slice 1
    assert (heat[28:, 28:] == np.array([255, 0, 0])).all()  # score 11: the max
    with pytest.raises(ValueError, match="scored_token_ids"):
        score_heatmap(frame, scores, input_ids, video_grid, video_id)
    assert token_grid(input_ids, image_grid, image_id).tolist() == [[3, 4], [5, 6]]


# --------------------------------------------------------------------------- Qwen3-VL: 16-pixel patches


def test_overlay_of_a_pruned_qwen3_vl_call():
    """Qwen3-VL's 16-pixel patches (32 px per merged token): a 160x96 image is a 3 x 5 grid of tokens, and the
    overlay of what a real pruned generate kept dims and outlines exactly those cells."""
    from sparse_cache import PrunableDynamicCache
    from sparse_cache._compat import CACHE_KWARG

    model = testing.tiny_vlm_model("qwen3_vl", seed=0)
    processor = testing.tiny_family_processor("qwen3_vl")
    config = model.config
    assert (config.vision_config.patch_size, config.vision_config.spatial_merge_size) == (16, 2)
    image = noise_image(160, 96, seed=7)
    inputs = testing.make_inputs(processor, ["what is in the picture?"], [[image]])
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 10]]  # patches of 16 px; 14 px would give other counts
    cache = PrunableDynamicCache(model, keep_tokens=4, scorer="random", seed=3)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False, **{CACHE_KWARG: cache})
    positions = image_positions(inputs, config.image_token_id)
    kept = cache.kept_visual_positions[0]
    assert positions.numel() == 15 and kept.numel() == 4  # pruning happened: 4 of 15 kept
    merge = config.vision_config.spatial_merge_size
    grid = token_grid(inputs["input_ids"], inputs["image_grid_thw"], config.image_token_id, merge_size=merge)
    assert grid.shape == (3, 5) and torch.equal(grid.flatten(), positions)
    cells = {(int(i) // 5, int(i) % 5) for i in torch.nonzero(torch.isin(positions, kept)).flatten()}
    assert len(cells) == 4
    overlay = kept_overlay(image, kept, inputs["input_ids"], inputs["image_grid_thw"], config.image_token_id,
                           merge_size=merge, dim=DIM, line_width=1)
    check_cells(image, overlay, 3, 5, cells)


def test_heatmap_scale_is_robust_to_one_outlier_and_has_a_colour_bar(processor, ids):
    """One huge score (attention often has one) must not squash every other cell to the bottom of the map."""
    image = noise_image(112, 112, seed=7)
    inputs = testing.make_inputs(processor, ["what is in the picture?"], [[image]])
    args = (inputs["input_ids"], inputs["image_grid_thw"], ids[0])
    scores = torch.arange(16, dtype=torch.float32)
    scores[15] = 1e6  # the outlier
    robust = score_heatmap(image, scores, *args, alpha=1.0, cmap=red_blue, outline=None)
    minmax = score_heatmap(image, scores, *args, alpha=1.0, cmap=red_blue, outline=None, scale="minmax")
    assert robust.info["vmax"] < 1e6 == minmax.info["vmax"]

    def red_of(picture, k):
        y0, y1, x0, x1 = cell_box(k // 4, k % 4, 4, 4, 112, 112)
        return int(np.asarray(picture)[y0:y1, x0:x1, 0].mean())

    assert red_of(minmax, 14) == 0  # min-max: score 14 looks exactly like score 0
    assert red_of(robust, 14) > 200 and red_of(robust, 1) < 50  # robust: the ranks show
    assert red_of(robust, 15) == 255  # the outlier is clipped to the top colour
    with pytest.raises(ValueError, match="scale"):
        score_heatmap(image, scores, *args, scale="log")
    # the colour bar: the heat map keeps its pixels, a bar with the range is appended on the right
    barred = score_heatmap(image, scores, *args, alpha=1.0, cmap=red_blue, outline=None, colorbar=True)
    assert barred.height == image.height and barred.width > image.width
    assert np.array_equal(np.asarray(barred)[:, :112], np.asarray(robust))
    strip = np.asarray(barred)[:, 112:]
    assert (strip[..., 0] > 200).any() and (strip[..., 2] > 200).any()  # both ends of the ramp are drawn
    assert barred.info["vmin"] == robust.info["vmin"]


# --------------------------------------------------------------------------- LLaVA layouts (views)


def _llava_inputs(family, sizes):
    processor = testing.tiny_family_processor(family)
    images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    return processor, images, testing.make_inputs(processor, ["count the objects."] * len(images),
                                                  [[image] for image in images])


def _embeds_seen_by_the_decoder(model, inputs):
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["embeds"]


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_views_follow_the_models_tile_layout(family):
    """The adapter's views of a LLaVA-NeXT / OneVision image are the model's own packing: the newline positions are
    exactly where the model put its learned ``image_newline`` vector (one per tile-map row), the grids hold every
    other image token once, the base tile first (a 2 x 2-tile map for a 112 x 84 image: 16 + 6 x 8 + 6 = 70)."""
    from sparse_cache.models import adapter_for

    model = testing.tiny_vlm_model(family)
    _, images, inputs = _llava_inputs(family, [(112, 84), (56, 112)])
    embeds = _embeds_seen_by_the_decoder(model, inputs)
    newline = model.model.image_newline.detach()
    adapter = adapter_for(model)
    for row in range(2):
        views = adapter.image_views(inputs, row=row, image_size=images[row].size)
        assert [v["name"] for v in views] == ["base", "tiles"]
        base, tiles = views
        assert base["grid"].shape == (4, 4) and base["newlines"] is None
        assert tiles["newlines"].numel() == tiles["grid"].shape[0]  # one newline per tile-map row
        image_pos = torch.nonzero(inputs["input_ids"][row] == adapter.image_token_id).flatten()
        laid_out = torch.cat([base["grid"].flatten(), torch.cat([tiles["grid"], tiles["newlines"][:, None]], 1).flatten()])
        assert torch.equal(laid_out, image_pos)  # every token once, in the model's order
        is_newline = (embeds[row] == newline).all(-1)
        assert torch.equal(torch.nonzero(is_newline).flatten(), tiles["newlines"])
    assert views[1]["grid"].shape[1] < views[1]["grid"].shape[0]  # the portrait image: a tall, un-padded map
    with pytest.raises(IndexError, match="image_index: 1 is outside the row's 1 image"):
        adapter.image_views(inputs, row=0, image_index=1)


def test_views_overlay_maps_kept_tokens_through_the_tiles():
    """A kept token of the tile map lights its cell in the tile panel (right of the base panel), a kept newline its
    row's cell of the newline column; everything else is dimmed."""
    from sparse_cache.models import adapter_for
    from sparse_cache.visualize import views_overlay

    model = testing.tiny_vlm_model("llava_next")
    _, images, inputs = _llava_inputs("llava_next", [(112, 84)])
    views = adapter_for(model).image_views(inputs, image_size=images[0].size)
    base, tiles = views
    rows, cols = tiles["grid"].shape
    kept = torch.tensor([int(tiles["grid"][1, 2]), int(tiles["newlines"][3])])
    picture = np.asarray(views_overlay(images[0], views, kept, dim=DIM, outline=RED)).astype(np.int64)
    src = np.asarray(images[0]).astype(np.int64)
    height, width = src.shape[:2]
    assert picture.shape[0] == height
    np.testing.assert_array_equal(picture[:, :width], np.rint(src * DIM))  # base panel: nothing kept there
    tile_panel = picture[:, width + 8:width + 8 + width]
    y0, y1, x0, x1 = cell_box(1, 2, rows, cols, width, height)
    np.testing.assert_array_equal(tile_panel[y0 + 1:y1 - 1, x0 + 1:x1 - 1], src[y0 + 1:y1 - 1, x0 + 1:x1 - 1])
    assert (tile_panel[y0, x0:x1] == np.array(RED)).all()
    y0, y1, x0, x1 = cell_box(0, 0, rows, cols, width, height)
    np.testing.assert_array_equal(tile_panel[y0:y1, x0:x1], np.rint(src[y0:y1, x0:x1] * DIM))
    strip = picture[:, width + 8 + width:]
    assert strip.shape[1] >= 6
    kept_row = cell_box(3, 0, rows, 1, 1, height)
    pruned_row = cell_box(0, 0, rows, 1, 1, height)
    assert (strip[kept_row[0]:kept_row[1]] == np.array(RED)).all(-1).any()  # the kept newline is outlined
    assert (strip[pruned_row[0] + 1:pruned_row[1] - 1, 1:-1] == round(230 * DIM)).all()  # a pruned one dimmed


def test_llava_view_is_the_centre_crop_the_processor_keeps():
    """LLaVA-1.5's CLIP processor keeps the centre square of a landscape image: the one view's box says so, and the
    overlay draws its 4 x 4 grid on that square only."""
    from sparse_cache.models import adapter_for
    from sparse_cache.visualize import views_overlay

    model = testing.tiny_vlm_model("llava")
    processor, images, inputs = _llava_inputs("llava", [(112, 56)])
    (view,) = adapter_for(model).image_views(inputs, image_size=images[0].size,
                                             image_processor=processor.image_processor)
    assert view["box"] == (0.25, 0.0, 0.75, 1.0) and view["grid"].shape == (4, 4)
    kept = view["grid"][0, :2].flatten()
    picture = views_overlay(images[0], [view], kept, dim=DIM)
    crop = images[0].crop((28, 0, 84, 56))
    check_cells(crop, picture, 4, 4, {(0, 0), (0, 1)})


def test_views_heatmap_colours_one_range_over_every_view():
    from sparse_cache.models import adapter_for
    from sparse_cache.visualize import views_heatmap

    model = testing.tiny_vlm_model("llava_next")
    _, images, inputs = _llava_inputs("llava_next", [(112, 84)])
    views = adapter_for(model).image_views(inputs, image_size=images[0].size)
    positions = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    scores = torch.arange(positions.numel(), dtype=torch.float32)
    picture = views_heatmap(images[0], views, scores, positions, scale="minmax", colorbar=True)
    assert (picture.info["vmin"], picture.info["vmax"]) == (0.0, float(positions.numel() - 1))
    with pytest.raises(ValueError, match="scores: got 3 values"):
        views_heatmap(images[0], views, scores[:3], positions)
