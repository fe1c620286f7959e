"""Every registered scorer against oracle 2, plus property tests of each scorer on constructed embeddings."""

import math
import sys

import pytest
import torch
from oracles import GREEDY, assert_pruned, masked_decode_logits, visual_ids

from sparse_cache import PrunableDynamicCache, testing
from sparse_cache.scorers import SCORERS, ScoringContext, get_scorer
from sparse_cache.scorers.cdpruner import conditional_features, conditional_kernel, greedy_dpp_order, min_max
from sparse_cache.scorers.dart import duplication_order
from sparse_cache.scorers.divprune import max_min_order, visual_block_ranges
from sparse_cache.scorers.uniform import UniformScorer, stride_order
from sparse_cache.select import select_visual

NEW = 4
ATOL = 1e-5
KEEP_RATIO = 0.25


@pytest.fixture(scope="module")
def mixed_batch(processor):
    """Left-padded batch: one 48-token image; two 16-token images; no image at all."""
    return testing.make_inputs(
        processor,
        ["what colour is the square on the left?", "count the objects.", "describe the image."],
        [
            [testing.synthetic_image(224, 168, seed=1)],
            [testing.synthetic_image(112, 112, seed=2), testing.synthetic_image(112, 112, seed=3)],
            [],
        ],
    )


def image_blocks(inputs, model):
    """Per row, the positions of each image's tokens (runs of image pads)."""
    ids = inputs["input_ids"]
    blocks = []
    for row in range(ids.shape[0]):
        visual = torch.nonzero(ids[row] == model.config.image_token_id).flatten()
        if visual.numel() == 0:
            blocks.append([])
            continue
        starts = [0] + (torch.nonzero(visual[1:] - visual[:-1] != 1).flatten() + 1).tolist()
        blocks.append([visual[s:e] for s, e in zip(starts, starts[1:] + [visual.numel()])])
    return blocks


# --------------------------------------------------------------------------- the matrix: scorer x attention


def test_registry_lists_the_methods():
    assert {"sparsevlm", "fastv", "random", "uniform", "cosine", "divprune", "cdpruner", "dart"} <= set(SCORERS)
    for name, cls in SCORERS.items():
        assert cls.name == name
        assert get_scorer(name).name == name
    for name in ("uniform", "cosine", "divprune", "cdpruner", "dart"):
        assert "Based on" in sys.modules[SCORERS[name].__module__].__doc__


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_every_scorer_masked_equivalence_on_padded_batch(model, mixed_batch, name):
    cache = PrunableDynamicCache(model, keep_ratio=KEEP_RATIO, scorer=name)
    out = model.generate(**mixed_batch, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert_pruned(cache, mixed_batch, visual_ids(model), kept_counts=[12, 8, 0])

    # budgets: round(0.25 * n) per image, nothing for the row without an image
    blocks = image_blocks(mixed_batch, model)
    for row, row_blocks in enumerate(blocks):
        kept = cache.kept_visual_positions[row]
        assert torch.all(kept[1:] > kept[:-1])
        for block in row_blocks:
            assert int(torch.isin(kept, block).sum()) == math.floor(KEEP_RATIO * block.numel() + 0.5)
        assert kept.numel() == sum(math.floor(KEEP_RATIO * b.numel() + 0.5) for b in row_blocks)
        # the kept tokens are each image's top-scored ones
        scores = cache.visual_scores[row]
        assert scores.numel() == sum(b.numel() for b in row_blocks)
        offset = 0
        for block in row_blocks:
            block_scores = scores[offset : offset + block.numel()]
            is_kept = torch.isin(block, kept)
            assert block_scores[is_kept].min() >= block_scores[~is_kept].max()
            offset += block.numel()
    assert [k.numel() for k in cache.kept_visual_positions] == [12, 8, 0]

    prompt_len = mixed_batch["input_ids"].shape[1]
    expected = masked_decode_logits(
        model, mixed_batch, cache.kept_visual_positions, out.sequences[:, prompt_len:], visual_ids(model)
    )
    assert len(out.logits) == len(expected)
    for step, (got, want) in enumerate(zip(out.logits, expected)):
        diff = (got.float() - want).abs().max().item()
        assert diff <= ATOL, f"{name}, step {step}: max |diff| {diff:.3g} > {ATOL}"


# --------------------------------------------------------------------------- constructed contexts


def make_context(visual_embeds, text_embeds=None, gap=False):
    """A one-row context: ``[text?] visual... [text...]``; ``gap`` splits the visual tokens into two images."""
    visual_embeds = torch.as_tensor(visual_embeds, dtype=torch.float32)
    text_embeds = torch.zeros(0, visual_embeds.shape[1]) if text_embeds is None else torch.as_tensor(
        text_embeds, dtype=torch.float32
    )
    n, half = visual_embeds.shape[0], visual_embeds.shape[0] // 2
    pieces = [torch.zeros(1, visual_embeds.shape[1])]  # a system token
    positions = []
    for index in range(n):
        if gap and index == half:
            pieces.append(torch.zeros(1, visual_embeds.shape[1]))  # <|vision_end|><|vision_start|>
        positions.append(sum(p.shape[0] for p in pieces))
        pieces.append(visual_embeds[index : index + 1])
    start = sum(p.shape[0] for p in pieces)
    pieces.append(text_embeds)
    embeds = torch.cat(pieces)[None]
    return ScoringContext(
        inputs_embeds=embeds,
        token_valid=torch.ones(embeds.shape[:2], dtype=torch.bool),
        visual_positions=[torch.tensor(positions)],
        text_positions=[torch.arange(start, start + text_embeds.shape[0])],
        generator=torch.Generator().manual_seed(0),
    )


def unit_circle(degrees):
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin(), torch.zeros_like(radians)], dim=1).float()


