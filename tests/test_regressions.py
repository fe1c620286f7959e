"""Regressions found by the randomized oracle test (tests/test_randomized.py), each a minimal repro."""

import pytest
import torch
from oracles import GREEDY, in_prefill_reference_logits, masked_decode_logits, visual_ids
from transformers import LogitsProcessor, LogitsProcessorList

from sparse_cache import PrunableDynamicCache, testing

ATOL = 1e-5


class ForceTokenAt(LogitsProcessor):
    """Force ``token`` as the ``step``-th generated token (a random tiny model emits special tokens often)."""

    def __init__(self, step, token, prompt_len):
        self.step, self.token, self.prompt_len = step, token, prompt_len

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_len == self.step:
            scores = torch.full_like(scores, -float("inf"))
            scores[:, self.token] = 0.0
        return scores


@pytest.mark.parametrize(
    "kwargs",
    [dict(keep_ratio=0.25), dict(keep_ratio=0.25, mode="in-prefill"),
     dict(mode="in-prefill", schedule=[(1, 0.5), (2, 0.25)])],
    ids=["post-prefill", "in-prefill", "schedule"],
)
def test_generated_image_pad_token_is_not_a_new_image(sdpa_model, single_inputs, kwargs):
    """A decode step whose (generated) token is ``<|image_pad|>`` brings no image: no pixels, no grid. The
    cache must not score it as a new image: ``kept_visual_positions`` holds prompt positions only,
    ``visual_scores`` one score per prompt visual token, and ``stage_kept_visual_positions`` the
    prefill's stages (today the decode step is scored as a one-token image: its position joins the kept
    set, its score is appended, and the stages are overwritten by ``[[position]]``)."""
    model = sdpa_model
    image = model.config.image_token_id
    prompt_len = single_inputs["input_ids"].shape[1]
    n_visual = int((single_inputs["input_ids"] == image).sum())
    cache = PrunableDynamicCache(model, **kwargs)
    out = model.generate(
        **single_inputs, past_key_values=cache, max_new_tokens=4, min_new_tokens=4,
        logits_processor=LogitsProcessorList([ForceTokenAt(1, image, prompt_len)]), **GREEDY,
    )
    assert out.sequences[0, prompt_len + 1] == image
    kept = cache.kept_visual_positions[0]
    assert bool((kept < prompt_len).all()), f"a generated token was reported as kept visual token: {kept.tolist()}"
    assert cache.visual_scores[0].numel() == n_visual
    stage_layers = [layer for layer, _ in cache.schedule] if cache.schedule else [cache.scoring_layer]
    assert len(cache.stage_kept_visual_positions) == len(stage_layers)
    assert torch.equal(cache.stage_kept_visual_positions[-1][0], kept)
    continuations = out.sequences[:, prompt_len:]
    if kwargs.get("mode") == "in-prefill":
        stages = list(zip(stage_layers, cache.stage_kept_visual_positions))
        expected = in_prefill_reference_logits(model, single_inputs, stages, continuations, visual_ids(model))
    else:
        expected = masked_decode_logits(model, single_inputs, [kept], continuations, visual_ids(model))
    for step, (a, e) in enumerate(zip(out.logits, expected)):
        assert (a - e).abs().max() <= ATOL, f"step {step}"


@pytest.mark.parametrize("schedule", [[(1, 0.5)], "sparsevlm"])
def test_schedule_on_shallow_model_ignores_default_layer(processor, single_inputs, schedule):
    """On a 2-layer model an in-prefill schedule within layers 0..1 is valid, yet the constructor first
    validates the scorer's default scoring layer (2 for sparsevlm) and raises ``scoring_layer: 2 is outside
    the model's decoder layers 0..1``, though the caller passed no scoring_layer and the schedule replaces it."""
    model = testing.tiny_qwen2_5_vl_model(seed=0, num_hidden_layers=2)
    kwargs = dict(keep_ratio=0.8) if schedule == "sparsevlm" else {}
    cache = PrunableDynamicCache(model, mode="in-prefill", schedule=schedule, **kwargs)
    assert cache.scoring_layer == cache.schedule[0][0]
    out = model.generate(**single_inputs, past_key_values=cache, max_new_tokens=3, min_new_tokens=3, **GREEDY)
    stages = [(layer, kept) for (layer, _), kept in zip(cache.schedule, cache.stage_kept_visual_positions)]
    prompt_len = single_inputs["input_ids"].shape[1]
    expected = in_prefill_reference_logits(model, single_inputs, stages, out.sequences[:, prompt_len:], visual_ids(model))
    for step, (a, e) in enumerate(zip(out.logits, expected)):
        assert (a - e).abs().max() <= ATOL, f"step {step}"
