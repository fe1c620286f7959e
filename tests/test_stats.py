"""``cache.stats``: per-call metrics, exact against the kept counts the budgets give and the cache's tensors.

Every expected number is computed here from the inputs, the budgets (``select.budget``) and the cache's own
tensors after the call (shapes and dtypes), never read back from the library's record; every test first asserts
that pruning happened and compares the logits with the oracle of its mode.
"""

import json

import pytest
import torch
from oracles import (
    GREEDY,
    assert_pruned,
    in_prefill_reference_logits,
    masked_decode_logits,
    visual_ids,
    visual_positions,
)

from sparse_cache import PrunableDynamicCache, stats as stats_module, testing
from sparse_cache.select import budget
from sparse_cache.stats import conversation_totals

NEW = 4
ATOL = 1e-5


def image_runs(inputs, model):
    """Per row: (first position, token count) of each image, from the runs of image tokens in ``input_ids``."""
    runs = []
    for visual in visual_positions(inputs, (model.config.image_token_id,)):
        row, start = [], None
        for i, pos in enumerate(visual.tolist()):
            if start is None or pos != visual[i - 1] + 1:
                row.append([pos, 0])
                start = pos
            row[-1][1] += 1
        runs.append([tuple(r) for r in row])
    return runs


def token_bytes(cache) -> int:
    """One token entry in every layer, keys and values, from the tensors' shapes and dtypes."""
    return sum(layer.keys.shape[1] * layer.keys.shape[3] * layer.keys.element_size()
               + layer.values.shape[1] * layer.values.shape[3] * layer.values.element_size() for layer in cache.layers)


def tensor_bytes(cache, minus_columns: int = 0) -> int:
    """Exact bytes of every key and value tensor, less ``minus_columns`` entries per row (decoded tokens)."""
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            b, h, length, d = t.shape
            total += b * h * (length - minus_columns) * d * t.element_size()
    return total


def assert_logits_close(actual, expected, atol=ATOL):
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected)):
        diff = (a.float() - e.float()).abs().max().item()
        assert diff <= atol, f"step {step}: max |diff| {diff:.3g} > {atol}"


def check_exact_stats(stats, cache, inputs, model, kept_per_block, new_tokens, *, mode, scorer="sparsevlm"):
    """Everything in ``stats`` against numbers computed from the inputs, the expected counts and the tensors."""
    runs = image_runs(inputs, model)
    mask = inputs["attention_mask"]
    batch, width = inputs["input_ids"].shape
    per_token = token_bytes(cache)
    assert stats.kv_bytes_per_token == per_token
    assert stats.kv_bytes_before == batch * width * per_token  # every layer held every prompt token
    # right after compaction: the tensors now, less the decoded tokens fed since (the last one is never fed)
    assert stats.kv_bytes_after == tensor_bytes(cache, minus_columns=new_tokens - 1)
    assert stats.kv_bytes_after < stats.kv_bytes_before
    assert stats.mode == mode and stats.scorer == scorer and stats.scoring_layer == cache.scoring_layer
    assert stats.past_length == 0 and stats.new_tokens == width and stats.pass_index == 0
    assert len(stats.rows) == batch
    for row, row_stats in enumerate(stats.rows):
        assert row_stats.row == row
        blocks = row_stats.blocks
        assert [(b.first_position, b.visual_tokens_total) for b in blocks] == runs[row]
        assert [b.visual_tokens_kept for b in blocks] == kept_per_block[row]
        assert all(b.kind == "image" for b in blocks) and [b.index for b in blocks] == list(range(len(blocks)))
        total = sum(n for _, n in runs[row])
        kept = sum(kept_per_block[row])
        assert row_stats.visual_tokens_total == total and row_stats.visual_tokens_kept == kept
        assert row_stats.visual_tokens_kept == cache.kept_visual_positions[row].numel()
        valid = int(mask[row].sum())
        assert row_stats.kv_entries_before == valid and row_stats.kv_entries_after == valid - total + kept
        assert row_stats.kv_bytes_before == valid * per_token
        assert row_stats.kv_bytes_after == (valid - total + kept) * per_token
        for block in blocks:  # sparsevlm's scores are attention: the kept share of each image's mass
            assert block.score_mass_kept is not None and 0 < block.score_mass_kept <= 1 + 1e-9
    # the allocated tensors are the rows' entries plus the left padding of the shorter rows
    widest = max(r.kv_entries_after for r in stats.rows)
    assert stats.kv_bytes_after == batch * widest * per_token
    assert stats.visual_tokens_kept == sum(map(sum, kept_per_block))
    assert stats.visual_tokens_total == sum(n for row in runs for _, n in row)
    assert stats.scoring_s > 0 and stats.selection_s > 0 and stats.compaction_s > 0
    assert stats.timing_synchronized is False
    json.dumps(stats.to_dict())  # JSON-ready
    assert stats.to_dict()["kv_bytes_saved"] == stats.kv_bytes_before - stats.kv_bytes_after


