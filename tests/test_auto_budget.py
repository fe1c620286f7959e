"""Budgets that pick themselves (``sparse_cache.budget``): coverage per image, a memory budget per call.

Each test first asserts that pruning happened with the counts computed here independently (from the cache's
scores for coverage, from the token counts and the cache's tensor sizes for the per-call budgets), then compares
the per-step logits with the oracle of the mode (masked equivalence, or the in-prefill reference) for the kept set.
"""

import math
import random

import numpy as np
import pytest
import torch
from oracles import (
    GREEDY,
    assert_not_pruned,
    assert_pruned,
    in_prefill_reference_logits,
    masked_decode_logits,
    visual_ids,
)
from test_planted_signal import CELL, planted_image, planted_model

from sparse_cache import PrunableDynamicCache, pruning, testing
from sparse_cache.budget import apportion, coverage_count

NEW = 4
ATOL = 1e-5


def image_blocks(inputs, model):
    """Per row, per image (runs of image tokens): the positions of its tokens."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    out = []
    for row in range(ids.shape[0]):
        visual = torch.nonzero((ids[row] == model.config.image_token_id) & (mask[row] == 1)).flatten().tolist()
        blocks = []
        for i, pos in enumerate(visual):
            if i == 0 or pos != visual[i - 1] + 1:
                blocks.append([])
            blocks[-1].append(pos)
        out.append(blocks)
    return out


def smallest_covering_set(scores: np.ndarray, coverage: float) -> int:
    """Independent reference: the least k whose k largest scores hold >= coverage of the image's mass."""
    values = np.sort(scores.astype(np.float64))[::-1]
    total = values.sum()
    for k in range(1, len(values) + 1):
        if values[:k].sum() >= coverage * total * (1 - 1e-12):
            return k
    return len(values)


def kept_per_block(cache, blocks):
    return [[int(torch.isin(torch.tensor(b), cache.kept_visual_positions[row]).sum()) for b in row_blocks]
            for row, row_blocks in enumerate(blocks)]


def run(model, inputs, new=NEW, **kwargs):
    cache = PrunableDynamicCache(model, **kwargs)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=new, min_new_tokens=new, **GREEDY)
    return cache, out


def check_oracle(model, inputs, cache, out, mode="post-prefill", layer=None):
    prompt_len = inputs["input_ids"].shape[1]
    if mode == "post-prefill":
        expected = masked_decode_logits(model, inputs, cache.kept_visual_positions, out.sequences[:, prompt_len:],
                                        visual_ids(model))
    else:
        expected = in_prefill_reference_logits(model, inputs, [(layer, cache.kept_visual_positions)],
                                               out.sequences[:, prompt_len:], visual_ids(model))
    assert len(out.logits) == len(expected)
    for step, (a, e) in enumerate(zip(out.logits, expected)):
        diff = (a.float() - e.float()).abs().max().item()
        assert diff <= ATOL, f"step {step}: max |diff| {diff:.3g} > {ATOL}"


# --------------------------------------------------------------------------- coverage


@pytest.mark.parametrize("scorer,coverage", [("sparsevlm", 0.5), ("sparsevlm", 0.8), ("fastv", 0.6),
                                             ("sparsevlm_plus", 0.7)])
