"""No silent wrong answers: both cache keywords, no conversation state on the model, hook lifetime, races,
and the self-check that makes a pruning cache that did not prune an error.

Races are forced, not left to chance: threads start each turn at a barrier, and a test-only hook sleeps
inside every decoder forward so that the other thread runs in the middle of it (``time.sleep`` releases
the GIL).
"""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest
import torch
import transformers
from oracles import GREEDY, feed, masked_full_cache, visual_ids
from transformers import DynamicCache

import sparse_cache
from sparse_cache import PrunableDynamicCache, hooks, testing
from sparse_cache._compat import CACHE_KWARG

NEW = 4
ATOL = 1e-5
SPELLINGS = ["past_key_values"] + (["cache"] if CACHE_KWARG == "cache" else [])


def assert_pruned(cache, rows_with_images):
    """Pruning happened: every row with visual tokens kept fewer than it had, and the cache shrank."""
    assert len(cache.kept_visual_positions) == len(cache.visual_scores) == len(rows_with_images)
    for row, has_images in enumerate(rows_with_images):
        if has_images:
            total = cache.visual_scores[row].numel()
            assert 0 < cache.kept_visual_positions[row].numel() < total, (row, total)
    assert cache.get_physical_length() < cache.get_seq_length()


def turn_ids(processor, question, batch):
    ids = processor.tokenizer(
        f"<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
        add_special_tokens=False, return_tensors="pt",
    )["input_ids"]
    return ids.expand(batch, -1)


