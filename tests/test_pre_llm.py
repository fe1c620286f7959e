"""``mode="pre-llm"``: visual tokens dropped from the language model's input, before layer 0.

Exact oracle (built here from the model's own modules, never the library): after asserting that pruning
happened, every step's logits equal (1e-4, float32) those of the language model run on the *subset* of its
input embeddings (every text token, the kept visual tokens; rows left-padded to the longest, pads masked)
with the original position ids passed explicitly (M-RoPE rows for Qwen, 1-D for LLaVA) and, for Qwen3-VL,
the DeepStack features and their visual mask cut the same way; decoding then continues over that plain
``DynamicCache`` at the original (logical) positions. The kept set itself equals the scorer's selection
computed directly on the input embeddings.
"""

from __future__ import annotations

import pytest
import torch
from oracles import (
    GREEDY,
    assert_pruned,
    family_inputs,
    family_model,
    feed,
    full_positions,
    later_turn_with_image,
    visual_ids,
)
from transformers import DynamicCache

from sparse_cache import PrunableDynamicCache, testing
from sparse_cache._compat import CACHE_KWARG
from sparse_cache.models import adapter_for
from sparse_cache.scorers import ScoringContext, get_scorer
from sparse_cache.select import budget, select_visual

NEW = 4
ATOL = 1e-4
FAMILIES = testing.FAMILIES + testing.LLAVA_FAMILIES
EMBEDDING_SCORERS = ("cosine", "divprune", "cdpruner", "uniform", "random", "dart_embed")
model_of = family_model
inputs_of = family_inputs


def logits_close(got, expected, atol=ATOL):
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(got, expected)):
        diff = (a.float() - b.float()).abs().max().item()
        assert diff <= atol, f"step {step}: {diff}"


@torch.no_grad()
def text_model_inputs(model, inputs, positions):
    """What the language model receives in a plain forward: input embeddings, DeepStack mask and features."""
    text_model = model.model.language_model
    captured = {}

    def capture(module, args, kwargs):
        captured.update(kwargs)
        raise _Stop

    handle = text_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model(**inputs, position_ids=positions)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured


class _Stop(Exception):
    pass


@torch.no_grad()
def subset_prefill(model, inputs, kept_positions):
    """Oracle: the language model on the subset of its input embeddings, original positions, plain cache.

    Returns ``(cache, 2-D mask of the subset, last original positions, first next-token logits)``.
    """
    ids = inputs["input_ids"]
    batch = ids.shape[0]
    valid = inputs.get("attention_mask", torch.ones_like(ids)).bool()
    visual = torch.isin(ids, torch.tensor(visual_ids(model)))
    positions = full_positions(model, inputs)
    captured = text_model_inputs(model, inputs, positions)
    embeds = captured["inputs_embeds"]
    rows = []
    for row in range(batch):
        keep = valid[row] & ~visual[row]
        keep[kept_positions[row]] = True
        rows.append(torch.nonzero(keep).flatten())
    width = max(r.numel() for r in rows)
    index = torch.zeros(batch, width, dtype=torch.long)
    sub_valid = torch.zeros(batch, width, dtype=torch.bool)
    sub_embeds = torch.zeros(batch, width, embeds.shape[-1], dtype=embeds.dtype)  # pad slots: zeros, masked
    for row, columns in enumerate(rows):
        start = width - columns.numel()
        index[row, start:] = columns
        sub_valid[row, start:] = True
        sub_embeds[row, start:] = embeds[row, columns]
    if positions.ndim == 3:
        sub_positions = positions.gather(2, index[None].expand(positions.shape[0], -1, -1))
    else:
        sub_positions = positions.gather(1, index)
    kwargs = dict(inputs_embeds=sub_embeds, position_ids=sub_positions, attention_mask=sub_valid.long(),
                  use_cache=True)
    cache = DynamicCache(config=model.config)
    kwargs[CACHE_KWARG] = cache
    if captured.get("deepstack_visual_embeds") is not None:  # Qwen3-VL: features of the kept visual tokens only
        deep_mask = captured["visual_pos_masks"]
        rank = torch.cumsum(deep_mask.flatten().long(), 0).view_as(deep_mask) - 1
        sub_mask = deep_mask.gather(1, index) & sub_valid
        kwargs["visual_pos_masks"] = sub_mask
        rows = rank.gather(1, index)[sub_mask]
        kwargs["deepstack_visual_embeds"] = [features[rows] for features in captured["deepstack_visual_embeds"]]
    hidden = model.model.language_model(**kwargs).last_hidden_state
    first = model.lm_head(hidden[:, -1]).float()
    return cache, sub_valid.long(), positions[..., -1:], first