def test_coverage_keeps_the_smallest_set_reaching_the_target(model, multi_inputs, scorer, coverage):
    cache, out = run(model, multi_inputs, keep_ratio="auto", coverage=coverage, scorer=scorer)
    blocks = image_blocks(multi_inputs, model)
    # expected counts from the cache's scores, per image, independently of the library's selection code
    expected = []
    for row, row_blocks in enumerate(blocks):
        scores = cache.visual_scores[row].double().numpy()
        start, row_expected = 0, []
        for b in row_blocks:
            block_scores = scores[start:start + len(b)]
            k = smallest_covering_set(block_scores, coverage)
            ordered = np.sort(block_scores)[::-1]
            assert ordered[:k].sum() >= coverage * ordered.sum() * (1 - 1e-12)  # reaches the target ...
            assert k == 1 or ordered[:k - 1].sum() < coverage * ordered.sum()  # ... and one fewer does not
            row_expected.append(k)
            start += len(b)
        expected.append(row_expected)
    assert_pruned(cache, multi_inputs, visual_ids(model), kept_counts=[sum(r) for r in expected])
    assert kept_per_block(cache, blocks) == expected
    # the kept tokens of each image are its k top-scored ones
    for row, row_blocks in enumerate(blocks):
        start = 0
        for b, k in zip(row_blocks, expected[row]):
            block_scores = cache.visual_scores[row][start:start + len(b)]
            top = torch.tensor(b)[torch.argsort(block_scores, descending=True, stable=True)[:k]].sort().values
            assert torch.equal(cache.kept_visual_positions[row][torch.isin(cache.kept_visual_positions[row],
                                                                          torch.tensor(b))], top)
            start += len(b)
    check_oracle(model, multi_inputs, cache, out)
    stats = cache.stats
    assert stats.budget == {"keep_ratio": "auto", "coverage": coverage}
    for row, row_stats in enumerate(stats.rows):
        assert [b.visual_tokens_kept for b in row_stats.blocks] == expected[row]
        assert all(b.score_mass_kept >= coverage - 1e-6 for b in row_stats.blocks)


def test_coverage_in_prefill_matches_the_reference(model, multi_inputs):
    cache, out = run(model, multi_inputs, coverage=0.6, mode="in-prefill", scoring_layer=1)
    blocks = image_blocks(multi_inputs, model)
    expected = []
    for row, row_blocks in enumerate(blocks):
        scores, start, row_expected = cache.visual_scores[row].double().numpy(), 0, []
        for b in row_blocks:
            row_expected.append(smallest_covering_set(scores[start:start + len(b)], 0.6))
            start += len(b)
        expected.append(row_expected)
    assert_pruned(cache, multi_inputs, visual_ids(model), kept_counts=[sum(r) for r in expected])
    assert kept_per_block(cache, blocks) == expected
    check_oracle(model, multi_inputs, cache, out, mode="in-prefill", layer=1)


