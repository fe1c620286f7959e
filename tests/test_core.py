"""Core behaviour of PrunableDynamicCache against the oracles of ../docs/oracles.md."""

import gc
import math

import pytest
import torch
from oracles import GREEDY, assert_not_pruned, assert_pruned, eager_rater_scores, masked_decode_logits, visual_ids
from transformers import DynamicCache

from sparse_cache import PrunableDynamicCache, testing, uninstall
from sparse_cache.hooks import is_installed
from sparse_cache.lifecycle import PruningLifecycle

NEW = 6
ATOL = 1e-5


def generate(model, inputs, cache=None, new=NEW, **kw):
    args = dict(GREEDY, max_new_tokens=new, min_new_tokens=new, **kw)
    if cache is not None:
        args["past_key_values"] = cache
    return model.generate(**inputs, **args)


def assert_logits_close(actual, expected, atol=ATOL):
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected)):
        diff = (a.float() - e.float()).abs().max().item()
        assert diff <= atol, f"step {step}: max |diff| {diff:.3g} > {atol}"


# --------------------------------------------------------------------------- oracle 1: identity


def test_keep_ratio_one_is_bit_identical(model, single_inputs, batch_inputs):
    for inputs in (single_inputs, batch_inputs):
        ref = generate(model, inputs)
        cache = PrunableDynamicCache(model, keep_ratio=1.0)
        out = generate(model, inputs, cache)
        # the hooks ran (one finite score per visual token) and kept every token: identity is not vacuous
        assert_not_pruned(cache, inputs, visual_ids(model))
        assert torch.equal(out.sequences, ref.sequences)
        for a, b in zip(out.logits, ref.logits):
            assert torch.equal(a, b)


def test_text_only_prompt_is_bit_identical(model, processor):
    inputs = testing.make_inputs(processor, ["describe the image."], [[]])
    ref = generate(model, inputs)
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    out = generate(model, inputs, cache)
    for a, b in zip(out.logits, ref.logits):
        assert torch.equal(a, b)
    assert cache.kept_visual_positions == [] or cache.kept_visual_positions[0].numel() == 0
    assert cache.get_physical_length() == cache.get_seq_length()  # nothing to drop: nothing dropped


def test_plain_generate_unchanged_by_installed_hooks(processor, single_inputs):
    model = testing.tiny_qwen2_5_vl_model(seed=3)
    before = generate(model, single_inputs)
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    generate(model, single_inputs, cache)
    assert_pruned(cache, single_inputs, visual_ids(model))  # the hooks were live and pruned in between
    assert is_installed(model)
    after = generate(model, single_inputs)
    assert torch.equal(before.sequences, after.sequences)
    for a, b in zip(before.logits, after.logits):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="live PrunableDynamicCache"):
        uninstall(model)  # the live cache still needs them
    del cache
    gc.collect()  # the last cache gone, the hooks went with it
    assert not is_installed(model)
    assert "prepare_inputs_for_generation" not in vars(model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    uninstall(model)  # a no-op now


# --------------------------------------------------------------------------- oracle 2: masked equivalence


@pytest.mark.parametrize("keep_ratio", [0.25, 0.5])
def test_masked_equivalence_single(model, single_inputs, keep_ratio):
    cache = PrunableDynamicCache(model, keep_ratio=keep_ratio)
    out = generate(model, single_inputs, cache)
    n_visual = int((single_inputs["input_ids"] == model.config.image_token_id).sum())
    assert_pruned(cache, single_inputs, visual_ids(model), kept_counts=[math.floor(keep_ratio * n_visual + 0.5)])
    prompt_len = single_inputs["input_ids"].shape[1]
    expected = masked_decode_logits(
        model, single_inputs, cache.kept_visual_positions, out.sequences[:, prompt_len:], visual_ids(model)
    )
    assert_logits_close(out.logits, expected)
    # the pruned run really differs from the unpruned one (the oracle is not vacuous)
    ref = generate(model, single_inputs)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(out.logits[1:], ref.logits[1:]))


