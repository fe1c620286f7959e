"""Every way people generate, each against an oracle of docs/oracles.md (per-step logits)."""

import threading

import pytest
import torch
from oracles import GREEDY, feed, masked_decode_logits, masked_full_cache, teacher_forced_logprob

from sparse_cache import PrunableDynamicCache, testing

NEW = 5
ATOL = 1e-5


def visual_ids(model):
    return (model.config.image_token_id, model.config.video_token_id)


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
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    first = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    seen = cache.get_seq_length()
    turn = new_turn(processor, "and what is on the right?", batch)
    second_inputs = continue_inputs(inputs, first.sequences, turn)
    second = model.generate(
        **second_inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY
    )
    # only the new tokens were fed: the last answer token and the new turn
    assert cache.get_seq_length() == seen + 1 + turn.shape[1] + NEW - 1
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
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    with torch.no_grad():
        out = model(**single_inputs, past_key_values=cache, use_cache=True)
        got = [out.logits[:, -1].float()]
        tokens = []
        for _ in range(NEW - 1):
            token = got[-1].argmax(-1, keepdim=True)
            tokens.append(token)
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            got.append(out.logits[:, -1].float())
    assert cache.get_physical_length() < cache.get_seq_length()
    tokens.append(got[-1].argmax(-1, keepdim=True))
    expected = masked_decode_logits(
        model, single_inputs, cache.kept_visual_positions, torch.cat(tokens, 1), visual_ids(model)
    )
    assert_close(got, expected)


# --------------------------------------------------------------------------- sampling, beams, assisted


def test_sampling_with_seed_matches_oracle(model, batch_inputs):
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    torch.manual_seed(123)
    out = model.generate(
        **batch_inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW,
        do_sample=True, top_k=0, temperature=1.0, return_dict_in_generate=True, output_logits=True,
    )
    prompt_len = batch_inputs["input_ids"].shape[1]
    expected = masked_decode_logits(
        model, batch_inputs, cache.kept_visual_positions, out.sequences[:, prompt_len:], visual_ids(model)
    )
    assert_close(out.logits, expected)
    # same seed, same cache config: same tokens
    torch.manual_seed(123)
    again = model.generate(
        **batch_inputs, past_key_values=PrunableDynamicCache(model, keep_ratio=0.25), max_new_tokens=NEW,
        min_new_tokens=NEW, do_sample=True, top_k=0, temperature=1.0,
    )
    assert torch.equal(again, out.sequences)


def test_beam_search_scores_match_teacher_forced_oracle(model, batch_inputs):
    beams, returned = 3, 2
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    out = model.generate(
        **batch_inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, num_beams=beams,
        num_return_sequences=returned, length_penalty=0.0, do_sample=False, early_stopping=True,
        return_dict_in_generate=True, output_scores=True,
    )
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
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    out = model.generate(
        **single_inputs, past_key_values=cache, max_new_tokens=10, min_new_tokens=10, prompt_lookup_num_tokens=3,
        **GREEDY,
    )
    greedy = model.generate(
        **single_inputs, past_key_values=PrunableDynamicCache(model, keep_ratio=0.25), max_new_tokens=10,
        min_new_tokens=10, **GREEDY,
    )
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
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
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
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    n_video = int((inputs["input_ids"] == model.config.video_token_id).sum())
    assert n_video == 32
    assert cache.kept_visual_positions[0].numel() == 8
    prompt_len = inputs["input_ids"].shape[1]
    expected = masked_decode_logits(model, inputs, cache.kept_visual_positions, out.sequences[:, prompt_len:], visual_ids(model))
    assert_close(out.logits, expected)


# --------------------------------------------------------------------------- dtypes, offload, threads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_scores_are_finite_on_long_sequences(dtype):
    model = testing.tiny_qwen2_5_vl_model(seed=0, dtype=dtype)
    processor = testing.tiny_processor(max_pixels=28 * 28 * 1024)
    inputs = testing.make_inputs(
        processor, ["describe this image in detail."], [[testing.synthetic_image(896, 896, seed=3)]]
    )
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 1024
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=3, min_new_tokens=3, **GREEDY)
    scores = cache.visual_scores[0]
    assert scores.dtype == torch.float32
    assert torch.isfinite(scores).all() and scores.sum() <= 1.0 + 1e-4
    assert all(torch.isfinite(step).all() for step in out.logits)


