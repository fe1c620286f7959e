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


def density_peak_clusters(points: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Cluster ``points`` ``(M, D)`` into ``num_clusters`` groups by density-peak clustering (DPC-kNN).

    Distances are euclidean scaled by ``1/sqrt(D)``. Local density ``rho_i = exp(-mean of the squared
    distances to the k nearest neighbours)`` with ``k = num_clusters``; ``delta_i`` = distance to the
    nearest denser point (the largest distance for the densest one). The ``num_clusters`` points with the
    largest ``rho * delta`` are centres; every other point joins the cluster of its nearest denser point,
    in order of decreasing density. Returns the cluster index ``(M,)`` of every point (centres in order of
    decreasing ``rho * delta``). Ties are broken by index, so the result is deterministic.
    """
    m = points.shape[0]
    if m == 0:
        return torch.zeros(0, dtype=torch.long, device=points.device)
    num_clusters = max(1, min(num_clusters, m))
    x = points.double()
    distance = torch.cdist(x, x) / math.sqrt(points.shape[-1])
    k = min(num_clusters, m - 1)
    if k > 0:
        nearest = torch.topk(distance, k + 1, largest=False).values[:, 1:]  # drop the point itself
        density = torch.exp(-(nearest**2).mean(dim=1))
    else:
        density = torch.ones(m, dtype=torch.float64, device=points.device)
    # a strict order of density (ties: lower index counts as denser) so "denser" is well defined
    order = sorted(range(m), key=lambda i: (-float(density[i]), i))
    rank = torch.empty(m, dtype=torch.long)
    rank[torch.tensor(order)] = torch.arange(m)
    rank = rank.to(points.device)
    denser = rank[None, :] < rank[:, None]  # [i, j]: j is denser than i
    masked = distance.masked_fill(~denser, float("inf"))
    delta, parent = masked.min(dim=1)
    top = order[0]
    delta[top] = distance[top].max()
    parent[top] = top
    centres = torch.argsort(density * delta, descending=True, stable=True)[:num_clusters]
    label = torch.full((m,), -1, dtype=torch.long, device=points.device)
    label[centres] = torch.arange(centres.numel(), device=points.device)
    for i in order:  # parents are denser, so they are labelled first
        if label[i] < 0:
            label[i] = label[parent[i]] if label[parent[i]] >= 0 else 0
    return label
