"""Randomized oracle test: random tiny models, batches, budgets, modes, scorers and decoding settings.

Every case is drawn from its own seed (``SeedSequence([base, index])``) and checked against the
oracle that applies (docs/oracles.md):

* ``post-prefill`` -> masked equivalence (oracle 2): per-step logits for greedy and sampling
  (``masked_decode_logits``), ``sequences_scores`` for beam search (``teacher_forced_logprob``);
* ``in-prefill`` (one scoring layer, an explicit progressive schedule, or ``schedule="sparsevlm"``,
  with or without recycling) -> the hand-built reference of oracle 5 (``in_prefill_reference_logits``),
  per-step logits or, for beams, the summed log-probabilities of each returned sequence.

Before comparing, each case asserts that pruning happened where it must: per image/video the kept
count is the budget, a row with visual tokens and a budget below its count keeps fewer than all,
rows without visual tokens keep nothing to prune and lose nothing, the physical cache is shorter
than the logical one exactly when something was dropped, and the physical length is the longest
row's kept entries plus the decoded tokens.

Models are the expensive part: a pool of ``--random-pool`` (default 8) random configurations per
base seed is built lazily, each in sdpa and eager (same weights), and the cases draw from it.
Options (tests/conftest.py; docs/testing.md): ``--random-cases N`` (default 500,
env ``SPARSE_CACHE_RANDOM_CASES``), ``--random-base B`` (default 0, env ``SPARSE_CACHE_RANDOM_BASE``),
``--random-case I`` (run only case ``I``: the replay command a failure prints), ``--random-pool K``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pytest
import torch
from oracles import feed, in_prefill_reference_logits, masked_decode_logits, masked_full_cache, teacher_forced_logprob
from transformers import BatchFeature

import sparse_cache
from sparse_cache import PrunableDynamicCache, testing

pytestmark = pytest.mark.randomized

ATOL = 1e-4
SCORERS = sorted(sparse_cache.SCORERS)
RATER_SCORERS = ("sparsevlm", "sparsevlm_plus")  # those that support adaptive_scale
PROMPTS = (
    "describe the image.",
    "what colour is the square on the left?",
    "count the objects.",
    "is there a person here? answer yes or no.",
    "what is shown in the video?",
    "please summarize the scene. which object is the largest? where is the ball?",
    "answer the question with one word.",
    "the quick brown fox jumps over the lazy dog. what colour is the fox in the picture?",
    "left or right?",
)


# --------------------------------------------------------------------------- pool of configurations


@dataclass
class ModelSpec:
    seed: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    mrope_section: list[int]
    rope_theta: float
    tie_word_embeddings: bool
    vision_depth: int
    init_std: float

    def overrides(self) -> dict:
        return dict(
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            hidden_size=self.num_attention_heads * self.head_dim,
            intermediate_size=self.intermediate_size,
            mrope_section=list(self.mrope_section),
            rope_theta=self.rope_theta,
            tie_word_embeddings=self.tie_word_embeddings,
            vision_depth=self.vision_depth,
            vision_fullatt_block_indexes=[self.vision_depth - 1],
        )


def draw_model_spec(base: int, index: int) -> ModelSpec:
    rng = np.random.default_rng(np.random.SeedSequence([base, 1_000_000 + index]))
    heads = int(rng.choice([2, 3, 4, 6]))
    kv_heads = int(rng.choice([d for d in range(1, heads + 1) if heads % d == 0]))  # GQA ratio heads / kv_heads
    head_dim = int(rng.choice([8, 12, 16]))
    half = head_dim // 2
    if rng.random() < 0.5:
        mrope = [half // 4, (half - half // 4) // 2]  # the default split, as in testing.py
        mrope.append(half - sum(mrope))
        if mrope[0] == 0:
            mrope = [1, mrope[1] - 1, mrope[2]]
    else:  # any split of head_dim / 2 into three positive sections
        cuts = sorted(rng.choice(np.arange(1, half), size=2, replace=False).tolist())
        mrope = [cuts[0], cuts[1] - cuts[0], half - cuts[1]]
    hidden = heads * head_dim
    return ModelSpec(
        seed=int(rng.integers(0, 2**31 - 1)),
        num_hidden_layers=int(rng.integers(2, 6)),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(rng.choice([hidden, 2 * hidden, 3 * hidden])),
        mrope_section=[int(x) for x in mrope],
        rope_theta=float(rng.choice([10_000.0, 1_000_000.0])),
        tie_word_embeddings=bool(rng.random() < 0.3),
        vision_depth=int(rng.choice([1, 2])),
        init_std=float(rng.choice([0.15, 0.2, 0.25])),
    )


_MODELS: dict[tuple, torch.nn.Module] = {}


def pool_model(spec: ModelSpec, attn: str):
    key = (json.dumps(asdict(spec), sort_keys=True), attn)
    if key not in _MODELS:
        _MODELS[key] = testing.tiny_qwen2_5_vl_model(
            seed=spec.seed, attn_implementation=attn, init_std=spec.init_std, **spec.overrides()
        )
    return _MODELS[key]


# --------------------------------------------------------------------------- cases


@dataclass
class RowSpec:
    prompt: str
    images: list[tuple[int, int, int]] = field(default_factory=list)  # (width, height, seed)
    video: tuple[int, int, int, int] | None = None  # (frames, width, height, seed): placed before the images


@dataclass
class Case:
    base: int
    index: int
    pool_index: int
    model: ModelSpec
    attn: str
    rows: list[RowSpec]
    mode: str  # post-prefill | in-prefill | schedule | sparsevlm-schedule
    cache_kwargs: dict
    generation: str  # greedy | sample | beam | assisted
    new_tokens: int
    gen_kwargs: dict
    sample_seed: int
    second_turn: str | None = None  # question of a second generate on the same cache

    def describe(self) -> str:
        data = asdict(self)
        return json.dumps(data, default=str)


def draw_case(base: int, index: int, pool_size: int) -> Case:
    rng = np.random.default_rng(np.random.SeedSequence([base, index]))
    pool_index = int(rng.integers(0, pool_size))
    spec = draw_model_spec(base, pool_index)
    layers = spec.num_hidden_layers
    attn = str(rng.choice(["sdpa", "eager"]))

    # batch
    n_rows = int(rng.integers(1, 5))
    rows = []
    video_row = int(rng.integers(0, n_rows)) if rng.random() < 0.2 else None
    for row in range(n_rows):
        prompt = str(rng.choice(PROMPTS))
        if rng.random() < 0.3:  # vary prompt lengths further, so padding differs
            prompt = " ".join([prompt] * int(rng.integers(2, 4)))
        spec_row = RowSpec(prompt=prompt)
        if row == video_row:
            frames = int(rng.choice([2, 4]))
            spec_row.video = (frames, int(rng.integers(56, 113)), int(rng.integers(56, 113)), int(rng.integers(0, 10_000)))
            n_images = int(rng.choice([0, 0, 0, 1]))
        else:
            n_images = int(rng.choice([0, 1, 1, 2, 2, 3], p=[0.15, 0.25, 0.2, 0.15, 0.1, 0.15]))
        for _ in range(n_images):
            spec_row.images.append((int(rng.integers(56, 169)), int(rng.integers(56, 169)), int(rng.integers(0, 10_000))))
        rows.append(spec_row)

    # mode, scorer, budget
    scorer = str(rng.choice(SCORERS))
    u = rng.random()
    if u < 0.45:
        mode = "post-prefill"
    elif u < 0.7:
        mode = "in-prefill"
    elif u < 0.85 or layers < 4:
        mode = "schedule"
    else:
        mode = "sparsevlm-schedule"
    kwargs: dict = dict(scorer=scorer, seed=int(rng.integers(0, 1000)))

    def ratio() -> float:
        r = rng.random()
        if r < 0.05:
            return 1.0
        return round(float(rng.uniform(0.05, 0.95)), 3)

    def budget_kwargs(allow_adaptive: bool) -> dict:
        r = rng.random()
        if allow_adaptive and scorer in RATER_SCORERS and r < 0.12:
            return dict(adaptive_scale=round(float(rng.uniform(0.1, 1.0)), 3))
        if r < 0.3:
            return dict(keep_tokens=int(rng.integers(1, 21)))
        return dict(keep_ratio=ratio())

    if mode == "post-prefill":
        kwargs.update(budget_kwargs(allow_adaptive=True))
        default = sparse_cache.SCORERS[scorer].default_layer
        if (default is not None and default >= layers) or rng.random() < 0.4:
            kwargs["scoring_layer"] = int(rng.integers(0, layers))
    elif mode == "in-prefill":
        kwargs.update(budget_kwargs(allow_adaptive=True))
        kwargs["mode"] = "in-prefill"
        kwargs["scoring_layer"] = int(rng.integers(0, layers))
    elif mode == "schedule":
        kwargs["mode"] = "in-prefill"
        n_stages = int(rng.integers(1, min(3, layers) + 1))
        stage_layers = sorted(rng.choice(layers, size=n_stages, replace=False).tolist())
        ratios = sorted((ratio() for _ in range(n_stages)), reverse=True)
        kwargs["schedule"] = [(int(layer), float(r)) for layer, r in zip(stage_layers, ratios)]
    else:
        kwargs["mode"] = "in-prefill"
        kwargs["schedule"] = "sparsevlm"
        # derive_schedule needs a layer-average ratio above what pruning after its first layer allows
        kwargs["keep_ratio"] = round(float(rng.uniform(1.0 / layers + 0.05, 1.0)), 3)
    if kwargs.get("mode") == "in-prefill" and "adaptive_scale" not in kwargs and rng.random() < 0.15:
        kwargs["recycle"] = True

    # generation
    new_tokens = int(rng.choice([3, 4]))
    g = rng.random()
    if g >= 0.9 and n_rows == 1:  # assisted decoding (prompt lookup) is batch-size-1 only in transformers
        generation, gen_kwargs = "assisted", dict(do_sample=False, prompt_lookup_num_tokens=int(rng.integers(2, 4)))
        new_tokens = int(rng.choice([4, 6]))
    elif g < 0.45 or g >= 0.9:
        generation, gen_kwargs = "greedy", dict(do_sample=False)
    elif g < 0.7:
        generation = "sample"
        gen_kwargs = dict(
            do_sample=True, temperature=float(rng.choice([0.7, 1.0, 1.3])), top_k=int(rng.choice([0, 5])), top_p=1.0
        )
    else:
        generation = "beam"
        beams = int(rng.integers(2, 4))
        gen_kwargs = dict(
            do_sample=False, num_beams=beams, num_return_sequences=int(rng.integers(1, beams + 1)),
            length_penalty=0.0, early_stopping=True,
        )
    sample_seed = int(rng.integers(0, 2**31 - 1))
    # a second turn on the same cache (oracle 3): post-prefill only (oracle 5 covers one prefill)
    second_turn = None
    if mode == "post-prefill" and generation in ("greedy", "sample") and rng.random() < 0.25:
        second_turn = str(rng.choice(PROMPTS))
    return Case(
        base=base, index=index, pool_index=pool_index, model=spec, attn=attn, rows=rows, mode=mode,
        cache_kwargs=kwargs, generation=generation, new_tokens=new_tokens, gen_kwargs=gen_kwargs,
        sample_seed=sample_seed, second_turn=second_turn,
    )


# --------------------------------------------------------------------------- inputs


def _frames(video):
    n, width, height, seed = video
    return [testing.synthetic_image(width, height, seed=seed + f) for f in range(n)]


def build_inputs(processor, rows: list[RowSpec]) -> BatchFeature:
    """Left-padded batch; ``testing.make_inputs`` when no row has a video, else built by hand like it.

    By hand: each row's chat text has its ``<|video_pad|>`` (from ``testing.make_video_inputs``) and
    ``<|image_pad|>`` placeholders expanded to their token counts, images go through the image
    processor in row order, videos are concatenated in row order.
    """
    if all(r.video is None for r in rows):
        return testing.make_inputs(processor, [r.prompt for r in rows], [[testing.synthetic_image(*i) for i in r.images] for r in rows])
    ip = processor.image_processor
    merge = ip.merge_size**2
    texts, flat_images, videos = [], [], []
    for r in rows:
        content = []
        if r.video is not None:
            content.append({"type": "video"})
        content += [{"type": "image"} for _ in r.images]
        content.append({"type": "text", "text": r.prompt})
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                   tokenize=False))
        flat_images += [testing.synthetic_image(*i) for i in r.images]
        if r.video is not None:
            videos.append(testing.make_video_inputs(processor, r.prompt, _frames(r.video)))
    data = {}
    if flat_images:
        image_out = ip(images=flat_images, return_tensors="pt")
        data["pixel_values"], data["image_grid_thw"] = image_out["pixel_values"], image_out["image_grid_thw"]
        counts = iter((data["image_grid_thw"].prod(-1) // merge).tolist())
    video_counts = iter([int(v["video_grid_thw"].prod() // merge) for v in videos])
    expanded = []
    for text, r in zip(texts, rows):
        if r.video is not None:
            text = text.replace(processor.video_token, "\0" * next(video_counts), 1)
        for _ in r.images:
            text = text.replace(processor.image_token, "\1" * next(counts), 1)
        expanded.append(text.replace("\0", processor.video_token).replace("\1", processor.image_token))
    enc = processor.tokenizer(expanded, return_tensors="pt", padding=True, padding_side="left")
    types = torch.zeros_like(enc["input_ids"])
    types[enc["input_ids"] == processor.image_token_id] = 1
    types[enc["input_ids"] == processor.video_token_id] = 2
    data.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], mm_token_type_ids=types)
    data["pixel_values_videos"] = torch.cat([v["pixel_values_videos"] for v in videos])
    data["video_grid_thw"] = torch.cat([v["video_grid_thw"] for v in videos])
    data["second_per_grid_ts"] = torch.cat([v["second_per_grid_ts"] for v in videos])
    return BatchFeature(data=data)


def visual_blocks(inputs, model) -> list[list[torch.Tensor]]:
    """Per row, the positions of each image, then each video, in the order the model consumes them."""
    ids = inputs["input_ids"]
    merge = model.config.vision_config.spatial_merge_size**2
    blocks = [[] for _ in range(ids.shape[0])]
    for token_id, grid_name in ((model.config.image_token_id, "image_grid_thw"), (model.config.video_token_id, "video_grid_thw")):
        if grid_name not in inputs:
            continue
        counts = iter((inputs[grid_name].prod(-1) // merge).tolist())
        for row in range(ids.shape[0]):
            positions = torch.nonzero(ids[row] == token_id).flatten()
            start = 0
            while start < positions.numel():
                n = next(counts)
                blocks[row].append(positions[start : start + n])
                start += n
    return blocks


# --------------------------------------------------------------------------- checks


def expected_count(n: int, keep_ratio, keep_tokens) -> int:
    if keep_ratio is not None:
        return max(1, min(n, int(math.floor(keep_ratio * n + 0.5))))
    return min(n, keep_tokens)


def assert_close(actual, expected, what):
    assert len(actual) == len(expected), f"{what}: {len(actual)} steps vs {len(expected)}"
    for step, (a, e) in enumerate(zip(actual, expected)):
        diff = (a.float() - e.float()).abs().max().item()
        assert diff <= ATOL, f"{what}: step {step}: max |diff| {diff:.3g} > {ATOL}"


def run_case(case: Case, processor) -> None:
    model = pool_model(case.model, case.attn)
    inputs = build_inputs(processor, case.rows)
    ids = inputs["input_ids"]
    batch, prompt_len = ids.shape
    visual_ids = (model.config.image_token_id, model.config.video_token_id)
    blocks = visual_blocks(inputs, model)
    for row, spec in enumerate(case.rows):
        assert len(blocks[row]) == len(spec.images) + (spec.video is not None), "test setup: blocks per row"

    cache = PrunableDynamicCache(model, **case.cache_kwargs)
    torch.manual_seed(case.sample_seed)
    out = model.generate(
        **inputs, past_key_values=cache, max_new_tokens=case.new_tokens, min_new_tokens=case.new_tokens,
        return_dict_in_generate=True, output_logits=True, output_scores=True,
        **case.gen_kwargs,
    )
    # a random tiny model often generates <|image_pad|>: a plain token in a decode step (regression test in
    # tests/test_regressions.py), which the oracles feed as such
    beams = case.gen_kwargs.get("num_beams", 1)
    returned = case.gen_kwargs.get("num_return_sequences", 1)
    continuations = out.sequences[:, prompt_len:]
    assert continuations.shape[1] == case.new_tokens

    # ---- cache rows follow beams: every beam of a row shares the row's kept set
    rows_of_cache = batch * beams
    if not any(blocks):  # no visual token anywhere: the cache never pruned, the oracle is plain decoding
        assert cache.kept_visual_positions == [] or all(k.numel() == 0 for k in cache.kept_visual_positions)
        assert cache.get_physical_length() == cache.get_seq_length() == prompt_len + case.new_tokens - 1
        cache.kept_visual_positions = [torch.zeros(0, dtype=torch.long)] * rows_of_cache
        cache.visual_scores = [torch.zeros(0)] * rows_of_cache
    assert len(cache.kept_visual_positions) == rows_of_cache
    kept = [cache.kept_visual_positions[row * beams] for row in range(batch)]
    stages = [[stage[row * beams] for row in range(batch)] for stage in cache.stage_kept_visual_positions]
    recycled = [cache.recycled_groups[row * beams] for row in range(batch)] if cache.recycled_groups else None
    for row in range(batch):
        for beam in range(beams):
            assert torch.equal(cache.kept_visual_positions[row * beams + beam], kept[row]), f"row {row} beam {beam}"

    # ---- pruning happened where it must, and nowhere else
    kw = case.cache_kwargs
    schedule = cache.schedule
    final_ratio, final_tokens = (schedule[-1][1], None) if schedule else (kw.get("keep_ratio"), kw.get("keep_tokens"))
    valid = inputs["attention_mask"].sum(1)
    stored = []
    for row in range(batch):
        k = kept[row]
        n_visual = sum(b.numel() for b in blocks[row])
        assert k.numel() == 0 or bool((k[1:] > k[:-1]).all()), f"row {row}: kept positions not ascending"
        assert cache.visual_scores[row * beams].numel() == n_visual, f"row {row}: {cache.visual_scores[row * beams].numel()} scores for {n_visual} visual tokens"
        assert bool(torch.isin(k, torch.cat(blocks[row]) if blocks[row] else k[:0]).all()), f"row {row}: kept a non-visual position"
        if n_visual == 0:
            assert k.numel() == 0, f"row {row} has no visual tokens but reports kept {k.tolist()}"
        for b, positions in enumerate(blocks[row]):
            got = int(torch.isin(k, positions).sum())
            n = positions.numel()
            if "adaptive_scale" in kw:
                assert 1 <= got <= n, f"row {row} block {b}: adaptive kept {got} of {n}"
            else:
                want = expected_count(n, final_ratio, final_tokens)
                assert got == want, f"row {row} block {b}: kept {got} of {n}, budget says {want}"
        if schedule and any(blocks):  # each stage keeps its budget (of the block's original count) among the previous survivors
            assert len(stages) == len(schedule)
            previous = None
            for s, ((layer, r), stage_kept) in enumerate(zip(schedule, stages)):
                for b, positions in enumerate(blocks[row]):
                    got = int(torch.isin(stage_kept[row], positions).sum())
                    want = expected_count(positions.numel(), r, None)
                    assert got == want, f"row {row} stage {s} block {b}: kept {got}, budget {want}"
                if previous is not None:
                    assert bool(torch.isin(stage_kept[row], previous).all()), f"row {row} stage {s}: not nested"
                previous = stage_kept[row]
            assert torch.equal(stages[-1][row], k)
        n_recycled = len(recycled[row]) if recycled else 0
        stored.append(int(valid[row]) - (n_visual - k.numel()) + n_recycled)
        if n_visual and ("adaptive_scale" not in kw):
            if any(expected_count(b.numel(), final_ratio, final_tokens) < b.numel() for b in blocks[row]):
                assert k.numel() < n_visual, f"row {row}: nothing pruned"
    fed = case.new_tokens - 1
    dropped_any = any(k.numel() < sum(b.numel() for b in bl) for k, bl in zip(kept, blocks))
    assert cache.get_seq_length() == prompt_len + fed
    if dropped_any:
        if max(stored) < prompt_len:  # the longest row lost entries (another row may be the longest, unpruned)
            assert cache.get_physical_length() < cache.get_seq_length()
        assert cache.get_physical_length() == max(stored) + fed, (cache.get_physical_length(), stored, fed)
    else:  # nothing dropped: every entry is still there
        assert cache.get_physical_length() == cache.get_seq_length()
    for layer in cache.layers:
        assert layer.keys.shape[2] == cache.get_physical_length()

    # ---- oracle
    in_prefill = kw.get("mode") == "in-prefill" and any(blocks)  # without visual tokens nothing is cut
    stage_layers = [layer for layer, _ in schedule] if schedule else [kw.get("scoring_layer")]
    if case.generation != "beam":
        if in_prefill:
            expected = in_prefill_reference_logits(
                model, inputs, list(zip(stage_layers, stages)), continuations, visual_ids, recycled
            )
            assert_close(out.logits, expected, "in-prefill reference (oracle 5)")
        elif case.second_turn is None:
            expected = masked_decode_logits(model, inputs, kept, continuations, visual_ids)
            assert_close(out.logits, expected, "masked equivalence (oracle 2)")
        else:
            check_second_turn(case, model, processor, inputs, cache, out, kept, visual_ids)
        return
    # beams: each returned sequence's score is its summed log-probability under the oracle
    origin = torch.arange(batch).repeat_interleave(returned).tolist()
    expanded = build_inputs(processor, [case.rows[r] for r in origin])
    assert expanded["input_ids"].shape[1] == prompt_len
    if in_prefill:
        expanded_stages = [(layer, [stage[r] for r in origin]) for layer, stage in zip(stage_layers, stages)]
        logits = in_prefill_reference_logits(
            model, expanded, expanded_stages, continuations, visual_ids, [recycled[r] for r in origin] if recycled else None
        )
        logprob = torch.log_softmax(torch.stack(logits, 1), -1).gather(-1, continuations[..., None]).squeeze(-1).sum(-1)
        what = "in-prefill reference (oracle 5), beam scores"
    else:
        logprob = teacher_forced_logprob(model, expanded, [kept[r] for r in origin], continuations, visual_ids)
        what = "masked equivalence (oracle 2), beam scores"
    diff = (out.sequences_scores.float() - logprob).abs().max().item()
    assert diff <= ATOL, f"{what}: max |diff| {diff:.3g} > {ATOL}: {out.sequences_scores.tolist()} vs {logprob.tolist()}"


def check_second_turn(case, model, processor, inputs, cache, first, kept, visual_ids) -> None:
    """Oracle 3: a second generate on the same cache continues the conversation (as tests/test_generation.py)."""
    batch, prompt_len = inputs["input_ids"].shape
    text = f"<|im_end|>\n<|im_start|>user\n{case.second_turn}<|im_end|>\n<|im_start|>assistant\n"
    turn = processor.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].expand(batch, -1)
    mask = inputs["attention_mask"]
    extra = first.sequences.shape[1] - mask.shape[1] + turn.shape[1]
    second_inputs = dict(
        input_ids=torch.cat([first.sequences, turn], dim=1),
        attention_mask=torch.cat([mask, mask.new_ones(batch, extra)], dim=1),
    )
    seen = cache.get_seq_length()
    torch.manual_seed(case.sample_seed + 1)
    second = model.generate(
        **second_inputs, past_key_values=cache, max_new_tokens=case.new_tokens, min_new_tokens=case.new_tokens,
        return_dict_in_generate=True, output_logits=True, **case.gen_kwargs,
    )
    assert cache.get_seq_length() == seen + 1 + turn.shape[1] + case.new_tokens - 1
    for row in range(batch):
        assert torch.equal(cache.kept_visual_positions[row], kept[row]), f"row {row}: the second turn changed the kept set"
    gen1 = first.sequences[:, prompt_len:]
    gen2 = second.sequences[:, second_inputs["input_ids"].shape[1]:]
    full, mask, last, first_logits = masked_full_cache(model, inputs, kept, visual_ids)
    logits, mask, last = feed(model, full, mask, last, gen1[:, :-1])
    assert_close(first.logits, [first_logits] + list(logits.unbind(1)), "masked equivalence (oracle 2), turn 1")
    logits, mask, last = feed(model, full, mask, last, torch.cat([gen1[:, -1:], turn], dim=1))
    expected = [logits[:, -1]]
    logits, mask, last = feed(model, full, mask, last, gen2[:, :-1])
    expected += list(logits.unbind(1))
    assert_close(second.logits, expected, "continuation (oracle 3), turn 2")


def replay_command(case: Case, pool: int) -> str:
    return (f"PYTHONPATH=. python -m pytest -q tests/test_randomized.py --random-base {case.base} "
            f"--random-case {case.index} --random-pool {pool}")


def pytest_generate_tests(metafunc):
    if "case_index" not in metafunc.fixturenames:
        return
    from conftest import random_settings

    settings = random_settings(metafunc.config)
    indices = [settings["case"]] if settings["case"] is not None else range(settings["cases"])
    metafunc.parametrize("case_index", list(indices), ids=[f"b{settings['base']}-{i:04d}" for i in indices])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster, and far faster on shared, oversubscribed cores (measured:
    40 cases took 3.4 s of CPU with 1 thread against 21-45 s with 2 while other jobs ran)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def random_processor():
    return testing.tiny_processor()


def test_random_case_matches_oracle(case_index, random_processor, request):
    from conftest import random_settings

    settings = random_settings(request.config)
    case = draw_case(settings["base"], case_index, settings["pool"])
    try:
        with torch.no_grad():
            run_case(case, random_processor)
    except Exception as exc:  # a crash is a failure too: say which case, and how to replay it alone
        raise AssertionError(
            f"randomized case {case.index} (base {case.base}) failed: {type(exc).__name__}: {exc}\n"
            f"case: {case.describe()}\nreplay: {replay_command(case, settings['pool'])}"
        ) from exc
