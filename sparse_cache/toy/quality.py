"""Quality benchmark of every pruning method on the toy VLM::

    python -m sparse_cache.toy.quality [--samples 400] [--out-dir toy_quality] [--force]

The default ``--out-dir`` is ``toy_quality`` in the current folder (scratch, not the committed results); existing
report files are never overwritten without ``--force`` (the committed results in ``benchmarks/quality`` are
refreshed with ``--out-dir benchmarks/quality --force``).

For each scorer and keep ratio it reports the answer accuracy and the share of the queried cells that
the pruned cache kept (the ``k``-th image token is cell ``k``, row-major), under three protocols:

(a) ``single``: one question, the cache pruned right after the prefill (``mode="post-prefill"``), a
    one-token answer. The question's own cache entries were computed while the whole image was there,
    so the answer leaks past the pruning: accuracy stays high whatever is kept. Reported as such.
(b) ``followup``: a first turn asks about colour X and is answered on the pruned cache; a second turn
    asks again about X (``same``) or about another colour Y (``different``). The second question is
    processed after the pruning and sees only the kept visual tokens, so its accuracy measures what
    pruning kept. Text-guided scorers only saw the first question.
(c) ``in-prefill``: one question, pruned inside the prefill (``mode="in-prefill"``) right after the
    scoring layer (layer 2 for scorers that have none), so the later layers compute only the kept
    tokens. Skipped, with a message, when the installed ``PrunableDynamicCache`` has no ``mode``.

``oracle`` is not a method: it keeps the cells of the colour that is asked (of the second turn in
(b)) and fills the budget at random; it is the upper bound of what a budget allows. ``unpruned`` is
the model with a plain ``DynamicCache``; every scorer's ``keep_ratio=1.0`` equals it (oracle 1 of
``../../docs/oracles.md``), so that column is reported once.

Every figure comes with a 95% interval (accuracy: Wilson score; share of queried cells kept: percentile
bootstrap over the samples) and the number of samples; differences between rows are paired bootstrap
intervals on the same samples (:mod:`.stats`); a difference is called only when its interval excludes 0.

Coverage budgets: ``--coverages 0.5,0.8,0.95`` (the default) also runs the default scorer at its default layer
with ``keep_ratio="auto", coverage=c`` (each image keeps the fewest top-scored tokens holding ``c`` of its score
mass, so the count varies per sample; it is read from ``cache.stats`` and reported with its interval). A
coverage row is compared (paired) with unpruned and with the same scorer keeping a *fixed count* per image equal
to the coverage row's mean count (rounded): the same mean budget, spent evenly. ``--only coverage`` runs just
those rows (and the unpruned ones, to check the samples are the report's) and puts them into the report already
in ``--out-dir``::

    python -m sparse_cache.toy.quality --only coverage --out-dir benchmarks/quality

Writes ``quality.md`` (tables), ``quality.json`` (every number, interval and comparison, and the settings) and
``quality.png`` (with error bars).
"""


from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import transformers
from transformers import DynamicCache

from .._compat import CACHE_KWARG
from ..cache import PrunableDynamicCache
from ..scorers import SCORERS, Scorer, ScoringContext
from ..select import budget, scaled_layer
from .model import build_inputs, followup_text, load_toy_vlm
from .stats import (
    BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE, bootstrap_interval, intervals_separate, paired_difference,
    wilson_interval,
)
from .task import ANSWERS, make_followup, make_sample

logger = logging.getLogger(__name__)

__all__ = [
    "KEEP_RATIOS",
    "PROTOCOLS",
    "QueriedCellsScorer",
    "supports_in_prefill",
    "evaluate_single",
    "evaluate_followup",
    "run_quality",
    "paired_comparisons",
    "COVERAGES",
    "merge_coverage",
    "coverage_table",
    "markdown_report",
    "report_json",
    "write_report",
    "main",
]

KEEP_RATIOS = (1.0, 0.5, 0.25, 0.1)
#: coverage targets of the self-picking budget (``keep_ratio="auto", coverage=c``) the command line runs by default
COVERAGES = (0.5, 0.8, 0.95)
#: baseline of a coverage row: the same scorer keeping a fixed count per image, its mean count (rounded)
MATCHED = "fixed-count"
#: what ``--only`` can rerun into an existing report
ONLY = ("coverage",)
#: default --out-dir: a scratch folder in the current one, never the committed benchmarks/quality
DEFAULT_OUT_DIR = "toy_quality"
REPORT_FILES = {"markdown": "quality.md", "json": "quality.json", "plot": "quality.png"}
#: protocol name -> what it measures (the tables' captions)
PROTOCOLS = {
    "single": "(a) one question, pruned after the prefill (leaks: the question's cache entries saw the whole image)",
    "followup-same": "(b) second turn, same colour as the first (scorers saw the first question)",
    "followup-different": "(b) second turn, a different colour (scorers saw the first question only)",
    "in-prefill": "(c) one question, pruned inside the prefill after the scoring layer",
}
#: scorers that ignore the question (the baselines a text-guided scorer has to beat)
TEXT_AGNOSTIC = ("random", "uniform", "divprune")
ORACLE = "oracle"
UNPRUNED = "unpruned"
#: key of a result row's per-sample outcomes (kept in memory for paired comparisons, not written to the JSON)
PER_SAMPLE = "per_sample"
#: metrics with a per-sample value, an interval and paired comparisons
METRICS = ("accuracy", "queried_recall")
#: pruning layer of protocol (c) for scorers without a scoring layer of their own
IN_PREFILL_DEFAULT_LAYER = 2


class QueriedCellsScorer(Scorer):
    """Upper bound: scores the queried cells of each row above all others (ties broken at random).

    ``cells[row]`` are the row-major cell indices the question needs (= indices into the row's visual
    tokens for a one-image prompt). Not a pruning method: it knows the answer's location.
    """

    name = ORACLE
    default_layer = None

    def __init__(self, cells: Sequence[Sequence[int]]):
        self.cells = [list(c) for c in cells]

    def score(self, context: ScoringContext) -> list[torch.Tensor]:
        if len(self.cells) != context.batch_size:
            raise ValueError(f"cells: got {len(self.cells)} rows for a batch of {context.batch_size}")
        scores = []
        for row, visual in enumerate(context.visual_positions):
            s = torch.rand(visual.numel(), generator=context.generator) * 0.5
            index = torch.tensor([c for c in self.cells[row] if c < visual.numel()], dtype=torch.long)
            s[index] += 1.0
            scores.append(s.to(visual.device))
        return scores


