"""Scorers in O(n x k) memory without host syncs in their loops (issue 14, item 3).

* every registered scorer, in a generate at 4,096 visual tokens, allocates no tensor of ``n x n`` elements
  (``n`` = visual tokens) while scoring, recorded by a ``TorchDispatchMode`` around ``score``;
* DivPrune, CDPruner and recycling's clustering pick exactly what the former ``n x n`` implementations
  (kept below as references) picked, chunked or not;
* their selection loops read nothing back to the host (no ``aten._local_scalar_dense`` per step).
"""

import copy
import math

import pytest
import torch
from oracles import assert_pruned
from torch.utils._python_dispatch import TorchDispatchMode

from sparse_cache import PrunableDynamicCache, testing
from sparse_cache.recycle import density_peak_clusters
from sparse_cache.scorers import SCORERS, get_scorer
from sparse_cache.scorers.cdpruner import conditional_features, conditional_kernel, greedy_dpp_order
from sparse_cache.scorers.divprune import max_min_order

# --------------------------------------------------------------------------- the former implementations


def reference_max_min_order(embeds):
    n = embeds.shape[0]
    if n <= 1:
        return torch.arange(n)
    unit = torch.nn.functional.normalize(embeds.float(), dim=-1)
    distance = (1.0 - unit @ unit.T).clamp_min_(0.0)
    distance.fill_diagonal_(float("inf"))
    first = int(torch.argmax(distance.min(dim=1).values))
    distance.fill_diagonal_(0.0)
    order = torch.empty(n, dtype=torch.long)
    order[0] = first
    min_to_chosen = distance[first].clone()
    min_to_chosen[first] = float("-inf")
    for step in range(1, n):
        pick = int(torch.argmax(min_to_chosen))
        order[step] = pick
        torch.minimum(min_to_chosen, distance[pick], out=min_to_chosen)
        min_to_chosen[pick] = float("-inf")
    return order


def reference_greedy_dpp_order(kernel, max_picks=None, eps=1e-10):
    n = kernel.shape[0]
    limit = n if max_picks is None else min(n, max_picks)
    kernel = kernel.double()
    residual = torch.diagonal(kernel).clone()
    threshold = eps * float(residual.max().clamp_min(0))
    factors = kernel.new_zeros(n, limit)
    available = torch.ones(n, dtype=torch.bool)
    picks = []
    for step in range(limit):
        gains = residual.masked_fill(~available, float("-inf"))
        pick = int(torch.argmax(gains))
        if not float(gains[pick]) > threshold:
            break
        picks.append(pick)
        column = (kernel[pick] - factors[:, :step] @ factors[pick, :step]) / gains[pick].sqrt()
        factors[:, step] = column
        residual = residual - column.square()
        available[pick] = False
    return torch.tensor(picks, dtype=torch.long)


def reference_density_peak_clusters(points, num_clusters):
    m = points.shape[0]
    num_clusters = max(1, min(num_clusters, m))
    x = points.double()
    distance = torch.cdist(x, x) / math.sqrt(points.shape[-1])
    k = min(num_clusters, m - 1)
    if k > 0:
        nearest = torch.topk(distance, k + 1, largest=False).values[:, 1:]
        density = torch.exp(-(nearest**2).mean(dim=1))
    else:
        density = torch.ones(m, dtype=torch.float64)
    order = sorted(range(m), key=lambda i: (-float(density[i]), i))
    rank = torch.empty(m, dtype=torch.long)
    rank[torch.tensor(order)] = torch.arange(m)
    denser = rank[None, :] < rank[:, None]
    delta, parent = distance.masked_fill(~denser, float("inf")).min(dim=1)
    top = order[0]
    delta[top] = distance[top].max()
    parent[top] = top
    centres = torch.argsort(density * delta, descending=True, stable=True)[:num_clusters]
    label = torch.full((m,), -1, dtype=torch.long)
    label[centres] = torch.arange(centres.numel())
    for i in order:
        if label[i] < 0:
            label[i] = label[parent[i]] if label[parent[i]] >= 0 else 0
    return label


# --------------------------------------------------------------------------- same selections as before


@pytest.mark.parametrize("seed", range(4))
def test_divprune_matches_the_n_by_n_implementation(seed):
    gen = torch.Generator().manual_seed(seed)
    points = torch.randn(300, 16, generator=gen)
    expected = reference_max_min_order(points)
    assert torch.equal(max_min_order(points), expected)
    assert torch.equal(max_min_order(points, chunk_elements=7 * 300), expected)  # blocks of 7 rows
    assert torch.equal(max_min_order(points.bfloat16()), reference_max_min_order(points.bfloat16()))


