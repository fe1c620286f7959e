"""Planted signal: weights set so that the text attends to a known subset of visual tokens.

The recipe (weights only, deterministic), on the tiny Qwen2.5-VL of ``sparse_cache.testing``:

* vision: every block is the identity (attention output projection and MLP down projection zeroed),
  the patch embedding writes the mean pixel value of a patch to channel 0 (all else zero), so after the
  merger's RMSNorm channel 0 is ``+sqrt(32)`` for a bright patch and ``-sqrt(32)`` for a dark one; the
  merger MLP outputs ``b + v * GELU(c * mean sign)``: a bright merged cell gets a large component along a
  direction ``v`` of the decoder's hidden space, a dark one none (``b`` is orthogonal to ``v``);
* decoder layers 0 and 1 are the identity (``o_proj`` and MLP ``down_proj`` zeroed), so layer 2 sees the
  input embeddings;
* layer 2: every query is a constant (``q_proj`` weight 0, bias on the lowest-frequency rotary pair of
  each head) and that pair of every key reads the ``v`` direction. With ``rope_theta = 1e12`` that pair
  barely rotates, so every text query's logit to a bright visual token is large and to a dark one zero.

An image whose target cells (2x2 patches of 14 px; the k-th image token is cell k in row-major order) are
white and the rest black then makes every text rater attend to the targets, and SparseVLM must keep
exactly them.
"""

import numpy as np
import pytest
import torch
from oracles import assert_pruned
from PIL import Image

from sparse_cache import SCORERS, PrunableDynamicCache, testing

CELL = 28  # pixels per merged token side: 2 x 2 patches of 14 px
TARGETS = ([1, 6, 11, 12, 14], [0, 9, 20, 33, 47])  # row 0: 4 x 4 cells; row 1: 6 x 8 cells
SIZES = ((112, 112), (224, 168))  # (width, height)


def planted_model(attn_implementation):
    model = testing.tiny_qwen2_5_vl_model(seed=0, attn_implementation=attn_implementation, rope_theta=1e12)
    visual = model.model.visual
    text = model.model.language_model
    hidden = text.config.hidden_size
    head_dim = hidden // text.config.num_attention_heads
    pair = head_dim // 2 - 1  # lowest rotary frequency (the last pair of the w section)
    direction = torch.zeros(hidden)
    direction[0] = 1.0  # v
    offset = torch.randn(hidden, generator=torch.Generator().manual_seed(1))
    offset[0] = 0.0  # b, orthogonal to v
    with torch.no_grad():
        for block in visual.blocks:
            for linear in (block.attn.proj, block.mlp.down_proj):
                linear.weight.zero_()
                linear.bias.zero_()
        patch = visual.patch_embed.proj.weight  # (C_out, C_in, T, p, p)
        patch.zero_()
        patch[0] = 1.0 / patch[0].numel()  # channel 0 = mean pixel value of the patch
        context_dim = visual.config.hidden_size
        first, second = visual.merger.mlp[0], visual.merger.mlp[2]
        first.weight.zero_()
        first.bias.zero_()
        first.weight[0, [i * context_dim for i in range(4)]] = 0.5  # c * mean sign over the 2 x 2 patches
        second.weight.zero_()
        second.weight[:, 0] = 10.0 * direction
        second.bias.copy_(offset)
        for layer in text.layers[:2]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        attention = text.layers[2].self_attn
        attention.q_proj.weight.zero_()
        attention.q_proj.bias.zero_()
        attention.k_proj.weight.zero_()
        attention.k_proj.bias.zero_()
        for head in range(text.config.num_attention_heads):
            attention.q_proj.bias[head * head_dim + pair] = 4.0
        for head in range(text.config.num_key_value_heads):
            attention.k_proj.weight[head * head_dim + pair] = 4.0 * direction
    return model


def planted_image(width, height, targets):
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    columns = width // CELL
    for cell in targets:
        r, c = divmod(cell, columns)
        pixels[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL] = 255
    return Image.fromarray(pixels, mode="RGB")


@pytest.fixture(scope="module")
def planted_inputs(processor):
    """Left-padded batch of two rows, different images, targets and prompt lengths."""
    images = [[planted_image(w, h, t)] for (w, h), t in zip(SIZES, TARGETS)]
    return testing.make_inputs(processor, ["what colour is the square on the left?", "count."], images)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def planted(request):
    return planted_model(request.param)


def target_positions(inputs, model):
    ids = inputs["input_ids"]
    expected = []
    for row, targets in enumerate(TARGETS):
        visual = torch.nonzero(ids[row] == model.config.image_token_id).flatten()
        assert visual.numel() == (SIZES[row][0] // CELL) * (SIZES[row][1] // CELL)
        expected.append(visual[targets])
    return expected


def run(model, inputs, scorer):
    layer = None if SCORERS[scorer].default_layer is None else 2  # the weights plant the signal at layer 2
    cache = PrunableDynamicCache(model, keep_tokens=len(TARGETS[0]), scorer=scorer, scoring_layer=layer)
    model.generate(**inputs, past_key_values=cache, max_new_tokens=1, do_sample=False)
    visual = (model.config.image_token_id, model.config.video_token_id)
    assert_pruned(cache, inputs, visual, kept_counts=[len(t) for t in TARGETS])
    return cache


def test_planted_weights_make_the_text_attend_to_the_targets(planted_inputs):
    # Independent of the library: layer-2 attention of the eager model, from output_attentions.
    model = planted_model("eager")
    with torch.no_grad():
        out = model(**planted_inputs, output_attentions=True)
    attention = out.attentions[2]  # (B, H, S, S)
    for row, expected in enumerate(target_positions(planted_inputs, model)):
        last = planted_inputs["input_ids"].shape[1] - 1
        on_targets = attention[row, :, last, expected].sum(-1)
        assert torch.all(on_targets > 0.99), on_targets


def test_sparsevlm_keeps_exactly_the_planted_subset(planted, planted_inputs):
    cache = run(planted, planted_inputs, "sparsevlm")
    for row, expected in enumerate(target_positions(planted_inputs, planted)):
        assert torch.equal(cache.kept_visual_positions[row], expected)
        scores = cache.visual_scores[row]
        is_target = torch.zeros(scores.numel(), dtype=torch.bool)
        is_target[TARGETS[row]] = True
        # the raters' attention splits over the targets (about 1/5 each) and leaves nothing for the rest
        assert scores[is_target].min() > 0.1
        assert scores[is_target].min() > 1e6 * scores[~is_target].max()


def test_random_does_not_keep_the_planted_subset(planted, planted_inputs):
    cache = run(planted, planted_inputs, "random")
    expected = target_positions(planted_inputs, planted)
    assert [k.numel() for k in cache.kept_visual_positions] == [len(t) for t in TARGETS]
    for kept, target in zip(cache.kept_visual_positions, expected):
        assert not torch.equal(kept, target)
