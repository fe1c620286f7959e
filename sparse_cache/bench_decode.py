"""What one decode step costs: the pruned cache against plain ``DynamicCache``, eager and compiled.

    python -m sparse_cache.bench_decode --model small --visual-tokens 16320 --keep-ratios 1.0,0.25 --steps 16
    python -m sparse_cache.bench_decode --model qwen2.5-vl-7b --device cuda --visual-tokens 16320 --steps 64

For each configuration (``baseline``: transformers' ``DynamicCache`` with the library's hooks removed; ``keep=r``:
a :class:`~sparse_cache.PrunableDynamicCache`) the prompt (one synthetic image, batch ``--batch-size``) is
prefilled once by ``generate(..., max_new_tokens=1)``, then the same greedy decode steps are run by hand, each
step one forward of one token per row with explicit logical positions:

* **dynamic**: the cache itself (``DynamicCache.update`` concatenates each layer's keys and values: O(length) per
  step, in transformers, for both); per step the median time, the number of aten ops of the whole forward
  (model + library hooks, a ``TorchDispatchMode`` over one step) and the host syncs among them
  (``aten._local_scalar_dense``). The pruned cache's extra ops are the library's per-step work;
* **torch.cat update** (every pruning configuration): after those steps the same cache is handed back to transformers' own
  ``DynamicLayer.update`` (its spare-capacity buffers dropped, :mod:`sparse_cache.spare`) and timed again;
* **static eager** / **static compiled** (pruned configurations only, ``keep=1`` being the unpruned control):
  the cache converted by :func:`sparse_cache.static_cache.to_static` (fixed-shape buffers of the physical length
  plus the steps), its step run as is and under ``torch.compile`` (``--compile-backend``, default inductor); the
  compile time and the number of graphs dynamo built (1: no recompile per step) are recorded.

Times: ``--clock wall`` (``perf_counter``; CUDA steps are synchronised) or ``process`` (CPU time of the process).
Output: a markdown table on stdout, ``NAME-decode.json`` in ``--out-dir``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shlex
import statistics
import sys
import time
from typing import Sequence

import torch

from . import bench, presets, testing
from ._compat import CACHE_KWARG
from .static_cache import row_major

logger = logging.getLogger(__name__)


class _OpCounter:
    """Counts aten ops (and host syncs) while active: a ``TorchDispatchMode`` entered around one forward."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.ops += 1
                if "_local_scalar_dense" in str(func):
                    counter.syncs += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.ops = self.syncs = 0


def _positions(adapter, deltas, logical: int, batch: int, device) -> torch.Tensor:
    if deltas is None:
        deltas = torch.zeros(batch, 1, dtype=torch.long, device=device)
    return adapter.continuation_positions(deltas.to(device), logical, 1, None, device).clone()


def _timed_steps(step, tokens, positions, steps: int, clock, cuda: bool):
    """Greedy steps; per-step seconds; ``positions`` advanced in place."""
    times = []
    with torch.no_grad():
        for _ in range(steps):
            if cuda:
                torch.cuda.synchronize()
            start = clock()
            logits = step(row_major(tokens), positions.clone())
            if cuda:
                torch.cuda.synchronize()
            times.append(clock() - start)
            tokens = logits.argmax(-1, keepdim=True)
            positions.add_(1)
    return times, tokens