@pytest.mark.parametrize("seed", range(3))
def test_divprune_stopped_at_the_budget_keeps_the_same_tokens_in_a_fraction_of_the_work(seed):
    """max_min_order(limit=k): the first k picks are the full order's (so is the next one: the rest follow the next
    pick's criterion); one matrix-vector product per pick, so k picks instead of n."""
    gen = torch.Generator().manual_seed(seed)
    points = torch.randn(300, 16, generator=gen)
    full = reference_max_min_order(points)
    for limit in (1, 2, 37, 75, 299, 300, 1000):
        order = max_min_order(points, limit=limit)
        picked = min(limit, 300)
        assert torch.equal(order[:picked], full[:picked]), limit
        if picked < 300:
            assert order[picked] == full[picked], limit
        assert torch.equal(order.sort().values, torch.arange(300)), limit  # a permutation
    products = {}
    for limit in (None, 75):
        with RecordOps() as recorder:
            max_min_order(points, limit=limit)
        products[limit] = sum(name == "aten.mv" for name in recorder.names)  # one per pick after the first
    assert (products[None], products[75]) == (299 + 1, 74 + 1)  # and one for the first pick's distances


def test_the_cache_tells_greedy_scorers_how_many_tokens_it_keeps(sdpa_model, processor):
    """context.keep_limit: the fixed budget of each image (None when the budget depends on the scores or is planned
    at selection); DivPrune then stops there and keeps what its full order would."""
    seen = []

    class Spy(type(get_scorer("divprune"))):
        def score(self, context):
            seen.append(copy.deepcopy(context.keep_limit))
            return super().score(context)

    inputs = testing.make_inputs(processor, ["describe.", "count them."],
                                 [[testing.synthetic_image(112, 112, seed=1)],
                                  [testing.synthetic_image(56, 56, seed=2), testing.synthetic_image(112, 84, seed=3)]])
    ids = inputs["input_ids"]
    kept = {}
    for budget_kwargs in (dict(keep_ratio=0.25), dict(keep_tokens=5), dict(max_visual_tokens=20)):
        seen.clear()
        cache = PrunableDynamicCache(sdpa_model, scorer=Spy(), **budget_kwargs)
        sdpa_model.generate(**inputs, past_key_values=cache, max_new_tokens=1, do_sample=False)
        assert_pruned(cache, inputs, (sdpa_model.config.image_token_id, sdpa_model.config.video_token_id))
        kept[str(budget_kwargs)] = [k.tolist() for k in cache.kept_visual_positions]
        if "max_visual_tokens" in budget_kwargs:
            assert seen == [None]  # planned at selection, over the images: the whole order
            continue
        counts = [[16], [4, 12]]  # visual tokens of each image, per row
        expected = [{block: (max(1, math.floor(c * 0.25 + 0.5)) if "keep_ratio" in budget_kwargs else min(c, 5))
                     for block, c in enumerate(row)} for row in counts]
        assert [list(row.values()) for row in seen[0]] == [list(row.values()) for row in expected]
    # the same kept sets as the scorer without a limit (called by hand on the cache's scoring context)
    for budget_kwargs in (dict(keep_ratio=0.25), dict(keep_tokens=5)):
        class Full(type(get_scorer("divprune"))):
            def score(self, context):
                context.keep_limit = None
                return super().score(context)

        cache = PrunableDynamicCache(sdpa_model, scorer=Full(), **budget_kwargs)
        sdpa_model.generate(**inputs, past_key_values=cache, max_new_tokens=1, do_sample=False)
        assert [k.tolist() for k in cache.kept_visual_positions] == kept[str(budget_kwargs)]


@pytest.mark.parametrize("seed", range(4))
def test_cdpruner_matches_the_kernel_implementation(seed):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(200, 24, generator=gen, dtype=torch.float64)
    relevance = torch.rand(200, generator=gen, dtype=torch.float64)
    relevance[:3] = 0.0  # tokens that never add volume
    features[10] = features[11]  # an exact duplicate: no volume once one of them is picked
    expected = reference_greedy_dpp_order(conditional_kernel(features, relevance))
    assert torch.equal(greedy_dpp_order(conditional_features(features, relevance)), expected)
    assert torch.equal(greedy_dpp_order(conditional_features(features, relevance), max_picks=9), expected[:9])
    # float32, the dtype used for float32 / bf16 / fp16 embeddings: the same picks, the same rank
    assert torch.equal(greedy_dpp_order(conditional_features(features.float(), relevance.float())), expected)