@pytest.mark.parametrize("mode", ["post-prefill", "in-prefill"])
def test_stats_are_exact_for_a_padded_batch_with_several_images(model, multi_inputs, mode):
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scoring_layer=1, mode=mode)
    out = model.generate(**multi_inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    runs = image_runs(multi_inputs, model)
    kept_per_block = [[budget(n, 0.25, None) for _, n in row] for row in runs]  # [[12, 4], [4]]
    assert kept_per_block == [[12, 4], [4]]
    assert_pruned(cache, multi_inputs, visual_ids(model), kept_counts=[16, 4])
    prompt_len = multi_inputs["input_ids"].shape[1]
    if mode == "post-prefill":
        expected = masked_decode_logits(model, multi_inputs, cache.kept_visual_positions, out.sequences[:, prompt_len:],
                                        visual_ids(model))
    else:
        expected = in_prefill_reference_logits(model, multi_inputs, [(1, cache.kept_visual_positions)],
                                               out.sequences[:, prompt_len:], visual_ids(model))
    assert_logits_close(out.logits, expected)
    stats = cache.stats
    check_exact_stats(stats, cache, multi_inputs, model, kept_per_block, NEW, mode=mode)
    assert stats.budget == {"keep_ratio": 0.25}
    assert stats.stages == [{"after_layer": 1, "visual_tokens_kept": [16, 4]}]
    for row in stats.rows:
        assert all(b.stage_kept == [b.visual_tokens_kept] for b in row.blocks)
    assert cache.stats_history == [stats]


def test_stats_of_in_prefill_stages(model, multi_inputs):
    schedule = [(0, 0.5), (1, 0.25), (2, 0.125)]
    cache = PrunableDynamicCache(model, mode="in-prefill", schedule=schedule)
    out = model.generate(**multi_inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    runs = image_runs(multi_inputs, model)
    per_stage = [[[budget(n, r, None) for _, n in row] for row in runs] for _, r in schedule]
    assert per_stage == [[[24, 8], [8]], [[12, 4], [4]], [[6, 2], [2]]]
    assert_pruned(cache, multi_inputs, visual_ids(model), kept_counts=[8, 2])
    stages = [(layer, kept) for (layer, _), kept in zip(schedule, cache.stage_kept_visual_positions)]
    prompt_len = multi_inputs["input_ids"].shape[1]
    expected = in_prefill_reference_logits(model, multi_inputs, stages, out.sequences[:, prompt_len:], visual_ids(model))
    assert_logits_close(out.logits, expected)
    stats = cache.stats
    check_exact_stats(stats, cache, multi_inputs, model, per_stage[-1], NEW, mode="in-prefill")
    assert stats.stages == [
        {"after_layer": layer, "visual_tokens_kept": [sum(blocks) for blocks in stage]}
        for (layer, _), stage in zip(schedule, per_stage)
    ]
    for row, row_stats in enumerate(stats.rows):
        for i, block in enumerate(row_stats.blocks):
            assert block.stage_kept == [stage[row][i] for stage in per_stage]
    assert stats.budget == {"schedule": [[0, 0.5], [1, 0.25], [2, 0.125]]}


def test_stats_follow_beam_rows(sdpa_model, multi_inputs):
    beams = 2
    cache = PrunableDynamicCache(sdpa_model, keep_ratio=0.25)
    sdpa_model.generate(**multi_inputs, past_key_values=cache, max_new_tokens=3, min_new_tokens=3, num_beams=beams,
                        do_sample=False)
    assert_pruned(cache, multi_inputs, visual_ids(sdpa_model), expand=beams, kept_counts=[16, 16, 4, 4])
    rows = cache.stats.rows
    assert [r.row for r in rows] == list(range(2 * beams))
    assert [r.visual_tokens_kept for r in rows] == [k.numel() for k in cache.kept_visual_positions]
    assert [[b.visual_tokens_kept for b in r.blocks] for r in rows] == [[12, 4], [12, 4], [4], [4]]


def test_stats_of_a_later_turn_with_a_new_image(sdpa_model, processor, single_inputs):
    """Turn 2 brings a new image (explicit positions, as in test_generation): a second pass with its own stats;
    a text-only turn adds none. Turn 1 is checked against the masked oracle."""
    model = sdpa_model
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    first = model.generate(**single_inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert_pruned(cache, single_inputs, visual_ids(model), kept_counts=[12])
    prompt_len = single_inputs["input_ids"].shape[1]
    expected = masked_decode_logits(model, single_inputs, cache.kept_visual_positions, first.sequences[:, prompt_len:],
                                    visual_ids(model))
    assert_logits_close(first.logits, expected)
    first_stats = cache.stats
    physical_before = cache.get_physical_length()
    image2 = testing.synthetic_image(112, 112, seed=8)
    turn_text = ("<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>and this one?<|im_end|>\n"
                 "<|im_start|>assistant\n")
    turn = processor(text=[turn_text], images=[image2], return_tensors="pt")
    sequences = first.sequences
    full_ids = torch.cat([sequences, turn["input_ids"]], 1)
    types1 = torch.cat([single_inputs["mm_token_type_ids"], torch.zeros_like(sequences[:, prompt_len:])], 1)
    full_types = torch.cat([types1, turn["mm_token_type_ids"]], 1)
    grids = torch.cat([single_inputs["image_grid_thw"], turn["image_grid_thw"]])
    rope, _ = model.model.get_rope_index(full_ids, mm_token_type_ids=full_types, image_grid_thw=grids)
    positions = torch.cat([rope[:1], rope], 0)
    fed = slice(sequences.shape[1] - 1, full_ids.shape[1])
    past_logical = cache.get_seq_length()
    with torch.no_grad():
        model(input_ids=full_ids[:, fed], pixel_values=turn["pixel_values"], image_grid_thw=turn["image_grid_thw"],
              mm_token_type_ids=full_types[:, fed], position_ids=positions[..., fed], past_key_values=cache,
              use_cache=True)
    second = cache.stats
    assert len(cache.stats_history) == 2 and cache.stats_history[0] == first_stats
    assert second.pass_index == 1 and second.past_length == past_logical
    width = fed.stop - fed.start
    assert second.new_tokens == width
    per_token = token_bytes(cache)
    assert second.kv_bytes_before == (physical_before + width) * per_token
    assert second.kv_bytes_after == tensor_bytes(cache) == (physical_before + width - 12) * per_token
    [row] = second.rows
    [block] = row.blocks
    image_positions = torch.nonzero(full_ids[0] == model.config.image_token_id).flatten()
    assert block.first_position == int(image_positions[48]) and block.visual_tokens_total == 16
    assert block.visual_tokens_kept == budget(16, 0.25, None) == 4
    assert row.kv_entries_before == physical_before + width and row.kv_entries_after == physical_before + width - 12
    totals = conversation_totals(cache.stats_history)
    assert totals["passes"] == 2 and totals["visual_tokens_total"] == 64 and totals["visual_tokens_kept"] == 16
    assert totals["kv_bytes_after"] == second.kv_bytes_after


def test_a_text_only_turn_adds_no_pass_and_text_only_calls_have_no_stats(sdpa_model, processor, single_inputs):
    cache = PrunableDynamicCache(sdpa_model, keep_ratio=0.25)
    assert cache.stats is None and cache.stats_history == []
    first = sdpa_model.generate(**single_inputs, past_key_values=cache, max_new_tokens=2, **GREEDY)
    assert_pruned(cache, single_inputs, visual_ids(sdpa_model), kept_counts=[12])
    stats = cache.stats
    turn = processor.tokenizer("<|im_end|>\n<|im_start|>user\nand?<|im_end|>\n<|im_start|>assistant\n",
                               add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([first.sequences, turn], 1)
    sdpa_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=2,
                        **GREEDY)
    assert cache.stats_history == [stats] and cache.stats == stats
    text_only = testing.make_inputs(processor, ["describe the image."], [[]])
    plain = PrunableDynamicCache(sdpa_model, keep_ratio=0.25)
    sdpa_model.generate(**text_only, past_key_values=plain, max_new_tokens=2, **GREEDY)
    assert plain.stats is None and conversation_totals(plain.stats_history) == {"passes": 0}


def test_keep_ratio_one_reports_nothing_compacted(sdpa_model, multi_inputs):
    cache = PrunableDynamicCache(sdpa_model, keep_ratio=1.0)
    sdpa_model.generate(**multi_inputs, past_key_values=cache, max_new_tokens=1, **GREEDY)
    stats = cache.stats
    assert stats.visual_tokens_kept == stats.visual_tokens_total == 80
    assert stats.kv_bytes_after == stats.kv_bytes_before == tensor_bytes(cache)
    assert stats.compaction_s == 0.0 and stats.scoring_s > 0
    assert [r.kv_entries_after for r in stats.rows] == multi_inputs["attention_mask"].sum(1).tolist()


def test_sync_timing_synchronizes_around_prefill_work_only(sdpa_model, single_inputs, monkeypatch):
    """``sync_timing=True`` waits for the device around each timed section, a fixed number of times per call
    whatever the number of decode steps (none in a decode step); ``False`` never."""
    calls = []
    monkeypatch.setattr(stats_module, "_synchronize", lambda device: calls.append(device))
    counts = {}
    for new in (2, 6):
        calls.clear()
        cache = PrunableDynamicCache(sdpa_model, keep_ratio=0.25, sync_timing=True)
        sdpa_model.generate(**single_inputs, past_key_values=cache, max_new_tokens=new, min_new_tokens=new, **GREEDY)
        assert_pruned(cache, single_inputs, visual_ids(sdpa_model), kept_counts=[12])
        assert cache.stats.timing_synchronized is True
        counts[new] = len(calls)
    assert counts[2] == counts[6] == 2 * 3  # scoring, selection, compaction: before and after each
    calls.clear()
    cache = PrunableDynamicCache(sdpa_model, keep_ratio=0.25)
    sdpa_model.generate(**single_inputs, past_key_values=cache, max_new_tokens=2, **GREEDY)
    assert calls == [] and cache.stats.timing_synchronized is False
    with pytest.raises(TypeError, match="sync_timing"):
        PrunableDynamicCache(sdpa_model, keep_ratio=0.25, sync_timing="yes")


def test_video_blocks_are_reported_as_video(sdpa_model, processor):
    frames = [testing.synthetic_image(112, 112, seed=s) for s in range(4)]
    inputs = testing.make_video_inputs(processor, "what happens?", frames)
    cache = PrunableDynamicCache(sdpa_model, keep_ratio=0.25)
    out = sdpa_model.generate(**inputs, past_key_values=cache, max_new_tokens=3, min_new_tokens=3, **GREEDY)
    total = int((inputs["input_ids"] == sdpa_model.config.video_token_id).sum())
    assert_pruned(cache, inputs, visual_ids(sdpa_model), kept_counts=[budget(total, 0.25, None)])
    prompt_len = inputs["input_ids"].shape[1]
    expected = masked_decode_logits(sdpa_model, inputs, cache.kept_visual_positions, out.sequences[:, prompt_len:],
                                    visual_ids(sdpa_model))
    assert_logits_close(out.logits, expected)
    [block] = cache.stats.rows[0].blocks
    assert block.kind == "video" and block.visual_tokens_total == total
    assert block.visual_tokens_kept == budget(total, 0.25, None)


def test_generate_json_prints_the_stats(capsys, tmp_path):
    """``sparse-cache generate --json`` carries ``stats``: the reported run's ``cache.stats.to_dict()``."""
    from sparse_cache.cli import main

    model_dir = tmp_path / "tiny"
    model = testing.tiny_qwen2_5_vl_model(seed=0)
    model.save_pretrained(model_dir)
    testing.tiny_processor().save_pretrained(model_dir)
    image = tmp_path / "photo.png"
    testing.synthetic_image(224, 168, seed=1).save(image)  # 48 visual tokens
    code = main(["generate", "--model", str(model_dir), "--image", str(image), "--prompt", "count the objects.",
                 "--keep-ratio", "0.25", "--max-new-tokens", "2", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["visual_tokens_total"] == 48 and result["visual_tokens_kept"] == 12  # pruning happened
    stats = result["stats"]
    assert stats["visual_tokens_total"] == 48 and stats["visual_tokens_kept"] == 12
    assert stats["mode"] == "post-prefill" and stats["scorer"] == "sparsevlm" and stats["budget"] == {"keep_ratio": 0.25}
    [row] = stats["rows"]
    [block] = row["blocks"]
    assert block["visual_tokens_total"] == 48 and block["visual_tokens_kept"] == 12 and block["kind"] == "image"
    per_token = stats["kv_bytes_per_token"]
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert per_token == text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * 4  # float32 K and V
    assert row["kv_bytes_before"] - row["kv_bytes_after"] == 36 * per_token == stats["kv_bytes_saved"]
    assert stats["scoring_s"] > 0 and stats["compaction_s"] > 0


@pytest.mark.parametrize("family", testing.ORACLE_FAMILIES)
def test_stats_and_a_per_call_budget_in_every_family(family):
    """Every family: ``max_visual_tokens`` split over the batch's images in proportion to their counts (the images
    found here as runs of image tokens), the stats per image equal to it, decoding equal to the masked oracle."""
    import math

    model = testing.tiny_vlm_model(family, seed=0, attn_implementation="sdpa")
    processor = testing.tiny_family_processor(family)
    inputs = testing.make_inputs(
        processor, ["what colour is the square on the left?", "compare the two pictures."],
        [[testing.synthetic_image(224, 168, seed=1)],
         [testing.synthetic_image(112, 112, seed=2), testing.synthetic_image(112, 168, seed=3)]],
    )
    ids = (model.config.image_token_id, getattr(model.config, "video_token_id", None))
    ids = tuple(i for i in ids if i is not None)
    runs = image_runs(inputs, model)
    counts = [n for row in runs for _, n in row]
    seats = max(len(counts), (2 * sum(counts)) // 5)
    cache = PrunableDynamicCache(model, max_visual_tokens=seats)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=3, min_new_tokens=3, **GREEDY)
    stats = cache.stats
    kept = [[b.visual_tokens_kept for b in row.blocks] for row in stats.rows]
    assert_pruned(cache, inputs, ids, kept_counts=[sum(row) for row in kept])
    assert [[(b.first_position, b.visual_tokens_total) for b in row.blocks] for row in stats.rows] == runs
    flat = [k for row in kept for k in row]
    assert sum(flat) == seats
    for k, n in zip(flat, counts):
        assert math.floor(seats * n / sum(counts)) <= k <= math.ceil(seats * n / sum(counts))
    for row, row_runs in enumerate(runs):  # the stats' counts are the cache's kept positions per image
        positions = cache.kept_visual_positions[row]
        assert [int(((positions >= s) & (positions < s + n)).sum()) for s, n in row_runs] == kept[row]
    assert stats.kv_bytes_after == tensor_bytes(cache, minus_columns=2)
    assert stats.kv_bytes_before == inputs["input_ids"].numel() * token_bytes(cache)
    prompt_len = inputs["input_ids"].shape[1]
    expected = masked_decode_logits(model, inputs, cache.kept_visual_positions, out.sequences[:, prompt_len:], ids)
    assert_logits_close(out.logits, expected, atol=1e-4)


def test_stats_of_a_pre_llm_call(model, multi_inputs):
    """pre-llm: kept counts per image, every layer holding only the kept entries, and the recording of the kept
    prefix timed as compaction (it was reported as 0 before)."""
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scorer="divprune", mode="pre-llm")
    model.generate(**multi_inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert_pruned(cache, multi_inputs, visual_ids(model), kept_counts=[16, 4])
    stats = cache.stats
    runs = image_runs(multi_inputs, model)
    assert [[b.visual_tokens_kept for b in row.blocks] for row in stats.rows] == [
        [budget(n, 0.25, None) for _, n in row] for row in runs]
    assert stats.mode == "pre-llm" and stats.scorer == "divprune" and stats.scoring_layer is None
    widest = max(r.kv_entries_after for r in stats.rows)
    assert stats.kv_bytes_after == len(stats.rows) * widest * token_bytes(cache) < stats.kv_bytes_before
    assert stats.scoring_s > 0 and stats.selection_s > 0 and stats.compaction_s > 0
