"""Tests for the offline tiny Qwen2.5-VL fixtures in ``sparse_cache.testing``."""

import numpy as np
import pytest
import torch

from sparse_cache.testing import (
    DEFAULT_SYSTEM_PROMPT,
    SPECIAL_TOKENS,
    make_inputs,
    make_video_inputs,
    synthetic_image,
    tiny_processor,
    tiny_qwen2_5_vl_config,
    tiny_qwen2_5_vl_model,
    tiny_tokenizer,
)

PATCH_DIM = 3 * 2 * 14 * 14  # channels * temporal_patch_size * patch_size**2


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def model():
    return tiny_qwen2_5_vl_model(seed=0, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def batch(processor):
    return make_inputs(
        processor,
        ["Describe the image.", "What is in the picture?"],
        [[synthetic_image(112, 112, seed=0)], [synthetic_image(224, 168, seed=1)]],
    )


# --------------------------------------------------------------------------- tokenizer / config


def test_tokenizer_basics():
    tok = tiny_tokenizer()
    # pinned: identical with tokenizers 0.22 / 0.23 and transformers 5.14 / 5.23
    assert len(tok) == 340
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(333, 340))
    assert tok.padding_side == "left"
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert len(set(ids)) == len(SPECIAL_TOKENS) and tok.unk_token_id not in ids
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = "Any ASCII text: {x} = 42 * y_z!\tok\n~"
    assert tok.decode(tok(text)["input_ids"]) == text
    # special tokens are single tokens even inside text
    enc = tok("a<|image_pad|>b")["input_ids"]
    assert tok.convert_tokens_to_ids("<|image_pad|>") in enc
    # deterministic
    assert tiny_tokenizer()(text)["input_ids"] == tok(text)["input_ids"]


def test_chat_template(processor):
    content = [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Hi"}]
    msgs = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|video_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert processor.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == text


def test_config_ids_match_tokenizer():
    tok = tiny_tokenizer()
    cfg = tiny_qwen2_5_vl_config()
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    text = cfg.get_text_config()
    assert text.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert text.pad_token_id == tok.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert text.vocab_size == len(tok)
    sizes = (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads)
    assert sizes == (64, 4, 4, 2) and text.intermediate_size == 128
    assert text.rope_parameters["mrope_section"] == [2, 3, 3]
    vis = cfg.vision_config
    assert (vis.depth, vis.hidden_size, vis.num_heads, vis.out_hidden_size) == (2, 32, 2, 64)
    assert list(vis.fullatt_block_indexes) == [1] and vis.window_size == 112


def test_config_overrides():
    cfg = tiny_qwen2_5_vl_config(
        num_hidden_layers=2, hidden_size=128, vision_depth=1, attn_implementation="eager"
    )
    text = cfg.get_text_config()
    assert text.num_hidden_layers == 2 and text.hidden_size == 128
    assert text.rope_parameters["mrope_section"] == [4, 6, 6]  # head_dim 32
    assert cfg.vision_config.depth == 1 and cfg.vision_config.out_hidden_size == 128
    assert cfg._attn_implementation == "eager" and text._attn_implementation == "eager"
    with pytest.raises(ValueError):
        tiny_qwen2_5_vl_config(mrope_section=[2, 2, 2])


# --------------------------------------------------------------------------- processor


def test_synthetic_image_deterministic():
    a, b, c = synthetic_image(), synthetic_image(), synthetic_image(seed=1)
    assert a.mode == "RGB" and a.size == (112, 112)
    assert synthetic_image(224, 168).size == (224, 168)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert len(np.unique(np.asarray(a).reshape(-1, 3), axis=0)) > 4


def test_single_image(processor):
    out = make_inputs(processor, ["Describe the image."], [[synthetic_image()]])
    assert set(out) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"}
    assert out["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert tuple(out["pixel_values"].shape) == (64, PATCH_DIM)
    image_mask = out["input_ids"] == processor.image_token_id
    assert image_mask.sum().item() == 16
    assert torch.equal(out["mm_token_type_ids"], image_mask.long())
    assert out["attention_mask"].all()
    assert out["input_ids"].shape == (1, 72)  # 54 text tokens + start + 16 pads + end
    assert make_inputs(processor, ["Describe the image."], [[]])["input_ids"].shape == (1, 54)
    # one contiguous block <|vision_start|> 16 x <|image_pad|> <|vision_end|>
    ids = out["input_ids"][0].tolist()
    start = ids.index(processor.tokenizer.convert_tokens_to_ids("<|vision_start|>"))
    assert ids[start + 1 : start + 17] == [processor.image_token_id] * 16
    assert ids[start + 17] == processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")


def test_batch_left_padded(processor, batch):
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 12, 16]]
    assert tuple(batch["pixel_values"].shape) == (64 + 192, PATCH_DIM)
    assert (batch["input_ids"] == processor.image_token_id).sum(1).tolist() == [16, 48]
    mask = batch["attention_mask"]
    assert mask.sum(1).tolist() == [72, 110]
    assert mask[:, -1].all()
    assert mask[1].all() and not mask[0].all()
    n_pad = int((mask[0] == 0).sum())
    assert mask[0, :n_pad].eq(0).all() and mask[0, n_pad:].eq(1).all()
    assert batch["input_ids"][0, :n_pad].eq(processor.tokenizer.pad_token_id).all()
    right = make_inputs(
        processor,
        ["Describe the image.", "What is in the picture?"],
        [[synthetic_image(112, 112, seed=0)], [synthetic_image(224, 168, seed=1)]],
        padding_side="right",
    )
    assert right["attention_mask"][:, 0].all() and not right["attention_mask"][0, -1]
    assert processor.tokenizer.padding_side == "left"  # restored


