"""DART on the input embeddings: keep the visual tokens that duplicate a few pivot tokens the least.

Based on "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More"
(Wen et al., 2025, DART), in the embedding-level variant that production runtimes use when the decoder's
layer-2 states do not exist because pruning happens before the language model (NVIDIA TensorRT-Edge-LLM's
default visual-token pruner), restated in ``../../docs/methods.md``. Everything is read from the decoder
input embeddings (visual features already inserted):

1. pivots: per image (or video), the ``num_visual_pivots`` visual tokens with the largest L1 norm of their
   embeddings, plus the row's ``num_text_pivots`` text tokens (after the last visual token) with the
   largest L1 norm;
2. for each pivot, its least cosine-similar visual tokens are kept, the budget shared evenly between
   pivots.

Scores encode the same priority order as the attention-level :class:`~sparse_cache.scorers.dart.DartScorer`
(visual pivots first, then a round-robin over pivots of each pivot's next least-similar token:
:func:`~sparse_cache.scorers.dart.duplication_order`), so one score vector serves every budget. Needs no
decoder layer: usable in every mode, ``mode="pre-llm"`` included.
"""

from __future__ import annotations

import torch

from .base import ScoringContext
from .dart import DartScorer, _top, duplication_order
from .divprune import order_to_scores, visual_block_ranges


class DartEmbedScorer(DartScorer):
    """Duplication-aware order per image from the input embeddings: L1-norm pivots, least-similar tokens next
    (the arguments and their checks are those of :class:`~sparse_cache.scorers.dart.DartScorer`).

    Args:
        num_visual_pivots: visual pivots per image or video (default 4).
        num_text_pivots: text pivots per row, from the text after the last visual token (default 4).
    """

    name = "dart_embed"
    default_layer = None

    def score(self, context: ScoringContext) -> list[torch.Tensor]:
        scores = []
        for row in range(context.batch_size):
            embeds = context.inputs_embeds[row]
            device = embeds.device
            visual = context.visual_positions[row].to(device)
            text = context.text_positions[row].to(device)
            row_scores = torch.zeros(visual.numel(), dtype=torch.float32, device=device)
            if visual.numel() == 0:
                scores.append(row_scores)
                continue
            norm = embeds.float().abs().sum(dim=-1)  # (S,) L1 norm of every input embedding
            text_pivots = text[_top(norm[text], self.num_text_pivots)]
            for start, end in visual_block_ranges(context, row):
                block = visual[start:end]
                visual_pivots = _top(norm[block], self.num_visual_pivots)
                pivots = torch.cat([block[visual_pivots], text_pivots])
                order = duplication_order(embeds[block], embeds[pivots], visual_pivots)
                row_scores[start:end] = order_to_scores(order, end - start)
            scores.append(row_scores)
        return scores
