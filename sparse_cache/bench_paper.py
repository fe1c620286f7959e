"""The benchmark at SparseVLM's published setting: absolute visual-token budgets, the progressive schedule and the
paper's reported reductions next to the measured ones (used by :mod:`sparse_cache.bench`).

    sparse-cache-bench --model llava-1.5-7b --keep-tokens 192,128,64 --mode in-prefill --schedule sparsevlm

``--keep-tokens 192,128,64`` budgets each image in visual tokens (the paper's 192 / 128 / 64 of LLaVA-1.5's 576).
With ``--schedule sparsevlm`` (in-prefill) a budget is the layer-average of the visual tokens computed, as the
authors' 300/200/110-style stages are: the stages are those of ``PrunableDynamicCache(schedule="sparsevlm",
keep_ratio=tokens / visual tokens)``, i.e. layers 2/6/15 of 32 scaled to the model's depth.

``--layers N`` / ``--vision-layers N`` build a preset with fewer decoder / vision layers at its published width:
not the published model (recorded as such in the results), but the same per-layer shapes, so that the prefill
FLOPs model can be checked against measured time on a CPU where the 32-layer float32 model does not fit.
"""

from __future__ import annotations

import argparse
import re

from . import presets
from .select import budget

#: SparseVLM (ICML 2025) on LLaVA-1.5-7B, 576 visual tokens pruned to 192: prefill FLOPs and CUDA latency, as
#: reported (see docs/benchmarks.md for the source). Only the 192-token point is reported for both.
PAPER_REPORTED = {
    192: {"flops_t": (4.62, 2.14), "latency_ms": (57.82, 36.50)},
}
PAPER_SOURCE = "SparseVLM (ICML 2025), LLaVA-1.5-7B, 576 visual tokens"
SCHEDULES = ("sparsevlm",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep-tokens", default=None,
                        help="comma-separated visual-token budgets per image, e.g. 192,128,64 (the paper's setting on "
                             "llava-1.5-7b's 576); measured next to --keep-ratios")
    parser.add_argument("--schedule", default=None, choices=list(SCHEDULES),
                        help="in-prefill progressive schedule: the authors' layers 2/6/15 of 32 scaled to depth, "
                             "budgets the layer-average of the visual tokens computed (needs --mode in-prefill)")
    parser.add_argument("--layers", type=int, default=None,
                        help="preset only: build it with this many decoder layers at its published width (NOT the "
                             "published model: validates the FLOPs model where the full depth does not fit)")
    parser.add_argument("--vision-layers", type=int, default=None,
                        help="preset only: this many vision-tower layers (the tower is outside the prefill time)")


def parse_keep_tokens(text: str | None) -> tuple[int, ...]:
    if text is None:
        return ()
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items or not all(re.fullmatch(r"\d+", item) and int(item) >= 1 for item in items):
        raise ValueError(f"keep_tokens: {text!r} is not a comma-separated list of ints >= 1, e.g. 192,128,64")
    return tuple(int(item) for item in items)


def validate_settings(settings) -> None:
    """``ValueError`` naming the argument for bad keep_tokens / schedule / depth overrides."""
    tokens = tuple(settings.keep_tokens or ())
    for value in tokens:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"keep_tokens: {value!r} is not valid; give ints >= 1, e.g. 192,128,64")
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"keep_tokens: {list(tokens)} repeats a value; give each budget once")
    if settings.schedule is not None:
        if settings.schedule not in SCHEDULES:
            raise ValueError(f"schedule: {settings.schedule!r} is not valid; valid schedules are {list(SCHEDULES)}")
        if settings.mode != "in-prefill":
            raise ValueError(f"schedule: {settings.schedule!r} prunes inside the prefill; it needs mode 'in-prefill', "
                             f"got {settings.mode!r}")
    for name in ("layers", "vision_layers"):
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {value!r} is not valid; give an int >= 1")
        if settings.model not in presets.PRESETS:
            raise ValueError(f"{name}: overrides the depth of a preset; {settings.model!r} is not one "
                             f"(presets: {', '.join(sorted(presets.PRESETS))})")


def depth_overrides(settings) -> dict:
    """Config overrides of ``--layers`` / ``--vision-layers`` for the preset of ``settings`` (empty if none)."""
    out = {}
    if settings.layers is not None:
        out["num_hidden_layers"] = settings.layers
    if settings.vision_layers is not None:
        vision = presets.preset_config(settings.model).vision_config
        out["vision_depth" if hasattr(vision, "depth") else "vision_num_hidden_layers"] = settings.vision_layers
    return out


def preset_cases(args: argparse.Namespace, cases: list) -> list:
    """A preset whose processor fixes the visual tokens by the image (LLaVA) is run on its own image size unless
    ``--image-size`` is given; ``--visual-tokens`` / ``--cases`` cannot choose its token count."""
    preset = presets.PRESETS.get(args.model)
    if preset is None or preset.image_size is None:
        return cases
    width, height = preset.image_size
    if "visual_tokens" in args or "cases" in args:
        raise ValueError(
            f"visual_tokens: preset {args.model}'s processor fixes its visual tokens by the image size; pass "
            f"--image-size WIDTHxHEIGHT instead (default {width}x{height})"
        )
    if "image_size" in args:
        return cases
    return [(None, args.batch_size, preset.image_size)]


def token_configs(config_class, settings, modes, visual_tokens: int) -> list:
    """One configuration per ``keep_tokens`` budget and mode (``keep_ratio``: its share of the visual tokens)."""
    return [
        config_class(f"keep={t} tokens" if len(modes) == 1 else f"{mode} keep={t} tokens",
                     min(1.0, t / visual_tokens), mode, keep_tokens=t)
        for mode in modes
        for t in settings.keep_tokens
    ]


