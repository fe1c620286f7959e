"""SparseVLM+ (gravity correction, head selection) and SparseVLM's rank-based adaptive budget."""

import pytest
import torch
from oracles import GREEDY, assert_pruned, full_positions, masked_decode_logits, visual_ids

from sparse_cache import PrunableDynamicCache
from sparse_cache.models import adapter_for
from sparse_cache.scorers.sparsevlm_plus import position_bias
from sparse_cache.select import adaptive_keep_count


def closed_form_bias(model, positions, query_rows, allowed):
    """All-ones q and k after M-RoPE: q.k = 2 * sum_j cos(angle_q_j - angle_k_j), angle from raw 3-D positions."""
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    theta = text.rope_parameters["rope_theta"]
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    sections = text.rope_parameters["mrope_section"]
    axis = torch.cat([torch.full((n,), i % 3) for i, n in enumerate(sections)])  # t/h/w of each frequency
    pos = positions.double()  # (3, S)
    angles = pos[axis].T * inv_freq  # (S, d/2)
    delta = angles[query_rows][:, None, :] - angles[None, :, :]
    logits = 2 * torch.cos(delta).sum(-1) * head_dim**-0.5
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)


def test_gravity_correction_equals_direct_all_ones_computation(sdpa_model, single_inputs):
    positions = full_positions(sdpa_model, single_inputs)[1:, 0]  # (3, S) real 3-D positions
    seq = positions.shape[1]
    text_model = sdpa_model.model.language_model
    hidden = torch.zeros(1, seq, text_model.config.hidden_size)
    cos, sin = adapter_for(sdpa_model).rope_tables(
        text_model.layers[0].self_attn, *text_model.rotary_emb(hidden, positions[:, None])
    )
    rows = torch.tensor([seq - 5, seq - 3, seq - 1])
    allowed = torch.arange(seq)[None, :] <= rows[:, None]
    got = position_bias(cos[0, rows], sin[0, rows], cos[0], sin[0], text_model.layers[0].self_attn.scaling, allowed)
    expected = closed_form_bias(sdpa_model, positions, rows, allowed)
    assert torch.allclose(got.double(), expected, atol=1e-5)
    # the bias is not uniform over the image: RoPE alone favours some positions
    visual = torch.nonzero(single_inputs["input_ids"][0] == sdpa_model.config.image_token_id).flatten()
    assert got[:, visual].std() > 0


def test_sparsevlm_plus_scores_equal_eager_reference(model, eager_model, single_inputs):
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scorer="sparsevlm_plus", scoring_layer=2)
    model.generate(**single_inputs, past_key_values=cache, max_new_tokens=1)
    assert_pruned(cache, single_inputs, visual_ids(model), kept_counts=[12])
    ids = single_inputs["input_ids"][0]
    out = eager_model(**single_inputs, output_attentions=True, output_hidden_states=True)
    attn = out.attentions[2][0].float()  # (H, S, S)
    embeds = out.hidden_states[0][0].float()
    visual = torch.nonzero(ids == model.config.image_token_id).flatten()
    text = torch.arange(ids.shape[0])[torch.arange(ids.shape[0]) > visual.max()]
    relevance = torch.softmax(embeds[visual] @ embeds[text].T, -1).mean(0)
    raters = text[relevance > relevance.mean()] if (relevance > relevance.mean()).any() else text
    positions = full_positions(model, single_inputs)[1:, 0]
    allowed = torch.arange(ids.shape[0])[None, :] <= raters[:, None]
    bias = closed_form_bias(model, positions, raters, allowed).float()
    a = attn[:, raters][:, :, visual]
    heads = torch.topk(a.sum((1, 2)), a.shape[0] // 2).indices
    expected = (a / bias[:, visual])[heads].mean((0, 1))
    assert len(cache.visual_scores) == 1 and cache.visual_scores[0].numel() == expected.numel() == visual.numel()
    assert torch.allclose(cache.visual_scores[0], expected, rtol=1e-4, atol=1e-6)


def test_sparsevlm_plus_decoding_matches_masked_oracle(model, batch_inputs):
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scorer="sparsevlm_plus", scoring_layer=2)
    out = model.generate(**batch_inputs, past_key_values=cache, max_new_tokens=4, min_new_tokens=4, **GREEDY)
    assert_pruned(cache, batch_inputs, visual_ids(model), kept_counts=[12, 4])
    prompt_len = batch_inputs["input_ids"].shape[1]
    expected = masked_decode_logits(
        model, batch_inputs, cache.kept_visual_positions, out.sequences[:, prompt_len:], visual_ids(model)
    )
    for a, e in zip(out.logits, expected):
        assert (a - e).abs().max() <= 1e-5


def test_adaptive_keep_count_on_a_matrix_of_known_rank():
    torch.manual_seed(0)
    for rank in (1, 3, 5):
        p = torch.rand(6, rank) @ torch.rand(rank, 20)  # raters x visual, rank exactly `rank`
        assert int(torch.linalg.matrix_rank(p)) == rank
        for scale in (0.25, 0.5, 1.0):
            pruned = int(scale * (20 - rank) + 0.5)
            assert adaptive_keep_count(p, scale) == 20 - pruned
    assert adaptive_keep_count(torch.ones(4, 10), 1.0) == 1  # rank 1: everything but one token is redundant


def test_adaptive_budget_in_the_cache(sdpa_model, eager_model, batch_inputs):
    cache = PrunableDynamicCache(sdpa_model, adaptive_scale=0.5)
    out = sdpa_model.generate(**batch_inputs, past_key_values=cache, max_new_tokens=3, min_new_tokens=3, **GREEDY)
    assert_pruned(cache, batch_inputs, visual_ids(sdpa_model))
    ids = batch_inputs["input_ids"]
    mask = batch_inputs["attention_mask"]
    ref = eager_model(**batch_inputs, output_attentions=True, output_hidden_states=True)
    for row, kept in enumerate(cache.kept_visual_positions):
        visual = torch.nonzero(ids[row] == sdpa_model.config.image_token_id).flatten()
        text = torch.nonzero((torch.arange(ids.shape[1]) > visual.max()) & (mask[row] == 1)).flatten()
        embeds = ref.hidden_states[0][row].float()
        relevance = torch.softmax(embeds[visual] @ embeds[text].T, -1).mean(0)
        raters = text[relevance > relevance.mean()] if (relevance > relevance.mean()).any() else text
        p = ref.attentions[2][row].float()[:, raters][:, :, visual].mean(0)  # independent P (raters x visual)
        assert kept.numel() == adaptive_keep_count(p, 0.5) < visual.numel()
    prompt_len = ids.shape[1]
    expected = masked_decode_logits(
        sdpa_model, batch_inputs, cache.kept_visual_positions, out.sequences[:, prompt_len:], visual_ids(sdpa_model)
    )
    for a, e in zip(out.logits, expected):
        assert (a - e).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(adaptive_scale=0.5, keep_ratio=0.5), "leave keep_ratio"),
        (dict(adaptive_scale=-1.0), "adaptive_scale"),
        (dict(adaptive_scale=0.5, scorer="random"), "does not compute"),
    ],
)
def test_adaptive_bad_arguments(sdpa_model, kwargs, words):
    with pytest.raises(ValueError, match=words):
        PrunableDynamicCache(sdpa_model, **kwargs)