def test_masked_equivalence_left_padded_batch(model, batch_inputs):
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    out = generate(model, batch_inputs, cache)
    # 25% of 48 and of 16: rows keep different numbers of tokens
    assert_pruned(cache, batch_inputs, visual_ids(model), kept_counts=[12, 4])
    assert not cache._prefix_all_valid  # the shorter row is re-padded
    prompt_len = batch_inputs["input_ids"].shape[1]
    expected = masked_decode_logits(
        model, batch_inputs, cache.kept_visual_positions, out.sequences[:, prompt_len:], visual_ids(model)
    )
    assert_logits_close(out.logits, expected)


def test_row_without_visual_tokens_is_left_as_is(model, processor):
    inputs = testing.make_inputs(
        processor, ["describe the image.", "what is in the picture?"], [[], [testing.synthetic_image(112, 112, 4)]]
    )
    cache = PrunableDynamicCache(model, keep_tokens=3)
    out = generate(model, inputs, cache)
    assert_pruned(cache, inputs, visual_ids(model), kept_counts=[0, 3])
    prompt_len = inputs["input_ids"].shape[1]
    expected = masked_decode_logits(
        model, inputs, cache.kept_visual_positions, out.sequences[:, prompt_len:], visual_ids(model)
    )
    assert_logits_close(out.logits, expected)


# --------------------------------------------------------------------------- oracle 4: scoring


def test_scores_equal_eager_output_attentions(model, eager_model, batch_inputs):
    cache = PrunableDynamicCache(model, keep_ratio=0.5)
    generate(model, batch_inputs, cache, new=1)
    assert_pruned(cache, batch_inputs, visual_ids(model), kept_counts=[24, 8])
    assert cache.scoring_layer == 0  # the depth-scaled default: SparseVLM's layer 2 of 32, on 4 layers
    expected = eager_rater_scores(eager_model, batch_inputs, visual_ids(model), layer=cache.scoring_layer)
    n_visual = (batch_inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert n_visual == [48, 16]
    assert len(expected) == len(cache.visual_scores) == 2, (len(expected), len(cache.visual_scores))
    for row, (got, want) in enumerate(zip(cache.visual_scores, expected)):
        assert got.numel() == want.numel() == n_visual[row], (row, got.numel(), want.numel(), n_visual[row])
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=ATOL, rtol=0), f"row {row}: {(got - want).abs().max()}"


def test_kept_tokens_are_the_top_scored(sdpa_model, batch_inputs):
    cache = PrunableDynamicCache(sdpa_model, keep_ratio=0.25)
    generate(sdpa_model, batch_inputs, cache, new=1)
    assert_pruned(cache, batch_inputs, visual_ids(sdpa_model), kept_counts=[12, 4])
    ids = batch_inputs["input_ids"]
    for row in range(ids.shape[0]):
        visual = torch.nonzero(ids[row] == sdpa_model.config.image_token_id).flatten()
        scores = cache.visual_scores[row]
        kept = cache.kept_visual_positions[row]
        assert scores.shape == visual.shape
        assert torch.all(kept[1:] > kept[:-1])
        is_kept = torch.isin(visual, kept)
        assert scores[is_kept].min() >= scores[~is_kept].max()


# --------------------------------------------------------------------------- lengths


def test_logical_and_physical_lengths(sdpa_model, batch_inputs):
    cache = PrunableDynamicCache(sdpa_model, keep_ratio=0.25)
    out = generate(sdpa_model, batch_inputs, cache, new=4)
    assert_pruned(cache, batch_inputs, visual_ids(sdpa_model), kept_counts=[12, 4])
    assert cache.get_physical_length() < cache.get_seq_length()
    prompt_len = batch_inputs["input_ids"].shape[1]
    # the last generated token is not fed back: logical = prompt + new - 1
    assert cache.get_seq_length() == prompt_len + 4 - 1 == out.sequences.shape[1] - 1
    mask = batch_inputs["attention_mask"]
    n_visual = (batch_inputs["input_ids"] == sdpa_model.config.image_token_id).sum(1)
    stored = mask.sum(1) - n_visual + torch.tensor([k.numel() for k in cache.kept_visual_positions])
    assert cache.get_physical_length() == int(stored.max()) + 4 - 1
    for layer in cache.layers:
        assert layer.keys.shape[2] == cache.get_physical_length()
    assert cache.get_mask_sizes(1, 0)[0] == cache.get_physical_length() + 1
    assert cache.get_query_offset(0) == cache.get_physical_length()


