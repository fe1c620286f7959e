"""One suite over every supported family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, LLaVA-1.5, LLaVA-NeXT,
LLaVA-OneVision, Video-LLaVA), against the oracles.

Tiny random-weight models built offline (``testing.tiny_vlm_model``); Qwen3-VL inputs come from the PIL
Qwen2-VL image processor with patch 16, the exact layout of the Qwen3-VL image processor (its own processor
class needs torchvision for videos); LLaVA inputs from the transformers LLaVA processors with their PIL image
processors (LLaVA-OneVision and Video-LLaVA videos: their video processors need torchvision, so
``testing.make_llava_video_inputs`` builds their tensor layout from the image processors). Each test first asserts that pruning happened, then compares.
"""

from __future__ import annotations

import pytest
import torch
from oracles import (
    GREEDY,
    assert_pruned,
    eager_rater_scores,
    family_inputs,
    family_model,
    feed,
    in_prefill_reference_logits,
    masked_full_cache,
    teacher_forced_logprob,
    visual_ids,
)

from sparse_cache import PrunableDynamicCache, testing
from sparse_cache.models import adapter_for

NEW = 4
ATOL = 1e-4
FAMILIES = testing.ORACLE_FAMILIES
model_of = family_model


@pytest.fixture(scope="module")
def inputs_of():
    return family_inputs


def logits_close(got, expected, atol=ATOL):
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(got, expected)):
        diff = (a.float() - b.float()).abs().max().item()
        assert diff <= atol, f"step {step}: {diff}"


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_is_registered_and_plain_generate_is_bit_identical(family, inputs_of):
    model = model_of(family)
    assert adapter_for(model).family
    inputs = inputs_of(family, "batch")
    before = model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    cache = PrunableDynamicCache(model, keep_ratio=0.25)  # hooks live while it does
    model.generate(**inputs, past_key_values=cache, max_new_tokens=1, **GREEDY)
    assert_pruned(cache, inputs, visual_ids(model))
    after = model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    for a, b in zip(before.logits, after.logits):
        assert torch.equal(a, b)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_masked_equivalence_left_padded_batch_several_images(family, attn, inputs_of):
    model = model_of(family, attn)
    inputs = inputs_of(family, "batch")
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert_pruned(cache, inputs, visual_ids(model))
    prompt_len = inputs["input_ids"].shape[1]
    full, mask, last, first = masked_full_cache(model, inputs, cache.kept_visual_positions, visual_ids(model))
    logits, _, _ = feed(model, full, mask, last, out.sequences[:, prompt_len:-1])
    logits_close(out.logits, [first] + list(logits.unbind(1)))


