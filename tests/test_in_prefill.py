"""In-prefill pruning (SparseVLM proper) against oracle 5, a hand-built reference."""

import pytest
import torch
from oracles import GREEDY, assert_not_pruned, assert_pruned, in_prefill_reference_logits, visual_ids

from sparse_cache import PrunableDynamicCache

NEW = 5


@pytest.mark.parametrize("which", ["single", "batch"])
@pytest.mark.parametrize("layer", [1, 2])
def test_in_prefill_matches_hand_built_reference(model, single_inputs, batch_inputs, which, layer):
    inputs = single_inputs if which == "single" else batch_inputs
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scoring_layer=layer, mode="in-prefill")
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert_pruned(cache, inputs, visual_ids(model), kept_counts=[12] if which == "single" else [12, 4])
    prompt_len = inputs["input_ids"].shape[1]
    expected = in_prefill_reference_logits(
        model, inputs, [(layer, cache.kept_visual_positions)], out.sequences[:, prompt_len:], visual_ids(model)
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
    assert_not_pruned(cache, single_inputs, visual_ids(model))
    assert [[k.numel() for k in stage] for stage in cache.stage_kept_visual_positions] == [[48]]
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        assert (a - b).abs().max() <= 1e-5


def test_unknown_mode_is_refused(sdpa_model):
    with pytest.raises(ValueError, match="post-prefill"):
        PrunableDynamicCache(sdpa_model, keep_ratio=0.5, mode="during")
    with pytest.raises(ValueError, match="scoring_layer"):
        PrunableDynamicCache(sdpa_model, keep_ratio=0.5, scorer="random", mode="in-prefill")


@pytest.mark.parametrize("which", ["single", "batch"])
def test_progressive_schedule_matches_hand_built_reference(model, single_inputs, batch_inputs, which):
    inputs = single_inputs if which == "single" else batch_inputs
    schedule = [(0, 0.5), (1, 0.25), (2, 0.125)]
    cache = PrunableDynamicCache(model, mode="in-prefill", schedule=schedule)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert_pruned(cache, inputs, visual_ids(model), kept_counts=[6] if which == "single" else [6, 2])
    counts = [[k.numel() for k in stage] for stage in cache.stage_kept_visual_positions]
    # budgets relative to each image's own 48 / 16 tokens
    assert counts == ([[24], [12], [6]] if which == "single" else [[24, 8], [12, 4], [6, 2]])
    for earlier, later in zip(cache.stage_kept_visual_positions, cache.stage_kept_visual_positions[1:]):
        for a, b in zip(earlier, later):
            assert torch.isin(b, a).all()  # each stage prunes among the previous stage's survivors
    assert all(torch.equal(a, b) for a, b in zip(cache.kept_visual_positions, cache.stage_kept_visual_positions[-1]))
    stages = [(layer, kept) for (layer, _), kept in zip(schedule, cache.stage_kept_visual_positions)]
    prompt_len = inputs["input_ids"].shape[1]
    expected = in_prefill_reference_logits(model, inputs, stages, out.sequences[:, prompt_len:], visual_ids(model))
    for step, (a, e) in enumerate(zip(out.logits, expected)):
        diff = (a - e).abs().max().item()
        assert diff <= 1e-5, f"step {step}: {diff}"
    assert {layer_cache.keys.shape[2] for layer_cache in cache.layers} == {cache.get_physical_length()}


def test_derived_schedule_scales_the_authors_layers_and_hits_the_target():
    from sparse_cache.select import derive_schedule, layer_average_ratio

    for layers, expected in ((32, [2, 6, 15]), (28, [2, 5, 13]), (36, [2, 7, 17]), (4, [0, 1, 2])):
        schedule = derive_schedule(0.4, layers)
        assert [layer for layer, _ in schedule] == expected
        ratios = [r for _, r in schedule]
        assert ratios == sorted(ratios, reverse=True) and all(0 < r <= 1 for r in ratios)
        assert abs(layer_average_ratio(schedule, layers) - 0.4) < 1e-9
    # the authors' own budgets (300/200/110 of 576 after layers 2/6/15 of 32) for their "192 tokens"
    authors = [(2, 300 / 576), (6, 200 / 576), (15, 110 / 576)]
    target = layer_average_ratio(authors, 32)
    derived = derive_schedule(target, 32)
    assert [layer for layer, _ in derived] == [2, 6, 15]
    assert [r for _, r in derived] == pytest.approx([r for _, r in authors])
    with pytest.raises(ValueError, match="below what pruning after layer 2"):
        derive_schedule(0.05, 32)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(schedule=[(2, 0.5), (1, 0.25)]), "increasing"),
        (dict(schedule=[(1, 0.25), (2, 0.5)]), "must not increase"),
        (dict(schedule=[(1, 1.5)]), "keep_ratio"),
        (dict(schedule=[(9, 0.5)]), "0..3"),
        (dict(schedule=[(1, 0.5)], keep_ratio=0.5), "leave keep_ratio"),
        (dict(schedule="pyramid", keep_ratio=0.5), "unknown schedule"),
        (dict(schedule="sparsevlm", keep_tokens=8), "derives its stages from keep_ratio"),
    ],
)
def test_bad_schedules_are_refused(sdpa_model, kwargs, words):
    with pytest.raises((ValueError, TypeError), match=words):
        PrunableDynamicCache(sdpa_model, mode="in-prefill", **kwargs)
    if "schedule" in kwargs and "keep_ratio" not in kwargs and "keep_tokens" not in kwargs:
        with pytest.raises(ValueError, match="mode='in-prefill'"):
            PrunableDynamicCache(sdpa_model, schedule=[(1, 0.5)])