def supports_in_prefill() -> bool:
    """Whether the installed ``PrunableDynamicCache`` can prune inside the prefill (protocol (c))."""
    return "mode" in inspect.signature(PrunableDynamicCache.__init__).parameters


def parse_scorer(spec: str) -> tuple[str, int | None]:
    """``"sparsevlm"`` -> ``("sparsevlm", None)``; ``"sparsevlm@1"`` -> ``("sparsevlm", 1)`` (scoring layer 1)."""
    name, sep, layer = spec.partition("@")
    if name not in SCORERS and name != ORACLE:
        raise ValueError(f"scorers: unknown scorer {name!r}; valid names are {sorted(SCORERS) + [ORACLE]}")
    if not sep:
        return name, None
    if not layer.isdigit():
        raise ValueError(f"scorers: expected NAME or NAME@LAYER (e.g. sparsevlm@1), got {spec!r}")
    return name, int(layer)


def _make_cache(model, scorer: str, keep_ratio, cells, mode: str | None = None):
    """``keep_ratio``: a float, or the cache's budget arguments as a dict (``{"coverage": 0.8}``,
    ``{"keep_tokens": 12}``: :func:`budget_arguments`)."""
    if scorer == UNPRUNED or (not isinstance(keep_ratio, dict) and keep_ratio >= 1.0):
        return DynamicCache(config=model.config)
    name, layer = parse_scorer(scorer)
    kwargs = dict(keep_ratio) if isinstance(keep_ratio, dict) else {"keep_ratio": keep_ratio}
    if layer is not None:
        kwargs["scoring_layer"] = layer
    if mode is not None:
        kwargs["mode"] = mode
        if layer is None and _default_layer(name) is None:
            kwargs["scoring_layer"] = IN_PREFILL_DEFAULT_LAYER
    instance = QueriedCellsScorer(cells) if name == ORACLE else name
    return PrunableDynamicCache(model, scorer=instance, **kwargs)


#: depth of the shipped toy VLM (the scorers' published layers are scaled to it, as the cache does)
TOY_LAYERS = 4


def _default_layer(name: str, num_layers: int = TOY_LAYERS) -> int | None:
    return scaled_layer(SCORERS[name].default_layer, num_layers) if name in SCORERS else None


def _pruning_layer(scorer: str) -> int:
    """Layer after which protocol (c) prunes for ``scorer``."""
    name, layer = parse_scorer(scorer)
    for candidate in (layer, _default_layer(name)):
        if candidate is not None:
            return candidate
    return IN_PREFILL_DEFAULT_LAYER


def _first_visual(input_ids: torch.Tensor, image_token_id: int) -> list[int]:
    out = []
    for row in input_ids:
        positions = torch.nonzero(row == image_token_id).flatten()
        out.append(int(positions[0]) if positions.numel() else -1)
    return out


def _check_pruned(cache, keep_ratio, num_visual: int) -> None:
    """Raise ``RuntimeError`` if a cache that had to drop visual tokens kept them all (never a silent 100%).

    A coverage budget picks each row's count: some row may keep every token, but the call as a whole must have
    dropped some (and recorded its selection)."""
    if not isinstance(cache, PrunableDynamicCache):
        return
    auto = isinstance(keep_ratio, dict) and "coverage" in keep_ratio
    if not auto:
        ratio, tokens = (keep_ratio.get("keep_ratio"), keep_ratio.get("keep_tokens")) if isinstance(keep_ratio, dict) \
            else (keep_ratio, None)
        if budget(num_visual, ratio, tokens) >= num_visual:
            return
    kept = [int(k.numel()) for k in cache.kept_visual_positions]
    pruned_rows = (sum(kept) < num_visual * len(kept)) if auto else all(n < num_visual for n in kept)
    if kept and pruned_rows and cache.get_physical_length() < cache.get_seq_length():
        return
    what = f"kept {kept} of {num_visual} visual tokens per row" if kept else "recorded no selection"
    asked = (f"{budget_label(keep_ratio)} should drop some" if auto else
             f"{budget_label(keep_ratio)} should keep {budget(num_visual, ratio, tokens)}")
    raise RuntimeError(
        f"nothing was pruned with transformers {transformers.__version__}: {asked} of {num_visual} visual tokens, "
        f"but the cache {what}"
    )


def budget_arguments(row_budget) -> dict:
    """The cache arguments of a budget: a float keep ratio, or a dict of them (``{"coverage": 0.8}``)."""
    return dict(row_budget) if isinstance(row_budget, dict) else {"keep_ratio": float(row_budget)}


def budget_label(row_budget) -> str:
    """``keep_ratio=0.25``, ``coverage=0.8``, ``keep_tokens=12``."""
    return ", ".join(f"{k}={v:g}" for k, v in budget_arguments(row_budget).items())


def _kept_counts(cache, cells: list[set[int]]) -> list[int]:
    """Visual tokens kept per row, from ``cache.stats`` (the call's pruning pass), checked against the kept
    positions; the counts of ``cells`` for a plain cache (unpruned)."""
    stats = getattr(cache, "stats", None) if isinstance(cache, PrunableDynamicCache) else None
    if stats is None:
        return [len(c) for c in cells]
    counts = [row.visual_tokens_kept for row in stats.rows]
    if counts != [len(c) for c in cells]:
        raise RuntimeError(f"cache.stats counts {counts} visual tokens kept per row, the kept positions "
                           f"{[len(c) for c in cells]}")
    return counts


def _kept_cells(cache, first_visual: list[int], num_visual: int) -> list[set[int]]:
    if not isinstance(cache, PrunableDynamicCache):
        return [set(range(num_visual)) for _ in first_visual]
    if not cache.kept_visual_positions:
        raise RuntimeError(
            f"the pruning cache recorded no selection with transformers {transformers.__version__}: nothing was pruned"
        )
    return [set((kept - start).tolist()) for kept, start in zip(cache.kept_visual_positions, first_visual)]