@pytest.mark.parametrize("family", FAMILIES)
def test_continuation_on_the_pruned_cache(family, inputs_of):
    model = model_of(family)
    inputs = inputs_of(family, "single")
    processor = testing.tiny_family_processor(family)
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    first = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    turn = processor.tokenizer("<|im_end|>\n<|im_start|>user\nwhy?<|im_end|>\n<|im_start|>assistant\n",
                               add_special_tokens=False, return_tensors="pt")["input_ids"]
    second = model.generate(input_ids=torch.cat([first.sequences, turn], 1), past_key_values=cache,
                            max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert_pruned(cache, inputs, visual_ids(model))
    prompt_len = inputs["input_ids"].shape[1]
    gen1 = first.sequences[:, prompt_len:]
    gen2 = second.sequences[:, prompt_len + NEW + turn.shape[1]:]
    full, mask, last, _ = masked_full_cache(model, inputs, cache.kept_visual_positions, visual_ids(model))
    _, mask, last = feed(model, full, mask, last, gen1[:, :-1])
    logits, mask, last = feed(model, full, mask, last, torch.cat([gen1[:, -1:], turn], 1))
    expected = [logits[:, -1]]
    logits, _, _ = feed(model, full, mask, last, gen2[:, :-1])
    logits_close(second.logits, expected + list(logits.unbind(1)))


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_scores_match_teacher_forced_oracle(family, inputs_of):
    model = model_of(family)
    inputs = inputs_of(family, "single")
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, num_beams=3,
                         num_return_sequences=3, do_sample=False, return_dict_in_generate=True, output_scores=True,
                         length_penalty=0.0)
    assert_pruned(cache, inputs, visual_ids(model), expand=3)
    prompt_len = inputs["input_ids"].shape[1]
    # one row, one image: every row-aligned input interleaved, every per-image input (pixels, grids, sizes) tiled
    expanded = {k: v.repeat_interleave(3, 0) if k in ("input_ids", "attention_mask", "mm_token_type_ids")
                else v.repeat(3, *[1] * (v.ndim - 1)) for k, v in inputs.items()}
    kept = [cache.kept_visual_positions[0]] * 3
    expected = teacher_forced_logprob(model, expanded, kept, out.sequences[:, prompt_len:], visual_ids(model))
    assert (out.sequences_scores - expected).abs().max() <= ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_equal_eager_output_attentions(family, inputs_of):
    eager = model_of(family, "eager")
    inputs = inputs_of(family, "batch")
    cache = PrunableDynamicCache(model_of(family), keep_ratio=0.25)
    model_of(family).generate(**inputs, past_key_values=cache, max_new_tokens=1, **GREEDY)
    assert_pruned(cache, inputs, visual_ids(eager))
    expected = eager_rater_scores(eager, inputs, visual_ids(eager), layer=cache.scoring_layer)
    assert len(cache.visual_scores) == len(expected) == inputs["input_ids"].shape[0]
    for got, want in zip(cache.visual_scores, expected):
        assert got.shape == want.shape and got.numel() > 0
        assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_in_prefill_matches_hand_built_reference(family, layer, inputs_of):
    """For Qwen3-VL, cuts at layers 0 and 1 happen before DeepStack features are added (after layers 0 and 1):
    the features must follow the kept tokens."""
    model = model_of(family)
    inputs = inputs_of(family, "batch")
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scoring_layer=layer, mode="in-prefill")
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert_pruned(cache, inputs, visual_ids(model))
    prompt_len = inputs["input_ids"].shape[1]
    expected = in_prefill_reference_logits(
        model, inputs, [(layer, cache.kept_visual_positions)], out.sequences[:, prompt_len:], visual_ids(model)
    )
    logits_close(out.logits, expected)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
def test_progressive_schedule_across_the_deepstack_layers(family, inputs_of):
    model = model_of(family)
    inputs = inputs_of(family, "batch")
    cache = PrunableDynamicCache(model, mode="in-prefill", schedule=[(0, 0.5), (1, 0.25)])
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert_pruned(cache, inputs, visual_ids(model))
    stages = [(layer, kept) for (layer, _), kept in zip(cache.schedule, cache.stage_kept_visual_positions)]
    prompt_len = inputs["input_ids"].shape[1]
    expected = in_prefill_reference_logits(model, inputs, stages, out.sequences[:, prompt_len:], visual_ids(model))
    logits_close(out.logits, expected)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_video_matches_oracle(family):
    """Qwen2.5-VL video is covered in test_generation; Qwen3-VL prompts carry one timestamped block per
    temporal group of frames, as its processor writes them."""
    model = model_of(family)
    processor = testing.tiny_family_processor(family)
    frames = [testing.synthetic_image(128, 128, seed=s) for s in range(4)]
    inputs = testing.make_video_inputs(processor, "what happens in the video?", frames,
                                       frame_timestamps=family.startswith("qwen3"))
    inputs.pop("second_per_grid_ts")  # a Qwen2.5-VL input; these forwards do not take it
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert_pruned(cache, inputs, visual_ids(model))
    prompt_len = inputs["input_ids"].shape[1]
    full, mask, last, first = masked_full_cache(model, inputs, cache.kept_visual_positions, visual_ids(model))
    logits, _, _ = feed(model, full, mask, last, out.sequences[:, prompt_len:-1])
    logits_close(out.logits, [first] + list(logits.unbind(1)))


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
def test_video_in_prefill_before_the_deepstack_layers(family):
    model = model_of(family)
    processor = testing.tiny_family_processor(family)
    frames = [testing.synthetic_image(128, 128, seed=s) for s in range(4)]
    inputs = testing.make_video_inputs(processor, "what happens in the video?", frames, frame_timestamps=True)
    inputs.pop("second_per_grid_ts")
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scoring_layer=0, mode="in-prefill")
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert_pruned(cache, inputs, visual_ids(model))
    prompt_len = inputs["input_ids"].shape[1]
    expected = in_prefill_reference_logits(
        model, inputs, [(0, cache.kept_visual_positions)], out.sequences[:, prompt_len:], visual_ids(model)
    )
    logits_close(out.logits, expected)


