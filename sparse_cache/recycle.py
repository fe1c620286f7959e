"""Token recycling (SparseVLM v1, paper section 3.3): pruned tokens merged into a few new ones.

Of the tokens an image loses at the (last) pruning layer, the best-scored 30% (+1) are clustered with
density-peak clustering (DPC-kNN) on their hidden states, and each cluster is averaged into one token
that goes on through the later layers, placed right after the image's kept tokens.
"""

from __future__ import annotations

import math

import torch

#: share of an image's pruned tokens that is recycled (the best-scored ones), plus one
RECYCLE_SHARE = 0.3


def recycled_candidates(num_pruned: int) -> int:
    """How many of ``num_pruned`` tokens are recycled: the top 30% plus one (all if fewer)."""
    return min(num_pruned, int(RECYCLE_SHARE * num_pruned) + 1) if num_pruned else 0


def cluster_count(num_candidates: int) -> int:
    """Clusters formed from ``num_candidates`` recycled tokens: ``floor(M / 10) + 1``."""
    return num_candidates // 10 + 1 if num_candidates else 0


#: most elements of one block of pairwise distances computed at a time (16 MiB in float32); for
#: ``M^2 <= CHUNK_ELEMENTS`` (``M <= 2048``) the whole ``M x M`` matrix is one block.
CHUNK_ELEMENTS = 1 << 22


def _distances(x: torch.Tensor, rows: torch.Tensor | slice, scale: float) -> torch.Tensor:
    return torch.cdist(x[rows], x) * scale


def density_peak_clusters(
    points: torch.Tensor, num_clusters: int, chunk_elements: int = CHUNK_ELEMENTS
) -> torch.Tensor:
    """Cluster ``points`` ``(M, D)`` into ``num_clusters`` groups by density-peak clustering (DPC-kNN).

    Distances are euclidean scaled by ``1/sqrt(D)``. Local density ``rho_i = exp(-mean of the squared
    distances to the k nearest neighbours)`` with ``k = num_clusters``; ``delta_i`` = distance to the
    nearest denser point (the largest distance for the densest one). The ``num_clusters`` points with the
    largest ``rho * delta`` are centres; every other point joins the cluster of its nearest denser point,
    in order of decreasing density. Returns the cluster index ``(M,)`` of every point (centres in order of
    decreasing ``rho * delta``). Ties are broken by index, so the result is deterministic.

    Float32 (float64 input kept as is). The distances are computed twice by blocks of rows (for the
    densities, then for ``delta``), so memory is ``O(rows x M)``, never ``M x M`` once
    ``M^2 > chunk_elements``; ``M`` is at most 30% of one image's pruned tokens. The labels follow the
    parent links by pointer jumping (``ceil(log2 M)`` gathers), without host synchronisation.
    """
    m = points.shape[0]
    device = points.device
    if m == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    num_clusters = max(1, min(num_clusters, m))
    x = points.to(torch.promote_types(points.dtype, torch.float32))
    scale = 1.0 / math.sqrt(points.shape[-1])
    rows = min(m, max(1, chunk_elements // m))
    blocks = [slice(start, min(m, start + rows)) for start in range(0, m, rows)]
    k = min(num_clusters, m - 1)
    if k > 0:
        density = torch.empty(m, dtype=x.dtype, device=device)
        for block in blocks:
            nearest = torch.topk(_distances(x, block, scale), k + 1, largest=False).values[:, 1:]  # drop itself
            density[block] = torch.exp(-(nearest**2).mean(dim=1))
    else:
        density = torch.ones(m, dtype=x.dtype, device=device)
    # a strict order of density (ties: lower index counts as denser) so "denser" is well defined
    order = torch.argsort(density, descending=True, stable=True)
    rank = torch.empty(m, dtype=torch.long, device=device)
    rank[order] = torch.arange(m, device=device)
    delta = torch.empty(m, dtype=x.dtype, device=device)
    parent = torch.empty(m, dtype=torch.long, device=device)
    for block in blocks:
        denser = rank[None, :] < rank[block, None]  # [i, j]: j is denser than i
        delta[block], parent[block] = _distances(x, block, scale).masked_fill_(~denser, float("inf")).min(dim=1)
    top = order[:1]
    delta.index_copy_(0, top, _distances(x, top, scale).max(dim=1).values)
    parent.index_copy_(0, top, top)
    centres = torch.argsort(density * delta, descending=True, stable=True)[:num_clusters]
    # every chain of parents ends at a centre or at the densest point (which joins cluster 0 if no centre)
    label = torch.zeros(m, dtype=torch.long, device=device)
    label[centres] = torch.arange(centres.numel(), device=device)
    parent[centres] = centres
    for _ in range(max(1, math.ceil(math.log2(m)))):
        parent = parent[parent]  # pointer jumping: parent becomes the root of the chain
    return label[parent]