def cache_budget(config, settings) -> dict:
    """``PrunableDynamicCache`` keywords of a configuration's budget and schedule."""
    scheduled = settings.schedule is not None and config.mode == "in-prefill"
    tokens = getattr(config, "keep_tokens", None)
    out: dict = {"schedule": settings.schedule} if scheduled else {}
    if tokens is not None:
        if scheduled:  # the schedule's budget is a layer-average share of each image's visual tokens
            out["keep_ratio"] = config.keep_ratio
        else:
            out.update(keep_ratio=None, keep_tokens=tokens)
    return out


def schedule_tokens_per_layer(schedule, layers: int, total: int, visual: int) -> list[int]:
    """Tokens (per row) each decoder layer computes under ``schedule`` ``[(layer, keep ratio after it), ...]``: a
    stage's layer runs on the tokens before it, the layers after it on its budget."""
    out = []
    for layer in range(layers):
        ratio = 1.0
        for stage_layer, stage_ratio in schedule:
            if stage_layer < layer:
                ratio = stage_ratio
        out.append(total - visual + budget(visual, ratio, None))
    return out


def comparison_lines(result) -> list[str]:
    """Markdown lines comparing the budgets of ``--keep-tokens`` with the paper's reported reductions."""
    rows = [r for r in result.rows if r.get("keep_tokens") is not None]
    if not rows:
        return []
    base = result.rows[0]
    lines = [
        f"Paper's setting ({PAPER_SOURCE}; paper: prefill FLOPs and CUDA latency as reported, ratio = pruned / "
        "unpruned; here: the FLOPs model and the measured prefill of this run, same ratio):",
        "",
        "| config | kept visual/row | stages (layer: visual tokens after it) | FLOPs model (TFLOPs) | measured prefill "
        "| measured/model | paper FLOPs | paper latency | FLOPs + weights model | measured/that |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    visual = result.settings.get("visual_tokens_per_row") or 0
    base_tflops = base.get("prefill_tflops_model") or 0.0
    for row in rows:
        stages = row.get("schedule")
        stage_text = ", ".join(f"{layer}: {budget(visual, ratio, None)}" for layer, ratio in stages) if stages else (
            f"{row.get('scoring_layer')}: {row['kept_visual_per_row']}" if row.get("mode") == "in-prefill"
            else "after the prefill")
        paper = PAPER_REPORTED.get(row["keep_tokens"]) if visual == 576 else None
        flops = row.get("flops_model_prefill_vs_base")
        tflops = row.get("prefill_tflops_model")
        measured = row.get("prefill_vs_base")
        over = row.get("prefill_measured_over_flops_model")
        roofline = flops_and_weights_ratio(result, row)
        lines.append(
            f"| {row['config']} | {row['kept_visual_per_row']} | {stage_text} "
            f"| {'n/a' if flops is None else f'x{flops:.3f}'}"
            f"{'' if tflops is None else f' ({tflops:.3g} of {base_tflops:.3g})'} "
            f"| {'n/a' if measured is None else f'x{measured:.3f}'} | {'n/a' if over is None else f'{over:.3f}'} "
            f"| {'-' if paper is None else _paper_ratio(paper['flops_t'], 'T')} "
            f"| {'-' if paper is None else _paper_ratio(paper['latency_ms'], ' ms')} "
            f"| {'n/a' if roofline is None else f'x{roofline:.3f}'} "
            f"| {'n/a' if roofline is None or measured is None else f'{measured / roofline:.3f}'} |"
        )
    lines += [
        "",
        "FLOPs here count a multiply-add as 2 and cover the decoder layers only (no vision tower, no lm_head); the "
        "paper's absolute numbers follow its own convention, so compare the ratios. The paper's latency is CUDA "
        "on its GPU; the measured ratio is this run's. The FLOPs + weights model adds what the FLOPs model leaves "
        "out at small budgets: each forward reads every decoder weight once whatever the token count (that time, "
        "weights / bandwidth, is taken from the baseline's decode step in this run, the rest of the baseline's "
        "prefill is compute, scaled by the FLOPs ratio).",
        "",
    ]
    return lines


def flops_and_weights_ratio(result, row) -> float | None:
    """Prefill ratio predicted by compute (the FLOPs ratio) plus one pass over the weights per forward.

    Both rates come from the baseline of the same run: the baseline's decode step reads the weights and its KV
    cache once (the bytes model), which gives the weights' share of a step, ``weights_s = decode_s * W / (W + KV)``;
    the rest of the baseline's prefill, ``prefill_s - weights_s``, is compute and scales with the FLOPs ratio:
    ``(flops_ratio * (prefill_s - weights_s) + weights_s) / prefill_s``. ``None`` when a figure is missing.
    """
    base = result.rows[0]
    weights = result.settings.get("decode_weight_bytes")
    decode_s, kv_bytes = base.get("decode_per_token_s"), base.get("kv_bytes_decode_avg")
    prefill_s, flops = base.get("prefill_s"), row.get("flops_model_prefill_vs_base")
    if None in (weights, decode_s, kv_bytes, prefill_s, flops) or not prefill_s or not weights:
        return None
    weights_s = min(decode_s * weights / (weights + kv_bytes), prefill_s)
    return (flops * (prefill_s - weights_s) + weights_s) / prefill_s


def _paper_ratio(pair: tuple[float, float], unit: str) -> str:
    before, after = pair
    return f"x{after / before:.3f} ({before:g}{unit} -> {after:g}{unit})"