def test_sparsevlm_schedule_from_equivalent_ratio_runs_exactly(sdpa_model, batch_inputs):
    cache = PrunableDynamicCache(sdpa_model, keep_ratio=0.6, mode="in-prefill", schedule="sparsevlm")
    assert [layer for layer, _ in cache.schedule] == [0, 1, 2]
    out = sdpa_model.generate(**batch_inputs, past_key_values=cache, max_new_tokens=3, min_new_tokens=3, **GREEDY)
    assert_pruned(cache, batch_inputs, visual_ids(sdpa_model))
    assert len(cache.stage_kept_visual_positions) == len(cache.schedule) == 3
    stages = [(layer, kept) for (layer, _), kept in zip(cache.schedule, cache.stage_kept_visual_positions)]
    prompt_len = batch_inputs["input_ids"].shape[1]
    expected = in_prefill_reference_logits(
        sdpa_model, batch_inputs, stages, out.sequences[:, prompt_len:], visual_ids(sdpa_model)
    )
    for a, e in zip(out.logits, expected):
        assert (a - e).abs().max() <= 1e-5


@pytest.mark.parametrize("scorer", sorted(__import__("sparse_cache").SCORERS))
def test_every_scorer_in_a_progressive_schedule_matches_reference(sdpa_model, batch_inputs, scorer):
    schedule = [(1, 0.5), (2, 0.25)]
    cache = PrunableDynamicCache(sdpa_model, mode="in-prefill", schedule=schedule, scorer=scorer)
    out = sdpa_model.generate(**batch_inputs, past_key_values=cache, max_new_tokens=3, min_new_tokens=3, **GREEDY)
    assert_pruned(cache, batch_inputs, visual_ids(sdpa_model), kept_counts=[12, 4])
    assert [[k.numel() for k in stage] for stage in cache.stage_kept_visual_positions] == [[24, 8], [12, 4]]
    stages = [(layer, kept) for (layer, _), kept in zip(schedule, cache.stage_kept_visual_positions)]
    prompt_len = batch_inputs["input_ids"].shape[1]
    expected = in_prefill_reference_logits(
        sdpa_model, batch_inputs, stages, out.sequences[:, prompt_len:], visual_ids(sdpa_model)
    )
    for a, e in zip(out.logits, expected):
        assert (a - e).abs().max() <= 1e-5


def test_density_peak_clusters_recover_separated_blobs():
    from sparse_cache.recycle import cluster_count, density_peak_clusters, recycled_candidates

    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.3 * torch.randn(7, 2) for c in centres])
    labels = density_peak_clusters(points, 3)
    for blob in range(3):
        members = labels[blob * 7 : (blob + 1) * 7]
        assert (members == members[0]).all()
    assert len(set(labels.tolist())) == 3
    # one cluster: everything together; the counts follow the paper's rule
    assert (density_peak_clusters(points, 1) == 0).all()
    assert recycled_candidates(36) == 11 and cluster_count(11) == 2
    assert recycled_candidates(1) == 1 and recycled_candidates(0) == 0 and cluster_count(9) == 1