def run_decode_benchmark(model, processor, settings: bench.BenchSettings, steps: int, *, compile_backend="inductor",
                         image_size=None, static=True) -> dict:
    from torch._dynamo.utils import counters
    from transformers import DynamicCache

    from .cache import PrunableDynamicCache
    from .hooks import uninstall
    from .models import adapter_for
    from .static_cache import to_static

    settings.validate()
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    clock = time.process_time if settings.clock == "process" else time.perf_counter
    adapter = adapter_for(model)
    patch, merge = bench._processor_factor(processor)
    if image_size is None:
        image_size = settings.image_size or bench.image_size_for_visual_tokens(settings.visual_tokens, patch, merge)
    inputs = bench.build_inputs(processor, image_size, settings.batch_size, settings.prompt, settings.seed).to(device)
    if settings.batch_size > 1:
        raise ValueError("batch_size: the decode-step benchmark runs one row (no padding); use --batch-size 1")
    sequence_length = int(inputs["input_ids"].shape[1])
    rows = []
    configs = [None] + [float(r) for r in settings.keep_ratios]
    for keep in configs:
        label = bench.BASELINE if keep is None else f"keep={keep:g}"
        logger.info("%s: prefill of %d tokens", label, sequence_length)
        gc.collect()
        if keep is None:
            uninstall(model)
            cache = DynamicCache(config=model.config)
        else:
            cache = PrunableDynamicCache(model, keep_ratio=keep, scorer=settings.scorer, seed=settings.seed)
        with torch.no_grad():
            first = model.generate(**inputs, **{CACHE_KWARG: cache}, max_new_tokens=1, do_sample=False)
        tokens = first[:, -1:]
        logical = cache.get_seq_length()
        if keep is None:
            physical = logical
            deltas = getattr(adapter.vlm, "rope_deltas", None)  # set by this prefill: one conversation on the model
        else:
            physical = cache.get_physical_length()
            deltas = cache.rope_deltas
            if keep < 1 and not physical < logical:
                raise bench.NothingPrunedError(f"{label}: the cache kept all {logical} entries")
        row = {"config": label, "keep_ratio": keep, "logical_length": logical, "physical_length": physical}
        converted = []
        if static and keep is not None:
            converted = [to_static(cache, steps + 2) for _ in range(2)]  # eager, compiled (prefill state copied)

        def dynamic_step(ids, pos, cache=cache):
            return model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **{CACHE_KWARG: cache}).logits[:, -1, :]

        positions = _positions(adapter, deltas, logical, 1, device)
        times, tokens_after = _timed_steps(dynamic_step, tokens, positions, steps, clock, cuda)
        counter = _OpCounter()
        with torch.no_grad(), counter.mode:
            dynamic_step(row_major(tokens_after), positions.clone())
        row.update(dynamic_step_s=statistics.median(times[1:] or times), dynamic_steps=times,
                   ops_per_step=counter.ops, host_syncs_per_step=counter.syncs)
        if keep is not None:
            # the same cache with transformers' own update (torch.cat of each layer per step), for comparison
            cache.use_transformers_update()
            positions.add_(1)  # the counted step above
            times, tokens_cat = _timed_steps(dynamic_step, tokens_after, positions, steps, clock, cuda)
            counter = _OpCounter()
            with torch.no_grad(), counter.mode:
                dynamic_step(row_major(tokens_cat), positions.clone())
            row.update(dynamic_cat_step_s=statistics.median(times[1:] or times), dynamic_cat_steps=times,
                       ops_per_step_cat=counter.ops)
        for kind, st in zip(("static_eager", "static_compiled"), converted):
            step = st.step_function(model)
            compile_s = None
            if kind == "static_compiled":
                torch._dynamo.reset()
                counters.clear()
                step = torch.compile(step, backend=compile_backend, dynamic=False)
                start = time.perf_counter()
                with torch.no_grad():
                    step(row_major(tokens), st.positions.clone())  # the compile (and one step, written to slot P)
                compile_s = time.perf_counter() - start
                st.advance()
            else:
                with torch.no_grad():
                    step(row_major(tokens), st.positions.clone())  # one warm-up step, as for the compiled one
                st.advance()
            times, _ = _timed_steps(step, tokens, st.positions, steps, clock, cuda)
            row[f"{kind}_step_s"] = statistics.median(times[1:] or times)
            row[f"{kind}_steps"] = times
            if compile_s is not None:
                row["compile_s"] = compile_s
                row["compiled_graphs"] = int(counters["stats"]["unique_graphs"])
                torch._dynamo.reset()
        rows.append(row)
        del cache, converted
    base = rows[0]
    for row in rows:
        row["dynamic_vs_base"] = bench._ratio(row["dynamic_step_s"], base["dynamic_step_s"])
        row["extra_ops_vs_base"] = row["ops_per_step"] - base["ops_per_step"]
    environment = bench.collect_environment(device, next(model.parameters()).dtype, settings.attn_implementation)
    model_name = os.path.basename(os.path.normpath(settings.model))
    name = f"{model_name}-v{settings.visual_tokens}-s{steps}-{device.type}-{environment['dtype']}"
    name += ("-cputime" if settings.clock == "process" else "") + "-decode"
    return {"name": name, "environment": environment,
            "settings": {**bench.dataclasses.asdict(settings), "steps": steps, "sequence_length": sequence_length,
                         "image_size": list(image_size), "compile_backend": compile_backend}, "rows": rows}


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def run_paired_decode(model, processor, settings: bench.BenchSettings, rounds: int, *, image_size=None,
                      short_tokens: int | None = None) -> dict:
    """Decode steps of every configuration interleaved, one step each per round, and the bytes models.

    On a shared machine a step's time drifts by tens of percent over seconds (other tenants' memory traffic, clock
    changes), more than the differences measured; a configuration timed after another sees a different machine. Here
    every configuration is prefilled first, then each round runs one greedy step of each (snake order: reversed
    every other round), and a configuration's **paired ratio** is the median over rounds of its step time over the
    baseline's step of the same round (the first two rounds dropped: the first decode step of an uncompacted cache
    makes its buffer).

    Configurations: ``baseline``, transformers' ``DynamicCache`` on a copy of the model that never carried the
    library's hooks (exactly as without the library; the copy doubles the weights' memory); ``keep=r``, a :class:`~sparse_cache.PrunableDynamicCache`
    each, ``keep=1`` being the unpruned control; ``keep=1, short prompt``, the control on the same prompt with an
    image of ``short_tokens`` visual tokens (default: the smallest kept share of ``visual_tokens``), which with the
    control gives the per-step cost of a KV entry on unpruned caches.

    Two models of a step's time from the bytes it reads, neither fitted to a pruned run: the **bytes model**
    ``t_base * (W + KV(r)) / (W + KV(base))`` (the weights ``W`` and the KV cache read once, as in the end-to-end
    benchmark), and the **unpruned-length model** ``t_ctl + c * (P(r) - P(ctl))``, the line through the two unpruned
    controls (``c``: seconds per KV entry; ``P``: mean physical entries over the steps): what an unpruned cache of the
    pruned one's physical length costs. Its ``KV cost per byte / weights'`` is ``c`` against the weights' time per
    byte from the bytes model (1.0 when a KV byte costs what a weight byte does).
    """
    import copy

    from transformers import DynamicCache

    from .cache import PrunableDynamicCache
    from .hooks import uninstall
    from .models import adapter_for

    settings.validate()
    bench._positive_int("rounds", rounds)
    if settings.batch_size > 1:
        raise ValueError("batch_size: the decode-step benchmark runs one row (no padding); use --batch-size 1")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cuda = device.type == "cuda"
    clock = time.process_time if settings.clock == "process" else time.perf_counter
    patch, merge = bench._processor_factor(processor)
    if image_size is None:
        image_size = settings.image_size or bench.image_size_for_visual_tokens(settings.visual_tokens, patch, merge)
    keeps = [float(r) for r in settings.keep_ratios]
    if 1.0 not in keeps:
        keeps = [1.0] + keeps  # the unpruned control anchors the unpruned-length model
    if short_tokens is None and settings.visual_tokens and min(keeps) < 1:
        short_tokens = max(1, round(settings.visual_tokens * min(keeps)))
    gc.collect()
    uninstall(model)  # the baseline's copy must carry no hook
    plain = copy.deepcopy(model)
    configs = [(bench.BASELINE, None, image_size)] + [(f"keep={k:g}", k, image_size) for k in keeps]
    if short_tokens:
        configs.append(("keep=1, short prompt", 1.0, bench.image_size_for_visual_tokens(short_tokens, patch, merge)))
    states = []
    for label, keep, size in configs:
        inputs = bench.build_inputs(processor, size, 1, settings.prompt, settings.seed).to(device)
        target = plain if keep is None else model
        if keep is None:
            cache = DynamicCache(config=model.config)
        else:
            cache = PrunableDynamicCache(model, keep_ratio=keep, scorer=settings.scorer, seed=settings.seed)
        logger.info("%s: prefill of %d tokens", label, inputs["input_ids"].shape[1])
        with torch.no_grad():
            first = target.generate(**inputs, **{CACHE_KWARG: cache}, max_new_tokens=1, do_sample=False)
        logical = cache.get_seq_length()
        physical = logical if keep is None else cache.get_physical_length()
        if keep is not None and keep < 1 and not physical < logical:
            raise bench.NothingPrunedError(f"{label}: the cache kept all {logical} entries")
        deltas = getattr(adapter_for(plain).vlm, "rope_deltas", None) if keep is None else cache.rope_deltas
        states.append({
            "label": label, "keep": keep, "model": target, "cache": cache, "tokens": first[:, -1:],
            "positions": _positions(adapter_for(target), deltas, logical, 1, device), "times": [],
            "logical_length": logical, "physical_length": physical, "prompt_tokens": int(inputs["input_ids"].shape[1]),
        })
    with torch.no_grad():
        for r in range(rounds + 2):
            for st in (states if r % 2 == 0 else states[::-1]):
                ids = row_major(st["tokens"])
                if cuda:
                    torch.cuda.synchronize()
                start = clock()
                logits = st["model"](input_ids=ids, position_ids=st["positions"].clone(), use_cache=True,
                                     logits_to_keep=1, **{CACHE_KWARG: st["cache"]}).logits[:, -1, :]
                if cuda:
                    torch.cuda.synchronize()
                st["times"].append(clock() - start)
                st["tokens"] = logits.argmax(-1, keepdim=True)
                st["positions"].add_(1)
    weights = bench.decode_weight_bytes(model)
    per_entry = bench.expected_kv_bytes(model, 1, 1, dtype)
    base = states[0]
    base_times = base["times"][2:]
    rows = []
    for st in states:
        times = st["times"][2:]
        ratios = [t / b for t, b in zip(times, base_times)]
        low, high = _quartiles(ratios)
        rows.append({
            "config": st["label"], "keep_ratio": st["keep"], "prompt_tokens": st["prompt_tokens"],
            "logical_length": st["logical_length"], "physical_length": st["physical_length"],
            # physical entries read per step, averaged over the timed steps (rounds 2 .. rounds + 1)
            "mean_entries": st["physical_length"] + 1 + (rounds + 3) / 2,
            "step_s": statistics.median(times), "steps": st["times"],
            "paired_ratio": statistics.median(ratios), "paired_ratio_q25": low, "paired_ratio_q75": high,
        })
    base_row = rows[0]
    t_base = base_row["step_s"]
    kv_base = per_entry * base_row["mean_entries"]
    for row in rows:
        model_ratio = (weights + per_entry * row["mean_entries"]) / (weights + kv_base)
        row["bytes_model_ratio"] = model_ratio
        row["measured_vs_bytes_model"] = row["paired_ratio"] / model_ratio
    control = next(row for row in rows if row["config"] == "keep=1")
    short = next((row for row in rows if row["config"] == "keep=1, short prompt"), None)
    calibration = None
    if short is not None and control["mean_entries"] != short["mean_entries"]:
        slope = (control["paired_ratio"] - short["paired_ratio"]) / (control["mean_entries"] - short["mean_entries"])
        # the weights' time per byte, from the bytes model: t_base * W / (W + KV(base)) for W bytes
        weight_ratio_per_byte = 1.0 / (weights + kv_base)
        calibration = {"ratio_per_entry": slope, "seconds_per_entry": slope * t_base,
                       "kv_cost_per_byte_vs_weights": slope / per_entry / weight_ratio_per_byte}
        for row in rows:
            predicted = control["paired_ratio"] + slope * (row["mean_entries"] - control["mean_entries"])
            row["length_model_ratio"] = predicted
            row["measured_vs_length_model"] = row["paired_ratio"] / predicted
    del states, plain
    gc.collect()
    environment = bench.collect_environment(device, dtype, settings.attn_implementation)
    model_name = os.path.basename(os.path.normpath(settings.model))
    name = f"{model_name}-v{settings.visual_tokens}-r{rounds}-{device.type}-{environment['dtype']}"
    name += ("-cputime" if settings.clock == "process" else "") + "-paired"
    return {"name": name, "environment": environment,
            "settings": {**bench.dataclasses.asdict(settings), "rounds": rounds, "short_tokens": short_tokens,
                         "image_size": list(image_size), "weight_bytes": weights, "kv_bytes_per_entry": per_entry},
            "rows": rows, "calibration": calibration}


