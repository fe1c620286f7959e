"""Cases of the tensor-parallel suite (``test_tensor_parallel.py``), run twice on the same saved checkpoints:

- by every rank of ``python -m torch.distributed.run --nproc-per-node N tests/tp_cases.py ...`` (gloo, CPU), on the
  model loaded with ``from_pretrained(dir, tp_plan="auto")``; each rank writes ``rank{R}.pt``;
- by the pytest process on the same checkpoints loaded without ``tp_plan`` (the single-process reference).

Each case first asserts that pruning happened (``assert_pruned``), then records what the test compares: the kept
visual positions and scores after every prefill, and the per-step logits of ``generate``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # oracles.py

from oracles import GREEDY, assert_pruned, family_inputs, visual_ids  # noqa: E402

from sparse_cache import PrunableDynamicCache, testing  # noqa: E402
from sparse_cache.scorers import SCORERS, Scorer  # noqa: E402

NEW = 3
#: families whose tiny models the 2-rank launch covers (every supported one)
FAMILIES_2 = testing.FAMILIES + testing.LLAVA_FAMILIES
#: 3 ranks: the head counts overridden so that 3 divides them (6 query heads, 3 KV heads, head_dim 16)
FAMILIES_3 = ("qwen2_5_vl", "llava")
OVERRIDES_3 = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, intermediate_size=192)
TURN = "<|im_end|>\n<|im_start|>user\nwhy?<|im_end|>\n<|im_start|>assistant\n"


def checkpoint_name(family: str, ranks: int) -> str:
    return f"{family}-{ranks}"


def save_checkpoints(root: str, ranks: int) -> None:
    """The tiny models of the ``ranks`` launch, saved under ``root`` (weights depend only on the seed)."""
    for family in FAMILIES_2 if ranks == 2 else FAMILIES_3:
        overrides = {} if ranks == 2 else dict(OVERRIDES_3)
        testing.tiny_vlm_model(family, seed=0, **overrides).save_pretrained(os.path.join(root, checkpoint_name(family, ranks)))


def load(root: str, family: str, ranks: int, tp: bool):
    import transformers

    config = transformers.AutoConfig.from_pretrained(os.path.join(root, checkpoint_name(family, ranks)))
    model_class = getattr(transformers, config.architectures[0])
    kwargs = dict(tp_plan="auto") if tp else {}
    model = model_class.from_pretrained(os.path.join(root, checkpoint_name(family, ranks)), dtype=torch.float32,
                                        attn_implementation="sdpa", **kwargs).eval()
    model.generation_config = testing.greedy_generation_config(model.config)
    return model


inputs_of = family_inputs


class RankNoise(Scorer):
    """Scores that differ per rank (seeded by the rank): the agreement check must catch them."""

    name = "rank_noise"
    default_layer = None

    def score(self, context):
        rank = context.tensor_parallel.rank if context.tensor_parallel is not None else 0
        gen = torch.Generator().manual_seed(1000 + rank)
        return [torch.rand(v.numel(), generator=gen) for v in context.visual_positions]


def cases(ranks: int) -> list[dict]:
    """Every case of a launch: name, family, input kind, cache arguments, and what else to do."""
    out = []
    for family in FAMILIES_2 if ranks == 2 else FAMILIES_3:
        out.append(dict(name=f"{family}/batch/sparsevlm", family=family, kind="batch", cache=dict(keep_ratio=0.25)))
    for family in ("qwen2_5_vl", "qwen3_vl", "llava") if ranks == 2 else FAMILIES_3:
        out.append(dict(name=f"{family}/continuation", family=family, kind="single", cache=dict(keep_ratio=0.25),
                        continuation=True))
        out.append(dict(name=f"{family}/in-prefill-recycle", family=family, kind="batch",
                        cache=dict(mode="in-prefill", schedule=[(1, 0.5), (2, 0.25)], recycle=True)))
        # pre-llm: the replicated input embeddings are scored, the sharded LM runs on the cut, then a second turn
        out.append(dict(name=f"{family}/pre-llm-continuation", family=family, kind="single",
                        cache=dict(keep_ratio=0.25, mode="pre-llm", scorer="dart_embed"), continuation=True))
        scorers = ("dart_embed", "divprune", "random") if ranks == 2 else ("dart_embed",)
        for scorer in scorers:  # padded batch, two images in the second row (Qwen3-VL: DeepStack features cut too)
            out.append(dict(name=f"{family}/pre-llm/{scorer}", family=family, kind="batch",
                            cache=dict(keep_ratio=0.25, mode="pre-llm", scorer=scorer)))
    family = "qwen2_5_vl"
    if ranks == 2:
        for scorer in sorted(SCORERS):
            if scorer != "sparsevlm":
                out.append(dict(name=f"{family}/batch/{scorer}", family=family, kind="batch",
                                cache=dict(keep_ratio=0.25, scorer=scorer)))
        out.append(dict(name=f"{family}/adaptive", family=family, kind="batch", cache=dict(adaptive_scale=1.0)))
        out.append(dict(name=f"{family}/in-prefill-sparsevlm-plus", family=family, kind="batch",
                        cache=dict(mode="in-prefill", schedule=[(1, 0.5), (2, 0.25)], scorer="sparsevlm_plus")))
        for family in ("qwen3_vl", "llava"):
            for scorer in ("sparsevlm_plus", "dart", "cdpruner", "random"):
                out.append(dict(name=f"{family}/batch/{scorer}", family=family, kind="batch",
                                cache=dict(keep_ratio=0.25, scorer=scorer)))
    for family in ("qwen2_5_vl", "llava") if ranks == 2 else ("qwen2_5_vl",):
        # every rank's own computation agrees, before rank 0's scores are shared
        for scorer in ("sparsevlm", "sparsevlm_plus", "dart", "divprune", "random"):
            out.append(dict(name=f"{family}/unshared/{scorer}", family=family, kind="batch",
                            cache=dict(keep_ratio=0.25, scorer=scorer), unshared=True))
        for scorer in ("dart_embed", "divprune", "random"):  # pre-llm: every rank's own embedding scores agree
            out.append(dict(name=f"{family}/unshared/pre-llm/{scorer}", family=family, kind="batch",
                            cache=dict(keep_ratio=0.25, mode="pre-llm", scorer=scorer), unshared=True))
    return out


def run_case(model, case: dict) -> dict:
    inputs = inputs_of(case["family"], case["kind"])
    cache = PrunableDynamicCache(model, **case["cache"])
    if case.get("unshared") and cache.sparse_cache_lifecycle.tensor_parallel is not None:
        cache.sparse_cache_lifecycle.tensor_parallel.share_scores = False
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    extra = [len(g) for g in cache.recycled_groups] if case["cache"].get("recycle") else None
    assert_pruned(cache, inputs, visual_ids(model), extra=extra)
    result = dict(kept=[k.cpu() for k in cache.kept_visual_positions], scores=[s.cpu() for s in cache.visual_scores],
                  logits=[x.cpu() for x in out.logits], physical=cache.get_physical_length())
    if case.get("continuation"):
        turn = testing.tiny_family_processor(case["family"]).tokenizer(
            TURN, add_special_tokens=False, return_tensors="pt")["input_ids"]
        second = model.generate(input_ids=torch.cat([out.sequences, turn], 1), past_key_values=cache,
                                max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
        result["logits"] += [x.cpu() for x in second.logits]
        result["kept_after_turn"] = [k.cpu() for k in cache.kept_visual_positions]
    return result


def refusals(root: str, tp: bool) -> dict:
    """Errors the TP suite expects: a sequence-parallel plan, and ranks that disagree on the kept set."""
    out = {}
    model = load(root, "qwen2_5_vl", 2, tp)
    plan = getattr(model, "_tp_plan", None)
    if tp and plan is not None:
        saved = dict(plan)
        plan["model.language_model.norm"] = "sequence_parallel"
        try:
            PrunableDynamicCache(model, keep_ratio=0.25)
            out["sequence_parallel"] = None
        except ValueError as err:
            out["sequence_parallel"] = str(err)
        plan.clear()
        plan.update(saved)
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scorer=RankNoise())
    if cache.sparse_cache_lifecycle.tensor_parallel is not None:
        cache.sparse_cache_lifecycle.tensor_parallel.share_scores = False
    try:
        model.generate(**inputs_of("qwen2_5_vl", "batch"), past_key_values=cache, max_new_tokens=1, **GREEDY)
        out["disagreement"] = None
    except RuntimeError as err:
        out["disagreement"] = str(err)
    # pre-llm: the same disagreement is caught before the sharded language model runs on different cuts
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scorer=RankNoise(), mode="pre-llm")
    if cache.sparse_cache_lifecycle.tensor_parallel is not None:
        cache.sparse_cache_lifecycle.tensor_parallel.share_scores = False
    try:
        model.generate(**inputs_of("qwen2_5_vl", "batch"), past_key_values=cache, max_new_tokens=1, **GREEDY)
        out["disagreement_pre_llm"] = None
    except RuntimeError as err:
        out["disagreement_pre_llm"] = str(err)
    # shared (the default): the same scorer's rank-dependent scores are replaced by rank 0's, and the ranks agree
    cache = PrunableDynamicCache(model, keep_ratio=0.25, scorer=RankNoise())
    model.generate(**inputs_of("qwen2_5_vl", "batch"), past_key_values=cache, max_new_tokens=1, **GREEDY)
    out["shared_noise_kept"] = [k.cpu() for k in cache.kept_visual_positions]
    return out


def run_all(root: str, ranks: int, tp: bool, only: str | None = None) -> dict:
    results: dict = {}
    models: dict = {}
    for case in cases(ranks):
        if only and only not in case["name"]:
            continue
        family = case["family"]
        if family not in models:
            try:
                models[family] = load(root, family, ranks, tp)
            except Exception as err:  # noqa: BLE001 - transformers cannot load it this way: the test says so
                models[family] = f"{type(err).__name__}: {err}".splitlines()[0]
        if isinstance(models[family], str):
            results[case["name"]] = dict(load_error=models[family])
            continue
        try:
            results[case["name"]] = run_case(models[family], case)
        except Exception:  # noqa: BLE001 - recorded: the test reports it with the case's name
            results[case["name"]] = dict(error=traceback.format_exc())
            if tp:  # the other ranks may now wait in a collective: stop here rather than hang
                break
    if ranks == 2 and not only:
        results["refusals"] = refusals(root, tp)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--ranks", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default=None)
    args = parser.parse_args()
    import torch.distributed as dist

    torch.set_num_threads(1)
    # our own group first (transformers reuses an initialized one): a desynchronised case fails in a minute, no hang
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    results = run_all(args.root, args.ranks, tp=True, only=args.only)
    torch.save(results, os.path.join(args.out, f"rank{dist.get_rank()}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
