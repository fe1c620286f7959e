"""What the library adds to a decode step: no host sync and nothing that grows with the sequence.

Every aten op run inside the library's hooks during decode steps is recorded (a ``TorchDispatchMode``
around the lifecycle callbacks). A host sync shows up as ``aten._local_scalar_dense`` (``.item()``,
``bool(tensor)``); work proportional to the sequence shows up as output sizes that change with the
prompt length (views aside). The physical 2-D mask handed to the model when the caller passes one (always
with padding; on transformers 5.14 even without) is a view of a buffer that a decode step extends by one
column.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparse_cache import PrunableDynamicCache, testing
from sparse_cache.lifecycle import PruningLifecycle

CALLBACKS = ("on_vlm_forward", "on_text_forward", "on_text_forward_end", "on_attention", "on_layer_forward",
             "on_layer_forward_end", "on_top_forward", "on_top_forward_end")


class Recorder(TorchDispatchMode):
    def __init__(self, ops):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = tuple(tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else (out,))
                      if isinstance(t, torch.Tensor))
        self.ops.append((str(func), sizes))
        return out


def decode_ops(model, inputs, monkeypatch, steps=4, **cache_kwargs):
    """The ops the library runs in each decode step (after the prefill) of a greedy generate."""
    per_forward: list[list] = []

    def wrap(name):
        original = getattr(PruningLifecycle, name)

        def recorded(self, *args, **kwargs):
            if name == "on_top_forward":  # the first callback of every forward of the top-level model
                per_forward.append([])
            with Recorder(per_forward[-1]):
                return original(self, *args, **kwargs)

        monkeypatch.setattr(PruningLifecycle, name, recorded)

    for name in CALLBACKS:
        wrap(name)
    cache = PrunableDynamicCache(model, **(cache_kwargs or dict(keep_ratio=0.25)))
    model.generate(**inputs, past_key_values=cache, max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                   do_sample=False)
    assert cache.get_physical_length() < cache.get_seq_length()  # it pruned
    monkeypatch.undo()
    return per_forward[2:]  # the prefill and the first decode step (which checks the positions once) aside


@pytest.mark.parametrize("size", [(112, 112)])
def test_a_decode_step_does_no_host_sync_and_no_work_growing_with_the_sequence(sdpa_model, processor, monkeypatch,
                                                                            size):
    short = testing.make_inputs(processor, ["describe."], [[testing.synthetic_image(*size, seed=1)]])
    long = testing.make_inputs(processor, ["describe."], [[testing.synthetic_image(224, 224, seed=1)]])
    assert long["input_ids"].shape[1] > short["input_ids"].shape[1] + 30
    ops_short = decode_ops(sdpa_model, short, monkeypatch)
    ops_long = decode_ops(sdpa_model, long, monkeypatch)
    for step in ops_short + ops_long:
        assert not any("_local_scalar_dense" in name for name, _ in step), step
    # the same ops with the same sizes, whatever the sequence length; views (a slice of the mask buffer handed
    # to the model) cost O(1) whatever their size
    assert [without_views(step) for step in ops_short] == [without_views(step) for step in ops_long]
    assert ops_short  # the library did run in the decode steps


VIEW_OPS = ("aten.slice", "aten.view", "aten.expand", "aten.alias", "aten.as_strided", "aten.select",
            "aten.unsqueeze", "aten.squeeze", "aten.t.", "aten.transpose", "aten.permute", "aten.detach")


def without_views(step):
    return [(name, sizes) for name, sizes in step if not name.startswith(VIEW_OPS)]


def test_a_padded_decode_step_extends_the_physical_mask_in_place(sdpa_model, processor, monkeypatch):
    """Left-padded rows: the physical mask is handed to the model at every step, built once per call."""
    def batch(side):
        return testing.make_inputs(processor, ["describe.", "count the objects in it."],
                                   [[testing.synthetic_image(side, side, seed=1)], [testing.synthetic_image(112, 112, seed=2)]])

    short, long = batch(112), batch(224)
    assert long["input_ids"].shape[1] > short["input_ids"].shape[1] + 30
    ops_short = decode_ops(sdpa_model, short, monkeypatch)
    ops_long = decode_ops(sdpa_model, long, monkeypatch)
    for step in ops_short + ops_long:
        assert not any("_local_scalar_dense" in name for name, _ in step), step
    assert [without_views(step) for step in ops_short] == [without_views(step) for step in ops_long]


@pytest.mark.parametrize("cache_kwargs", [dict(coverage=0.6), dict(max_visual_tokens=10), dict(max_kv_bytes=125 * 1024),
                                          dict(keep_ratio=0.25, sync_timing=True), dict(keep_ratio=0.25, mode="in-prefill")],
                         ids=["coverage", "max_visual_tokens", "max_kv_bytes", "sync_timing", "in-prefill"])
def test_stats_and_self_picking_budgets_add_nothing_to_a_decode_step(sdpa_model, processor, monkeypatch, cache_kwargs):
    """cache.stats is recorded and the budgets are picked in the prefill only: a decode step still does no host sync
    and the same work whatever the prompt length."""
    def batch(side):
        return testing.make_inputs(processor, ["describe.", "count the objects in it."],
                                   [[testing.synthetic_image(side, side, seed=1)], [testing.synthetic_image(112, 112, seed=2)]])

    short, long = batch(112), batch(224)
    ops_short = decode_ops(sdpa_model, short, monkeypatch, **cache_kwargs)
    ops_long = decode_ops(sdpa_model, long, monkeypatch, **cache_kwargs)
    for step in ops_short + ops_long:
        assert not any("_local_scalar_dense" in name for name, _ in step), step
    assert [without_views(step) for step in ops_short] == [without_views(step) for step in ops_long]
    assert ops_short
def update_ops(model, inputs, monkeypatch, steps=4, keep_ratio=0.25):
    """The ops of ``PrunableDynamicCache.update`` in each decode step (every layer), and the layers' key addresses."""
    from sparse_cache.cache import PrunableDynamicCache as Cache

    per_step: list[list] = []
    addresses: list[list[int]] = []
    original = Cache.update

    def recorded(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == 0:
            per_step.append([])
        with Recorder(per_step[-1]):
            out = original(self, key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == 0:
            addresses.append([0 if layer.keys is None else layer.keys.data_ptr() for layer in self.layers])
        return out

    monkeypatch.setattr(Cache, "update", recorded)
    cache = PrunableDynamicCache(model, keep_ratio=keep_ratio)
    model.generate(**inputs, past_key_values=cache, max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                   do_sample=False)
    monkeypatch.undo()
    if keep_ratio < 1:
        assert cache.get_physical_length() < cache.get_seq_length()  # it pruned
    else:
        assert cache.get_physical_length() == cache.get_seq_length()  # the control: nothing dropped
    return per_step[1:], addresses[1:], cache


def test_a_pruned_decode_step_writes_the_cache_in_place(sdpa_model, processor, monkeypatch):
    """After compaction a decode step copies one entry per layer into spare capacity (no ``torch.cat`` of the
    whole layer, as transformers' DynamicLayer does): same ops and sizes whatever the prompt length, same storage."""
    short = testing.make_inputs(processor, ["describe."], [[testing.synthetic_image(112, 112, seed=1)]])
    long = testing.make_inputs(processor, ["describe."], [[testing.synthetic_image(224, 224, seed=1)]])
    ops_short, addresses_short, _ = update_ops(sdpa_model, short, monkeypatch)
    ops_long, addresses_long, cache = update_ops(sdpa_model, long, monkeypatch)
    assert ops_short and all(step for step in ops_short)
    assert [without_views(step) for step in ops_short] == [without_views(step) for step in ops_long]
    assert not any(name.startswith("aten.cat") for step in ops_long for name, _ in step)
    for step in ops_short + ops_long:
        assert not any("_local_scalar_dense" in name for name, _ in step), step
    assert all(a == addresses_long[0] for a in addresses_long)  # every layer kept its buffer
    assert all(layer.keys.shape[2] == cache.get_physical_length() for layer in cache.layers)


def test_an_uncompacted_cache_decodes_in_place_too(sdpa_model, processor, monkeypatch):
    """keep_ratio=1.0 (nothing dropped, so no compaction made a buffer): the first decode step moves each layer
    into a buffer with free slots (the one copy transformers' torch.cat would make), every later step writes one
    entry in place: no cat, the same ops and sizes whatever the prompt length, the same storage."""
    short = testing.make_inputs(processor, ["describe."], [[testing.synthetic_image(112, 112, seed=1)]])
    long = testing.make_inputs(processor, ["describe."], [[testing.synthetic_image(224, 224, seed=1)]])
    ops_short, addresses_short, _ = update_ops(sdpa_model, short, monkeypatch, keep_ratio=1.0)
    ops_long, addresses_long, cache = update_ops(sdpa_model, long, monkeypatch, keep_ratio=1.0)
    # the first decode step (ops_*[0]) makes the buffers; from the second on, only in-place writes
    assert any(name.startswith("aten.new_empty") for name, _ in ops_long[0])
    later_short, later_long = ops_short[1:], ops_long[1:]
    assert later_short and all(step for step in later_short)
    assert [without_views(step) for step in later_short] == [without_views(step) for step in later_long]
    assert not any(name.startswith("aten.cat") for step in later_long for name, _ in step)
    assert all(a == addresses_long[1] for a in addresses_long[1:])  # every layer kept its buffer
    assert cache._spare and len(cache._spare) == len(cache.layers)
    assert all(layer.keys.shape[2] == cache.get_seq_length() for layer in cache.layers)


def test_a_cache_handed_back_to_transformers_update_stays_exact(sdpa_model, processor):
    """use_transformers_update() (the decode benchmark's torch.cat column) and the in-place buffers give the same
    logits at every step; once handed back, no buffer is made again."""
    inputs = testing.make_inputs(processor, ["describe."], [[testing.synthetic_image(112, 112, seed=1)]])
    logits = []
    for hand_back in (False, True):
        cache = PrunableDynamicCache(sdpa_model, keep_ratio=0.25)
        out = sdpa_model.generate(**inputs, past_key_values=cache, max_new_tokens=1, do_sample=False)
        assert cache.get_physical_length() < cache.get_seq_length()  # it pruned
        if hand_back:
            cache.use_transformers_update()
        steps, token = [], out[:, -1:]
        ids = torch.cat([inputs["input_ids"], token], 1)
        mask = torch.ones_like(ids)
        cont = sdpa_model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=4,
                                   min_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        logits.append(torch.stack(cont.logits))
        assert (not cache._spare) == hand_back
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-5)