def generate(model, inputs, cache, **kwargs):
    return model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY, **kwargs)


def check_against_subset_oracle(model, inputs, cache, out):
    assert_pruned(cache, inputs, visual_ids(model))
    prompt_len = inputs["input_ids"].shape[1]
    sub, mask, last, first = subset_prefill(model, inputs, cache.kept_visual_positions)
    logits, _, _ = feed(model, sub, mask, last, out.sequences[:, prompt_len:-1])
    logits_close(out.logits, [first] + list(logits.unbind(1)))


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_several_images_matches_subset_oracle(family):
    model = model_of(family)
    inputs = inputs_of(family, "batch")
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scorer="cosine", mode="pre-llm")
    out = generate(model, inputs, cache)
    check_against_subset_oracle(model, inputs, cache, out)


@pytest.mark.parametrize("scorer", EMBEDDING_SCORERS)
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava", "llava_next"])
def test_every_embedding_scorer_matches_subset_oracle_and_its_own_selection(family, scorer):
    """The kept set is the scorer's top-k per image on the input embeddings; the logits the subset oracle's."""
    model = model_of(family)
    inputs = inputs_of(family, "batch")
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scorer=scorer, mode="pre-llm", seed=3)
    out = generate(model, inputs, cache)
    check_against_subset_oracle(model, inputs, cache, out)
    # the scorer computed directly on the input embeddings of a plain forward
    ids = inputs["input_ids"]
    valid = inputs["attention_mask"].bool()
    is_visual = torch.isin(ids, torch.tensor(visual_ids(model))) & valid
    embeds = text_model_inputs(model, inputs, full_positions(model, inputs))["inputs_embeds"]
    block_of, grids = adapter_for(model).visual_blocks(ids, is_visual, dict(inputs))
    positions = torch.arange(ids.shape[1])
    visual = [positions[is_visual[r]] for r in range(ids.shape[0])]
    text = [positions[(positions > v[-1]) & valid[r]] for r, v in enumerate(visual)]
    blocks = [block_of[r][is_visual[r]] for r in range(ids.shape[0])]
    context = ScoringContext(inputs_embeds=embeds, token_valid=valid, visual_positions=visual, text_positions=text,
                             visual_blocks=blocks, block_grids=grids, generator=torch.Generator().manual_seed(3))
    full_scores = get_scorer(scorer).score(context)  # no keep_limit: DivPrune's whole greedy order
    # as the cache calls it: the most each image can keep (a greedy scorer may stop there)
    context.keep_limit = [{int(b): budget(int(c), 0.25, None) for b, c in zip(*torch.unique_consecutive(
        blocks[r], return_counts=True))} for r in range(len(blocks))]
    context.generator = torch.Generator().manual_seed(3)
    scores = get_scorer(scorer).score(context)
    for row in range(len(blocks)):
        block_ids, counts = torch.unique_consecutive(blocks[row], return_counts=True)
        reference = {int(b): int(c) for b, c in zip(block_ids, counts)}
        assert block_ids.numel() == (2 if row else 1)  # row 1 holds two images: a budget each
        for candidate in (scores, full_scores):  # the limited order keeps what the full one does
            picked = select_visual(candidate[row].float(), blocks[row], 0.25, None, reference)
            assert torch.equal(cache.kept_visual_positions[row].cpu(), visual[row][picked.sort().values]), (row, scorer)
        assert torch.allclose(cache.visual_scores[row].cpu(), scores[row].float())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_computes_only_the_kept_tokens(family):
    """Every decoder layer of the prefill sees the kept slots only (the widest row's text + kept visual)."""
    model = model_of(family)
    inputs = inputs_of(family, "batch")
    widths = []

    def record(module, args, kwargs):
        widths.append((args[0] if args else kwargs["hidden_states"]).shape[1])

    handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in model.model.language_model.layers]
    try:
        cache = PrunableDynamicCache(model, keep_ratio=0.25, scorer="uniform", mode="pre-llm")
        model.generate(**inputs, past_key_values=cache, max_new_tokens=1, **GREEDY)
    finally:
        for handle in handles:
            handle.remove()
    counts = assert_pruned(cache, inputs, visual_ids(model))
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    is_visual = torch.isin(ids, torch.tensor(visual_ids(model)))
    kept_width = max(int((valid[r] & ~is_visual[r]).sum()) + counts[r] for r in range(ids.shape[0]))
    assert kept_width < ids.shape[1]
    assert widths == [kept_width] * len(model.model.language_model.layers)
    assert cache.get_physical_length() == kept_width and cache.get_seq_length() == ids.shape[1]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava", "llava_next", "llava_onevision"])