def _answers(processor, tokens: torch.Tensor) -> list[str]:
    return [processor.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


def _tally(records: list[dict]) -> dict:
    """The metrics of one (protocol, scorer, budget) run over its samples, each with its 95% interval.

    ``accuracy_ci``: Wilson score interval; ``queried_recall_ci``: percentile bootstrap over the ``n_recall``
    samples whose answer is yes (:mod:`.stats`). ``per_sample`` (in memory, not written to the JSON) keeps the
    per-sample outcomes, in sample order, for the paired comparisons of :func:`paired_comparisons`.
    """
    n = len(records)
    yes = [r for r in records if r["answer"] == ANSWERS[0]]
    no = [r for r in records if r["answer"] != ANSWERS[0]]
    recalls = [r["recall"] for r in yes]
    correct = sum(r["correct"] for r in records)
    out = {
        "n": n,
        "accuracy": correct / n if n else math.nan,
        "accuracy_ci": list(wilson_interval(correct, n)),
        "accuracy_yes": sum(r["correct"] for r in yes) / len(yes) if yes else math.nan,
        "accuracy_no": sum(r["correct"] for r in no) / len(no) if no else math.nan,
        "n_recall": len(recalls),
        "queried_recall": float(np.mean(recalls)) if recalls else math.nan,
        "queried_recall_ci": list(bootstrap_interval(recalls)),
        "kept_tokens": float(np.mean([r["kept"] for r in records])) if records else math.nan,
    }
    if records:  # visual tokens kept per sample (cache.stats): spread and interval (they vary under coverage)
        kept = np.array([r["kept"] for r in records], dtype=float)
        out["kept_tokens_ci"] = list(bootstrap_interval(kept))
        out["kept_tokens_range"] = [int(kept.min()), int(kept.max())]
        out["visual_tokens"] = int(records[0]["visual"])
        out["kept_share"] = float(kept.mean() / records[0]["visual"])
        out["samples_keeping_all"] = int(sum(r["kept"] >= r["visual"] for r in records))
    if records and "first_correct" in records[0]:
        first = sum(r["first_correct"] for r in records)
        out["first_turn_accuracy"] = first / n
        out["first_turn_accuracy_ci"] = list(wilson_interval(first, n))
    out[PER_SAMPLE] = {
        "accuracy": np.array([float(r["correct"]) for r in records]),
        # NaN for the samples whose answer is no (no queried cell): the same samples for every scorer
        "queried_recall": np.array([r["recall"] if r["answer"] == ANSWERS[0] else math.nan for r in records]),
        "kept_tokens": np.array([float(r["kept"]) for r in records]),
    }
    return out


def encode_batches(processor, items, batch_size: int = 100) -> list:
    """``[(chunk, inputs), ...]``: the processor's inputs for each batch of samples (or of conversations,
    first question only), computed once and reused by every scorer."""
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    batches = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        questions = [x.question if hasattr(x, "question") else x.questions[0] for x in chunk]
        batches.append((chunk, build_inputs(processor, [x.image for x in chunk], questions)))
    return batches


@torch.no_grad()
def evaluate_single(
    model, processor, samples, scorer: str, keep_ratio, mode: str | None = None, batch_size: int = 100,
    batches: list | None = None,
) -> dict:
    """Protocol (a) (``mode=None``: the default post-prefill pruning) or (c) (``mode="in-prefill"``).

    ``batches``: the output of :func:`encode_batches` for ``samples`` (computed here if not given).
    ``keep_ratio``: a float, or the cache's budget arguments (``{"coverage": 0.8}``, ``{"keep_tokens": 12}``).
    """
    image_token_id = model.config.image_token_id
    records = []
    for chunk, inputs in batches if batches is not None else encode_batches(processor, samples, batch_size):
        num_visual = int((inputs["input_ids"][0] == image_token_id).sum())
        cache = _make_cache(model, scorer, keep_ratio, [s.queried_cells for s in chunk], mode)
        out = model.generate(**inputs, **{CACHE_KWARG: cache}, max_new_tokens=1, do_sample=False)
        _check_pruned(cache, keep_ratio, num_visual)
        predicted = _answers(processor, out[:, inputs["input_ids"].shape[1] :])
        kept = _kept_cells(cache, _first_visual(inputs["input_ids"], image_token_id), num_visual)
        for sample, answer, cells, count in zip(chunk, predicted, kept, _kept_counts(cache, kept)):
            queried = set(sample.queried_cells)
            records.append({
                "answer": sample.answer,
                "correct": answer == sample.answer,
                "recall": len(queried & cells) / len(queried) if queried else math.nan,
                "kept": count,
                "visual": num_visual,
            })
    return _tally(records)


@torch.no_grad()
def evaluate_followup(
    model, processor, conversations, scorer: str, keep_ratio, batch_size: int = 100, batches: list | None = None
) -> dict:
    """Protocol (b): turn 1 (pruned after its prefill) then turn 2 on the same cache, scored on turn 2.

    The second ``generate`` gets the first one's output sequences followed by the new turn's tokens
    (``<|im_end|>`` closing the first answer, then the user turn and the assistant header) and the
    matching attention mask; no pixel values.
    """
    image_token_id = model.config.image_token_id
    records = []
    for chunk, inputs in batches if batches is not None else encode_batches(processor, conversations, batch_size):
        num_visual = int((inputs["input_ids"][0] == image_token_id).sum())
        cache = _make_cache(model, scorer, keep_ratio, [c.queried_cells[1] for c in chunk])
        out = model.generate(**inputs, **{CACHE_KWARG: cache}, max_new_tokens=1, do_sample=False)
        _check_pruned(cache, keep_ratio, num_visual)
        prompt_len = inputs["input_ids"].shape[1]
        first = _answers(processor, out[:, prompt_len:])
        new = [followup_text(processor, a, c.questions[1]) for a, c in zip(first, chunk)]
        new_ids = processor.tokenizer(new, add_special_tokens=False)["input_ids"]
        if len({len(x) for x in new_ids}) != 1:  # colour words are single tokens: never with toy questions
            raise RuntimeError("follow-up turns of one batch must have the same length")
        input_ids = torch.cat([out, torch.tensor(new_ids, dtype=out.dtype)], dim=1)
        new_mask = torch.ones(len(chunk), input_ids.shape[1] - prompt_len, dtype=inputs["attention_mask"].dtype)
        mask = torch.cat([inputs["attention_mask"], new_mask], dim=1)
        out2 = model.generate(
            input_ids=input_ids, attention_mask=mask, **{CACHE_KWARG: cache}, max_new_tokens=1, do_sample=False
        )
        second = _answers(processor, out2[:, input_ids.shape[1] :])
        kept = _kept_cells(cache, _first_visual(inputs["input_ids"], image_token_id), num_visual)
        # the second turn brings no image: cache.stats still describes the first turn's pruning pass
        for conv, a1, a2, cells, count in zip(chunk, first, second, kept, _kept_counts(cache, kept)):
            queried = set(conv.queried_cells[1])
            records.append({
                "answer": conv.answers[1],
                "correct": a2 == conv.answers[1],
                "first_correct": a1 == conv.answers[0],
                "recall": len(queried & cells) / len(queried) if queried else math.nan,
                "kept": count,
                "visual": num_visual,
            })
    return _tally(records)


#: the library's default (text-guided) scorer, also benchmarked at the layers before its default one
DEFAULT_SCORER = "sparsevlm"


def default_scorers() -> list[str]:
    """Every registered scorer (text-agnostic baselines included), the default scorer at the other layers up
    to its published (unscaled) one (``sparsevlm@1``, ``sparsevlm@2``: on the 4-layer toy the depth-scaled
    default is layer 0, the published layer 2 is half-way up), then the oracle."""
    names = list(SCORERS)
    reference = SCORERS[DEFAULT_SCORER].default_layer if DEFAULT_SCORER in SCORERS else None
    if reference:
        default = _default_layer(DEFAULT_SCORER)
        names += [f"{DEFAULT_SCORER}@{layer}" for layer in range(reference + 1) if layer != default]
    return names + [ORACLE]


def run_quality(
    model=None,
    processor=None,
    scorers: Sequence[str] | None = None,
    keep_ratios: Sequence[float] = KEEP_RATIOS,
    protocols: Sequence[str] | None = None,
    samples: int = 400,
    seed: int = 0,
    batch_size: int = 100,
    progress: bool = False,
    coverages: Sequence[float] = (),
    only: str | None = None,
) -> dict:
    """Run the benchmark; returns ``{"settings": ..., "results": [row, ...], "skipped": {...}}``.

    Each result row: ``protocol``, ``scorer``, ``keep_ratio`` and the metrics of :func:`_tally`
    (``accuracy``, ``queried_recall`` over the samples whose answer is yes, ``kept_tokens`` ...).

    ``coverages``: also run the default scorer (at its default layer) with ``keep_ratio="auto", coverage=c``
    (rows with ``keep_ratio: "auto"`` and ``coverage``), each followed by its :data:`MATCHED` baseline: the same
    scorer keeping ``round(mean kept)`` tokens of every image (``keep_tokens``; row key ``matched_to``), so that
    a coverage row is compared with a fixed budget of the same mean size (:func:`paired_comparisons`).
    ``only="coverage"``: the unpruned and coverage rows only (no fixed-ratio scorer rows), for
    :func:`merge_coverage`.
    """
    if model is None or processor is None:
        model, processor = load_toy_vlm()
    scorers = list(scorers) if scorers is not None else default_scorers()
    for spec in scorers:
        parse_scorer(spec)
    if only is not None and only not in ONLY:
        raise ValueError(f"only: expected one of {list(ONLY)} or None, got {only!r}")
    coverages = sorted({float(c) for c in coverages})
    for c in coverages:
        if not 0 < c < 1:
            raise ValueError(f"coverages: each must be in (0, 1) (1 keeps every token with any mass), got {c}")
    if only == "coverage" and not coverages:
        raise ValueError("only: 'coverage' needs coverages, e.g. coverages=(0.5, 0.8, 0.95)")
    protocols = list(protocols) if protocols is not None else list(PROTOCOLS)
    for name in protocols:
        if name not in PROTOCOLS:
            raise ValueError(f"protocols: unknown protocol {name!r}; valid names are {list(PROTOCOLS)}")
    ratios = sorted({float(r) for r in keep_ratios}, reverse=True)
    for r in ratios:
        if not 0 < r <= 1:
            raise ValueError(f"keep_ratios: each must be in (0, 1], got {r}")
    if samples < 1:
        raise ValueError(f"samples: need at least 1, got {samples}")
    skipped = {}
    if "in-prefill" in protocols and not supports_in_prefill():
        message = "PrunableDynamicCache has no `mode` parameter: in-prefill pruning is not available in this version"
        logger.warning("protocol (c) skipped: %s", message)
        skipped["in-prefill"] = message
        protocols = [p for p in protocols if p != "in-prefill"]

    # fixed, seeded data per protocol (independent streams, so adding a protocol changes no other)
    data = {}
    for name in protocols:
        rng = np.random.default_rng([seed, list(PROTOCOLS).index(name)])
        if name.startswith("followup"):
            data[name] = [make_followup(rng, same=name.endswith("same")) for _ in range(samples)]
        else:
            data[name] = [make_sample(rng) for _ in range(samples)]

    jobs = []
    for name in protocols:
        jobs.append((name, UNPRUNED, 1.0))
        if only is None:
            jobs += [(name, s, r) for s in scorers for r in ratios if r < 1.0]
        jobs += [(name, DEFAULT_SCORER, {"coverage": c}) for c in coverages]  # each followed by its matched row
    iterator = jobs
    if progress:
        try:
            from tqdm.auto import tqdm

            iterator = tqdm(jobs, desc="toy quality", unit="run")
        except ImportError:  # pragma: no cover
            pass
    results = []
    start_time, start_cpu = time.time(), time.process_time()
    batches = {name: encode_batches(processor, items, batch_size) for name, items in data.items()}
    def evaluate(name, scorer, ratio):
        if name.startswith("followup"):
            return evaluate_followup(model, processor, data[name], scorer, ratio, batches=batches[name])
        mode = "in-prefill" if name == "in-prefill" else None
        return evaluate_single(model, processor, data[name], scorer, ratio, mode, batches=batches[name])

    for name, scorer, ratio in iterator:
        metrics = evaluate(name, scorer, ratio)
        if isinstance(ratio, dict):  # coverage: keep_ratio="auto", then the fixed count of the same mean
            row = {"protocol": name, "scorer": scorer, "keep_ratio": "auto", "coverage": ratio["coverage"], **metrics}
            count = max(1, int(math.floor(metrics["kept_tokens"] + 0.5)))
            matched = {"protocol": name, "scorer": scorer, "keep_ratio": count / metrics["visual_tokens"],
                       "keep_tokens": count, "matched_to": budget_label(ratio),
                       **evaluate(name, scorer, {"keep_tokens": count})}
        else:
            row, matched = {"protocol": name, "scorer": scorer, "keep_ratio": ratio, **metrics}, None
        for r in (row, matched):
            if r is None:
                continue
            if name == "in-prefill" and scorer != UNPRUNED:
                r["pruning_layer"] = _pruning_layer(scorer)
            results.append(r)
            logger.debug("%s", r)
    # keep_ratio 1.0 keeps everything: every scorer equals the unpruned model there
    for name in protocols:
        base = next(r for r in results if r["protocol"] == name and r["scorer"] == UNPRUNED)
        if 1.0 in ratios:
            for scorer in scorers:
                results.append({**base, "scorer": scorer, "keep_ratio": 1.0, "same_as": UNPRUNED})
    settings = {
        "samples": samples,
        "seed": seed,
        "intervals": INTERVALS,
        "keep_ratios": ratios,
        "scorers": scorers if only is None else [],
        "coverages": coverages,
        "coverage_scorer": DEFAULT_SCORER,
        "protocols": {p: PROTOCOLS[p] for p in protocols},
        "seconds": round(time.time() - start_time, 1),
        "cpu_seconds": round(time.process_time() - start_cpu, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    return {"settings": settings, "results": results, "comparisons": paired_comparisons(results), "skipped": skipped}


#: how every interval of the report is computed (written to the JSON's settings)
INTERVALS = {
    "confidence": CONFIDENCE,
    "accuracy": "Wilson score interval (binomial proportion)",
    "queried_recall": f"percentile bootstrap over the samples whose answer is yes ({BOOTSTRAP_RESAMPLES} resamples, "
                      f"seed {BOOTSTRAP_SEED})",
    "comparisons": "paired percentile bootstrap of the per-sample differences between two rows on the same samples "
                   "(same resamples); 'separated': the interval excludes 0, the only case a difference is called",
}
#: the rows each result row is compared with, on the same samples (same protocol; same budget, except unpruned)
BASELINES = (UNPRUNED, "random", DEFAULT_SCORER)


def _budget(row: dict):
    """The budget of a row: its keep ratio (the tables' column), ``("coverage", c)`` for a coverage row,
    ``("keep_tokens", k)`` for the fixed count matched to one. A row is compared with a baseline scorer of the same
    protocol and budget (so never a coverage row with a fixed ratio), with unpruned, and a coverage row with its
    :data:`MATCHED` row (the same scorer, the coverage row's mean count as a fixed count per image)."""
    if row.get("coverage") is not None:
        return ("coverage", row["coverage"])
    if row.get("keep_tokens") is not None:
        return ("keep_tokens", row["keep_tokens"])
    return row["keep_ratio"]


def _coverage_label(row: dict) -> str:
    return budget_label({"coverage": row["coverage"]})


def _baseline_row(results: list[dict], row: dict, baseline: str) -> dict | None:
    if baseline == MATCHED:
        if row.get("coverage") is None:
            return None
        return next((r for r in results if r["protocol"] == row["protocol"] and r["scorer"] == row["scorer"]
                     and r.get("matched_to") == _coverage_label(row)), None)
    for r in results:
        if (r["protocol"] == row["protocol"] and r["scorer"] == baseline and not r.get("same_as")
                and (baseline == UNPRUNED or _budget(r) == _budget(row))):
            return r
    return None


def paired_comparisons(
    results: list[dict], baselines: Sequence[str] = BASELINES, metrics: Sequence[str] = METRICS
) -> list[dict]:
    """Paired bootstrap differences ``row - baseline`` for every pruned row with per-sample outcomes.

    One entry per (row, baseline, metric): ``protocol``, ``keep_ratio``, ``scorer``, ``baseline``, ``metric``,
    ``difference``, ``ci``, ``n``, ``separated`` (the interval excludes 0: a difference is called) and
    ``intervals_separate`` (the two rows' own intervals are disjoint, a stricter test). Against ``unpruned``
    only the accuracy is compared. Rows without per-sample outcomes (e.g. read back from a JSON) are skipped.
    A coverage row is also compared with its :data:`MATCHED` row (``baseline: "fixed-count"``,
    ``baseline_keep_tokens``); its entries carry ``keep_ratio: "auto"`` and ``coverage``.
    """
    out = []
    for row in results:
        if PER_SAMPLE not in row or row.get("same_as") or row["scorer"] == UNPRUNED or row.get("matched_to"):
            continue
        for baseline in (*baselines, MATCHED) if row.get("coverage") is not None else baselines:
            base = _baseline_row(results, row, baseline) if baseline != row["scorer"] else None
            if base is None or PER_SAMPLE not in base:
                continue
            for metric in metrics if baseline != UNPRUNED else ("accuracy",):
                a, b = row[PER_SAMPLE][metric], base[PER_SAMPLE][metric]
                valid = ~np.isnan(a)
                if a.shape != b.shape or not np.array_equal(valid, ~np.isnan(b)):
                    raise RuntimeError(f"{row['scorer']} and {baseline} ({row['protocol']}) were not measured on the "
                                       "same samples: no paired comparison")
                extra = {}
                if row.get("coverage") is not None:
                    extra["coverage"] = row["coverage"]
                if baseline == MATCHED:
                    extra["baseline_keep_tokens"] = base["keep_tokens"]
                out.append({
                    "protocol": row["protocol"], "keep_ratio": row["keep_ratio"], **extra, "scorer": row["scorer"],
                    "baseline": baseline, "metric": metric, **paired_difference(a[valid], b[valid]),
                    "intervals_separate": intervals_separate(row[f"{metric}_ci"], base[f"{metric}_ci"]),
                })
    return out


def _lookup(results, protocol, scorer, ratio):
    for r in results:
        if r["protocol"] == protocol and r["scorer"] == scorer and r["keep_ratio"] == ratio \
                and not r.get("matched_to"):
            return r
    return None


def _comparison(report, protocol, scorer, baseline, ratio, metric):
    for c in report.get("comparisons", []):
        if (c["protocol"], c["scorer"], c["baseline"], c["keep_ratio"], c["metric"]) == (
                protocol, scorer, baseline, ratio, metric):
            return c
    return None


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _fmt(x, percent=False, sign=False) -> str:
    if _nan(x):
        return "-"
    if percent:
        return f"{100 * x:+.0f}" if sign else f"{100 * x:.0f}"
    return f"{x:+.3f}" if sign else f"{x:.3f}"


def _fmt_ci(value, ci, percent=False, sign=False) -> str:
    """``0.895 [0.847, 0.930]``; percentages as ``76% [70, 82]``."""
    if _nan(value):
        return "-"
    text = _fmt(value, percent, sign) + ("%" if percent and not sign else "")  # differences: in points
    if ci is None or any(_nan(x) for x in ci):
        return text
    return f"{text} [{_fmt(ci[0], percent, sign)}, {_fmt(ci[1], percent, sign)}]"


def _scorer_label(scorer: str) -> str:
    return f"`{scorer}`" + (" (text-agnostic)" if scorer in TEXT_AGNOSTIC else "")


def _table(columns: Sequence, rows: Sequence[str], cell, label=_scorer_label, corner="scorer") -> list[str]:
    """A markdown table: one line per ``rows`` entry, ``cell(row, column)`` -> text (``None``: ``-``). Adding rows
    (e.g. other budgets) or columns needs no change here."""
    lines = [f"| {corner} | " + " | ".join(f"keep {c:g}" if isinstance(c, float) else str(c) for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for row in rows:
        lines.append(f"| {label(row)} | " + " | ".join(cell(row, c) or "-" for c in columns) + " |")
    return lines


def markdown_report(report: dict) -> str:
    """Markdown tables per protocol: accuracy and queried-cell recall with their 95% intervals per scorer and keep
    ratio, then the paired differences from each baseline (bold: the interval excludes 0)."""
    settings, results = report["settings"], report["results"]
    ratios = settings["keep_ratios"]
    pruned = [r for r in ratios if r < 1.0]
    intervals = settings.get("intervals", INTERVALS)
    lines = [
        "# Toy VLM quality benchmark",
        "",
        f"{settings['samples']} samples per protocol (seed {settings['seed']}), transformers "
        f"{settings['versions']['transformers']}, torch {settings['versions']['torch']}. "
        "`oracle` keeps the queried cells (upper bound, not a method); text-agnostic baselines: "
        + ", ".join(f"`{s}`" for s in TEXT_AGNOSTIC if s in settings["scorers"])
        + ". Keep ratio 1.0 is the unpruned model for every scorer.",
        "",
        f"Every figure comes with its {100 * intervals['confidence']:g}% confidence interval in brackets: accuracy: "
        f"{intervals['accuracy']} over the n samples; share of the queried colour's cells kept: "
        f"{intervals['queried_recall']}; differences: {intervals['comparisons']}. A difference is **bold** when "
        "its interval excludes 0. The intervals cover the sampling of the boards (another data seed), not the "
        "training run of the model. No correction for the number of comparisons: at 95%, about 1 in 20 "
        "comparisons of two equal methods is called.",
        "",
    ]
    for protocol, description in settings["protocols"].items():
        base = _lookup(results, protocol, UNPRUNED, 1.0)
        lines += [f"## {protocol}", "", description + ".", ""]
        if base is not None:
            extra = ""
            if "first_turn_accuracy" in base:
                extra = " First-turn accuracy unpruned: " + _fmt_ci(base["first_turn_accuracy"],
                                                                    base.get("first_turn_accuracy_ci")) + "."
            lines += [f"n = {base['n']} samples ({base.get('n_recall', '-')} whose answer is yes). Unpruned accuracy: "
                      f"{_fmt_ci(base['accuracy'], base.get('accuracy_ci'))}.{extra}", ""]

        def value(metric, percent):
            def cell(scorer, ratio):
                r = _lookup(results, protocol, scorer, ratio)
                return None if r is None else _fmt_ci(r[metric], r.get(f"{metric}_ci"), percent)
            return cell

        lines += ["Accuracy:", ""] + _table(ratios, settings["scorers"], value("accuracy", False)) + [""]
        lines += ["Share of the queried cells kept (samples whose answer is yes):", ""]
        lines += _table(ratios, settings["scorers"], value("queried_recall", True)) + [""]
        for baseline in BASELINES:
            for metric, percent in (("accuracy", False), ("queried_recall", True)):
                others = [s for s in settings["scorers"] if s != baseline]

                def difference(scorer, ratio, baseline=baseline, metric=metric, percent=percent):
                    c = _comparison(report, protocol, scorer, baseline, ratio, metric)
                    if c is None:
                        return None
                    text = _fmt_ci(c["difference"], c["ci"], percent, sign=True)
                    return f"**{text}**" if c["separated"] else text

                if not any(_comparison(report, protocol, s, baseline, r, metric) for s in others for r in pruned):
                    continue
                what = "accuracy" if metric == "accuracy" else "share of the queried cells kept (points)"
                against = "the unpruned model" if baseline == UNPRUNED else f"`{baseline}` at the same keep ratio"
                lines += [f"Paired difference in {what} from {against}:", ""]
                lines += _table(pruned, others, difference) + [""]
        lines += coverage_table(report, protocol)
    for protocol, message in report.get("skipped", {}).items():
        lines += [f"## {protocol}", "", f"Skipped: {message}.", ""]
    return "\n".join(lines)


def _coverage_rows(results, protocol):
    return sorted((r for r in results if r["protocol"] == protocol and r.get("coverage") is not None),
                  key=lambda r: r["coverage"])


def coverage_table(report: dict, protocol: str) -> list[str]:
    """Markdown lines of the coverage rows of ``protocol`` (none: ``[]``): visual tokens kept per sample (mean
    [interval], range; from ``cache.stats``), accuracy and queried-cell share, the fixed count of the same mean
    and the paired differences from it and from unpruned (bold: the interval excludes 0)."""
    rows = _coverage_rows(report["results"], protocol)
    if not rows:
        return []
    settings = report["settings"]
    scorer = rows[0]["scorer"]
    layer = rows[0].get("pruning_layer", _pruning_layer(scorer))
    header = ["coverage", "visual tokens kept (of n, range)", "accuracy", "queried cells kept",
              "fixed count k: accuracy", "fixed count k: queried cells kept", "accuracy - fixed count",
              "queried cells - fixed count (points)", "accuracy - unpruned"]
    lines = [
        f"Coverage budgets: `{scorer}` at its default scoring layer ({layer}) with `keep_ratio=\"auto\", "
        "coverage=c` (each image keeps the fewest top-scored tokens holding c of its score mass); visual tokens kept "
        "per sample from `cache.stats` (mean [bootstrap interval], min-max). *Fixed count k*: the same scorer "
        "keeping k tokens of every image, k = the coverage row's mean rounded (same mean budget, one count for all).",
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---|" * (len(header) - 1),
    ]

    def diff(row, baseline, metric, percent):
        c = next((c for c in report.get("comparisons", []) if c["protocol"] == protocol
                  and c.get("coverage") == row["coverage"] and c["baseline"] == baseline and c["metric"] == metric),
                 None)
        if c is None:
            return "-"
        text = _fmt_ci(c["difference"], c["ci"], percent, sign=True)
        return f"**{text}**" if c["separated"] else text

    for row in rows:
        matched = next((r for r in report["results"] if r["protocol"] == protocol and r["scorer"] == row["scorer"]
                        and r.get("matched_to") == _coverage_label(row)), None)
        low, high = row.get("kept_tokens_range") or ("-", "-")
        k_ci = row.get("kept_tokens_ci") or (math.nan, math.nan)
        kept = (f"{row['kept_tokens']:.1f} [{k_ci[0]:.1f}, {k_ci[1]:.1f}] of {row.get('visual_tokens', '-')} "
                f"({low}-{high})")
        cells = [f"{row['coverage']:g}", kept, _fmt_ci(row["accuracy"], row.get("accuracy_ci")),
                 _fmt_ci(row["queried_recall"], row.get("queried_recall_ci"), True)]
        if matched is None:
            cells += ["-", "-"]
        else:
            cells += [f"k={matched['keep_tokens']}: " + _fmt_ci(matched["accuracy"], matched.get("accuracy_ci")),
                      _fmt_ci(matched["queried_recall"], matched.get("queried_recall_ci"), True)]
        cells += [diff(row, MATCHED, "accuracy", False), diff(row, MATCHED, "queried_recall", True),
                  diff(row, UNPRUNED, "accuracy", False)]
        lines.append("| " + " | ".join(cells) + " |")
    run = settings.get("coverage_run")
    if run:
        lines += ["", f"(These rows were added to the report by `{run['command']}`, transformers "
                      f"{run['versions']['transformers']}.)"]
    return lines + [""]


def plot_report(report: dict, path: str | Path) -> None:
    """Accuracy (top) and queried-cell recall (bottom) against keep ratio, one column per protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings, results = report["settings"], report["results"]
    protocols = list(settings["protocols"])
    ratios = settings["keep_ratios"]
    fig, axes = plt.subplots(2, len(protocols), figsize=(4.5 * len(protocols), 7.5), squeeze=False, sharey="row")
    palette = plt.get_cmap("tab20").colors
    colours = {}
    for scorer in settings["scorers"]:
        base = parse_scorer(scorer)[0]
        if base not in colours:  # a scorer at another layer (NAME@LAYER) shares its scorer's colour
            colours[base] = palette[(2 * len(colours)) % 20 + (len(colours) >= 10)]
    for r in results:
        base = parse_scorer(r["scorer"])[0] if r["scorer"] != UNPRUNED else None
        if r.get("coverage") is not None and base not in colours:
            colours[base] = palette[(2 * len(colours)) % 20 + (len(colours) >= 10)]
    scorers = settings["scorers"]
    # each scorer's points are shifted a little along the (log) x axis so that the error bars do not overlap
    spread = 0.18
    shift = {s: math.exp(spread * ((i / max(len(scorers) - 1, 1)) - 0.5)) for i, s in enumerate(scorers)}
    for col, protocol in enumerate(protocols):
        for scorer in scorers:
            base, layer = parse_scorer(scorer)
            style = dict(marker="o", linewidth=1.5, markersize=4, color=colours[base])
            if scorer in TEXT_AGNOSTIC:
                style["linestyle"] = "--"
            if layer is not None:
                style.update(linestyle=":", marker="^v<>"[layer % 4], markersize=6)
            if scorer == ORACLE:
                style.update(color="black", linestyle=":", marker="s")
            for row, metric in enumerate(METRICS):
                xs, ys, lows, highs = [], [], [], []
                for ratio in ratios:
                    r = _lookup(results, protocol, scorer, ratio)
                    if r is not None and not _nan(r[metric]):
                        lo, hi = r.get(f"{metric}_ci") or (r[metric], r[metric])
                        xs.append(ratio * shift[scorer])
                        ys.append(r[metric])
                        lows.append(r[metric] - (r[metric] if _nan(lo) else lo))
                        highs.append((r[metric] if _nan(hi) else hi) - r[metric])
                axes[row, col].errorbar(xs, ys, yerr=[lows, highs], label=scorer, capsize=2, elinewidth=0.9,
                                        **style)
        for row, metric in enumerate(METRICS):  # coverage rows at their mean kept share (horizontal bar: interval)
            points = [r for r in _coverage_rows(results, protocol) if not _nan(r[metric])]
            if not points:
                continue
            xs = [r["kept_share"] for r in points]
            ys = [r[metric] for r in points]
            ci = [r.get(f"{metric}_ci") or (r[metric], r[metric]) for r in points]
            kci = [[k / r["visual_tokens"] for k in r["kept_tokens_ci"]] for r in points]
            axes[row, col].errorbar(
                xs, ys, yerr=[[y - c[0] for y, c in zip(ys, ci)], [c[1] - y for y, c in zip(ys, ci)]],
                xerr=[[x - k[0] for x, k in zip(xs, kci)], [k[1] - x for x, k in zip(xs, kci)]],
                color=colours.get(parse_scorer(points[0]["scorer"])[0], "black"), marker="*", markersize=10,
                linestyle="none", capsize=2, elinewidth=0.9, label=f"{points[0]['scorer']} coverage (x: kept share)")
            for x, y, r in zip(xs, ys, points):
                axes[row, col].annotate(f"c={r['coverage']:g}", (x, y), textcoords="offset points", xytext=(4, -10),
                                        fontsize=7)
        axes[0, col].axhline(0.5, color="gray", linewidth=0.8, linestyle="-.")  # chance
        axes[0, col].set_ylim(0.4, 1.02)
        axes[1, col].set_ylim(-0.02, 1.02)
        for row, metric in enumerate(("accuracy", "share of queried cells kept")):
            ax = axes[row, col]
            ax.set_xscale("log")
            ax.set_xticks(ratios)
            ax.set_xticklabels([f"{r:g}" for r in ratios])
            ax.set_xlabel("keep ratio (coverage: mean kept share)")
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel(metric)
        axes[0, col].set_title(protocol)
    axes[0, 0].legend(fontsize=8)
    confidence = settings.get("intervals", INTERVALS)["confidence"]
    fig.suptitle(f"toy VLM: {settings['samples']} samples per protocol, bars: {100 * confidence:g}% intervals "
                 "(accuracy: Wilson; queried cells kept: bootstrap)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge_coverage(existing: dict, new: dict) -> dict:
    """``existing`` (a report read from its JSON) with its coverage rows (coverage and matched rows, their
    comparisons) replaced by those of ``new`` (a :func:`run_quality` report with ``only="coverage"`` on the same
    samples). ``ValueError`` if the two were not run on the same samples: the settings differ, or ``new``'s
    unpruned rows do not reproduce ``existing``'s (same accuracy and queried-cell share, sample for sample in
    aggregate)."""
    a, b = existing["settings"], new["settings"]
    for key in ("samples", "seed"):
        if a[key] != b[key]:
            raise ValueError(f"{key}: the report in --out-dir has {key}={a[key]}, this run {b[key]}; rerun with "
                             f"--{key} {a[key]} to add coverage rows to it")
    missing = [p for p in b["protocols"] if p not in a["protocols"]]
    if missing:
        raise ValueError(f"protocols: {missing} are not in the existing report ({list(a['protocols'])})")
    for row in new["results"]:
        if row["scorer"] != UNPRUNED:
            continue
        old = _lookup(existing["results"], row["protocol"], UNPRUNED, 1.0)
        same = old is not None and all(
            (_nan(old[k]) and _nan(row[k])) or (not _nan(old[k]) and math.isclose(old[k], row[k], abs_tol=1e-12))
            for k in ("accuracy", "queried_recall"))
        if not same:
            raise ValueError(
                f"the unpruned {row['protocol']} row of this run (accuracy {row['accuracy']}) does not reproduce the "
                f"report's ({None if old is None else old['accuracy']}): not the same samples or model; regenerate "
                "the whole report instead")

    def coverage_row(r):
        return r.get("coverage") is not None or r.get("matched_to") is not None

    rerun = set(b["protocols"])
    results = [r for r in existing["results"] if not (coverage_row(r) and r["protocol"] in rerun)]
    results += [r for r in new["results"] if coverage_row(r)]
    comparisons = [c for c in existing.get("comparisons", [])
                   if c.get("coverage") is None or c["protocol"] not in rerun]
    comparisons += [c for c in new.get("comparisons", []) if c.get("coverage") is not None]
    settings = dict(a)
    settings["coverages"] = b["coverages"]
    settings["coverage_scorer"] = b["coverage_scorer"]
    settings["coverage_run"] = {k: b[k] for k in ("seconds", "cpu_seconds", "versions")}
    settings["coverage_run"]["command"] = b.get("command", "python -m sparse_cache.toy.quality --only coverage")
    return {**existing, "settings": settings, "results": results, "comparisons": comparisons}


def existing_report_files(out_dir: str | Path, plot: bool = True) -> list[Path]:
    """The report files :func:`write_report` would overwrite in ``out_dir``."""
    names = [n for k, n in REPORT_FILES.items() if plot or k != "plot"]
    return [Path(out_dir) / name for name in names if (Path(out_dir) / name).exists()]


def write_report(report: dict, out_dir: str | Path, plot: bool = True, force: bool = True) -> dict[str, Path]:
    """Write ``quality.md``, ``quality.json`` and (if ``plot``) ``quality.png`` to ``out_dir``; with
    ``force=False``, ``FileExistsError`` instead of overwriting any of them."""
    out_dir = Path(out_dir)
    if not force and existing_report_files(out_dir, plot):
        raise FileExistsError(f"{out_dir} already holds a quality report; pass force=True to overwrite it")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / REPORT_FILES["markdown"], "json": out_dir / REPORT_FILES["json"]}
    paths["markdown"].write_text(markdown_report(report))
    paths["json"].write_text(report_json(report))
    if plot:
        paths["plot"] = out_dir / REPORT_FILES["plot"]
        plot_report(report, paths["plot"])
    return paths


def _plain(x):
    """JSON-ready copy: NaN -> null, numpy scalars -> Python numbers, per-sample outcomes dropped."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items() if k != PER_SAMPLE}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(x) else float(x)
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    return x


def report_json(report: dict) -> str:
    """The report as JSON text: settings indented, one line per result row and per comparison (a reviewable
    diff); NaN written as null; the in-memory per-sample outcomes left out."""
    parts = []
    for key, value in _plain(report).items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            body = "[\n" + ",\n".join("    " + json.dumps(v) for v in value) + "\n  ]"
        else:
            body = json.dumps(value, indent=2).replace("\n", "\n  ")
        parts.append(f"  {json.dumps(key)}: {body}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _csv(value: str, cast=str) -> list:
    return [cast(v.strip()) for v in value.split(",") if v.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse_cache.toy.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=400, help="samples per protocol (default 400)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scorers", type=lambda v: _csv(v), default=None,
                        help="comma-separated scorers, NAME or NAME@LAYER to override the scoring layer (default: "
                             "every "
                             f"registered scorer and the oracle: {','.join(default_scorers())})")
    parser.add_argument("--keep-ratios", type=lambda v: _csv(v, float), default=list(KEEP_RATIOS))
    parser.add_argument("--protocols", type=lambda v: _csv(v), default=None, help=f"subset of {','.join(PROTOCOLS)}")
    parser.add_argument("--coverages", type=lambda v: _csv(v, float), default=list(COVERAGES),
                        help=f"coverage targets of {DEFAULT_SCORER} with keep_ratio='auto' (default "
                             f"{','.join(f'{c:g}' for c in COVERAGES)}; an empty string for none)")
    parser.add_argument("--only", choices=ONLY, default=None,
                        help="coverage: run only the coverage rows (and the unpruned rows they are compared with) and "
                             "put them into the report already in --out-dir (its other rows untouched; same "
                             "--samples and --seed)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the shipped toy VLM)")
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR,
                        help=f"folder for quality.md/.json/.png (default {DEFAULT_OUT_DIR}, in the current folder)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite a report already in --out-dir (e.g. to refresh benchmarks/quality)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these small ops gain nothing from more, and lose a lot "
                             "when the cores are shared)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads < 1:
        parser.error(f"--threads: must be >= 1, got {args.threads}")
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("the plot needs matplotlib (pip install 'sparse-cache[bench]'), or pass --no-plot")
    existing = existing_report_files(args.out_dir, plot=not args.no_plot)
    previous = None
    if args.only is not None:  # updates the report in --out-dir: it must be there (read before the run)
        json_path = Path(args.out_dir) / REPORT_FILES["json"]
        if not json_path.exists():
            parser.error(f"--only {args.only}: no {json_path} to add rows to; run without --only first")
        previous = json.loads(json_path.read_text())
        for key in ("samples", "seed"):  # the same samples as the report's, checked before the run
            if previous["settings"][key] != getattr(args, key):
                parser.error(f"--{key}: the report in {args.out_dir} has {key}={previous['settings'][key]}, not "
                             f"{getattr(args, key)}; --only adds rows run on the report's own samples")
        if not args.coverages:
            parser.error("--only coverage: --coverages is empty")
    elif existing and not args.force:  # before the run, not after minutes of work
        parser.error(f"--out-dir {args.out_dir} already holds {', '.join(p.name for p in existing)}; pass --force to "
                     "overwrite, or another --out-dir")
    torch.set_num_threads(args.threads)
    model, processor = load_toy_vlm(path=args.checkpoint)
    try:
        report = run_quality(model, processor, args.scorers, args.keep_ratios, args.protocols, args.samples,
                             args.seed, args.batch_size, progress=not args.no_progress, coverages=args.coverages,
                             only=args.only)
        if previous is not None:
            report["settings"]["command"] = "python -m sparse_cache.toy.quality " + " ".join(
                argv if argv is not None else sys.argv[1:])
            report = merge_coverage(previous, report)
    except ValueError as error:
        parser.error(str(error))
    except RuntimeError as error:  # e.g. nothing was pruned: no table of unpruned numbers labelled as pruned
        print(f"{parser.prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    paths = write_report(report, args.out_dir, plot=not args.no_plot)
    print(markdown_report(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
