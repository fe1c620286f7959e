"""Every way people generate, each against an oracle of ../docs/oracles.md (per-step logits)."""

import pytest
import torch
from oracles import (
    GREEDY,
    LATER_TURN_TEXT,
    assert_pruned,
    feed,
    later_turn_with_image,
    masked_decode_logits,
    masked_full_cache,
    teacher_forced_logprob,
    visual_ids,
)

from sparse_cache import PrunableDynamicCache, testing

#: These oracles were established with SparseVLM scoring at layer 2 of the 4-layer tiny model; the depth-scaled
#: default (layer 0 there) is covered by test_core, test_state and test_families.
LAYER = 2
NEW = 5
ATOL = 1e-5


def assert_close(actual, expected, atol=ATOL):
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected)):
        diff = (a.float() - e.float()).abs().max().item()
        assert diff <= atol, f"step {step}: max |diff| {diff:.3g} > {atol}"


def new_turn(processor, question, batch):
    text = f"<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    ids = processor.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ids.expand(batch, -1)


def continue_inputs(first_inputs, sequences, turn_ids):
    mask = first_inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(first_inputs["input_ids"])
    extra = sequences.shape[1] - mask.shape[1] + turn_ids.shape[1]
    return dict(
        input_ids=torch.cat([sequences, turn_ids], dim=1),
        attention_mask=torch.cat([mask, mask.new_ones(mask.shape[0], extra)], dim=1),
    )


# --------------------------------------------------------------------------- multi-turn (oracle 3)


@pytest.mark.parametrize("which", ["single", "batch"])
def test_second_turn_on_pruned_cache_matches_oracle(model, processor, single_inputs, batch_inputs, which):
    inputs = single_inputs if which == "single" else batch_inputs
    batch = inputs["input_ids"].shape[0]
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scoring_layer=LAYER)
    first = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert_pruned(cache, inputs, visual_ids(model), kept_counts=[12] if which == "single" else [12, 4])
    seen = cache.get_seq_length()
    dropped = seen - cache.get_physical_length()
    turn = new_turn(processor, "and what is on the right?", batch)
    second_inputs = continue_inputs(inputs, first.sequences, turn)
    second = model.generate(
        **second_inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY
    )
    # only the new tokens were fed: the last answer token and the new turn; the first turn's drop stays
    assert cache.get_seq_length() == seen + 1 + turn.shape[1] + NEW - 1
    assert cache.get_seq_length() - cache.get_physical_length() == dropped > 0
    prompt_len = inputs["input_ids"].shape[1]
    gen1 = first.sequences[:, prompt_len:]
    gen2 = second.sequences[:, second_inputs["input_ids"].shape[1] :]
    full, mask, last, first_logits = masked_full_cache(model, inputs, cache.kept_visual_positions, visual_ids(model))
    logits, mask, last = feed(model, full, mask, last, gen1[:, :-1])
    assert_close(first.logits, [first_logits] + list(logits.unbind(1)))
    logits, mask, last = feed(model, full, mask, last, torch.cat([gen1[:, -1:], turn], dim=1))
    expected = [logits[:, -1]]
    logits, mask, last = feed(model, full, mask, last, gen2[:, :-1])
    expected += list(logits.unbind(1))
    assert_close(second.logits, expected)


def test_manual_decode_loop_without_position_ids(model, single_inputs):
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scoring_layer=LAYER)
    with torch.no_grad():
        out = model(**single_inputs, past_key_values=cache, use_cache=True)
        got = [out.logits[:, -1].float()]
        tokens = []
        for _ in range(NEW - 1):
            token = got[-1].argmax(-1, keepdim=True)
            tokens.append(token)
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            got.append(out.logits[:, -1].float())
    assert_pruned(cache, single_inputs, visual_ids(model), kept_counts=[12])
    assert cache.get_physical_length() < cache.get_seq_length()
    tokens.append(got[-1].argmax(-1, keepdim=True))
    expected = masked_decode_logits(
        model, single_inputs, cache.kept_visual_positions, torch.cat(tokens, 1), visual_ids(model)
    )
    assert_close(got, expected)