def test_continuation_on_the_pre_llm_cache(family):
    model = model_of(family)
    inputs = inputs_of(family, "batch")
    processor = testing.tiny_family_processor(family)
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scorer="divprune", mode="pre-llm")
    first = generate(model, inputs, cache)
    turn_text = "<|im_end|>\n<|im_start|>user\nwhy?<|im_end|>\n<|im_start|>assistant\n"
    turn = processor.tokenizer(turn_text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    turn = turn.expand(first.sequences.shape[0], -1)
    mask = torch.cat([inputs["attention_mask"], torch.ones(turn.shape[0], NEW + turn.shape[1], dtype=torch.long)], 1)
    second = model.generate(input_ids=torch.cat([first.sequences, turn], 1), attention_mask=mask,
                            past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert_pruned(cache, inputs, visual_ids(model))
    prompt_len = inputs["input_ids"].shape[1]
    gen1 = first.sequences[:, prompt_len:]
    gen2 = second.sequences[:, prompt_len + NEW + turn.shape[1]:]
    sub, sub_mask, last, first_logits = subset_prefill(model, inputs, cache.kept_visual_positions)
    logits, sub_mask, last = feed(model, sub, sub_mask, last, gen1[:, :-1])
    logits_close(first.logits, [first_logits] + list(logits.unbind(1)))
    logits, sub_mask, last = feed(model, sub, sub_mask, last, torch.cat([gen1[:, -1:], turn], 1))
    expected = [logits[:, -1]]
    logits, _, _ = feed(model, sub, sub_mask, last, gen2[:, :-1])
    logits_close(second.logits, expected + list(logits.unbind(1)))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_video_matches_subset_oracle(family):
    model = model_of(family)
    processor = testing.tiny_family_processor(family)
    frames = [testing.synthetic_image(128, 128, seed=s) for s in range(4)]
    inputs = testing.make_video_inputs(processor, "what happens in the video?", frames,
                                       frame_timestamps=family.startswith("qwen3"))
    if family.startswith("qwen3"):
        inputs.pop("second_per_grid_ts")
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scorer="cdpruner", mode="pre-llm")
    out = generate(model, inputs, cache)
    check_against_subset_oracle(model, inputs, cache, out)


def test_llava_video_and_image_have_their_own_budgets():
    from sparse_cache.select import budget

    model = model_of("video_llava")
    processor = testing.tiny_family_processor("video_llava")
    frames = [testing.synthetic_image(64, 64, seed=s) for s in range(4)]
    inputs = testing.make_llava_video_inputs(processor, "what happens in the video?", frames,
                                             images=[testing.synthetic_image(112, 112, seed=2)])
    video_len = int((inputs["input_ids"] == model.config.video_token_id).sum())
    image_len = int((inputs["input_ids"] == model.config.image_token_id).sum())
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scorer="dart_embed", mode="pre-llm")
    out = generate(model, inputs, cache)
    assert_pruned(cache, inputs, visual_ids(model),
                  kept_counts=[budget(video_len, 0.25, None) + budget(image_len, 0.25, None)])
    check_against_subset_oracle(model, inputs, cache, out)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_beam_search_scores_match_teacher_forced_subset_oracle(family):
    model = model_of(family)
    inputs = inputs_of(family, "single")
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scorer="cosine", mode="pre-llm")
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, num_beams=3,
                         num_return_sequences=3, do_sample=False, return_dict_in_generate=True, output_scores=True,
                         length_penalty=0.0)
    assert_pruned(cache, inputs, visual_ids(model), expand=3)
    prompt_len = inputs["input_ids"].shape[1]
    continuations = out.sequences[:, prompt_len:]
    expanded = {k: v.repeat_interleave(3, 0) if k in ("input_ids", "attention_mask", "mm_token_type_ids")
                else v.repeat(3, *[1] * (v.ndim - 1)) for k, v in inputs.items()}
    sub, mask, last, first = subset_prefill(model, expanded, [cache.kept_visual_positions[0]] * 3)
    logits, _, _ = feed(model, sub, mask, last, continuations[:, :-1])
    logprobs = torch.log_softmax(torch.cat([first[:, None], logits], 1), dim=-1)
    expected = logprobs.gather(-1, continuations[..., None]).squeeze(-1).sum(-1)
    assert (out.sequences_scores - expected).abs().max() <= ATOL


