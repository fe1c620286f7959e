"""Reference computations the tests compare the pruned cache against (see ../docs/oracles.md).

They use only the model's own public forward with a plain ``DynamicCache``, never the library.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from sparse_cache import testing

GREEDY = dict(do_sample=False, return_dict_in_generate=True, output_logits=True)


def full_positions(model, inputs) -> torch.Tensor:
    """Positions as ``generate`` builds them: ``[4, B, S]`` (a text row plus the 3 M-RoPE rows) for M-RoPE
    families, ``[B, S]`` (the mask's cumulative sum) for 1-D RoPE families (LLaVA)."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    vlm = model.model
    if not hasattr(vlm, "get_rope_index"):  # 1-D RoPE
        return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    rope, _ = vlm.get_rope_index(
        ids,
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        second_per_grid_ts=inputs.get("second_per_grid_ts"),
        attention_mask=mask,
    )
    text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return torch.cat([text[None], rope], dim=0)


def dropped_mask(inputs, visual_token_ids, kept_positions) -> torch.Tensor:
    """The prompt's 2-D mask with every visual token not in ``kept_positions[row]`` zeroed."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.clone()
    visual = torch.isin(ids, torch.tensor(visual_token_ids))
    for row in range(ids.shape[0]):
        drop = visual[row].clone()
        drop[kept_positions[row]] = False
        mask[row, drop] = 0
    return mask


@torch.no_grad()
def masked_decode_logits(model, inputs, kept_positions, new_tokens, visual_token_ids) -> list[torch.Tensor]:
    """Oracle 2: full cache, dropped positions zeroed in the mask, same positions.

    The prefill sees every token (as the pruned run's prefill does); from the first decode step on, the
    mask zeroes the dropped visual tokens. ``new_tokens`` ``(B, T)`` are fed one by one (teacher forcing
    with the pruned run's own tokens). Returns the ``T`` per-step next-token logits ``(B, V)``.
    """
    positions = full_positions(model, inputs)
    cache = DynamicCache(config=model.config)
    out = model(**inputs, position_ids=positions, past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1].float()]
    mask = dropped_mask(inputs, visual_token_ids, kept_positions)
    last = positions[..., -1:]
    for step in range(new_tokens.shape[1] - 1):
        last = last + 1
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(
            input_ids=new_tokens[:, step : step + 1],
            attention_mask=mask,
            position_ids=last,
            past_key_values=cache,
            use_cache=True,
        )
        logits.append(out.logits[:, -1].float())
    return logits


@torch.no_grad()
def eager_rater_scores(eager_model, inputs, image_token_ids, layer: int = 2) -> list[torch.Tensor]:
    """Oracle 4: SparseVLM scores from ``output_attentions=True`` of an eager model at ``layer``.

    Raters re-derived here from the decoder input embeddings (hidden state 0), independently of the
    library: text tokens after the last visual token whose mean (over visual rows) softmax relevance is
    strictly above the mean; all of them if none is.
    """
    out = eager_model(**inputs, output_attentions=True, output_hidden_states=True)
    attn = out.attentions[layer].float()  # (B, H, S, S)
    embeds = out.hidden_states[0].float()
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    scores = []
    for row in range(ids.shape[0]):
        visual = torch.nonzero(torch.isin(ids[row], torch.tensor(image_token_ids)) & (mask[row] == 1)).flatten()
        after = torch.arange(ids.shape[1]) > visual.max()
        text = torch.nonzero(after & (mask[row] == 1)).flatten()
        relevance = torch.softmax(embeds[row, visual] @ embeds[row, text].T, dim=-1).mean(0)
        raters = text[relevance > relevance.mean()]
        if raters.numel() == 0:
            raters = text
        scores.append(attn[row][:, raters][:, :, visual].mean(dim=(0, 1)))
    return scores


@torch.no_grad()
def masked_full_cache(model, inputs, kept_positions, visual_token_ids):
    """Prefill a plain cache with every token; return ``(cache, decode mask, last positions, first logits)``."""
    positions = full_positions(model, inputs)
    cache = DynamicCache(config=model.config)
    out = model(**inputs, position_ids=positions, past_key_values=cache, use_cache=True)
    mask = dropped_mask(inputs, visual_token_ids, kept_positions)
    return cache, mask, positions[..., -1:], out.logits[:, -1].float()


@torch.no_grad()
def feed(model, cache, mask, last, tokens):
    """Feed ``tokens`` ``(B, n)`` at the next positions over a full cache with ``mask``; all-step logits."""
    n = tokens.shape[1]
    positions = last + torch.arange(1, n + 1).view(*[1] * (last.ndim - 1), -1)
    mask = torch.cat([mask, mask.new_ones(mask.shape[0], n)], dim=1)
    out = model(input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    return out.logits.float(), mask, positions[..., -1:]


@torch.no_grad()
def teacher_forced_logprob(model, inputs, kept_positions, continuations, visual_token_ids):
    """Sum of log-probabilities of each row's ``continuations`` under oracle 2 (beam scores)."""
    cache, mask, last, first = masked_full_cache(model, inputs, kept_positions, visual_token_ids)
    logits, _, _ = feed(model, cache, mask, last, continuations[:, :-1])
    all_logits = torch.cat([first[:, None], logits], dim=1)
    logprobs = torch.log_softmax(all_logits, dim=-1)
    return logprobs.gather(-1, continuations[..., None]).squeeze(-1).sum(-1)


def _attention_mask(allowed: torch.Tensor, model, dtype) -> torch.Tensor:
    """A boolean ``(B, 1, Q, K)`` mask in the format of the model's attention implementation."""
    if model.config.text_config._attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def _gather_rope(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    axis = table.ndim - 2  # (B, S, d) or, on transformers 5.14, (3, B, S, d)
    if table.ndim == 4:
        index = index.unsqueeze(0).expand(table.shape[0], -1, -1)
    return table.gather(axis, index.unsqueeze(-1).expand(*index.shape, table.shape[-1]))


@torch.no_grad()
def in_prefill_reference_logits(model, inputs, stages, new_tokens, visual_token_ids, recycled=None):
    """Oracle 5, built by hand from the model's own modules (no library code).

    ``stages`` is ``[(layer, kept_positions_per_row), ...]``: layers up to the first pruning layer run on
    every token; after each pruning layer only that stage's kept visual tokens and all text go on (each
    row's tokens in original order, rows left-padded), with their original positions. At the end every
    layer's cache keeps the last stage's set; decode steps attend, at every layer, to those tokens and
    earlier decoded ones. Returns the per-step next-token logits for ``new_tokens`` (teacher forcing).

    ``recycled`` (per row, ``[(representative, members), ...]``, as the cache reports its clusters): after
    the last pruning layer, each group becomes one token right after the last kept token of its image,
    with the mean hidden state of its members at the representative's position; layers that ran before
    it hold the mean of the members' keys and values.
    """
    text_model = model.model.language_model
    layers = text_model.layers
    ids = inputs["input_ids"]
    batch, seq = ids.shape
    valid = inputs.get("attention_mask", torch.ones_like(ids)).bool()
    positions = full_positions(model, inputs)
    captured = {}

    def capture(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]
        captured["deepstack"] = kwargs.get("deepstack_visual_embeds")  # Qwen3-VL: features added after layers 0..
        captured["deepstack_mask"] = kwargs.get("visual_pos_masks")

    handle = text_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model(**inputs, position_ids=positions)
    finally:
        handle.remove()
    hidden = captured["embeds"]
    dtype = hidden.dtype
    deepstack, deepstack_mask = captured["deepstack"], captured["deepstack_mask"]
    if deepstack is not None:  # row-major rank of each visual token among the features' rows
        deepstack_rank = torch.cumsum(deepstack_mask.flatten().long(), 0).view_as(deepstack_mask) - 1

    def add_deepstack(hidden, layer, current, current_valid):
        """Qwen3-VL adds DeepStack features to the visual tokens after its first layers (to the ones computed)."""
        if deepstack is None or layer >= len(deepstack):
            return hidden
        hidden = hidden.clone()
        for row in range(hidden.shape[0]):
            for slot in range(hidden.shape[1]):
                token = int(current[row, slot])
                if current_valid[row, slot] and deepstack_mask[row, token]:
                    hidden[row, slot] += deepstack[layer][deepstack_rank[row, token]].to(hidden.dtype)
        return hidden
    rope_positions = positions[1:] if positions.ndim == 3 else positions  # M-RoPE rows, or the 1-D positions
    cos, sin = text_model.rotary_emb(hidden, rope_positions)

    def causal(valid_cols, past_valid=None):
        q = valid_cols.shape[1]
        allowed = torch.ones(q, q, dtype=torch.bool).tril()[None] & valid_cols[:, None, :]
        allowed |= torch.eye(q, dtype=torch.bool)[None] & ~valid_cols[:, :, None]
        if past_valid is not None:
            allowed = torch.cat([past_valid[:, None, :].expand(-1, q, -1), allowed], -1)
        return allowed[:, None]

    caches = [DynamicCache(config=model.config) for _ in layers]
    visual = torch.isin(ids, torch.tensor(visual_token_ids))
    current = torch.arange(seq).expand(batch, -1)  # token behind each slot
    current_valid = valid
    rope = (cos, sin)
    mask = _attention_mask(causal(valid), model, dtype)
    layer_slots = []  # per layer: token behind each of its cache slots, and validity
    boundaries = [layer for layer, _ in stages] + [len(layers) - 1]
    start = 0
    for stage in range(len(boundaries)):
        for i in range(start, boundaries[stage] + 1):
            hidden = layers[i](hidden, attention_mask=mask, position_embeddings=rope, position_ids=None,
                               past_key_values=caches[i], use_cache=True)
            hidden = add_deepstack(hidden, i, current, current_valid)
            layer_slots.append((current, current_valid))
        start = boundaries[stage] + 1
        if stage == len(stages):
            break
        kept_positions = stages[stage][1]
        keep = current_valid.clone()
        for row in range(batch):
            is_dropped_visual = visual[row, current[row]] & ~torch.isin(current[row], kept_positions[row])
            keep[row] &= ~is_dropped_visual
        last_stage = stage == len(stages) - 1
        run = torch.cumsum((visual & ~torch.nn.functional.pad(visual, (1, 0))[:, :-1]).long(), 1)  # image id
        rows = []  # per row: (slot or None, token behind it, members if recycled)
        for row in range(batch):
            entries = []
            kept_cols = torch.nonzero(keep[row]).flatten().tolist()
            for col in kept_cols:
                token = int(current[row, col])
                entries.append((col, token, None))
                if last_stage and recycled and visual[row, token]:
                    later = [c for c in kept_cols if c > col and visual[row, int(current[row, c])]
                             and run[row, int(current[row, c])] == run[row, token]]
                    if not later:  # last kept token of its image: its recycled tokens follow
                        for representative, members in recycled[row]:
                            if run[row, representative] == run[row, token]:
                                entries.append((None, int(representative), members))
            rows.append(entries)
        width = max(len(e) for e in rows)
        new_hidden = torch.zeros(batch, width, hidden.shape[-1], dtype=hidden.dtype)
        new_current = torch.zeros(batch, width, dtype=torch.long)
        new_valid = torch.zeros(batch, width, dtype=torch.bool)
        recycled_slots = []
        for row, entries in enumerate(rows):
            offset = width - len(entries)
            for j, (col, token, members) in enumerate(entries):
                if col is None:
                    member_cols = torch.nonzero(torch.isin(current[row], members) & current_valid[row]).flatten()
                    new_hidden[row, offset + j] = hidden[row, member_cols].float().mean(0).to(hidden.dtype)
                    recycled_slots.append((row, offset + j, members))
                else:
                    new_hidden[row, offset + j] = hidden[row, col]
                new_current[row, offset + j] = token
                new_valid[row, offset + j] = True
        hidden = new_hidden
        current, current_valid = new_current, new_valid
        rope = (_gather_rope(cos, current), _gather_rope(sin, current))
        mask = _attention_mask(causal(current_valid), model, dtype)
    # every layer's cache keeps the last stage's tokens, in the final slot order
    for i, (slots, slots_valid) in enumerate(layer_slots):
        pick = torch.zeros(batch, current.shape[1], dtype=torch.long)
        for row in range(batch):
            where = {int(t): j for j, t in enumerate(slots[row].tolist()) if slots_valid[row, j]}
            pick[row] = torch.tensor([where.get(int(t), 0) for t in current[row].tolist()])
        for name in ("keys", "values"):
            t = getattr(caches[i].layers[i], name)
            gathered = t.gather(2, pick[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))
            if i <= stages[-1][0]:  # recycled tokens did not exist in this layer: mean of their members
                for row, slot, members in (recycled_slots if recycled else []):
                    member_slots = [j for j, tok in enumerate(slots[row].tolist())
                                    if slots_valid[row, j] and tok in set(members.tolist())]
                    gathered[row, :, slot] = t[row, :, member_slots].mean(-2)
            setattr(caches[i].layers[i], name, gathered)
    kept_valid = current_valid
    logits = [model.lm_head(text_model.norm(hidden))[:, -1].float()]
    past_valid = kept_valid
    last = rope_positions[..., -1:]
    for step in range(new_tokens.shape[1] - 1):
        last = last + 1
        hidden = text_model.embed_tokens(new_tokens[:, step : step + 1])
        rope = text_model.rotary_emb(hidden, last)
        mask = _attention_mask(causal(torch.ones(batch, 1, dtype=torch.bool), past_valid), model, dtype)
        for i, layer in enumerate(layers):
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rope, position_ids=None,
                           past_key_values=caches[i], use_cache=True)
        past_valid = torch.cat([past_valid, torch.ones(batch, 1, dtype=torch.bool)], 1)
        logits.append(model.lm_head(text_model.norm(hidden))[:, -1].float())
    return logits


# --------------------------------------------------------------------------- did pruning happen at all?


_family_models: dict = {}
_family_inputs: dict = {}


def family_model(family: str, attn: str = "sdpa"):
    """The tiny random-weight model of ``family`` (seed 0), built once per session."""
    if (family, attn) not in _family_models:
        _family_models[family, attn] = testing.tiny_vlm_model(family, seed=0, attn_implementation=attn)
    return _family_models[family, attn]


def family_inputs(family: str, kind: str):
    """Inputs for ``family``'s processor, built once per session. ``batch``: left padding, different images and
    lengths, two images in the second row; ``single``: one image."""
    key = (family, kind)
    if key not in _family_inputs:
        processor = testing.tiny_family_processor(family)
        if kind == "batch":
            _family_inputs[key] = testing.make_inputs(
                processor,
                ["what colour is the square on the left?", "compare the two pictures."],
                [[testing.synthetic_image(224, 168, seed=1)],
                 [testing.synthetic_image(112, 112, seed=2), testing.synthetic_image(112, 168, seed=3)]],
            )
        else:
            _family_inputs[key] = testing.make_inputs(processor, ["describe the image."],
                                                      [[testing.synthetic_image(168, 112, seed=4)]])
    return _family_inputs[key]


LATER_TURN_TEXT = ("<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>and this one?<|im_end|>\n"
                   "<|im_start|>assistant\n")


def later_turn_with_image(model, processor, first_inputs, sequences, cache, steps: int, image):
    """A Qwen conversation's turn 2 bringing ``image`` onto ``cache`` after turn 1 (``first_inputs`` answered by
    ``sequences``), run by hand with explicit M-RoPE positions over the whole conversation (transformers' generate
    cannot position a new image on a continued cache): the prefill of turn 2, then ``steps - 1`` greedy steps.

    Returns a dict: ``got`` (per step ``(B, vocab)`` float logits), ``tokens`` (the greedy tokens fed after the
    prefill), ``full_ids``, ``positions`` (``(4, B, L)``: text row + 3 M-RoPE rows), ``fed`` (the slice of the
    conversation turn 2's prefill feeds: the last answer token and the turn) and ``turn_inputs`` (its model inputs
    without positions or cache), for an oracle to replay."""
    turn = processor(text=[LATER_TURN_TEXT], images=[image], return_tensors="pt")
    prompt_len = first_inputs["input_ids"].shape[1]
    full_ids = torch.cat([sequences, turn["input_ids"]], 1)
    types1 = torch.cat([first_inputs["mm_token_type_ids"], torch.zeros_like(sequences[:, prompt_len:])], 1)
    full_types = torch.cat([types1, turn["mm_token_type_ids"]], 1)
    grids = torch.cat([first_inputs["image_grid_thw"], turn["image_grid_thw"]])
    rope, _ = model.model.get_rope_index(full_ids, mm_token_type_ids=full_types, image_grid_thw=grids)
    positions = torch.cat([rope[:1], rope], 0)  # text row (unused for masks with a cache) + 3 M-RoPE rows
    fed = slice(sequences.shape[1] - 1, full_ids.shape[1])  # the last answer token was never fed
    turn_inputs = dict(input_ids=full_ids[:, fed], pixel_values=turn["pixel_values"],
                       image_grid_thw=turn["image_grid_thw"], mm_token_type_ids=full_types[:, fed])
    with torch.no_grad():
        out = model(**turn_inputs, position_ids=positions[..., fed], past_key_values=cache, use_cache=True)
        got = [out.logits[:, -1].float()]
        last = positions[..., -1:]
        tokens = []
        for _ in range(steps - 1):
            tokens.append(got[-1].argmax(-1, keepdim=True))
            last = last + 1
            out = model(input_ids=tokens[-1], position_ids=last, past_key_values=cache, use_cache=True)
            got.append(out.logits[:, -1].float())
    return dict(got=got, tokens=tokens, full_ids=full_ids, positions=positions, fed=fed, turn_inputs=turn_inputs)


def visual_ids(model) -> tuple[int, ...]:
    """The model's image (and video, where it has one) placeholder token ids."""
    ids = (model.config.image_token_id, getattr(model.config, "video_token_id", None))
    return tuple(i for i in ids if i is not None)


def visual_positions(inputs, visual_token_ids) -> list[torch.Tensor]:
    """Per row of ``inputs``, the positions of its (unpadded) visual tokens, ascending."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    visual = torch.isin(ids, torch.tensor(visual_token_ids)) & (mask == 1)
    return [torch.nonzero(visual[row]).flatten() for row in range(ids.shape[0])]


def _row_layout(inputs, visual_token_ids, expand):
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    visual = visual_positions(inputs, visual_token_ids)
    rows = [visual[r // expand] for r in range(ids.shape[0] * expand)]
    valid = [int(mask[r // expand].sum()) for r in range(ids.shape[0] * expand)]
    return rows, valid, ids.shape[1]


def _check_hooks_ran(cache, rows, what):
    batch = len(rows)
    assert len(cache.visual_scores) == batch, (
        f"{what}: cache.visual_scores has {len(cache.visual_scores)} rows, expected {batch} (batch size after "
        "beam expansion): the scoring hooks did not run"
    )
    assert len(cache.kept_visual_positions) == batch, (
        f"{what}: cache.kept_visual_positions has {len(cache.kept_visual_positions)} rows, expected {batch}"
    )
    for row, visual in enumerate(rows):
        scores, kept = cache.visual_scores[row], cache.kept_visual_positions[row]
        assert scores.numel() == visual.numel(), (
            f"{what}: row {row} has {scores.numel()} visual scores for {visual.numel()} visual tokens"
        )
        assert torch.isfinite(scores).all(), f"{what}: row {row} has non-finite visual scores"
        kept = kept.cpu()
        assert torch.all(kept[1:] > kept[:-1]), f"{what}: row {row} kept positions are not strictly ascending"
        assert torch.isin(kept, visual).all(), f"{what}: row {row} kept positions that are not its visual tokens"


def _check_lengths(cache, rows, valid, width, kept_counts, extra, what):
    stored = [v - len(vis) + k + e for v, vis, k, e in zip(valid, rows, kept_counts, extra)]
    dropped = width - max(stored)
    logical, physical = cache.get_seq_length(), cache.get_physical_length()
    assert logical - physical == dropped, (
        f"{what}: logical length {logical} - physical length {physical} = {logical - physical}, expected {dropped} "
        f"(prompt width {width}, entries per row after compaction {stored})"
    )


def assert_pruned(cache, inputs, visual_token_ids, *, expand=1, extra=None, kept_counts=None):
    """Fail unless the last call on ``cache`` (after the prompt ``inputs``) really pruned.

    Checks, with a message saying which part of the pipeline did not run:

    - ``cache.visual_scores`` and ``cache.kept_visual_positions`` have one entry per row (``expand``: rows per
      prompt row, e.g. ``num_beams``), each row one finite score per visual token;
    - every row with visual tokens kept at least one and fewer than all of them (strictly ascending positions
      among its own visual tokens); ``kept_counts`` (per row), if given, the exact numbers;
    - the cache really dropped them: ``get_seq_length() - get_physical_length()`` equals the prompt width minus
      the widest row after compaction (text + kept visual + ``extra[row]`` entries, e.g. recycled tokens);
      so ``get_physical_length() < get_seq_length()`` whenever the widest compacted row is narrower than the
      prompt.

    A library that prunes nothing fails here, before any comparison with an oracle.
    """
    rows, valid, width = _row_layout(inputs, visual_token_ids, expand)
    what = "nothing was pruned"
    _check_hooks_ran(cache, rows, what)
    counts = [int(k.numel()) for k in cache.kept_visual_positions]
    assert any(v.numel() for v in rows), "assert_pruned: the prompt has no visual tokens"
    for row, visual in enumerate(rows):
        if visual.numel():
            assert 0 < counts[row] < visual.numel(), (
                f"{what}: row {row} kept {counts[row]} of its {visual.numel()} visual tokens"
            )
        else:
            assert counts[row] == 0, f"row {row} has no visual tokens but kept {counts[row]}"
    if kept_counts is not None:
        assert counts == list(kept_counts), f"kept counts per row {counts}, expected {list(kept_counts)}"
    extra = [0] * len(rows) if extra is None else list(extra)
    _check_lengths(cache, rows, valid, width, counts, extra, "the cache was not compacted to the kept tokens")
    return counts


def assert_not_pruned(cache, inputs, visual_token_ids, *, expand=1):
    """Fail unless the last call ran the hooks (one finite score per visual token) but kept every visual token.

    For identity tests (``keep_ratio=1.0`` with images): a library whose hooks never run fails too.
    """
    rows, valid, width = _row_layout(inputs, visual_token_ids, expand)
    assert any(v.numel() for v in rows), "assert_not_pruned: the prompt has no visual tokens"
    what = "hooks did not run"
    _check_hooks_ran(cache, rows, what)
    for row, visual in enumerate(rows):
        kept = cache.kept_visual_positions[row].cpu()
        assert torch.equal(kept, visual), f"row {row} kept {kept.numel()} of its {visual.numel()} visual tokens"
    _check_lengths(cache, rows, valid, width, [v.numel() for v in rows], [0] * len(rows), "something was dropped")