# --------------------------------------------------------------------------- sampling, beams, assisted


def test_sampling_with_seed_matches_oracle(model, batch_inputs):
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scoring_layer=LAYER)
    torch.manual_seed(123)
    out = model.generate(
        **batch_inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW,
        do_sample=True, top_k=0, temperature=1.0, return_dict_in_generate=True, output_logits=True,
    )
    assert_pruned(cache, batch_inputs, visual_ids(model), kept_counts=[12, 4])
    prompt_len = batch_inputs["input_ids"].shape[1]
    expected = masked_decode_logits(
        model, batch_inputs, cache.kept_visual_positions, out.sequences[:, prompt_len:], visual_ids(model)
    )
    assert_close(out.logits, expected)
    # same seed, same cache config: same tokens
    torch.manual_seed(123)
    again = model.generate(
        **batch_inputs, past_key_values=PrunableDynamicCache(model, keep_ratio=0.25, scoring_layer=LAYER), max_new_tokens=NEW,
        min_new_tokens=NEW, do_sample=True, top_k=0, temperature=1.0,
    )
    assert torch.equal(again, out.sequences)


def test_beam_search_scores_match_teacher_forced_oracle(model, batch_inputs):
    beams, returned = 3, 2
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scoring_layer=LAYER)
    out = model.generate(
        **batch_inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, num_beams=beams,
        num_return_sequences=returned, length_penalty=0.0, do_sample=False, early_stopping=True,
        return_dict_in_generate=True, output_scores=True,
    )
    # one row per beam, each pruned like its prompt row (25% of 48 and of 16)
    assert_pruned(cache, batch_inputs, visual_ids(model), expand=beams, kept_counts=[12] * beams + [4] * beams)
    prompt_len = batch_inputs["input_ids"].shape[1]
    # all beams of a row share the row's kept set: expand inputs and kept positions like generate does
    batch = batch_inputs["input_ids"].shape[0]
    kept = [cache.kept_visual_positions[row * beams] for row in range(batch)]
    for row in range(batch):
        for beam in range(beams):
            assert torch.equal(cache.kept_visual_positions[row * beams + beam], kept[row])
    rows = torch.arange(batch).repeat_interleave(returned)
    expanded = {k: v for k, v in batch_inputs.items() if k not in ("pixel_values", "image_grid_thw")}
    expanded = {k: v[rows] for k, v in expanded.items()}
    expanded["pixel_values"] = batch_inputs["pixel_values"]
    # pixel rows follow images in row order; repeat each row's images
    grids = batch_inputs["image_grid_thw"]
    patches = grids.prod(-1).tolist()
    chunks = torch.split(batch_inputs["pixel_values"], patches)
    expanded["pixel_values"] = torch.cat([chunks[r] for r in rows.tolist()])
    expanded["image_grid_thw"] = grids[rows]
    logprob = teacher_forced_logprob(
        model, expanded, [kept[r] for r in rows.tolist()], out.sequences[:, prompt_len:], visual_ids(model)
    )
    assert torch.allclose(out.sequences_scores.float(), logprob, atol=1e-4), (out.sequences_scores, logprob)


def test_assisted_decoding_batch1_matches_oracle(model, single_inputs):
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scoring_layer=LAYER)
    out = model.generate(
        **single_inputs, past_key_values=cache, max_new_tokens=10, min_new_tokens=10, prompt_lookup_num_tokens=3,
        **GREEDY,
    )
    greedy = model.generate(
        **single_inputs, past_key_values=PrunableDynamicCache(model, keep_ratio=0.25, scoring_layer=LAYER), max_new_tokens=10,
        min_new_tokens=10, **GREEDY,
    )
    assert_pruned(cache, single_inputs, visual_ids(model), kept_counts=[12])
    assert torch.equal(out.sequences, greedy.sequences)
    prompt_len = single_inputs["input_ids"].shape[1]
    assert cache.get_seq_length() == out.sequences.shape[1] - 1
    expected = masked_decode_logits(
        model, single_inputs, cache.kept_visual_positions, out.sequences[:, prompt_len:], visual_ids(model)
    )
    assert_close(greedy.logits, expected)
    assert_close(out.logits, expected, atol=1e-4)