# --------------------------------------------------------------------------- LLaVA families (1-D RoPE)

LLAVA = testing.LLAVA_FAMILIES


def llava_batch(family, inputs_of):
    return inputs_of(family, "batch")


def image_runs(inputs, image_token_id):
    """Per row, the ``(start, length)`` of each run of image tokens (images are separated by text here)."""
    runs = []
    for row in inputs["input_ids"]:
        visual = (row == image_token_id).long()
        edges = torch.diff(torch.nn.functional.pad(visual, (1, 1)))
        starts, ends = torch.nonzero(edges == 1).flatten(), torch.nonzero(edges == -1).flatten()
        runs.append([(int(s), int(e - s)) for s, e in zip(starts, ends)])
    return runs


@pytest.mark.parametrize("family", LLAVA)
def test_llava_per_image_budgets_count_each_images_own_tokens(family, inputs_of):
    """Budgets per image: LLaVA-1.5 16 tokens each; LLaVA-NeXT base + anyres tiles + row newlines, a different
    count per image size (the processor's own count), every image one run of ``<image>`` tokens."""
    from sparse_cache.select import budget

    model = model_of(family)
    inputs = llava_batch(family, inputs_of)
    processor = testing.tiny_family_processor(family)
    image_id = model.config.image_token_id
    runs = image_runs(inputs, image_id)
    lengths = [length for row in runs for _, length in row]
    if family in ("llava", "video_llava"):
        assert lengths == [16, 16, 16]
    elif family == "llava_onevision":  # SigLIP, "full": base 16 + the tile map shrunk by anyres_max_2 + newlines
        sizes = inputs["image_sizes"].tolist()
        expected = [processor._get_number_of_features(h, w, 56, 56) for h, w in sizes]
        # 168 x 224: map 6 x 8 -> 4 x 6 (ratio 1.22); 112 x 112 and 168 x 112: 8 x 8 -> 5 x 5 (ratio 1.41)
        assert lengths == expected == [16 + 4 * 7, 16 + 5 * 6, 16 + 5 * 6], (lengths, expected)
    else:  # the processor's count from each image size: base 16 + un-padded tiles + one newline per row (its count
        # includes the CLS token, which the "default" feature strategy drops)
        sizes = inputs["image_sizes"].tolist()
        expected = [processor._get_number_of_features(h, w, 56, 56) - 1 for h, w in sizes]
        assert lengths == expected and len(set(lengths)) == 3, (lengths, expected)
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    model.generate(**inputs, past_key_values=cache, max_new_tokens=1, **GREEDY)
    kept_counts = [sum(budget(length, 0.25, None) for _, length in row) for row in runs]
    assert_pruned(cache, inputs, visual_ids(model), kept_counts=kept_counts)
    for row, row_runs in enumerate(runs):
        kept = cache.kept_visual_positions[row]
        for start, length in row_runs:
            inside = ((kept >= start) & (kept < start + length)).sum()
            assert int(inside) == budget(length, 0.25, None)


@pytest.mark.parametrize("family", LLAVA)
def test_llava_adjacent_images_are_split_by_their_token_counts(family):
    """Two images with no text between them form one run of ``<image>`` tokens: the blocks still follow each
    image's own count (from the encoder outputs or ``image_sizes``), not the run."""
    model = model_of(family)
    processor = testing.tiny_family_processor(family)
    images = [testing.synthetic_image(112, 112, seed=2), testing.synthetic_image(112, 168, seed=3)]
    text = "<|im_start|>user\n<image><image>compare the two pictures.<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor(text=[text], images=images, return_tensors="pt")
    runs = image_runs(inputs, model.config.image_token_id)
    assert len(runs[0]) == 1
    adapter = adapter_for(model)
    counts = adapter.block_counts({k: v for k, v in inputs.items()})[0][1]
    assert sum(counts) == runs[0][0][1] and len(counts) == 2
    cache = PrunableDynamicCache(model, keep_tokens=3)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert_pruned(cache, inputs, visual_ids(model), kept_counts=[6])
    start = runs[0][0][0]
    kept = cache.kept_visual_positions[0] - start
    assert int((kept < counts[0]).sum()) == 3 and int((kept >= counts[0]).sum()) == 3
    prompt_len = inputs["input_ids"].shape[1]
    full, mask, last, first = masked_full_cache(model, inputs, cache.kept_visual_positions, visual_ids(model))
    logits, _, _ = feed(model, full, mask, last, out.sequences[:, prompt_len:-1])
    logits_close(out.logits, [first] + list(logits.unbind(1)))


