"""In-prefill pruning (SparseVLM proper) against oracle 5, a hand-built reference."""

import pytest
import torch
from oracles import GREEDY, in_prefill_reference_logits

from sparse_cache import PrunableDynamicCache

NEW = 5


def visual_ids(model):
    return (model.config.image_token_id, model.config.video_token_id)


@pytest.mark.parametrize("which", ["single", "batch"])
@pytest.mark.parametrize("layer", [1, 2])
def test_in_prefill_matches_hand_built_reference(model, single_inputs, batch_inputs, which, layer):
    inputs = single_inputs if which == "single" else batch_inputs
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scoring_layer=layer, mode="in-prefill")
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    if which == "batch":
        assert [k.numel() for k in cache.kept_visual_positions] == [12, 4]
    prompt_len = inputs["input_ids"].shape[1]
    expected = in_prefill_reference_logits(
        model, inputs, cache.kept_visual_positions, layer, out.sequences[:, prompt_len:], visual_ids(model)
    )
    assert len(out.logits) == len(expected)
    for step, (a, e) in enumerate(zip(out.logits, expected)):
        diff = (a - e).abs().max().item()
        assert diff <= 1e-5, f"step {step}: {diff}"
    # in-prefill differs from post-prefill compaction (later prefill layers never saw the dropped tokens)
    post = model.generate(**inputs, past_key_values=PrunableDynamicCache(model, keep_ratio=0.25, scoring_layer=layer),
                          max_new_tokens=1, **GREEDY)
    assert (post.logits[0] - out.logits[0]).abs().max() > 1e-4
    # one physical layout in every layer
    lengths = {layer_cache.keys.shape[2] for layer_cache in cache.layers}
    assert lengths == {cache.get_physical_length()}


def test_in_prefill_keep_ratio_one_equals_plain(model, single_inputs):
    ref = model.generate(**single_inputs, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    cache = PrunableDynamicCache(model, keep_ratio=1.0, mode="in-prefill")
    out = model.generate(**single_inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        assert (a - b).abs().max() <= 1e-5


def test_unknown_mode_is_refused(sdpa_model):
    with pytest.raises(ValueError, match="post-prefill"):
        PrunableDynamicCache(sdpa_model, keep_ratio=0.5, mode="during")
    with pytest.raises(ValueError, match="scoring_layer"):
        PrunableDynamicCache(sdpa_model, keep_ratio=0.5, scorer="random", mode="in-prefill")