# --------------------------------------------------------------------------- several images, video


def test_several_images_in_a_row_budget_per_image(model, processor):
    images = [testing.synthetic_image(224, 168, seed=1), testing.synthetic_image(112, 112, seed=2)]
    inputs = testing.make_inputs(processor, ["compare the two pictures.", "what is shown?"], [images, images[1:]])
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scoring_layer=LAYER)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert_pruned(cache, inputs, visual_ids(model), kept_counts=[16, 4])
    ids = inputs["input_ids"]
    image_id = model.config.image_token_id
    # row 0: 48 + 16 tokens -> 12 + 4 kept, per image; row 1: 16 -> 4
    visual0 = torch.nonzero(ids[0] == image_id).flatten()
    kept0 = cache.kept_visual_positions[0]
    assert torch.isin(kept0, visual0[:48]).sum() == 12 and torch.isin(kept0, visual0[48:]).sum() == 4
    assert cache.kept_visual_positions[1].numel() == 4
    prompt_len = ids.shape[1]
    expected = masked_decode_logits(model, inputs, cache.kept_visual_positions, out.sequences[:, prompt_len:], visual_ids(model))
    assert_close(out.logits, expected)


def test_video_matches_oracle(model, processor):
    frames = [testing.synthetic_image(112, 112, seed=s) for s in range(4)]
    inputs = testing.make_video_inputs(processor, "what is shown in the video?", frames)
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scoring_layer=LAYER)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    n_video = int((inputs["input_ids"] == model.config.video_token_id).sum())
    assert n_video == 32
    assert_pruned(cache, inputs, visual_ids(model), kept_counts=[8])
    prompt_len = inputs["input_ids"].shape[1]
    expected = masked_decode_logits(model, inputs, cache.kept_visual_positions, out.sequences[:, prompt_len:], visual_ids(model))
    assert_close(out.logits, expected)


# --------------------------------------------------------------------------- dtypes


