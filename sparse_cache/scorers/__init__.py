"""Scorer registry: a name -> scorer class map. A new method is one file here plus one line below."""

from __future__ import annotations

from .base import Scorer, ScoringContext
from .cdpruner import CDPrunerScorer
from .cosine import CosineScorer
from .dart import DartScorer
from .dart_embed import DartEmbedScorer
from .divprune import DivPruneScorer
from .fastv import FastVScorer
from .random import RandomScorer
from .sparsevlm import SparseVLMScorer, select_raters
from .sparsevlm_plus import SparseVLMPlusScorer
from .uniform import UniformScorer

SCORERS: dict[str, type[Scorer]] = {
    SparseVLMScorer.name: SparseVLMScorer,
    SparseVLMPlusScorer.name: SparseVLMPlusScorer,
    FastVScorer.name: FastVScorer,
    RandomScorer.name: RandomScorer,
    UniformScorer.name: UniformScorer,
    CosineScorer.name: CosineScorer,
    DivPruneScorer.name: DivPruneScorer,
    CDPrunerScorer.name: CDPrunerScorer,
    DartScorer.name: DartScorer,
    DartEmbedScorer.name: DartEmbedScorer,
}


def get_scorer(scorer: str | Scorer) -> Scorer:
    """Return a scorer instance from a registered name or an instance; raise a clear error otherwise."""
    if isinstance(scorer, Scorer):
        return scorer
    if isinstance(scorer, str):
        if scorer not in SCORERS:
            raise ValueError(f"scorer: unknown scorer {scorer!r}; valid names are {sorted(SCORERS)}")
        return SCORERS[scorer]()
    raise TypeError(
        f"scorer: expected a scorer name ({sorted(SCORERS)}) or a sparse_cache.scorers.Scorer instance, "
        f"got {type(scorer).__name__}"
    )


__all__ = ["SCORERS", "Scorer", "ScoringContext", "get_scorer", "select_raters", "SparseVLMScorer",
           "FastVScorer", "RandomScorer", "UniformScorer", "CosineScorer", "DivPruneScorer", "CDPrunerScorer",
           "DartScorer", "DartEmbedScorer"]
