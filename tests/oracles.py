"""Reference computations the tests compare the pruned cache against (see docs/oracles.md).

They use only the model's own public forward with a plain ``DynamicCache``, never the library.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

GREEDY = dict(do_sample=False, return_dict_in_generate=True, output_logits=True)


def full_positions(model, inputs) -> torch.Tensor:
    """``[4, B, S]`` positions as ``generate`` builds them: a text row plus the 3 M-RoPE rows."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    vlm = model.model
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
def eager_rater_scores(eager_model, inputs, image_token_ids) -> list[torch.Tensor]:
    """Oracle 4: SparseVLM scores from ``output_attentions=True`` of an eager model (layer 2).

    Raters re-derived here from the decoder input embeddings (hidden state 0), independently of the
    library: text tokens after the last visual token whose mean (over visual rows) softmax relevance is
    strictly above the mean; all of them if none is.
    """
    out = eager_model(**inputs, output_attentions=True, output_hidden_states=True)
    attn = out.attentions[2].float()  # (B, H, S, S)
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
    positions = last + torch.arange(1, n + 1).view(1, 1, -1)
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