# Half precision against float32 (measured on CPU, transformers 5.14.1 and 5.23.0, 1024 visual tokens, 256 kept):
# the largest |log-softmax difference| of the half-precision run from the float32 oracle of the same kept set was
# 0.16 for bfloat16 and 0.018 for float16, about 40 machine epsilons (2**-8 and 2**-11) of each dtype; a wrong kept
# set (26 of the 256 kept tokens swapped for pruned ones) moves the decode-step logits by more than 1.3. The
# tolerances below are 128 epsilons (about 3x the measured error, well below the error of a wrong kept set).
# Scores (computed in float32 from half-precision activations) were within 14-19 epsilons of the largest score
# of the float32 run: tolerance 48 epsilons of the largest score. Kept sets: 252-255 of 256 (bfloat16) and 256 of
# 256 (float16) shared with the float32 run: at least 95% and 98% required.
HALF_LOGSOFTMAX_ATOL = {torch.bfloat16: 128 * 2.0**-8, torch.float16: 128 * 2.0**-11}  # 0.5, 0.0625
HALF_SCORE_ATOL = {torch.bfloat16: 48 * 2.0**-8, torch.float16: 48 * 2.0**-11}  # times the largest score
HALF_MIN_OVERLAP = {torch.bfloat16: 0.95, torch.float16: 0.98}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_float32_on_long_sequences(dtype):
    model = testing.tiny_qwen2_5_vl_model(seed=0, dtype=dtype)
    # the same (half-rounded) weights in float32: the comparison measures arithmetic precision only
    reference = testing.tiny_qwen2_5_vl_model(seed=0, dtype=dtype).float()
    processor = testing.tiny_processor(max_pixels=28 * 28 * 1024)
    inputs = testing.make_inputs(
        processor, ["describe this image in detail."], [[testing.synthetic_image(896, 896, seed=3)]]
    )
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 1024
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    inputs_f32 = dict(inputs, pixel_values=inputs["pixel_values"].float())
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scoring_layer=LAYER)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=3, min_new_tokens=3, **GREEDY)
    assert_pruned(cache, inputs, visual_ids(model), kept_counts=[256])
    scores = cache.visual_scores[0]
    assert scores.dtype == torch.float32
    assert torch.isfinite(scores).all() and scores.sum() <= 1.0 + 1e-4
    assert all(torch.isfinite(step).all() for step in out.logits)

    # 1. decoding: the half-precision logits against the float32 masked oracle of the kept set it chose
    prompt_len = inputs["input_ids"].shape[1]
    expected = masked_decode_logits(
        reference, inputs_f32, cache.kept_visual_positions, out.sequences[:, prompt_len:], visual_ids(model)
    )
    assert len(out.logits) == len(expected) == 3
    atol = HALF_LOGSOFTMAX_ATOL[dtype]
    for step, (got, want) in enumerate(zip(out.logits, expected)):
        diff = (torch.log_softmax(got.float(), -1) - torch.log_softmax(want, -1)).abs().max().item()
        assert diff <= atol, f"{dtype}, step {step}: max |log-softmax diff| {diff:.3g} > {atol}"
        assert torch.equal(got.argmax(-1), want.argmax(-1)), f"{dtype}, step {step}: top-1 differs"

    # 2. scoring and selection: close to the float32 run's
    cache_f32 = PrunableDynamicCache(reference, keep_ratio=0.25, scoring_layer=LAYER)
    reference.generate(**inputs_f32, past_key_values=cache_f32, max_new_tokens=1, **GREEDY)
    assert_pruned(cache_f32, inputs_f32, visual_ids(model), kept_counts=[256])
    scores_f32 = cache_f32.visual_scores[0]
    score_atol = HALF_SCORE_ATOL[dtype] * scores_f32.max().item()
    diff = (scores - scores_f32).abs().max().item()
    assert diff <= score_atol, f"{dtype}: max |score diff| {diff:.3g} > {score_atol:.3g}"
    kept, kept_f32 = cache.kept_visual_positions[0], cache_f32.kept_visual_positions[0]
    overlap = torch.isin(kept, kept_f32).float().mean().item()
    assert overlap >= HALF_MIN_OVERLAP[dtype], f"{dtype}: kept set shares {overlap:.3f} with float32's"


def check_later_turn_with_a_new_image(model, processor, single_inputs, cache, first, kept_turn1):
    """Turn 2 brings a new image (16 visual tokens) onto ``cache`` after turn 1 (``first``); manual calls with
    explicit positions (transformers' generate cannot position a new image on a continued cache). Checks every
    step's logits against the masked oracle (turn 1's dropped tokens masked from its first decode step, turn 2's
    after its prefill) and returns turn 2's visual positions."""
    image_id = model.config.image_token_id
    sequences = first.sequences
    turn = later_turn_with_image(model, processor, single_inputs, sequences, cache, NEW,
                                 testing.synthetic_image(112, 112, seed=8))
    got, tokens, full_ids, positions, fed = (turn[k] for k in ("got", "tokens", "full_ids", "positions", "fed"))
    kept = cache.kept_visual_positions[0]
    visual2 = torch.nonzero(full_ids[0] == image_id).flatten()[48:]
    assert visual2.numel() == 16
    full, mask, last_o, _ = masked_full_cache(model, single_inputs, [kept_turn1], visual_ids(model))
    prompt_len = single_inputs["input_ids"].shape[1]
    _, mask, last_o = feed(model, full, mask, last_o, sequences[:, prompt_len:-1])
    turn_mask = torch.cat([mask, mask.new_ones(1, fed.stop - fed.start)], 1)
    with torch.no_grad():
        ref = model(**turn["turn_inputs"], position_ids=positions[..., fed], attention_mask=turn_mask,
                    past_key_values=full, use_cache=True)
    expected = [ref.logits[:, -1].float()]
    drop2 = visual2[~torch.isin(visual2, kept)]
    turn_mask[0, drop2] = 0
    logits, _, _ = feed(model, full, turn_mask, positions[..., -1:], torch.cat(tokens, 1))
    expected += list(logits.unbind(1))
    assert_close(got, expected)
    return visual2