# --------------------------------------------------------------------------- memory: no N x N tensor


def test_scoring_allocates_no_n_by_n_tensor(sdpa_model, processor, monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    inputs = testing.make_inputs(processor, ["what is in the picture?"], [[testing.synthetic_image(224, 224, 5)]])
    seq_len = inputs["input_ids"].shape[1]
    shapes = []

    class RecordShapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    shapes.append(tuple(t.shape))
            return out

    original = PruningLifecycle._score

    def recording_score(self, p, context):
        with RecordShapes():
            return original(self, p, context)

    monkeypatch.setattr(PruningLifecycle, "_score", recording_score)
    cache = PrunableDynamicCache(sdpa_model, keep_ratio=0.25)
    generate(sdpa_model, inputs, cache, new=1)
    assert_pruned(cache, inputs, visual_ids(sdpa_model))
    assert shapes, "the scorer ran no tensor op under the recorder"
    largest = max(math.prod(s) for s in shapes)
    assert largest < seq_len * seq_len, f"scoring allocated {largest} elements, N*N = {seq_len * seq_len}"
    assert not any(len(s) >= 2 and s[-1] >= seq_len and s[-2] >= seq_len for s in shapes)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(keep_ratio=0.0), ValueError, "keep_ratio"),
        (dict(keep_ratio=1.5), ValueError, "keep_ratio"),
        (dict(keep_ratio=-0.1), ValueError, "keep_ratio"),
        (dict(keep_ratio=float("nan")), ValueError, "keep_ratio"),
        (dict(keep_ratio="0.5"), TypeError, "keep_ratio"),
        (dict(keep_ratio=True), TypeError, "keep_ratio"),
        (dict(), ValueError, "exactly one"),
        (dict(keep_ratio=0.5, keep_tokens=10), ValueError, "exactly one"),
        (dict(keep_tokens=0), ValueError, "keep_tokens"),
        (dict(keep_tokens=2.5), TypeError, "keep_tokens"),
        (dict(keep_ratio=0.5, scorer="nope"), ValueError, "sparsevlm"),
        (dict(keep_ratio=0.5, scoring_layer=4), ValueError, "0..3"),
        (dict(keep_ratio=0.5, scoring_layer=-1), ValueError, "scoring_layer"),
    ],
)
def test_bad_arguments(sdpa_model, kwargs, error, words):
    with pytest.raises(error, match=words):
        PrunableDynamicCache(sdpa_model, **kwargs)


def test_unsupported_model_says_what_is_supported():
    with pytest.raises(TypeError, match="Qwen2_5_VLForConditionalGeneration"):
        PrunableDynamicCache(torch.nn.Linear(2, 2), keep_ratio=0.5)


def test_sliding_window_config_is_refused():
    model = testing.tiny_qwen2_5_vl_model(use_sliding_window=True, sliding_window=8, max_window_layers=0)
    with pytest.raises(ValueError, match="sliding"):
        PrunableDynamicCache(model, keep_ratio=0.5)


def test_cache_reused_for_unrelated_call_is_refused(sdpa_model, processor, single_inputs):
    cache = PrunableDynamicCache(sdpa_model, keep_ratio=0.25)
    generate(sdpa_model, single_inputs, cache)
    other = testing.make_inputs(processor, ["count the objects."], [[testing.synthetic_image(112, 112, 9)]])
    with pytest.raises(ValueError, match="single-use"):
        generate(sdpa_model, other, cache)


def test_cache_of_another_model_is_refused(sdpa_model, single_inputs):
    other = testing.tiny_qwen2_5_vl_model(seed=1)
    cache = PrunableDynamicCache(other, keep_ratio=0.25)
    # refused by the other model's hooks when it has some, by the cache's self-check when it has none
    with pytest.raises((ValueError, RuntimeError), match="another model|model it was built for"):
        generate(sdpa_model, single_inputs, cache)


def test_plain_dynamic_cache_still_works_on_hooked_model(sdpa_model, single_inputs):
    PrunableDynamicCache(sdpa_model, keep_ratio=0.5)  # installs hooks
    ref = generate(sdpa_model, single_inputs)
    out = generate(sdpa_model, single_inputs, DynamicCache(config=sdpa_model.config))
    for a, b in zip(out.logits, ref.logits):
        assert torch.equal(a, b)