def kept_for_every_budget(scores):
    """``k -> kept indices`` through the library's own selection (one block)."""
    block = torch.zeros(scores.numel(), dtype=torch.long)
    return {k: select_visual(scores, block, None, k).tolist() for k in range(1, scores.numel() + 1)}


def test_block_ranges_follow_runs_of_positions():
    context = make_context(torch.randn(6, 4), gap=True)
    assert visual_block_ranges(context, 0) == [(0, 3), (3, 6)]
    context.visual_blocks = [torch.tensor([0, 0, 1, 1, 1, 1])]  # the field, when set, wins over the runs
    assert visual_block_ranges(context, 0) == [(0, 2), (2, 6)]


# --------------------------------------------------------------------------- divprune


def test_divprune_max_min_order_on_hand_placed_points():
    # angles 0, 30, 90, 200, 210 degrees: distance 1 - cos grows with the angle between two points.
    # Nearest-neighbour angles 30, 30, 60, 10, 10 -> start at 90 (index 2); farthest from it: 210 (4);
    # then min angles to {90, 210}: 0 -> 90, 30 -> 60, 200 -> 10: pick 0 (0); then 30 (1) and 200 (3).
    points = unit_circle([0, 30, 90, 200, 210])
    assert max_min_order(points).tolist() == [2, 4, 0, 1, 3]
    scores = get_scorer("divprune").score(make_context(points))[0]
    for k, kept in kept_for_every_budget(scores).items():
        assert kept == sorted([2, 4, 0, 1, 3][:k])


def test_divprune_order_is_the_max_min_greedy_on_random_points():
    points = torch.randn(12, 5, generator=torch.Generator().manual_seed(3))
    order = max_min_order(points).tolist()
    unit = torch.nn.functional.normalize(points.double(), dim=-1)
    distance = 1 - unit @ unit.T
    off = distance + torch.diag(torch.full((12,), float("inf"), dtype=torch.float64))
    assert order[0] == int(torch.argmax(off.min(dim=1).values))
    for step in range(1, 12):
        rest = [i for i in range(12) if i not in order[:step]]
        gaps = {i: min(float(distance[i, j]) for j in order[:step]) for i in rest}
        assert gaps[order[step]] == pytest.approx(max(gaps.values()), abs=1e-6)


def test_divprune_orders_each_image_separately():
    points = unit_circle([0, 30, 90, 200, 210])
    context = make_context(torch.cat([points, points.flip(0)]), gap=True)
    scores = get_scorer("divprune").score(context)[0]
    assert torch.equal(scores[:5], scores[5:].flip(0))  # same greedy order within each image


# --------------------------------------------------------------------------- cdpruner