def format_paired_markdown(report: dict) -> str:
    s, env, cal = report["settings"], report["environment"], report["calibration"]
    lines = [
        f"### {report['name']}",
        "",
        f"{s.get('model_description') or s['model']}, batch 1, {s['rounds']} rounds of one greedy step per configuration (interleaved, snake order; "
        f"two warm-up rounds dropped), {bench.environment_summary(env)}, clock {s['clock']}. Paired ratio: median over rounds of the "
        "step time over the baseline's in the same round (quartiles in brackets). Weights read per step "
        f"{s['weight_bytes'] / 2**20:.1f} MiB, KV {s['kv_bytes_per_entry']} bytes per entry.",
        "",
        "| config | prompt tokens | physical entries (mean over steps) | ms/step (median) | paired ratio [q25, q75] | "
        "bytes model | measured / bytes model | unpruned-length model | measured / unpruned-length model |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        length = r.get("length_model_ratio")
        lines.append(
            f"| {r['config']} | {r['prompt_tokens']} | {r['mean_entries']:.0f} | {_ms(r['step_s'])} | "
            f"{r['paired_ratio']:.3f} [{r['paired_ratio_q25']:.3f}, {r['paired_ratio_q75']:.3f}] | "
            f"{r['bytes_model_ratio']:.3f} | {r['measured_vs_bytes_model']:.3f} | "
            f"{'-' if length is None else format(length, '.3f')} | "
            f"{'-' if length is None else format(r['measured_vs_length_model'], '.3f')} |"
        )
    if cal is not None:
        lines += ["", f"Unpruned controls: a KV entry costs {cal['seconds_per_entry'] * 1e6:.3f} us per step "
                      f"(x{cal['ratio_per_entry']:.3g} of the baseline step); a KV byte costs "
                      f"{cal['kv_cost_per_byte_vs_weights']:.2f}x a weight byte."]
    return "\n".join(lines) + "\n"


def _ms(value) -> str:
    return "-" if value is None else f"{value * 1e3:.2f}"


def format_decode_markdown(report: dict) -> str:
    s, env = report["settings"], report["environment"]
    lines = [
        f"### {report['name']}",
        "",
        f"{s.get('model_description') or s['model']}, {s['sequence_length']} prompt tokens, batch 1, {s['steps']} timed decode steps (median, the "
        f"first dropped), {bench.environment_summary(env)}, clock {s['clock']}, compile backend "
        f"{s['compile_backend']}.",
        "",
        "| config | logical / physical entries | dynamic ms/step | aten ops/step (vs baseline) | host syncs/step | "
        "same cache, torch.cat update: ms/step | static eager ms/step | static compiled ms/step | compile s | graphs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        ratio = bench._fmt_ratio(r["dynamic_vs_base"])
        lines.append(
            f"| {r['config']} | {r['logical_length']} / {r['physical_length']} | {_ms(r['dynamic_step_s'])}{ratio} | "
            f"{r['ops_per_step']} ({r['extra_ops_vs_base']:+d}) | {r['host_syncs_per_step']} | "
            f"{_ms(r.get('dynamic_cat_step_s'))} | "
            f"{_ms(r.get('static_eager_step_s'))} | {_ms(r.get('static_compiled_step_s'))} | "
            f"{'-' if r.get('compile_s') is None else format(r['compile_s'], '.1f')} | {r.get('compiled_graphs', '-')} |"
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sparse_cache.bench_decode", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="small", help="a preset or a checkpoint (as sparse-cache-bench)")
    parser.add_argument("--visual-tokens", type=int, default=16320)
    parser.add_argument("--keep-ratios", default="1.0,0.25")
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per configuration and kind")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=sorted(bench._DTYPES))
    parser.add_argument("--attn", dest="attn_implementation", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--scorer", default="sparsevlm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", default="wall", choices=["wall", "process"])
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the static step")
    parser.add_argument("--no-static", action="store_true", help="dynamic steps only (no static / compiled decode)")
    parser.add_argument("--rounds", type=int, default=32,
                        help="rounds of the interleaved (paired) measurement and its bytes models; 0: skip it")
    parser.add_argument("--short-tokens", type=int, default=None,
                        help="visual tokens of the short-prompt control (default: visual tokens x the smallest keep ratio)")
    parser.add_argument("--kv-heads", type=int, default=None,
                        help="override a preset's key/value heads (e.g. = query heads: no grouped-query attention); "
                             "NOT the published model, recorded in the results")
    parser.add_argument("--paired-only", action="store_true",
                        help="only the interleaved measurement (no per-configuration, static or compiled steps)")
    parser.add_argument("--out-dir", default="bench_results")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        bench._positive_int("steps", args.steps)
        if args.rounds < 0:
            raise ValueError(f"rounds: {args.rounds} is negative; give a count of rounds, or 0 to skip them")
        if args.paired_only and not args.rounds:
            raise ValueError("paired-only: needs rounds > 0 (it runs only the interleaved measurement)")
        if args.short_tokens is not None:
            bench._positive_int("short_tokens", args.short_tokens)
        overrides = {}
        if args.kv_heads is not None:
            bench._positive_int("kv_heads", args.kv_heads)
            if args.model not in presets.PRESETS:
                raise ValueError(f"kv_heads: overrides a preset's heads; {args.model!r} is not a preset")
            heads = presets.preset_config(args.model).get_text_config(decoder=True).num_attention_heads
            if heads % args.kv_heads:
                raise ValueError(f"kv_heads: {args.kv_heads} does not divide the {heads} query heads of {args.model}")
            overrides["num_key_value_heads"] = args.kv_heads
        settings = bench.BenchSettings(
            model=args.model, visual_tokens=args.visual_tokens, keep_ratios=bench.parse_keep_ratios(args.keep_ratios),
            device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation, scorer=args.scorer,
            seed=args.seed, clock=args.clock, progress=False,
        ).validate()
        if args.threads is not None:
            bench._positive_int("threads", args.threads)
    except ValueError as err:
        parser.error(str(err))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    patch, merge = bench.patch_and_merge(bench.model_config(settings.model))
    size = bench.image_size_for_visual_tokens(settings.visual_tokens, patch, merge)
    area = bench._rounded_area(size[0], size[1], patch * merge)
    model, processor, description = bench.load_model(
        settings.model, settings.device, settings.resolved_dtype(), settings.attn_implementation,
        min(area, testing.TINY_MIN_PIXELS * (patch * merge) ** 2 // 28**2), area, settings.seed,
        overrides=overrides or None,
    )
    command = "python -m sparse_cache.bench_decode " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    os.makedirs(args.out_dir, exist_ok=True)
    reports = []
    if not args.paired_only:
        reports.append((run_decode_benchmark(model, processor, settings, args.steps, compile_backend=args.compile_backend,
                                             image_size=size, static=not args.no_static), format_decode_markdown))
    if args.rounds:
        reports.append((run_paired_decode(model, processor, settings, args.rounds, image_size=size,
                                          short_tokens=args.short_tokens), format_paired_markdown))
    for report, formatter in reports:
        report["settings"]["command"] = command
        report["settings"]["model_description"] = description
        if overrides:
            report["settings"]["overrides"] = overrides
            report["name"] += "-kv" + str(overrides["num_key_value_heads"])
        path = os.path.join(args.out_dir, report["name"] + ".json")
        with open(path, "w") as handle:
            json.dump(report, handle, indent=2, default=bench._json_default)
            handle.write("\n")
        sys.stdout.write(formatter(report) + "\n")
        logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
