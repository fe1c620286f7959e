"""One suite over every supported family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE), against the oracles.

Tiny random-weight models built offline (``testing.tiny_vlm_model``); Qwen3-VL inputs come from the PIL
Qwen2-VL image processor with patch 16, the exact layout of the Qwen3-VL image processor (its own processor
class needs torchvision for videos). Each test first asserts that pruning happened, then compares.
"""

from __future__ import annotations

import pytest
import torch
from oracles import (
    GREEDY,
    assert_pruned,
    eager_rater_scores,
    feed,
    in_prefill_reference_logits,
    masked_full_cache,
    teacher_forced_logprob,
)

from sparse_cache import PrunableDynamicCache, testing
from sparse_cache.models import adapter_for

NEW = 4
ATOL = 1e-4
FAMILIES = testing.FAMILIES
_models: dict = {}


def model_of(family, attn="sdpa"):
    if (family, attn) not in _models:
        _models[family, attn] = testing.tiny_vlm_model(family, seed=0, attn_implementation=attn)
    return _models[family, attn]


def visual_ids(model):
    return (model.config.image_token_id, model.config.video_token_id)


@pytest.fixture(scope="module")
def inputs_of():
    cache = {}

    def make(family, kind):
        key = ("qwen3" if family.startswith("qwen3") else "qwen2", kind)
        if key not in cache:
            processor = testing.tiny_family_processor(family)
            if kind == "batch":  # left padding, different images and lengths, two images in the second row
                cache[key] = testing.make_inputs(
                    processor,
                    ["what colour is the square on the left?", "compare the two pictures."],
                    [[testing.synthetic_image(224, 168, seed=1)],
                     [testing.synthetic_image(112, 112, seed=2), testing.synthetic_image(112, 168, seed=3)]],
                )
            else:
                cache[key] = testing.make_inputs(
                    processor, ["describe the image."], [[testing.synthetic_image(168, 112, seed=4)]]
                )
        return cache[key]

    return make


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
    expanded = {k: v.repeat_interleave(3, 0) if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
                for k, v in inputs.items()}
    expanded["pixel_values"] = inputs["pixel_values"].repeat(3, 1)
    expanded["image_grid_thw"] = inputs["image_grid_thw"].repeat(3, 1)
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