def test_llava_uniform_scorer_strides_the_square_patch_grid(inputs_of):
    """LLaVA-1.5 images are a square grid of patches (4 x 4 here): keep_ratio 0.25 with ``uniform`` keeps the
    ``[::2, ::2]`` sub-grid of every image."""
    model = model_of("llava")
    inputs = llava_batch("llava", inputs_of)
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scorer="uniform")
    model.generate(**inputs, past_key_values=cache, max_new_tokens=1, **GREEDY)
    assert_pruned(cache, inputs, visual_ids(model))
    sub_grid = torch.tensor([r * 4 + c for r in (0, 2) for c in (0, 2)])
    for row, row_runs in enumerate(image_runs(inputs, model.config.image_token_id)):
        expected = torch.cat([start + sub_grid for start, _ in row_runs])
        assert torch.equal(cache.kept_visual_positions[row].cpu(), expected)


@pytest.mark.parametrize("family", LLAVA)
def test_llava_manual_decode_loop_without_position_ids(family, inputs_of):
    """A hand-written loop that never passes ``position_ids`` on a left-padded batch: the decoder counts the pads
    (``get_seq_length()`` onward); on the pruned cache every step equals the plain model over the full cache with
    the dropped tokens masked (the cache's logical length and per-row offsets give the same positions)."""
    from transformers import DynamicCache

    model = model_of(family)
    inputs = llava_batch(family, inputs_of)
    tokens = torch.tensor([[5, 9, 17], [33, 2, 40]])
    with torch.no_grad():
        cache = PrunableDynamicCache(model, keep_ratio=0.25)
        out = model(**inputs, past_key_values=cache, use_cache=True)
        assert_pruned(cache, inputs, visual_ids(model))
        got = [out.logits[:, -1]]
        mask = inputs["attention_mask"]
        for step in range(tokens.shape[1]):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            got.append(model(input_ids=tokens[:, step:step + 1], attention_mask=mask, past_key_values=cache).logits[:, -1])
        reference = DynamicCache(config=model.config)
        out = model(**inputs, past_key_values=reference, use_cache=True)
        expected = [out.logits[:, -1]]
        from oracles import dropped_mask
        mask = dropped_mask(inputs, visual_ids(model), cache.kept_visual_positions)
        for step in range(tokens.shape[1]):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            expected.append(model(input_ids=tokens[:, step:step + 1], attention_mask=mask,
                                  past_key_values=reference).logits[:, -1])
    assert cache.rope_deltas.flatten().tolist() == (inputs["attention_mask"] == 0).sum(1).tolist()  # the pads
    logits_close(got, expected)


@pytest.mark.parametrize("family", LLAVA)
def test_llava_sparsevlm_schedule_scaled_to_depth(family, inputs_of):
    """The authors' 2/6/15-of-32 progressive schedule scaled to 4 layers (0/1/2), against the hand-built reference."""
    model = model_of(family)
    inputs = llava_batch(family, inputs_of)
    cache = PrunableDynamicCache(model, keep_ratio=0.5, mode="in-prefill", schedule="sparsevlm")
    assert [layer for layer, _ in cache.schedule] == [0, 1, 2]
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert_pruned(cache, inputs, visual_ids(model))
    stages = [(layer, kept) for (layer, _), kept in zip(cache.schedule, cache.stage_kept_visual_positions)]
    prompt_len = inputs["input_ids"].shape[1]
    expected = in_prefill_reference_logits(model, inputs, stages, out.sequences[:, prompt_len:], visual_ids(model))
    logits_close(out.logits, expected)