def test_eager_attention_and_keep_tokens():
    model = model_of("qwen2_5_vl", "eager")
    inputs = inputs_of("qwen2_5_vl", "batch")
    cache = PrunableDynamicCache(model, keep_tokens=5, scorer="dart_embed", mode="pre-llm")
    out = generate(model, inputs, cache)
    assert_pruned(cache, inputs, visual_ids(model), kept_counts=[5, 10])  # row 2: two images, 5 each
    check_against_subset_oracle(model, inputs, cache, out)


def test_keep_ratio_one_is_plain_generate():
    model = model_of("qwen3_vl")
    inputs = inputs_of("qwen3_vl", "batch")
    plain = generate(model, inputs, None)
    cache = PrunableDynamicCache(model, keep_ratio=1.0, scorer="cosine", mode="pre-llm")
    out = generate(model, inputs, cache)
    assert cache.get_seq_length() == cache.get_physical_length() == inputs["input_ids"].shape[1] + NEW - 1
    assert [k.numel() for k in cache.kept_visual_positions] == [int(v.numel()) for v in cache.visual_scores]
    for a, b in zip(plain.logits, out.logits):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scorer", ["sparsevlm", "sparsevlm_plus", "fastv", "dart"])
def test_attention_scorers_refuse_pre_llm(scorer):
    model = model_of("qwen2_5_vl")
    with pytest.raises(ValueError) as error:
        PrunableDynamicCache(model, keep_ratio=0.25, scorer=scorer, mode="pre-llm")
    message = str(error.value)
    assert message.startswith("scorer:") and repr(scorer) in message
    assert "'post-prefill'" in message and "'in-prefill'" in message and "embeddings" in message
    if scorer == "dart":
        assert "dart_embed" in message


def test_pre_llm_refusals():
    model = model_of("qwen2_5_vl")
    with pytest.raises(ValueError, match="^scoring_layer: mode='pre-llm'"):
        PrunableDynamicCache(model, keep_ratio=0.25, scorer="cosine", mode="pre-llm", scoring_layer=1)
    with pytest.raises(ValueError, match="^recycle:"):
        PrunableDynamicCache(model, keep_ratio=0.25, scorer="cosine", mode="pre-llm", recycle=True)
    with pytest.raises(ValueError, match="^schedule:"):
        PrunableDynamicCache(model, scorer="cosine", mode="pre-llm", schedule=[(0, 0.5)])
    with pytest.raises(ValueError, match="'pre-llm'"):
        PrunableDynamicCache(model, keep_ratio=0.25, mode="pre_llm")


def test_command_line_refuses_an_attention_scorer_and_lists_the_embedding_ones(capsys):
    from sparse_cache import SCORERS, cli

    assert cli.EMBEDDING_SCORER_NAMES == tuple(sorted(n for n, s in SCORERS.items() if s.default_layer is None))
    code = cli.main(["generate", "--mode", "pre-llm", "--max-new-tokens", "1"])  # default scorer: sparsevlm
    err = capsys.readouterr().err
    assert code != 0 and "--mode pre-llm" in err and "--scorer sparsevlm" in err and "dart_embed" in err