@pytest.mark.parametrize("which", ["single", "batch"])
def test_recycling_matches_hand_built_reference(model, single_inputs, batch_inputs, which):
    inputs = single_inputs if which == "single" else batch_inputs
    cache = PrunableDynamicCache(model, keep_ratio=0.25, mode="in-prefill", recycle=True, scoring_layer=2)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    groups = cache.recycled_groups
    assert len(groups) == inputs["input_ids"].shape[0] and all(groups), "no recycled token in some row"
    # kept visual tokens plus one physical entry per recycled token
    assert_pruned(cache, inputs, visual_ids(model), kept_counts=[12] if which == "single" else [12, 4],
                  extra=[len(g) for g in groups])
    ids = inputs["input_ids"]
    for row, row_groups in enumerate(groups):
        n_visual = int((ids[row] == model.config.image_token_id).sum())
        pruned = n_visual - cache.kept_visual_positions[row].numel()
        members = torch.cat([m for _, m in row_groups])
        assert members.numel() == int(0.3 * pruned) + 1  # the best-scored 30% (+1) of the pruned tokens
        assert not torch.isin(members, cache.kept_visual_positions[row]).any()
        assert len(row_groups) == members.numel() // 10 + 1
    # physical length: kept + text + one entry per recycled token
    assert cache.get_physical_length() == int(
        (inputs["attention_mask"].sum(1) - (ids == model.config.image_token_id).sum(1)
         + torch.tensor([k.numel() + len(g) for k, g in zip(cache.kept_visual_positions, groups)])).max()
    ) + NEW - 1
    prompt_len = ids.shape[1]
    recycled = [[(rep, members) for rep, members in row_groups] for row_groups in groups]
    expected = in_prefill_reference_logits(
        model, inputs, [(2, cache.kept_visual_positions)], out.sequences[:, prompt_len:], visual_ids(model), recycled
    )
    for step, (a, e) in enumerate(zip(out.logits, expected)):
        assert (a - e).abs().max() <= 1e-5, f"step {step}"
    plain = PrunableDynamicCache(model, keep_ratio=0.25, mode="in-prefill", scoring_layer=2)
    without = model.generate(**inputs, past_key_values=plain, max_new_tokens=1, **GREEDY)
    assert (without.logits[0] - out.logits[0]).abs().max() > 1e-4  # recycling changes the answer distribution


def test_recycling_needs_in_prefill_mode(sdpa_model):
    with pytest.raises(ValueError, match="mode='in-prefill'"):
        PrunableDynamicCache(sdpa_model, keep_ratio=0.25, recycle=True)


def test_in_prefill_beam_search_scores_match_reference(sdpa_model, single_inputs):
    beams = 3
    cache = PrunableDynamicCache(sdpa_model, keep_ratio=0.25, mode="in-prefill", scoring_layer=2)
    out = sdpa_model.generate(
        **single_inputs, past_key_values=cache, max_new_tokens=4, min_new_tokens=4, num_beams=beams,
        num_return_sequences=beams, length_penalty=0.0, do_sample=False, return_dict_in_generate=True,
        output_scores=True,
    )
    assert_pruned(cache, single_inputs, visual_ids(sdpa_model), expand=beams, kept_counts=[12] * beams)
    rows = torch.zeros(beams, dtype=torch.long)
    expanded = {k: v[rows] for k, v in single_inputs.items() if k not in ("pixel_values", "image_grid_thw")}
    expanded["pixel_values"] = single_inputs["pixel_values"].repeat(beams, 1)
    expanded["image_grid_thw"] = single_inputs["image_grid_thw"].repeat(beams, 1)
    prompt_len = single_inputs["input_ids"].shape[1]
    continuations = out.sequences[:, prompt_len:]
    kept = [cache.kept_visual_positions[0]] * beams
    logits = in_prefill_reference_logits(sdpa_model, expanded, [(2, kept)], continuations, visual_ids(sdpa_model))
    logprobs = torch.log_softmax(torch.stack(logits, 1), -1).gather(-1, continuations[..., None]).squeeze(-1).sum(-1)
    assert torch.allclose(out.sequences_scores.float(), logprobs, atol=1e-4)