@pytest.mark.parametrize("family", LLAVA)
def test_llava_recycling_matches_hand_built_reference(family, inputs_of):
    model = model_of(family)
    inputs = llava_batch(family, inputs_of)
    cache = PrunableDynamicCache(model, keep_ratio=0.25, mode="in-prefill", recycle=True, scoring_layer=1)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    groups = cache.recycled_groups
    assert all(groups), "no recycled token in some row"
    assert_pruned(cache, inputs, visual_ids(model), extra=[len(g) for g in groups])
    prompt_len = inputs["input_ids"].shape[1]
    expected = in_prefill_reference_logits(model, inputs, [(1, cache.kept_visual_positions)],
                                           out.sequences[:, prompt_len:], visual_ids(model), groups)
    logits_close(out.logits, expected)


@pytest.mark.parametrize("scorer", sorted(__import__("sparse_cache").SCORERS))
@pytest.mark.parametrize("family", LLAVA)
def test_llava_every_scorer_matches_masked_oracle(family, scorer, inputs_of):
    model = model_of(family)
    inputs = llava_batch(family, inputs_of)
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scorer=scorer)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert_pruned(cache, inputs, visual_ids(model))
    prompt_len = inputs["input_ids"].shape[1]
    full, mask, last, first = masked_full_cache(model, inputs, cache.kept_visual_positions, visual_ids(model))
    logits, _, _ = feed(model, full, mask, last, out.sequences[:, prompt_len:-1])
    logits_close(out.logits, [first] + list(logits.unbind(1)))


def test_llava_refusals():
    """A Mistral backbone with a sliding window, and a LLaVA family without an adapter yet, are refused in one line."""
    model = testing.tiny_vlm_model("llava_next", sliding_window=8)
    with pytest.raises(ValueError, match="sliding_window=8"):
        PrunableDynamicCache(model, keep_ratio=0.25)

    class LlavaNextVideoForConditionalGeneration(torch.nn.Module):
        pass

    with pytest.raises(TypeError) as error:
        adapter_for(LlavaNextVideoForConditionalGeneration())
    message = str(error.value)
    assert "\n" not in message and "LlavaForConditionalGeneration" in message and "LlavaNextForConditionalGeneration" in message


VIDEO_LLAVA = ("llava_onevision", "video_llava")


def llava_video_inputs(family):
    """One row: a 4-frame video, then an image, then the question. OneVision: 4 pooled frames of 2 x 2 tokens and
    one newline (17 tokens), the image anyres (46); Video-LLaVA: 4 frames of 16 patches + CLS (68), the image 16."""
    processor = testing.tiny_family_processor(family)
    frames = [testing.synthetic_image(64, 64, seed=s) for s in range(4)]
    return testing.make_llava_video_inputs(processor, "what happens in the video?", frames,
                                           images=[testing.synthetic_image(112, 112, seed=2)])


@pytest.mark.parametrize("family", VIDEO_LLAVA)
def test_llava_video_per_video_budget_and_masked_oracle(family):
    """The video is one block with its own budget (all its frames, newline included), the image another."""
    from sparse_cache.select import budget

    model = model_of(family)
    inputs = llava_video_inputs(family)
    video_len = int((inputs["input_ids"] == model.config.video_token_id).sum())
    image_len = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert (video_len, image_len) == {"llava_onevision": (17, 46), "video_llava": (68, 16)}[family]
    adapter = adapter_for(model)
    counts = [c for _, c, _ in adapter.block_counts(dict(inputs))]
    assert counts == [[image_len], [video_len]]
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert_pruned(cache, inputs, visual_ids(model),
                  kept_counts=[budget(video_len, 0.25, None) + budget(image_len, 0.25, None)])
    kept = cache.kept_visual_positions[0]
    in_video = (inputs["input_ids"][0, kept] == model.config.video_token_id).sum()
    assert int(in_video) == budget(video_len, 0.25, None)
    prompt_len = inputs["input_ids"].shape[1]
    full, mask, last, first = masked_full_cache(model, inputs, cache.kept_visual_positions, visual_ids(model))
    logits, _, _ = feed(model, full, mask, last, out.sequences[:, prompt_len:-1])
    logits_close(out.logits, [first] + list(logits.unbind(1)))


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("family", VIDEO_LLAVA)
def test_llava_video_in_prefill_matches_hand_built_reference(family, layer):
    model = model_of(family)
    inputs = llava_video_inputs(family)
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scoring_layer=layer, mode="in-prefill")
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert_pruned(cache, inputs, visual_ids(model))
    prompt_len = inputs["input_ids"].shape[1]
    expected = in_prefill_reference_logits(
        model, inputs, [(layer, cache.kept_visual_positions)], out.sequences[:, prompt_len:], visual_ids(model)
    )
    logits_close(out.logits, expected)