def test_coverage_keeps_few_tokens_of_sparse_content_and_many_of_dense_content(processor):
    """Planted attention (tests/test_planted_signal.py): the text attends only to the bright cells. An image with
    one bright cell keeps one token, one with five keeps five, an all-bright one nearly all of its tokens."""
    model = planted_model("sdpa")
    sparse = planted_image(112, 112, [6])  # 4 x 4 cells, one bright
    five = planted_image(224, 168, [0, 9, 20, 33, 47])  # 6 x 8 cells, five bright
    dense = planted_image(112, 112, list(range(16)))  # every cell bright
    inputs = testing.make_inputs(processor, ["what colour is the square on the left?", "count.", "count them all."],
                                 [[sparse], [five], [dense]])
    cache, out = run(model, inputs, new=3, coverage=0.9, scoring_layer=2)
    counts = [k.numel() for k in cache.kept_visual_positions]
    assert counts[0] == 1 and counts[1] == 5
    assert 14 <= counts[2] < 16  # spread mass: ceil(0.9 x 16) = 15 if exactly uniform
    assert_pruned(cache, inputs, visual_ids(model), kept_counts=counts)
    ids = inputs["input_ids"]
    for row, targets in ((0, [6]), (1, [0, 9, 20, 33, 47])):
        visual = torch.nonzero(ids[row] == model.config.image_token_id).flatten()
        assert torch.equal(cache.kept_visual_positions[row], visual[targets])
    assert (112 // CELL) ** 2 == 16
    check_oracle(model, inputs, cache, out)


def test_coverage_count_reference():
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = 1 + trial % 40
        scores = torch.rand(n, generator=gen) ** (1 + trial % 5)
        if trial % 7 == 0:
            scores[: n // 2] = 0
        coverage = float(torch.rand((), generator=gen)) * 0.98 + 0.01
        assert coverage_count(scores, coverage) == smallest_covering_set(scores.numpy(), coverage), (trial, n)
    assert coverage_count(torch.zeros(5), 0.9) == 1  # no mass at all: one token
    assert coverage_count(torch.full((48,), 1 / 48), 0.5) == 24  # rounding of the sum does not add a token
    assert coverage_count(torch.tensor([0.5, 0.3, 0.2]), 1.0) == 3


# --------------------------------------------------------------------------- per-call budgets


def quotas(counts, seats):
    total = sum(counts)
    return [seats * n / total for n in counts]


@pytest.mark.parametrize("seats,expected", [(20, [[12, 4], [4]]), (23, [[14, 5], [4]]), (7, [[4, 2], [1]])])
def test_max_visual_tokens_splits_the_call_budget_in_proportion(model, multi_inputs, seats, expected):
    cache, out = run(model, multi_inputs, keep_ratio="auto", max_visual_tokens=seats)
    blocks = image_blocks(multi_inputs, model)
    counts = [len(b) for row in blocks for b in row]
    assert counts == [48, 16, 16]
    kept = kept_per_block(cache, blocks)
    flat = [k for row in kept for k in row]
    # the split: floor or ceil of each image's quota, exactly the budget in all, larger remainders first
    assert sum(flat) == seats
    for k, q in zip(flat, quotas(counts, seats)):
        assert math.floor(q) <= k <= math.ceil(q)
    assert kept == expected
    assert_pruned(cache, multi_inputs, visual_ids(model), kept_counts=[sum(r) for r in expected])
    check_oracle(model, multi_inputs, cache, out)
    assert cache.stats.visual_tokens_kept == seats
    assert cache.stats.budget == {"keep_ratio": "auto", "max_visual_tokens": seats}


def entry_bytes(model, dtype=torch.float32) -> int:
    """One token entry in every layer, from the config (as the cache's tensors will be)."""
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


@pytest.mark.parametrize("mode", ["post-prefill", "in-prefill"])
def test_max_kv_bytes_is_respected_and_split_in_proportion(model, multi_inputs, mode):
    per_token = entry_bytes(model)
    mask = multi_inputs["attention_mask"]
    visual_total = 80
    text_entries = int(mask.sum()) - visual_total
    seats = 30
    max_kv_bytes = (text_entries + seats) * per_token + per_token // 2  # half a token more: floors to 30 tokens
    layer = 1 if mode == "in-prefill" else None
    cache, out = run(model, multi_inputs, max_kv_bytes=max_kv_bytes, mode=mode, scoring_layer=layer)
    blocks = image_blocks(multi_inputs, model)
    kept = kept_per_block(cache, blocks)
    assert kept == [[18, 6], [6]]  # 30 seats over 48 / 16 / 16 tokens
    assert_pruned(cache, multi_inputs, visual_ids(model), kept_counts=[24, 6])
    check_oracle(model, multi_inputs, cache, out, mode=mode, layer=1)
    # the cache's real entries right after the prefill, in bytes from its tensors, are within the budget
    tensor_per_token = sum(l.keys[0, :, 0].numel() * l.keys.element_size() + l.values[0, :, 0].numel()
                           * l.values.element_size() for l in cache.layers)
    assert tensor_per_token == per_token
    entries = [int(mask[row].sum()) - sum(len(b) for b in blocks[row]) + sum(kept[row]) for row in range(2)]
    assert sum(entries) * per_token <= max_kv_bytes < (sum(entries) + 1) * per_token
    assert sum(r.kv_bytes_after for r in cache.stats.rows) == sum(entries) * per_token


def test_a_byte_budget_below_the_text_is_a_clear_error(sdpa_model, multi_inputs):
    per_token = entry_bytes(sdpa_model)
    text_entries = int(multi_inputs["attention_mask"].sum()) - 80
    cache = PrunableDynamicCache(sdpa_model, max_kv_bytes=text_entries * per_token - 1)
    with pytest.raises(ValueError, match=r"max_kv_bytes: \d+ bytes is smaller than the KV of the text") as info:
        sdpa_model.generate(**multi_inputs, past_key_values=cache, max_new_tokens=1, **GREEDY)
    assert f">= {(text_entries + 3) * per_token}" in str(info.value)
    cache = PrunableDynamicCache(sdpa_model, max_kv_bytes=(text_entries + 2) * per_token)
    with pytest.raises(ValueError, match="fewer than one per image/video"):
        sdpa_model.generate(**multi_inputs, past_key_values=cache, max_new_tokens=1, **GREEDY)
    cache = PrunableDynamicCache(sdpa_model, max_visual_tokens=2)
    with pytest.raises(ValueError, match="max_visual_tokens: 2 cannot keep one visual token of each of the call's 3"):
        sdpa_model.generate(**multi_inputs, past_key_values=cache, max_new_tokens=1, **GREEDY)


def test_a_budget_covering_every_token_keeps_all(sdpa_model, multi_inputs):
    ref = sdpa_model.generate(**multi_inputs, max_new_tokens=3, min_new_tokens=3, **GREEDY)
    cache, out = run(sdpa_model, multi_inputs, new=3, max_visual_tokens=80)
    assert_not_pruned(cache, multi_inputs, visual_ids(sdpa_model))
    for a, b in zip(out.logits, ref.logits):
        assert torch.equal(a, b)


def test_apportion_properties():
    rng = random.Random(0)
    for _ in range(500):
        counts = [rng.randint(1, 60) for _ in range(rng.randint(1, 6))]
        seats = rng.randint(len(counts), sum(counts))
        kept = apportion(counts, seats)
        assert sum(kept) == seats
        assert all(1 <= k <= n for k, n in zip(kept, counts))
        q = quotas(counts, seats)
        if all(x >= 1 for x in q):  # the at-least-one rule never moved a seat
            assert all(math.floor(x) <= k <= math.ceil(x) for k, x in zip(kept, q))
    assert apportion([100, 1, 1], 3) == [1, 1, 1]
    assert apportion([100, 2, 2], 4) == [2, 1, 1]
    assert apportion([10, 10], 5) == [3, 2]  # tie: the earlier image


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(keep_ratio="auto"), ValueError, "keep_ratio: 'auto' needs a target"),
    (dict(keep_ratio="half"), TypeError, "keep_ratio: expected a float in (0, 1] or 'auto'"),
    (dict(keep_ratio="auto", keep_tokens=4, coverage=0.9), ValueError, "keep_tokens: keep_ratio='auto'"),
    (dict(keep_ratio=0.5, coverage=0.9), ValueError, "coverage: a self-picking budget"),
    (dict(keep_tokens=8, max_visual_tokens=10), ValueError, "max_visual_tokens: a self-picking budget"),
    (dict(coverage=0.9, max_kv_bytes=10_000), ValueError, "coverage/max_kv_bytes: give exactly one target"),
    (dict(coverage=0.0), ValueError, "coverage: expected a share of the score mass in (0, 1]"),
    (dict(coverage=1.5), ValueError, "got 1.5"),
    (dict(coverage=True), ValueError, "coverage: expected"),
    (dict(max_kv_bytes=0), ValueError, "max_kv_bytes: expected an int >= 1 (per call), got 0"),
    (dict(max_visual_tokens=2.5), ValueError, "max_visual_tokens: expected an int >= 1"),
    (dict(coverage=0.9, scorer="random"), ValueError, "Scorers that support coverage: ['fastv', 'sparsevlm', 'sparsevlm_plus']"),
    (dict(coverage=0.9, scorer="cosine"), ValueError, "scorer 'cosine' does not give one"),
    (dict(coverage=0.9, scorer="divprune"), ValueError, "scorer 'divprune'"),
    (dict(coverage=0.9, mode="in-prefill", schedule=[(1, 0.5)]), ValueError, "coverage: a progressive schedule"),
    (dict(coverage=0.9, adaptive_scale=0.5), ValueError, "coverage: adaptive_scale is another"),
    (dict(max_visual_tokens=10, mode="in-prefill", recycle=True), ValueError, "max_visual_tokens: recycled tokens"),
])
def test_bad_auto_budget_arguments(sdpa_model, kwargs, error, words):
    with pytest.raises(error) as info:
        PrunableDynamicCache(sdpa_model, **kwargs)
    assert words in str(info.value)


def test_max_visual_tokens_works_through_enable(sdpa_model, multi_inputs):
    with pruning(sdpa_model, keep_ratio="auto", max_visual_tokens=20):
        out = sdpa_model.generate(**multi_inputs, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    cache = PrunableDynamicCache(sdpa_model, max_visual_tokens=20)
    ref = sdpa_model.generate(**multi_inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert_pruned(cache, multi_inputs, visual_ids(sdpa_model), kept_counts=[16, 4])
    for a, b in zip(out.logits, ref.logits):
        assert torch.equal(a, b)