def continued(inputs, sequences, turn):
    out = {"input_ids": torch.cat([sequences, turn], 1)}
    if "attention_mask" in inputs:
        mask = inputs["attention_mask"]
        out["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], out["input_ids"].shape[1] - mask.shape[1])], 1)
    return out


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def release_caches():
    gc.collect()


def two_turns(model, processor, inputs, keep_ratio, question, **cache_kwargs):
    """A pruned two-turn conversation by ``generate``: returns (cache, first, second) outputs' logits."""
    cache = PrunableDynamicCache(model, keep_ratio=keep_ratio, **cache_kwargs)
    first = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    second_inputs = continued(inputs, first.sequences, turn_ids(processor, question, inputs["input_ids"].shape[0]))
    second = model.generate(**second_inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    return cache, torch.stack(first.logits), torch.stack(second.logits), second.sequences


def second_turn_oracle(model, processor, inputs, cache, first_logits, second_sequences, question):
    """Oracle 3 for ``two_turns``: the full cache with the dropped tokens masked, same positions."""
    batch = inputs["input_ids"].shape[0]
    turn = turn_ids(processor, question, batch)
    prompt_len = inputs["input_ids"].shape[1]
    gen1 = second_sequences[:, prompt_len : prompt_len + NEW]
    gen2 = second_sequences[:, prompt_len + NEW + turn.shape[1] :]
    full, mask, last, first = masked_full_cache(model, inputs, cache.kept_visual_positions, visual_ids(model))
    logits, mask, last = feed(model, full, mask, last, gen1[:, :-1])
    expected_first = torch.stack([first] + list(logits.unbind(1)))
    logits, mask, last = feed(model, full, mask, last, torch.cat([gen1[:, -1:], turn], 1))
    expected = [logits[:, -1]]
    logits, _, _ = feed(model, full, mask, last, gen2[:, :-1])
    return expected_first, torch.stack(expected + list(logits.unbind(1)))


# --------------------------------------------------------------------------- both spellings


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_both_cache_keywords_prune_exactly_in_generate(sdpa_model, batch_inputs, spelling):
    model = sdpa_model
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    out = model.generate(**batch_inputs, **{spelling: cache}, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert_pruned(cache, [True, True])
    prompt_len = batch_inputs["input_ids"].shape[1]
    full, mask, last, first = masked_full_cache(model, batch_inputs, cache.kept_visual_positions, visual_ids(model))
    logits, _, _ = feed(model, full, mask, last, out.sequences[:, prompt_len:-1])
    expected = [first] + list(logits.unbind(1))
    for got, want in zip(out.logits, expected):
        assert (got - want).abs().max() <= ATOL


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_both_cache_keywords_prune_exactly_in_a_manual_loop(sdpa_model, single_inputs, spelling):
    model = sdpa_model
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    with torch.no_grad():
        out = model(**single_inputs, **{spelling: cache}, use_cache=True)
        got, tokens = [out.logits[:, -1].float()], []
        for _ in range(NEW - 1):
            tokens.append(got[-1].argmax(-1, keepdim=True))
            out = model(input_ids=tokens[-1], **{spelling: cache}, use_cache=True)
            got.append(out.logits[:, -1].float())
    assert_pruned(cache, [True])
    full, mask, last, first = masked_full_cache(model, single_inputs, cache.kept_visual_positions, visual_ids(model))
    logits, _, _ = feed(model, full, mask, last, torch.cat(tokens, 1))
    for a, b in zip(got, [first] + list(logits.unbind(1))):
        assert (a - b).abs().max() <= ATOL


# --------------------------------------------------------------------------- no state on the model


def test_pruned_calls_neither_read_nor_write_the_models_rope_deltas(sdpa_model, processor, single_inputs):
    model = sdpa_model
    sentinel = torch.full((1, 1), 12345)
    model.model.rope_deltas = sentinel  # would shift every position if a pruned call read it
    try:
        cache, first, second, sequences = two_turns(model, processor, single_inputs, 0.25, "why?")
        with torch.no_grad():  # manual steps without position_ids read the cache's offsets, not the model's
            model(input_ids=sequences[:, -1:], past_key_values=cache, use_cache=True)
        assert model.model.rope_deltas is sentinel
    finally:
        model.model.rope_deltas = None
    assert_pruned(cache, [True])
    expected_first, expected_second = second_turn_oracle(model, processor, single_inputs, cache, first, sequences, "why?")
    assert (first.float() - expected_first).abs().max() <= ATOL
    assert (second.float() - expected_second).abs().max() <= ATOL


def _manual_steps(model, inputs, cache, steps):
    """Generator: a manual greedy loop without position_ids (positions come from the model's or the
    cache's offsets); yields each step's logits so that two conversations can be interleaved step by step."""
    with torch.no_grad():
        out = model(**inputs, past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1].float()
        yield logits
        for _ in range(steps - 1):
            out = model(input_ids=logits.argmax(-1, keepdim=True), past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1].float()
            yield logits


def test_pruned_and_plain_conversations_interleaved_step_by_step(sdpa_model, processor, single_inputs):
    """A plain conversation interleaved with a pruned one is bit-identical to transformers alone."""
    model = sdpa_model
    other = testing.make_inputs(processor, ["count the objects."], [[testing.synthetic_image(112, 168, seed=7)]])
    steps = 6
    model.model.rope_deltas = None
    plain_alone = list(_manual_steps(model, single_inputs, DynamicCache(config=model.config), steps))
    pruned_cache = PrunableDynamicCache(model, keep_ratio=0.25)
    pruned_alone = list(_manual_steps(model, other, pruned_cache, steps))
    assert_pruned(pruned_cache, [True])

    model.model.rope_deltas = None
    plain = _manual_steps(model, single_inputs, DynamicCache(config=model.config), steps)
    interleaved_cache = PrunableDynamicCache(model, keep_ratio=0.25)
    pruned = _manual_steps(model, other, interleaved_cache, steps)
    for step in range(steps):
        plain_logits = next(plain)  # the plain conversation reads the model's rope_deltas (transformers' own state)
        pruned_logits = next(pruned)  # the pruned one must not disturb it, nor be disturbed
        assert torch.equal(plain_logits, plain_alone[step]), step
        assert (pruned_logits - pruned_alone[step]).abs().max() <= ATOL, step
    assert_pruned(interleaved_cache, [True])


def test_two_threads_with_pruned_multi_turn_conversations(sdpa_model, processor, single_inputs, batch_inputs):
    """Two pruned conversations (different images and lengths, two turns each) run concurrently many times;
    each equals its solo run. A barrier starts each turn together and a sleep inside every decoder forward
    hands the GIL to the other thread in the middle of the call."""
    model = sdpa_model
    conversations = {
        "a": (single_inputs, 0.25, "why?"),
        "b": (batch_inputs, 0.5, "and what is on the right of it?"),
    }
    solo = {}
    for name, (inputs, ratio, question) in conversations.items():
        solo[name] = two_turns(model, processor, inputs, ratio, question)[1:]
    barrier = threading.Barrier(2, timeout=60)
    errors, mismatches = [], []

    def nap(module, args, kwargs):
        time.sleep(0.002)

    handle = model.model.language_model.register_forward_pre_hook(nap, with_kwargs=True)

    def worker(name):
        inputs, ratio, question = conversations[name]
        try:
            for _ in range(4):
                barrier.wait()
                cache = PrunableDynamicCache(model, keep_ratio=ratio)
                first = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
                second_inputs = continued(inputs, first.sequences, turn_ids(processor, question, inputs["input_ids"].shape[0]))
                barrier.wait()
                second = model.generate(
                    **second_inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY
                )
                for got, want in ((torch.stack(first.logits), solo[name][0]), (torch.stack(second.logits), solo[name][1])):
                    diff = (got - want).abs().max().item()
                    if diff > ATOL:
                        mismatches.append((name, diff))
        except Exception as exc:  # reported below
            barrier.abort()
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(name,)) for name in conversations]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        handle.remove()
    assert not errors, errors
    assert not mismatches, mismatches


# --------------------------------------------------------------------------- hook lifetime, disable, races


def test_disable_between_turns_keeps_the_live_conversation_exact(processor, batch_inputs):
    model = testing.tiny_qwen2_5_vl_model(seed=3)
    question = "and the other one?"
    reference = two_turns(model, processor, batch_inputs, 0.25, question)[1:]
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    sparse_cache.enable(model, keep_ratio=0.5)
    first = model.generate(**batch_inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    with sparse_cache.pruning(model, keep_ratio=0.1):  # an unrelated block that ends (disables) mid-conversation
        pass
    sparse_cache.disable(model)
    assert not sparse_cache.is_enabled(model)
    assert hooks.is_installed(model)  # the live conversation still holds them
    second_inputs = continued(batch_inputs, first.sequences, turn_ids(processor, question, 2))
    second = model.generate(**second_inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert_pruned(cache, [True, True])
    assert (torch.stack(first.logits) - reference[0]).abs().max() <= ATOL
    assert (torch.stack(second.logits) - reference[1]).abs().max() <= ATOL
    del cache, first, second
    release_caches()
    assert not hooks.is_installed(model) and hook_count(model) == 0


def test_uninstall_refuses_while_a_cache_is_alive_then_hooks_go_with_the_last_cache(single_inputs):
    model = testing.tiny_qwen2_5_vl_model(seed=4)
    baseline = hook_count(model)
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    assert hook_count(model) > baseline
    with pytest.raises(RuntimeError, match="live PrunableDynamicCache"):
        sparse_cache.uninstall(model)
    other = PrunableDynamicCache(model, keep_ratio=0.5)
    ref = weakref.ref(cache)
    del cache
    release_caches()
    assert ref() is None and hooks.is_installed(model)  # `other` still holds them
    del other
    release_caches()
    assert hook_count(model) == baseline and "prepare_inputs_for_generation" not in vars(model)


def test_hook_installation_race_installs_once(monkeypatch, batch_inputs):
    """Two threads build the first caches of a model at once, with a delay injected inside the install
    window: the hooks are installed exactly once, a padded decode works, and they all go afterwards."""
    model = testing.tiny_qwen2_5_vl_model(seed=6)
    barrier = threading.Barrier(2, timeout=30)
    monkeypatch.setattr(hooks, "_before_install", lambda: time.sleep(0.05))
    caches, errors = [], []

    def build():
        try:
            barrier.wait()
            caches.append(PrunableDynamicCache(model, keep_ratio=0.25))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(caches) == 2
    layers = model.model.language_model.layers
    assert all(len(layer._forward_pre_hooks) == 1 and len(layer._forward_hooks) == 1 for layer in layers)
    assert all(len(layer.self_attn._forward_hooks) == 1 for layer in layers)
    out = model.generate(**batch_inputs, past_key_values=caches[0], max_new_tokens=NEW, **GREEDY)
    assert_pruned(caches[0], [True, True])
    del caches[:], out
    release_caches()
    assert hook_count(model) == 0


# --------------------------------------------------------------------------- the self-check


def test_self_check_raises_when_no_hook_sees_the_call(sdpa_model, single_inputs, monkeypatch):
    """Simulates a renamed keyword: the hooks cannot find the cache, so nothing could be pruned."""
    monkeypatch.setattr(hooks, "_cache_of", lambda *args, **kwargs: None)
    cache = PrunableDynamicCache(sdpa_model, keep_ratio=0.25)
    with pytest.raises(RuntimeError, match=rf"self-check failed.*transformers {transformers.__version__}"):
        sdpa_model.generate(**single_inputs, past_key_values=cache, max_new_tokens=2, **GREEDY)


def test_self_check_raises_when_the_scoring_hook_does_not_fire(single_inputs):
    model = testing.tiny_qwen2_5_vl_model(seed=8)
    cache = PrunableDynamicCache(model, keep_ratio=0.25)
    model.model.language_model.layers[cache.scoring_layer].self_attn._forward_hooks.clear()
    with pytest.raises(RuntimeError, match=f"scoring layer {cache.scoring_layer}'s attention hook did not run"):
        model.generate(**single_inputs, past_key_values=cache, max_new_tokens=2, **GREEDY)


def test_self_check_raises_when_the_in_prefill_cut_does_not_happen(single_inputs):
    model = testing.tiny_qwen2_5_vl_model(seed=8)
    cache = PrunableDynamicCache(model, keep_ratio=0.25, mode="in-prefill")
    model.model.language_model.layers[cache.scoring_layer]._forward_hooks.clear()
    with pytest.raises(RuntimeError, match="did not cut its output"):
        model.generate(**single_inputs, past_key_values=cache, max_new_tokens=2, **GREEDY)


def test_self_check_raises_when_the_cache_is_given_to_the_language_model_directly(sdpa_model, single_inputs):
    cache = PrunableDynamicCache(sdpa_model, keep_ratio=0.25)
    embeds = sdpa_model.model.get_input_embeddings()(single_inputs["input_ids"])
    with pytest.raises(RuntimeError, match="self-check failed"):
        sdpa_model.model.language_model(inputs_embeds=embeds, past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("case", ["keep_ratio_one", "text_only"])
def test_legitimate_no_ops_stay_silent(sdpa_model, processor, single_inputs, case):
    if case == "keep_ratio_one":
        inputs, cache = single_inputs, PrunableDynamicCache(sdpa_model, keep_ratio=1.0)
    else:
        inputs = processor(text=["hello there"], return_tensors="pt")
        cache = PrunableDynamicCache(sdpa_model, keep_ratio=0.25)
    out = sdpa_model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    plain = sdpa_model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert cache.get_physical_length() == cache.get_seq_length()
    if case == "keep_ratio_one":  # the hooks ran: every visual token was scored, and all kept
        assert cache.visual_scores[0].numel() == cache.kept_visual_positions[0].numel() > 0
    for a, b in zip(out.logits, plain.logits):
        assert torch.equal(a, b)


def test_a_new_image_on_a_continued_cache_without_positions_is_refused(sdpa_model, processor, single_inputs):
    cache = PrunableDynamicCache(sdpa_model, keep_ratio=0.25)
    with torch.no_grad():
        sdpa_model(**single_inputs, past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="position_ids"):
            sdpa_model(**single_inputs, past_key_values=cache, use_cache=True)


def test_positions_of_another_conversation_are_refused(sdpa_model, processor, single_inputs):
    cache = PrunableDynamicCache(sdpa_model, keep_ratio=0.25)
    with torch.no_grad():
        out = sdpa_model(**single_inputs, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True).expand(-1, 2)  # a two-token turn: checked
        wrong = torch.full((3, 1, 2), cache.get_seq_length() + 1000)
        with pytest.raises(ValueError, match="do not continue this conversation"):
            sdpa_model(input_ids=token, position_ids=wrong, past_key_values=cache, use_cache=True)
