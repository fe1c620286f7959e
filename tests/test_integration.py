"""Pipelines, enable/disable, accelerate offload, interleaved conversations, logging, refusals."""

import gc
import logging

import pytest
import torch
import transformers
from oracles import GREEDY, feed, masked_full_cache

import sparse_cache
import sparse_cache.auto as sparse_cache_auto
from sparse_cache import PrunableDynamicCache, testing

NEW = 4


def generate(model, inputs, cache=None, new=NEW):
    kwargs = dict(past_key_values=cache) if cache is not None else {}
    return model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, **kwargs, **GREEDY)


def test_interleaved_conversations_keep_their_own_positions(sdpa_model, processor, single_inputs):
    """Conversation A's second turn after conversation B's first (another rope_deltas) is still exact."""
    model = sdpa_model
    other = testing.make_inputs(processor, ["count the objects."], [[testing.synthetic_image(112, 112, seed=7)]])
    cache_a = PrunableDynamicCache(model, keep_ratio=0.25)
    first = generate(model, single_inputs, cache_a)
    generate(model, other, PrunableDynamicCache(model, keep_ratio=0.5))  # leaves its rope_deltas on the model
    turn = processor.tokenizer(
        "<|im_end|>\n<|im_start|>user\nwhy?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False,
        return_tensors="pt",
    )["input_ids"]
    second = model.generate(
        input_ids=torch.cat([first.sequences, turn], 1), past_key_values=cache_a, max_new_tokens=NEW,
        min_new_tokens=NEW, **GREEDY,
    )
    prompt_len = single_inputs["input_ids"].shape[1]
    gen1 = first.sequences[:, prompt_len:]
    full, mask, last, _ = masked_full_cache(model, single_inputs, cache_a.kept_visual_positions,
                                         (model.config.image_token_id, model.config.video_token_id))
    _, mask, last = feed(model, full, mask, last, gen1[:, :-1])
    logits, mask, last = feed(model, full, mask, last, torch.cat([gen1[:, -1:], turn], 1))
    assert (second.logits[0] - logits[:, -1]).abs().max() <= 1e-5
    gen2 = second.sequences[:, prompt_len + gen1.shape[1] + turn.shape[1]:]
    logits, _, _ = feed(model, full, mask, last, gen2[:, :-1])
    for step in range(1, NEW):
        assert (second.logits[step] - logits[:, step - 1]).abs().max() <= 1e-5


def test_enable_prunes_every_generate_and_disable_restores(processor, single_inputs, monkeypatch):
    model = testing.tiny_qwen2_5_vl_model(seed=5)
    plain = generate(model, single_inputs)
    created = []

    class Recording(PrunableDynamicCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(sparse_cache_auto, "PrunableDynamicCache", Recording)
    sparse_cache.enable(model, keep_ratio=0.25)
    assert sparse_cache.is_enabled(model)
    created.clear()
    pruned = generate(model, single_inputs)
    reference = generate(model, single_inputs, PrunableDynamicCache(model, keep_ratio=0.25))
    assert len(created) == 1 and created[0].kept_visual_positions[0].numel() == 12
    assert torch.equal(pruned.sequences, reference.sequences)
    for a, b in zip(pruned.logits, reference.logits):
        assert torch.equal(a, b)
    sparse_cache.disable(model)
    assert not sparse_cache.is_enabled(model)
    assert "generate" not in vars(model)
    # the outputs still hold their caches (a conversation could continue): the hooks stay until they go
    assert sparse_cache.hooks.is_installed(model)
    del pruned, reference, created[:]
    gc.collect()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert "prepare_inputs_for_generation" not in vars(model)
    again = generate(model, single_inputs)
    for a, b in zip(plain.logits, again.logits):
        assert torch.equal(a, b)


def test_enable_validates_now():
    model = testing.tiny_qwen2_5_vl_model(seed=5)
    with pytest.raises(ValueError, match="keep_ratio"):
        sparse_cache.enable(model, keep_ratio=2.0)


def test_pipeline_prunes_each_call(processor, monkeypatch):
    model = testing.tiny_qwen2_5_vl_model(seed=6)
    pipe = transformers.pipeline("image-text-to-text", model=model, processor=processor)
    images = [testing.synthetic_image(224, 168, seed=s) for s in (1, 2)]
    messages = [
        [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": "what colour?"}]}]
        for im in images
    ]
    created = []

    class Recording(PrunableDynamicCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(sparse_cache_auto, "PrunableDynamicCache", Recording)
    args = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, return_full_text=False)
    with sparse_cache.pruning(model, keep_ratio=0.25):
        created.clear()
        results = [pipe(text=m, **args)[0]["generated_text"] for m in messages]
    assert len(created) == 2 and {c.kept_visual_positions[0].numel() for c in created} == {12}
    for text, image in zip(results, images):
        inputs = testing.make_inputs(processor, ["what colour?"], [[image]])
        out = model.generate(**inputs, past_key_values=PrunableDynamicCache(model, keep_ratio=0.25),
                             max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        expected = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert text == expected
    assert not sparse_cache.is_enabled(model)


def test_offloaded_model_gives_the_same_logits(tmp_path, sdpa_model, single_inputs):
    sdpa_model.save_pretrained(tmp_path / "model")
    layers = sdpa_model.config.text_config.num_hidden_layers
    device_map = {"model.visual": "cpu", "model.language_model.embed_tokens": "cpu",
                  "model.language_model.norm": "cpu", "model.language_model.rotary_emb": "cpu", "lm_head": "cpu"}
    for i in range(layers):
        device_map[f"model.language_model.layers.{i}"] = "disk" if i in (1, 2) else "cpu"
    offloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=str(tmp_path / "offload"),
        attn_implementation="sdpa",
    ).eval()
    cache = PrunableDynamicCache(sdpa_model, keep_ratio=0.25)
    ref = generate(sdpa_model, single_inputs, cache)
    cache_off = PrunableDynamicCache(offloaded, keep_ratio=0.25)
    out = generate(offloaded, single_inputs, cache_off)
    assert torch.equal(cache.kept_visual_positions[0], cache_off.kept_visual_positions[0])
    for a, b in zip(out.logits, ref.logits):
        assert (a - b).abs().max() <= 1e-5


def test_keep_tokens_above_count_keeps_all_and_logs(sdpa_model, single_inputs, caplog):
    cache = PrunableDynamicCache(sdpa_model, keep_tokens=1000)
    with caplog.at_level(logging.DEBUG, logger="sparse_cache"):
        generate(sdpa_model, single_inputs, cache, new=1)
    assert cache.kept_visual_positions[0].numel() == 48
    assert any("keep_tokens=1000 exceeds its 48 tokens" in r.getMessage() for r in caplog.records)


def test_flash_attention_is_refused_with_a_clear_error():
    model = testing.tiny_qwen2_5_vl_model(seed=0)
    model.config._attn_implementation = "flash_attention_2"
    model.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2'"):
        PrunableDynamicCache(model, keep_ratio=0.5)