def test_threads_with_different_caches_do_not_interfere(sdpa_model, batch_inputs, single_inputs):
    def run(inputs, prune):
        cache = PrunableDynamicCache(sdpa_model, keep_ratio=0.25) if prune else None
        kwargs = dict(past_key_values=cache) if prune else {}
        return sdpa_model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, **kwargs, **GREEDY)

    alone = {"pruned": run(batch_inputs, True), "plain": run(single_inputs, False)}
    results = {}
    errors = []

    def worker(name, inputs, prune):
        try:
            for _ in range(3):
                results.setdefault(name, []).append(run(inputs, prune))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=worker, args=("pruned", batch_inputs, True)),
        threading.Thread(target=worker, args=("plain", single_inputs, False)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name, outs in results.items():
        for out in outs:
            assert torch.equal(out.sequences, alone[name].sequences)
            for a, b in zip(out.logits, alone[name].logits):
                assert torch.equal(a, b)


def test_new_image_in_a_later_turn_is_scored_in_that_turn(model, processor, single_inputs):
    """Turn 2 brings a new image: its tokens are scored and pruned in turn 2's prefill (by turn 2's
    question), turn 1's kept set is left as it was; decoding matches the masked oracle (manual calls with
    explicit positions: transformers' generate cannot position a new image on a continued cache)."""
    image_id = model.config.image_token_id
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    first = model.generate(**single_inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    kept_turn1 = cache.kept_visual_positions[0].clone()
    image2 = testing.synthetic_image(112, 112, seed=8)
    turn_text = "<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>and this one?<|im_end|>\n<|im_start|>assistant\n"
    turn = processor(text=[turn_text], images=[image2], return_tensors="pt")
    sequences = first.sequences
    full_ids = torch.cat([sequences, turn["input_ids"]], 1)
    types1 = torch.cat([single_inputs["mm_token_type_ids"], torch.zeros_like(sequences[:, single_inputs["input_ids"].shape[1]:])], 1)
    full_types = torch.cat([types1, turn["mm_token_type_ids"]], 1)
    grids = torch.cat([single_inputs["image_grid_thw"], turn["image_grid_thw"]])
    rope, _ = model.model.get_rope_index(full_ids, mm_token_type_ids=full_types, image_grid_thw=grids)
    positions = torch.cat([rope[:1], rope], 0)  # text row (unused for masks with a cache) + 3 M-RoPE rows
    fed = slice(sequences.shape[1] - 1, full_ids.shape[1])  # the last answer token was never fed
    with torch.no_grad():
        out = model(
            input_ids=full_ids[:, fed], pixel_values=turn["pixel_values"], image_grid_thw=turn["image_grid_thw"],
            mm_token_type_ids=full_types[:, fed], position_ids=positions[..., fed], past_key_values=cache,
            use_cache=True,
        )
        got = [out.logits[:, -1].float()]
        last = positions[..., -1:]
        tokens = []
        for _ in range(NEW - 1):
            tokens.append(got[-1].argmax(-1, keepdim=True))
            last = last + 1
            out = model(input_ids=tokens[-1], position_ids=last, past_key_values=cache, use_cache=True)
            got.append(out.logits[:, -1].float())
    kept = cache.kept_visual_positions[0]
    visual2 = torch.nonzero(full_ids[0] == image_id).flatten()[48:]
    assert torch.equal(kept[: kept_turn1.numel()], kept_turn1)
    assert torch.equal(kept[kept_turn1.numel():], kept[torch.isin(kept, visual2)]) and torch.isin(kept, visual2).sum() == 4
    assert cache.visual_scores[0].numel() == 48 + 16
    # oracle: full cache; turn 1's dropped tokens masked from its first decode step, turn 2's after its prefill
    full, mask, last_o, _ = masked_full_cache(model, single_inputs, [kept_turn1], visual_ids(model))
    prompt_len = single_inputs["input_ids"].shape[1]
    _, mask, last_o = feed(model, full, mask, last_o, sequences[:, prompt_len:-1])
    turn_mask = torch.cat([mask, mask.new_ones(1, fed.stop - fed.start)], 1)
    with torch.no_grad():
        ref = model(
            input_ids=full_ids[:, fed], pixel_values=turn["pixel_values"], image_grid_thw=turn["image_grid_thw"],
            mm_token_type_ids=full_types[:, fed], position_ids=positions[..., fed], attention_mask=turn_mask,
            past_key_values=full, use_cache=True,
        )
    expected = [ref.logits[:, -1].float()]
    drop2 = visual2[~torch.isin(visual2, kept)]
    turn_mask[0, drop2] = 0
    logits, _, _ = feed(model, full, turn_mask, positions[..., -1:], torch.cat(tokens, 1))
    expected += list(logits.unbind(1))
    assert_close(got, expected)
