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
* **torch.cat update** (pruned configurations): after those steps the same cache is handed back to transformers' own
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

from . import bench, testing
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
        if keep is not None and getattr(cache, "_spare", None):
            # the same cache with transformers' own update (torch.cat of each layer per step), for comparison
            cache._spare.clear()
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.contiguous(), layer.values.contiguous()
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


def _ms(value) -> str:
    return "-" if value is None else f"{value * 1e3:.2f}"


def format_decode_markdown(report: dict) -> str:
    s, env = report["settings"], report["environment"]
    lines = [
        f"### {report['name']}",
        "",
        f"{s['model']}, {s['sequence_length']} prompt tokens, batch 1, {s['steps']} timed decode steps (median, the "
        f"first dropped), {env['device']} {env['dtype']} {env['attn_implementation']}, transformers "
        f"{env['transformers']}, torch {env['torch']}, clock {s['clock']}, compile backend {s['compile_backend']}.",
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
    model, processor, _ = bench.load_model(
        settings.model, settings.device, settings.resolved_dtype(), settings.attn_implementation,
        min(area, testing.TINY_MIN_PIXELS * (patch * merge) ** 2 // 28**2), area, settings.seed,
    )
    report = run_decode_benchmark(model, processor, settings, args.steps, compile_backend=args.compile_backend,
                                  image_size=size, static=not args.no_static)
    report["settings"]["command"] = "python -m sparse_cache.bench_decode " + shlex.join(
        sys.argv[1:] if argv is None else list(argv))
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, report["name"] + ".json")
    with open(path, "w") as handle:
        json.dump(report, handle, indent=2, default=bench._json_default)
        handle.write("\n")
    sys.stdout.write(format_decode_markdown(report))
    logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