@pytest.mark.parametrize("family", VIDEO_LLAVA)
def test_llava_video_beam_scores_match_teacher_forced_oracle(family):
    model = model_of(family)
    inputs = llava_video_inputs(family)
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, num_beams=3,
                         num_return_sequences=3, do_sample=False, return_dict_in_generate=True, output_scores=True,
                         length_penalty=0.0)
    assert_pruned(cache, inputs, visual_ids(model), expand=3)
    prompt_len = inputs["input_ids"].shape[1]
    expanded = {k: v.repeat_interleave(3, 0) if k in ("input_ids", "attention_mask")
                else v.repeat(3, *[1] * (v.ndim - 1)) for k, v in inputs.items()}
    kept = [cache.kept_visual_positions[0]] * 3
    expected = teacher_forced_logprob(model, expanded, kept, out.sequences[:, prompt_len:], visual_ids(model))
    assert (out.sequences_scores - expected).abs().max() <= ATOL


@pytest.mark.parametrize("family", VIDEO_LLAVA)
def test_llava_two_videos_have_their_own_budgets(family):
    """Two videos in one row (one ``pixel_values_videos`` of 2): each is a block of its own count, and
    ``keep_tokens`` applies per video; the masked oracle holds."""
    model = model_of(family)
    processor = testing.tiny_family_processor(family)
    frames = [testing.synthetic_image(64, 64, seed=s) for s in range(4)]
    inputs = testing.make_llava_video_inputs(processor, "compare the two clips.", frames, videos=2)
    video_len = int((inputs["input_ids"] == model.config.video_token_id).sum()) // 2
    assert adapter_for(model).block_counts(dict(inputs))[1][1] == [video_len, video_len]
    cache = PrunableDynamicCache(model, keep_tokens=5)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert_pruned(cache, inputs, visual_ids(model), kept_counts=[10])
    runs = image_runs(inputs, model.config.video_token_id)[0]
    assert len(runs) == 2
    kept = cache.kept_visual_positions[0]
    for start, length in runs:
        assert int(((kept >= start) & (kept < start + length)).sum()) == 5
    prompt_len = inputs["input_ids"].shape[1]
    full, mask, last, first = masked_full_cache(model, inputs, cache.kept_visual_positions, visual_ids(model))
    logits, _, _ = feed(model, full, mask, last, out.sequences[:, prompt_len:-1])
    logits_close(out.logits, [first] + list(logits.unbind(1)))


def test_onevision_rows_of_several_images_take_one_tile_each():
    """Images given per row (``batch_num_images`` [1, 2]): the lone image is anyres (44 tokens), the two of the
    second row one tile + newline each (17), as ``get_image_features`` packs them; budgets and the masked oracle."""
    from sparse_cache.select import budget

    model = model_of("llava_onevision")
    processor = testing.tiny_family_processor("llava_onevision")
    images = [[testing.synthetic_image(224, 168, seed=1)],
              [testing.synthetic_image(112, 112, seed=2), testing.synthetic_image(112, 168, seed=3)]]
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"} for _ in row] + [{"type": "text", "text": prompt}]}],
        add_generation_prompt=True, tokenize=False) for row, prompt in zip(images, ["what is it?", "compare them."])]
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    assert inputs["batch_num_images"].tolist() == [1, 2]
    lengths = [length for row in image_runs(inputs, model.config.image_token_id) for _, length in row]
    assert lengths == [44, 17, 17]
    assert adapter_for(model).block_counts(dict(inputs))[0][1] == lengths
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert_pruned(cache, inputs, visual_ids(model), kept_counts=[budget(44, 0.25, None), 2 * budget(17, 0.25, None)])
    prompt_len = inputs["input_ids"].shape[1]
    full, mask, last, first = masked_full_cache(model, inputs, cache.kept_visual_positions, visual_ids(model))
    logits, _, _ = feed(model, full, mask, last, out.sequences[:, prompt_len:-1])
    logits_close(out.logits, [first] + list(logits.unbind(1)))