def brute_force_greedy(kernel, picks):
    """Greedy MAP by brute-force log-det: each step the j maximising log det L[Y + j]."""
    order = []
    for _ in range(picks):
        best, best_value = None, -math.inf
        for j in range(kernel.shape[0]):
            if j in order:
                continue
            index = torch.tensor(order + [j])
            sign, logdet = torch.linalg.slogdet(kernel[index][:, index])
            value = float(logdet) if sign > 0 else -math.inf
            if value > best_value + 1e-9:
                best, best_value = j, value
        order.append(best)
    return order


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cdpruner_greedy_matches_brute_force_log_det(seed):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    relevance = torch.rand(7, generator=gen, dtype=torch.float64)
    kernel = conditional_kernel(features, relevance)
    order = greedy_dpp_order(conditional_features(features, relevance)).tolist()  # never builds the kernel
    assert len(order) == 4  # rank of the kernel: the embedding size
    assert order == brute_force_greedy(kernel, 4)
    assert greedy_dpp_order(conditional_features(features, relevance), max_picks=2).tolist() == order[:2]
    # float32 (the compute dtype of float32/bf16 embeddings): same picks, same rank detection
    assert greedy_dpp_order(conditional_features(features.float(), relevance.float())).tolist() == order


def test_cdpruner_scores_follow_the_conditional_dpp():
    gen = torch.Generator().manual_seed(5)
    visual = torch.randn(8, 5, generator=gen)
    question = torch.randn(3, 5, generator=gen)
    scores = get_scorer("cdpruner").score(make_context(visual, question))[0]
    # the kernel rebuilt here from the definition: r = min-max(cos(visual, mean question)), diag(r) S diag(r)
    cosine = torch.nn.functional.cosine_similarity(visual.double(), question.double().mean(0, keepdim=True), dim=-1)
    r = (cosine - cosine.min()) / (cosine.max() - cosine.min())
    unit = torch.nn.functional.normalize(visual.double(), dim=-1)
    kernel = r[:, None] * (unit @ unit.T) * r[None, :]
    ranked = torch.argsort(scores, descending=True).tolist()
    assert ranked[:5] == brute_force_greedy(kernel, 5)  # rank 5: the embedding size
    rest = [i for i in range(8) if i not in ranked[:5]]
    assert ranked[5:] == sorted(rest, key=lambda i: -float(r[i]))  # then by relevance
    block = torch.zeros(8, dtype=torch.long)
    for k in range(1, 9):
        assert select_visual(scores, block, None, k).tolist() == sorted(ranked[:k])


def test_cdpruner_prefers_a_relevant_distinct_token_over_a_duplicate():
    question = torch.tensor([[1.0, 0.0, 0.0]])
    # 0 and 1 are the same most relevant token; 2 is relevant but different; 3 is the least relevant
    visual = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.5, 0.0, 3**0.5 / 2]])
    context = make_context(visual, question)
    cd = get_scorer("cdpruner").score(context)[0]
    cos = get_scorer("cosine").score(context)[0]
    assert select_visual(cos, torch.zeros(4, dtype=torch.long), None, 2).tolist() == [0, 1]
    assert select_visual(cd, torch.zeros(4, dtype=torch.long), None, 2).tolist() == [0, 2]
    relevance = min_max(cos)
    assert relevance.tolist() == pytest.approx([1.0, 1.0, 1.1 / 1.5, 0.0], abs=1e-6)
    # greedy MAP: 0 (r = 1, the earlier of the tie), then 2; the duplicate 1 and token 3 (r = 0) add no
    # volume, so they follow by relevance
    assert torch.argsort(cd, descending=True).tolist() == [0, 2, 1, 3]


def test_cdpruner_without_question_is_pure_diversity():
    points = unit_circle([0, 30, 90, 200, 210])
    scores = get_scorer("cdpruner").score(make_context(points))[0]
    picks = greedy_dpp_order(conditional_features(points, torch.ones(5))).tolist()
    assert picks == brute_force_greedy(conditional_kernel(points.double(), torch.ones(5)), 2)  # rank 2: planar points
    assert torch.argsort(scores, descending=True)[:2].tolist() == picks


# --------------------------------------------------------------------------- cosine


def test_cosine_known_ordering():
    question = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # mean direction: the x axis
    visual = unit_circle([120, 0, 60, 179, 30]) * torch.tensor([[1.0], [3.0], [0.5], [2.0], [1.0]])
    scores = get_scorer("cosine").score(make_context(visual, question))[0]
    expected = torch.cos(torch.tensor([120.0, 0, 60, 179, 30]) * math.pi / 180)
    assert torch.allclose(scores, expected, atol=1e-6)
    assert torch.argsort(scores, descending=True).tolist() == [1, 4, 2, 0, 3]