def test_bench_pre_llm_rows_and_flops_model(tmp_path):
    """The bench's pre-llm mode: every layer computes the kept tokens, so the FLOPs model is the kept share."""
    import json

    from sparse_cache import bench, presets

    argv = ["--model", "tiny", "--visual-tokens", "64", "--new-tokens", "2", "--repeats", "1", "--warmup", "0",
            "--keep-ratios", "1,0.25", "--mode", "pre-llm", "--scorer", "cosine", "--out-dir", str(tmp_path),
            "--no-progress", "--cpu-memory", "none", "--log-level", "WARNING"]
    threads = torch.get_num_threads()
    try:
        assert bench.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    (path,) = tmp_path.glob("*.json")
    data = json.loads(path.read_text())
    rows = {r["config"]: r for r in data["results"]}
    base, pruned = rows["baseline"], rows["keep=0.25"]
    assert pruned["mode"] == "pre-llm" and pruned["kept_visual_per_row"] == 16
    assert pruned["physical_length_prefill"] == base["physical_length_prefill"] - 48
    text = presets.preset_config("tiny").get_text_config(decoder=True)
    total, layers = data["settings"]["sequence_length"], text.num_hidden_layers
    expected = bench.prefill_flops(text, [total - 48] * layers) / bench.prefill_flops(text, [total] * layers)
    assert pruned["flops_model_prefill_vs_base"] == pytest.approx(expected) and expected < (total - 40) / total
    assert rows["keep=1"]["flops_model_prefill_vs_base"] == 1.0
    assert data["targets"]["pre_llm_flops_model"]["worst_config"] is not None
    with pytest.raises(ValueError, match="^scorer: 'sparsevlm'.*'pre-llm'"):
        bench.BenchSettings(mode="pre-llm").validate()


def test_new_image_in_a_later_turn_is_cut_after_the_earlier_entries():
    """Turn 2 brings a new image (explicit positions, as transformers' generate cannot position it): its dropped
    tokens never enter the language model either; the oracle continues the subset cache with turn 2's subset."""
    model = model_of("qwen2_5_vl")
    processor = testing.tiny_family_processor("qwen2_5_vl")
    inputs = inputs_of("qwen2_5_vl", "single")
    image_id = model.config.image_token_id
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scorer="cosine", mode="pre-llm")
    first = generate(model, inputs, cache)
    assert_pruned(cache, inputs, visual_ids(model))
    kept_turn1 = cache.kept_visual_positions[0].clone()
    dropped_turn1 = cache.get_seq_length() - cache.get_physical_length()
    sequences = first.sequences
    prompt_len = inputs["input_ids"].shape[1]
    turn = later_turn_with_image(model, processor, inputs, sequences, cache, NEW, testing.synthetic_image(112, 112, seed=8))
    got, tokens, full_ids, positions, fed, turn_inputs = (
        turn[k] for k in ("got", "tokens", "full_ids", "positions", "fed", "turn_inputs"))
    kept = cache.kept_visual_positions[0]
    visual2 = torch.nonzero(full_ids[0] == image_id).flatten()[int((inputs["input_ids"] == image_id).sum()):]
    kept2 = kept[torch.isin(kept, visual2)]
    assert torch.equal(kept[: kept_turn1.numel()], kept_turn1) and kept2.numel() == 4 and visual2.numel() == 16
    assert cache.get_seq_length() - cache.get_physical_length() == dropped_turn1 + 12
    # oracle: the subset cache of turn 1, then turn 2's embeddings without its dropped visual tokens
    sub, mask, last_o, _ = subset_prefill(model, inputs, [kept_turn1])
    _, mask, last_o = feed(model, sub, mask, last_o, sequences[:, prompt_len:-1])
    embeds = text_model_inputs(model, turn_inputs, positions[..., fed])["inputs_embeds"]
    local = torch.arange(fed.start, fed.stop)
    keep = ~torch.isin(local, visual2) | torch.isin(local, kept2)
    with torch.no_grad():
        hidden = model.model.language_model(
            inputs_embeds=embeds[:, keep], position_ids=positions[..., fed][..., keep],
            attention_mask=torch.cat([mask, mask.new_ones(1, int(keep.sum()))], 1), use_cache=True,
            **{CACHE_KWARG: sub},
        ).last_hidden_state
    mask = torch.cat([mask, mask.new_ones(1, int(keep.sum()))], 1)
    expected = [model.lm_head(hidden[:, -1]).float()]
    logits, _, _ = feed(model, sub, mask, positions[..., -1:], torch.cat(tokens, 1))
    logits_close(got, expected + list(logits.unbind(1)))


def test_assisted_decoding_matches_subset_oracle():
    """Prompt lookup: the first forward carries prompt + drafts; the prompt alone is cut before the language model."""
    model = model_of("qwen2_5_vl")
    inputs = inputs_of("qwen2_5_vl", "single")
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scorer="cosine", mode="pre-llm")
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=10, min_new_tokens=10,
                         prompt_lookup_num_tokens=3, **GREEDY)
    assert cache.get_seq_length() == out.sequences.shape[1] - 1
    check_against_subset_oracle(model, inputs, cache, out)
