"""Fixed-shape decoding over a pruned cache (``sparse_cache.static_cache``), compiled with ``torch.compile``.

Each test first asserts that the prefill pruned (``assert_pruned``), then compares every decode step's logits
with those of the eager ``PrunableDynamicCache`` (itself checked against the masked-full-cache oracle by the
rest of the suite) at 1e-4 in float32. The compiled step uses dynamo's ``eager`` backend (graph capture and
guards are what is tested; the inductor backend only changes the kernels and is measured by the bench) with
``fullgraph=True``, and dynamo's counters must show a single graph for all steps: no recompiles per step.
"""

from __future__ import annotations

import pytest
import torch
from oracles import assert_pruned, visual_ids

from sparse_cache import PrunableDynamicCache, testing
from sparse_cache.static_cache import PrunedStaticCache, to_static

STEPS = 5
ATOL = 1e-4
FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava")
_models: dict = {}


def model_of(family):
    if family not in _models:
        _models[family] = testing.tiny_vlm_model(family, seed=0, attn_implementation="sdpa")
    return _models[family]


def batch_inputs(family):
    """Left-padded rows with different images and lengths (the physical mask has masked slots)."""
    processor = testing.tiny_family_processor(family)
    return testing.make_inputs(
        processor,
        ["what colour is the square on the left?", "count."],
        [[testing.synthetic_image(224, 168, seed=1)], [testing.synthetic_image(112, 112, seed=2)]],
    )


def reference(model, inputs, keep_ratio):
    cache = PrunableDynamicCache(model, keep_ratio=keep_ratio)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=STEPS, min_new_tokens=STEPS,
                         do_sample=False, output_logits=True, return_dict_in_generate=True)
    return cache, out


def prefill(model, inputs, keep_ratio):
    """The pruned prefill and first token through ``generate``, then the cache converted to fixed shapes."""
    cache = PrunableDynamicCache(model, keep_ratio=keep_ratio)
    first = model.generate(**inputs, past_key_values=cache, max_new_tokens=1, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
    static = to_static(cache, STEPS - 1, attention_mask=inputs["attention_mask"])
    return cache, first, static


def close(got, expected):
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(got, expected)):
        diff = (a.float() - b.float()).abs().max().item()
        assert diff <= ATOL, f"step {step}: {diff}"


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_static_decode_equals_the_eager_pruned_cache_with_one_graph(family):
    from torch._dynamo.utils import counters

    model = model_of(family)
    inputs = batch_inputs(family)
    ref_cache, ref = reference(model, inputs, 0.25)
    assert_pruned(ref_cache, inputs, visual_ids(model))
    cache, first, static = prefill(model, inputs, 0.25)
    assert_pruned(cache, inputs, visual_ids(model))
    assert static.get_physical_length() == cache.get_physical_length() < cache.get_seq_length()
    assert static.physical_mask.shape == (2, cache.get_physical_length() + STEPS - 1)
    address = static.layers[0].keys.data_ptr()

    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(static.step_function(model), fullgraph=True, backend="eager", dynamic=False)
    logits = static.decode(step, first.sequences[:, -1:], STEPS - 1)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # traced once, no recompile per step
    assert not counters["recompiles"], dict(counters["recompiles"])
    torch._dynamo.reset()

    close([first.logits[0]] + logits, ref.logits)
    # the buffers were written in place (static addresses), every slot used
    assert static.layers[0].keys.data_ptr() == address
    assert static.get_physical_length() == static.capacity
    assert static.get_logical_length() == cache.get_seq_length() + STEPS - 1


def test_eager_static_decode_and_the_unpruned_baseline():
    """Without compiling, the same step is exact; a cache that was not compacted (keep_ratio=1.0) decodes over
    the whole prompt like a plain DynamicCache (the bench's unpruned compiled baseline)."""
    model = model_of("qwen2_5_vl")
    inputs = batch_inputs("qwen2_5_vl")
    ref_cache, ref = reference(model, inputs, 0.25)
    assert_pruned(ref_cache, inputs, visual_ids(model))
    cache, first, static = prefill(model, inputs, 0.25)
    assert_pruned(cache, inputs, visual_ids(model))
    close([first.logits[0]] + static.decode(static.step_function(model), first.sequences[:, -1:], STEPS - 1),
          ref.logits)

    plain = model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
    cache, first, static = prefill(model, inputs, 1.0)
    assert cache.get_physical_length() == cache.get_seq_length() == inputs["input_ids"].shape[1]  # a control
    close([first.logits[0]] + static.decode(static.step_function(model), first.sequences[:, -1:], STEPS - 1),
          plain.logits)


def test_static_conversion_errors():
    model = model_of("qwen2_5_vl")
    inputs = batch_inputs("qwen2_5_vl")
    with pytest.raises(TypeError, match="cache: expected a PrunableDynamicCache"):
        to_static(object(), 4)
    empty = PrunableDynamicCache(model, keep_ratio=0.25)
    with pytest.raises(ValueError, match="cache: it is empty"):
        to_static(empty, 4)
    cache, first, static = prefill(model, inputs, 0.25)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_new_tokens: expected an int >= 1"):
            to_static(cache, bad)
    with pytest.raises(ValueError, match=r"attention_mask: expected the 2-D mask"):
        to_static(cache, 4, attention_mask=inputs["attention_mask"][:, 1:])
    assert isinstance(static, PrunedStaticCache)
    with pytest.raises(ValueError, match=r"steps: expected an int in 0\.\.4"):
        static.decode(static.step_function(model), first.sequences[:, -1:], 5)
    with pytest.raises(ValueError, match=r"tokens: expected shape \(2, 1\)"):
        static.decode(static.step_function(model), first.sequences[:1, -1:], 1)