def test_text_guided_scorers_without_text_or_visual_tokens():
    context = make_context(torch.randn(4, 3))  # no text after the visual tokens
    assert get_scorer("cosine").score(context) == [None]
    assert get_scorer("cdpruner").score(context)[0].shape == (4,)
    empty = make_context(torch.zeros(0, 3), torch.randn(2, 3))
    for name in ("cosine", "divprune", "cdpruner", "uniform", "random"):
        assert get_scorer(name).score(empty)[0].numel() == 0


# --------------------------------------------------------------------------- uniform


@pytest.mark.parametrize("n", [1, 5, 16, 48, 63, 100])
def test_uniform_keeps_evenly_strided_tokens(n):
    scores = get_scorer("uniform").score(make_context(torch.randn(n, 3)))[0]
    kept = kept_for_every_budget(scores)
    for j in range(8):  # exactly tokens[::s] whenever the budget is ceil(n / s), s a power of two
        assert kept[math.ceil(n / 2**j)] == list(range(0, n, 2**j))
    for k, chosen in kept.items():  # evenly spread for any budget: no gap reaches twice the ideal n / k
        gaps = [b - a for a, b in zip(chosen, chosen[1:])] + [n - chosen[-1]]
        assert max(gaps) < 2 * n / k, (k, chosen)


def test_uniform_strides_both_axes_with_the_grid():
    order = stride_order(48, (1, 6, 8))
    assert sorted(order.tolist()) == list(range(48))
    grid = torch.arange(48).view(6, 8)
    assert sorted(order[:12].tolist()) == sorted(grid[::2, ::2].flatten().tolist())
    assert sorted(order[:4].tolist()) == sorted(grid[::4, ::4].flatten().tolist())
    # with the grids in the context, the scorer strides each image on its own grid
    context = make_context(torch.randn(32, 3), gap=True)
    context.visual_blocks = [torch.tensor([0] * 16 + [1] * 16)]
    context.block_grids = [(1, 4, 4), (1, 2, 8)]
    scores = get_scorer("uniform").score(context)[0]
    kept = select_visual(scores, torch.tensor([0] * 16 + [1] * 16), 0.25, None).tolist()
    assert kept == [0, 2, 8, 10] + [16 + i for i in (0, 2, 4, 6)]


class RecordingUniform(UniformScorer):
    def score(self, context):
        self.block_grids = context.block_grids
        return super().score(context)


def test_uniform_in_generate_keeps_the_stride_two_sub_grid_of_each_image(sdpa_model, mixed_batch):
    scorer = RecordingUniform()
    cache = PrunableDynamicCache(sdpa_model, keep_ratio=0.25, scorer=scorer)
    sdpa_model.generate(**mixed_batch, past_key_values=cache, max_new_tokens=1, do_sample=False)
    assert_pruned(cache, mixed_batch, visual_ids(sdpa_model), kept_counts=[12, 8, 0])
    grids = [[(6, 8)], [(4, 4), (4, 4)], []]  # merged tokens (h, w) of 224x168 and 112x112 images
    blocks = image_blocks(mixed_batch, sdpa_model)
    assert scorer.block_grids is not None, "the cache must give scorers each image's grid"
    for row, (row_blocks, row_grids) in enumerate(zip(blocks, grids)):
        expected = [block.view(h, w)[::2, ::2].flatten() for block, (h, w) in zip(row_blocks, row_grids)]
        expected = torch.cat(expected) if expected else torch.zeros(0, dtype=torch.long)
        assert torch.equal(cache.kept_visual_positions[row], expected)


# --------------------------------------------------------------------------- dart


def test_dart_order_pivots_then_least_similar_per_pivot():
    features = unit_circle([0, 10, 90, 180, 170, 100])
    pivots = torch.cat([features[:1], unit_circle([170])])  # visual pivot: token 0; a text pivot at 170 degrees
    order = duplication_order(features, pivots, torch.tensor([0])).tolist()
    # least similar first -- to token 0: 180, 170, 100, 90, 10; to the 170-degree pivot: 0, 10, 90, 100, 180.
    # Round 0: 180 (3), then 0 (already, the pivot); round 1: 170 (4), 10 (1); round 2: 100 (5), 90 (2).
    assert order == [0, 3, 4, 1, 5, 2]