def test_text_only_row(processor):
    out = make_inputs(processor, ["Hello there", "Describe the image."], [[], [synthetic_image()]])
    assert out["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert (out["mm_token_type_ids"] == 1).sum(1).tolist() == [0, 16]
    text_only = make_inputs(processor, ["Hello there"], [[]])
    assert "pixel_values" not in text_only
    with pytest.raises(ValueError):
        make_inputs(processor, ["a", "b"], [[]])


def test_processor_save_load_roundtrip(processor, tmp_path):
    from transformers import AutoProcessor, Qwen2_5_VLProcessor

    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, Qwen2_5_VLProcessor)
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.chat_template == processor.chat_template
    prompts, images = ["Describe the image.", "Hi"], [[synthetic_image(224, 168)], []]
    a, b = make_inputs(processor, prompts, images), make_inputs(loaded, prompts, images)
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------- model


def test_model_deterministic(model):
    again = tiny_qwen2_5_vl_model(seed=0)
    other = tiny_qwen2_5_vl_model(seed=1)
    w = "model.language_model.layers.0.self_attn.q_proj.weight"
    sd = model.state_dict()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in sd.items())
    assert not torch.equal(sd[w], other.state_dict()[w])
    assert not model.training


def test_generate_sdpa_matches_eager(model, batch):
    eager = tiny_qwen2_5_vl_model(seed=0, attn_implementation="eager")
    assert model.config._attn_implementation == "sdpa"
    assert eager.config.get_text_config()._attn_implementation == "eager"
    n = batch["input_ids"].shape[1]
    with torch.no_grad():
        out_sdpa = model.generate(**batch, max_new_tokens=5, do_sample=False)[:, n:]
        out_eager = eager.generate(**batch, max_new_tokens=5, do_sample=False)[:, n:]
    assert out_sdpa.shape == (2, 5)
    assert torch.equal(out_sdpa, out_eager)
    assert len(set(out_sdpa.flatten().tolist())) > 2  # tokens vary


def test_attention_not_uniform(batch):
    tiny = tiny_qwen2_5_vl_model(seed=0, attn_implementation="eager", num_hidden_layers=1)
    with torch.no_grad():
        attn = tiny(**batch, output_attentions=True).attentions[0][1]  # row 1: no padding
    q = attn.shape[-1] - 1
    assert attn[:, q].max() > 5.0 / (q + 1)  # last query is far from uniform


def _reference_video_patches(frames, patch=14, merge=2, tps=2):
    """Independent re-implementation of the Qwen2-VL video processor for unresized frames."""
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    arr = np.stack([(np.asarray(f, dtype=np.float32) / 255.0 - mean) / std for f in frames])  # T, H, W, C
    video = torch.from_numpy(arr).permute(0, 3, 1, 2)[None]  # B, T, C, H, W
    b, t, c, h, w = video.shape
    gt, gh, gw = t // tps, h // patch, w // patch
    x = video.reshape(b, gt, tps, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(gt * gh * gw, c * tps * patch * patch), [gt, gh, gw]


def test_video_inputs_forward(processor, model):
    frames = [synthetic_image(112, 112, seed=i) for i in range(4)]
    video = make_video_inputs(processor, "What happens in the video?", frames)
    assert video["video_grid_thw"].tolist() == [[2, 8, 8]]
    assert tuple(video["pixel_values_videos"].shape) == (128, PATCH_DIM)
    assert video["second_per_grid_ts"].tolist() == [1.0]
    video_mask = video["input_ids"] == processor.video_token_id
    assert video_mask.sum().item() == 32
    assert video["input_ids"].shape == (1, 100) and video["attention_mask"].all()
    assert torch.equal(video["mm_token_type_ids"], 2 * video_mask.long())
    ref, grid = _reference_video_patches(frames)
    assert grid == [2, 8, 8]
    torch.testing.assert_close(video["pixel_values_videos"], ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        logits = model(**video).logits
    assert logits.shape == (1, video["input_ids"].shape[1], model.config.get_text_config().vocab_size)
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError):
        make_video_inputs(processor, "odd", frames[:3])