def test_new_image_in_a_later_turn_is_scored_in_that_turn(model, processor, single_inputs):
    """Turn 2 brings a new image: its tokens are scored and pruned in turn 2's prefill (by turn 2's
    question), turn 1's kept set is left as it was; decoding matches the masked oracle."""
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scoring_layer=LAYER)
    first = model.generate(**single_inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert_pruned(cache, single_inputs, visual_ids(model), kept_counts=[12])
    dropped_turn1 = cache.get_seq_length() - cache.get_physical_length()
    kept_turn1 = cache.kept_visual_positions[0].clone()
    visual2 = check_later_turn_with_a_new_image(model, processor, single_inputs, cache, first, kept_turn1)
    kept = cache.kept_visual_positions[0]
    assert torch.equal(kept[: kept_turn1.numel()], kept_turn1)
    assert torch.equal(kept[kept_turn1.numel():], kept[torch.isin(kept, visual2)]) and torch.isin(kept, visual2).sum() == 4
    assert cache.visual_scores[0].numel() == 48 + 16 and torch.isfinite(cache.visual_scores[0]).all()
    # turn 2's prefill dropped 16 - 4 more entries
    assert cache.get_seq_length() - cache.get_physical_length() == dropped_turn1 + 12


def test_a_kv_byte_budget_counts_earlier_turns_first(model, processor, single_inputs):
    """max_kv_bytes is per call and pays first for what the cache already holds: turn 1 fits whole under the budget
    (nothing to prune, the 48 visual tokens kept), turn 2's new image gets what is left (4 of its 16 tokens), the
    cache then holds exactly the budget, and decoding matches the masked oracle. A budget that cannot hold turn 2's
    text on top of turn 1 is refused with the minimum."""
    text = model.config.get_text_config(decoder=True)
    per_token = text.num_hidden_layers * 2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 4
    probe = PrunableDynamicCache(model, keep_ratio=1.0)
    first = model.generate(**single_inputs, past_key_values=probe, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    turn1_entries = first.sequences.shape[1] - 1  # the last answer token is fed with turn 2
    del probe

    turn2 = processor(text=[LATER_TURN_TEXT], images=[testing.synthetic_image(112, 112, seed=8)], return_tensors="pt")
    turn2_text = 1 + turn2["input_ids"].shape[1] - 16  # the fed answer token + turn 2's tokens that are not its image's
    budget_bytes = (turn1_entries + turn2_text + 4) * per_token
    cache = PrunableDynamicCache(model, max_kv_bytes=budget_bytes, scoring_layer=LAYER)
    first = model.generate(**single_inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert cache.get_seq_length() == cache.get_physical_length() == turn1_entries  # turn 1 fit: kept whole
    assert cache.kept_visual_positions[0].numel() == 48
    kept_turn1 = cache.kept_visual_positions[0].clone()
    visual2 = check_later_turn_with_a_new_image(model, processor, single_inputs, cache, first, kept_turn1)
    kept = cache.kept_visual_positions[0]
    assert torch.equal(kept[:48], kept_turn1) and int(torch.isin(kept, visual2).sum()) == 4  # it pruned turn 2
    stats = cache.stats_history[-1]
    assert stats.kv_bytes_after == budget_bytes  # exactly the budget, right after turn 2's prefill
    assert cache.get_seq_length() - cache.get_physical_length() == 12

    small = PrunableDynamicCache(model, max_kv_bytes=(turn1_entries + turn2_text) * per_token, scoring_layer=LAYER)
    first = model.generate(**single_inputs, past_key_values=small, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    with pytest.raises(ValueError, match=rf"max_kv_bytes: .*give max_kv_bytes >= {(turn1_entries + turn2_text + 1) * per_token}"):
        check_later_turn_with_a_new_image(model, processor, single_inputs, small, first, small.kept_visual_positions[0].clone())