@pytest.mark.parametrize("seed", range(3))
def test_density_peak_clusters_match_the_m_by_m_implementation(seed):
    gen = torch.Generator().manual_seed(seed)
    centres = 6 * torch.randn(5, 8, generator=gen)
    points = (centres[torch.arange(90) % 5] + torch.randn(90, 8, generator=gen)).double()
    for clusters in (1, 3, 9):
        expected = reference_density_peak_clusters(points, clusters)
        assert torch.equal(density_peak_clusters(points, clusters), expected)
        assert torch.equal(density_peak_clusters(points, clusters, chunk_elements=4 * 90), expected)
        assert torch.equal(density_peak_clusters(points.float(), clusters, chunk_elements=4 * 90), expected)


# --------------------------------------------------------------------------- no host sync per step


class RecordOps(TorchDispatchMode):
    """Records every aten op's name and output shapes."""

    def __init__(self):
        super().__init__()
        self.names, self.shapes = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.names.append(str(func.overloadpacket))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def syncs(names):
    return sum(name.endswith("_local_scalar_dense") for name in names)


def test_selection_loops_do_not_sync_per_step():
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(400, 32, generator=gen)
    relevance = torch.rand(400, generator=gen)
    for run in (
        lambda: max_min_order(points, chunk_elements=50 * 400),
        lambda: greedy_dpp_order(conditional_features(points, relevance), max_picks=32),
        lambda: density_peak_clusters(points, 41, chunk_elements=50 * 400),
    ):
        with RecordOps() as recorder:
            run()
        assert syncs(recorder.names) <= 2, f"{syncs(recorder.names)} host syncs"
        assert max(math.prod(s) for s in recorder.shapes) < 400 * 400


# --------------------------------------------------------------------------- every scorer at 4K visual tokens


@pytest.fixture(scope="module")
def large_inputs():
    """One 1792x1792 image: a 128x128 patch grid, 64x64 = 4,096 merged visual tokens."""
    processor = testing.tiny_processor(max_pixels=28 * 28 * 4096)
    return testing.make_inputs(processor, ["what is in the picture?"], [[testing.synthetic_image(1792, 1792, 5)]])


_VISION_OUTPUT = {}


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_scorer_allocates_no_n_by_n_tensor_at_4k_visual_tokens(sdpa_model, large_inputs, name, monkeypatch):
    # the vision tower (16,384 patches) is the slowest part: run it once for all scorers
    visual = sdpa_model.model.visual
    compute = visual.forward

    def cached_forward(pixel_values, *args, **kwargs):
        if pixel_values.data_ptr() != large_inputs["pixel_values"].data_ptr():
            return compute(pixel_values, *args, **kwargs)
        if "output" not in _VISION_OUTPUT:
            _VISION_OUTPUT["output"] = compute(pixel_values, *args, **kwargs)
        return copy.copy(_VISION_OUTPUT["output"])  # callers replace fields of the output

    monkeypatch.setattr(visual, "forward", cached_forward)
    visual_ids = (sdpa_model.config.image_token_id, sdpa_model.config.video_token_id)
    n = int((large_inputs["input_ids"] == sdpa_model.config.image_token_id).sum())
    assert n == 4096
    scorer = get_scorer(name)
    recorder = RecordOps()
    score = scorer.score

    def recorded_score(context):
        with recorder:
            return score(context)

    scorer.score = recorded_score
    cache = PrunableDynamicCache(sdpa_model, keep_ratio=0.25, scorer=scorer)
    sdpa_model.generate(**large_inputs, past_key_values=cache, max_new_tokens=1, do_sample=False)
    assert_pruned(cache, large_inputs, visual_ids, kept_counts=[1024])
    assert recorder.shapes, f"{name}: the scorer ran no tensor op under the recorder"
    largest = max(math.prod(s) for s in recorder.shapes)
    assert largest < n * n, f"{name}: scoring allocated {largest} elements, n*n = {n * n}"
    assert syncs(recorder.names) < n // 16, f"{name}: {syncs(recorder.names)} host syncs for {n} tokens"
