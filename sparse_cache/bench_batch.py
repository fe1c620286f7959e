"""Batch mode of the benchmark: throughput at several batch sizes, and capacity under a memory budget.

    sparse-cache-bench --model qwen2.5-vl-7b --device cuda --visual-tokens 4096 --batches 1,4,16 \\
        --memory-budget 80GiB --new-tokens 64
    python -m sparse_cache.bench --model small --visual-tokens 256 --batches 1,4 --memory-budget 2GiB   # CPU

For every batch size, :func:`sparse_cache.bench.run_benchmark` measures the baseline and every keep ratio in one
interleaved run (same images, same prompt, one image per row), exactly as the single-batch bench does
(``NothingPrunedError`` included). From its medians:

* ``tokens_per_s``: generated tokens per second of the whole call, ``batch * new_tokens / e2e_s``;
* ``decode_tokens_per_s``: tokens per second of the decode phase, ``batch / decode_per_token_s``;
* ``peak_mem_bytes``: peak memory of the call above the memory held before it (CUDA ``max_memory_allocated``;
  CPU: the torch profiler's running sum of allocations, as in the single-batch bench).

**Capacity** (``--memory-budget``): the largest batch whose memory stays under the budget, where the memory of a
batch is the model's weights (parameters and buffers, held whatever the batch) plus the call's peak above its
start. The peak is modelled as linear in the batch, ``peak(b) = fixed + per_row * b``, fitted by least squares
to the peaks measured at the batch sizes of the run (at least two); ``per_row`` is what one more row costs at its
worst moment (KV cache and activations of the prefill, or the KV cache at the end of decoding, whichever is
larger), ``fixed`` what does not grow with the batch (workspace, the logits processor). Then
``capacity = floor((budget - weights - fixed) / per_row)``. With ``--verify-capacity`` (default) each
configuration is then run once at its predicted capacity (a new :func:`run_benchmark` at that batch, one repeat,
no warm-up) and the measured total is reported against the budget (``verified_under_budget``); a prediction
larger than ``--max-verify-batch`` is not run (reported as such).

Post-prefill pruning computes every token in the prefill and compacts the cache at its end, so its peak (at the
prefill) is that of the baseline unless decoding is long enough for the full-length KV cache to be the peak:
its capacity gain shows with many new tokens; in-prefill pruning lowers the prefill peak itself.

Outputs in ``--out-dir``: ``NAME-batch.json`` (every per-batch result in full, the fit and the capacities),
``NAME-batch.csv`` (one row per batch size and configuration), ``NAME-batch_throughput.png`` and
``NAME-batch_capacity.png``; a markdown summary on stdout.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import re
import shlex
import sys
from typing import Any, Sequence

import torch

from . import bench, testing

logger = logging.getLogger(__name__)

__all__ = ["parse_batches", "parse_memory", "fit_peak", "capacity", "run_batch_benchmark", "format_batch_markdown",
           "write_batch_outputs", "main_batch"]

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_batches(text: str) -> tuple[int, ...]:
    """``"1,4,16"`` -> ``(1, 4, 16)``; ascending, distinct, each >= 1."""
    try:
        batches = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"batches: {text!r} is not valid; give comma-separated batch sizes >= 1, e.g. 1,4,16") from None
    if not batches or any(b < 1 for b in batches) or len(set(batches)) != len(batches):
        raise ValueError(f"batches: {text!r} is not valid; give distinct comma-separated batch sizes >= 1, e.g. 1,4,16")
    return tuple(sorted(batches))


def parse_memory(text: str) -> int:
    """``"80GiB"``, ``"8GB"``, ``"512MiB"``, ``"1.5e9"`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(
            f"memory_budget: {text!r} is not valid; give a positive size with an optional unit, e.g. 80GiB, 24GB, "
            "512MiB or a number of bytes"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def fit_peak(batches: Sequence[int], peaks: Sequence[float]) -> tuple[float, float] | None:
    """Least-squares ``(fixed, per_row)`` of ``peak = fixed + per_row * batch``; ``None`` with fewer than two
    measured batch sizes (or a non-increasing fit)."""
    points = [(b, p) for b, p in zip(batches, peaks) if p is not None]
    if len({b for b, _ in points}) < 2:
        return None
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_p = sum(p for _, p in points) / n
    var = sum((b - mean_b) ** 2 for b, _ in points)
    per_row = sum((b - mean_b) * (p - mean_p) for b, p in points) / var
    if per_row <= 0:
        return None
    return mean_p - per_row * mean_b, per_row


def capacity(budget: int, weights: int, fit: tuple[float, float] | None) -> int | None:
    """Largest batch ``b`` with ``weights + fixed + per_row * b <= budget`` (0 if none fits); ``None`` without a fit."""
    if fit is None:
        return None
    fixed, per_row = fit
    return max(0, math.floor((budget - weights - fixed) / per_row))


def model_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers of ``model`` (each tensor once)."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def run_batch_benchmark(model, processor, settings: bench.BenchSettings, batches: Sequence[int], *,
                        memory_budget: int | None = None, verify: bool = True, max_verify_batch: int = 256,
                        model_description: str = "", image_size: tuple[int, int] | None = None,
                        command: str | None = None) -> dict:
    """Run :func:`sparse_cache.bench.run_benchmark` at every batch size; throughput per configuration and batch;
    with ``memory_budget`` (bytes), the capacity of each configuration (see the module docstring)."""
    per_batch = {}
    for done, batch in enumerate(batches):
        logger.info("batch %d (%d of %d)", batch, done + 1, len(batches))
        per_batch[batch] = bench.run_benchmark(
            model, processor, dataclasses.replace(settings, batch_size=batch), model_description=model_description,
            image_size=image_size, command=command,
        )
    first = per_batch[batches[0]]
    labels = [row["config"] for row in first.rows]
    weights = model_bytes(model)
    rows = []
    for batch, result in per_batch.items():
        base = result.rows[0]
        for row in result.rows:
            tokens_per_s = batch * settings.new_tokens / row["e2e_s"] if row["e2e_s"] else None
            decode_tps = batch / row["decode_per_token_s"] if row["decode_per_token_s"] else None
            base_tps = batch * settings.new_tokens / base["e2e_s"] if base["e2e_s"] else None
            base_decode = batch / base["decode_per_token_s"] if base["decode_per_token_s"] else None
            rows.append({
                "batch_size": batch, "config": row["config"], "keep_ratio": row["keep_ratio"], "mode": row["mode"],
                "control": row["control"], "kept_visual_per_row": row["kept_visual_per_row"],
                "e2e_s": row["e2e_s"], "prefill_s": row["prefill_s"], "decode_per_token_s": row["decode_per_token_s"],
                "tokens_per_s": tokens_per_s, "tokens_per_s_vs_base": bench._ratio(tokens_per_s, base_tps),
                "decode_tokens_per_s": decode_tps, "decode_tokens_per_s_vs_base": bench._ratio(decode_tps, base_decode),
                "peak_mem_bytes": row["peak_mem_bytes"], "kv_bytes_prefill": row["kv_bytes_prefill"],
            })
    capacities = []
    for label in labels:
        mine = [r for r in rows if r["config"] == label]
        fit = fit_peak([r["batch_size"] for r in mine], [r["peak_mem_bytes"] for r in mine])
        entry: dict[str, Any] = {
            "config": label, "keep_ratio": mine[0]["keep_ratio"], "mode": mine[0]["mode"],
            "fixed_bytes": None if fit is None else fit[0], "per_row_bytes": None if fit is None else fit[1],
            "capacity": None, "verified_batch": None, "verified_total_bytes": None, "verified_under_budget": None,
        }
        if memory_budget is not None:
            entry["capacity"] = capacity(memory_budget, weights, fit)
        capacities.append(entry)
    if memory_budget is not None:
        base_capacity = capacities[0]["capacity"]
        for entry in capacities:
            entry["capacity_vs_base"] = bench._ratio(entry["capacity"], base_capacity)
        if verify:
            _verify_capacities(model, processor, settings, capacities, weights, memory_budget, max_verify_batch,
                               model_description, image_size, command)
    return {
        "name": first.name.replace(f"-b{batches[0]}-", "-b" + "_".join(map(str, batches)) + "-", 1) + "-batch",
        "environment": first.environment,
        "settings": {**first.settings, "batch_size": None, "batches": list(batches), "memory_budget_bytes": memory_budget,
                     "model_bytes": weights, "capacity_method": (
                         "memory of a batch = model weights (parameters + buffers) + peak of the call above its start; "
                         "peak fitted as fixed + per_row * batch (least squares over the measured batches); capacity = "
                         "floor((budget - weights - fixed) / per_row), then verified by one run at that batch")},
        "rows": rows,
        "capacity": capacities,
        "per_batch": {str(b): r.to_dict() for b, r in per_batch.items()},
    }


def _verify_capacities(model, processor, settings, capacities, weights, budget, max_verify_batch, description,
                       image_size, command) -> None:
    """One run per configuration at its predicted capacity: the measured total against the budget."""
    for entry in capacities:
        batch = entry["capacity"]
        if not batch:
            continue
        if batch > max_verify_batch:
            logger.info("%s: predicted capacity %d > --max-verify-batch %d: not verified", entry["config"], batch,
                        max_verify_batch)
            continue
        logger.info("verifying %s at batch %d", entry["config"], batch)
        try:
            peak = measure_peak(model, processor, settings, batch, entry["keep_ratio"], entry["mode"], image_size)
        except KeyboardInterrupt:  # e.g. the GPU script's time limit: keep the sweep, report the rest as not run
            logger.warning("interrupted while verifying %s: the remaining capacities are not verified", entry["config"])
            return
        except torch.cuda.OutOfMemoryError:
            entry["verified_batch"] = batch
            logger.warning("%s: out of memory at its predicted capacity %d", entry["config"], batch)
            entry["verified_under_budget"] = False
            torch.cuda.empty_cache()
            continue
        entry["verified_batch"] = batch
        if peak is not None:
            entry["verified_total_bytes"] = weights + peak
            entry["verified_under_budget"] = entry["verified_total_bytes"] <= budget


def measure_peak(model, processor, settings: bench.BenchSettings, batch: int, keep_ratio: float | None,
                 mode: str | None, image_size: tuple[int, int]) -> int | None:
    """Peak memory (bytes above the start) of one ``generate`` of ``settings.new_tokens`` tokens at ``batch`` rows with
    one configuration only (the baseline, ``keep_ratio=None``, without the library's hooks)."""
    import gc

    from transformers import DynamicCache, GenerationConfig

    from ._compat import CACHE_KWARG
    from .cache import PrunableDynamicCache
    from .hooks import uninstall

    device = next(model.parameters()).device
    inputs = bench.build_inputs(processor, image_size, batch, settings.prompt, settings.seed).to(device)
    text = model.config.get_text_config(decoder=True)
    config = GenerationConfig(
        max_new_tokens=settings.new_tokens, min_new_tokens=settings.new_tokens, do_sample=False, num_beams=1,
        use_cache=True, eos_token_id=getattr(model.generation_config, "eos_token_id", None) or text.eos_token_id,
        pad_token_id=getattr(model.generation_config, "pad_token_id", None) or text.pad_token_id,
    )
    gc.collect()
    if keep_ratio is None:
        uninstall(model)
        cache = DynamicCache(config=model.config)
    else:
        extra = {} if (mode or "post-prefill") == "post-prefill" else {"mode": mode}
        cache = PrunableDynamicCache(model, keep_ratio=keep_ratio, scorer=settings.scorer, seed=settings.seed, **extra)

    def run():
        model.generate(**inputs, **{CACHE_KWARG: cache}, generation_config=config)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if settings.cpu_memory == "none":
        run()
        return None
    return bench._profiled_peak_bytes(run)


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def format_batch_markdown(report: dict) -> str:
    s, env = report["settings"], report["environment"]
    lines = [
        f"### {report['name']}",
        "",
        f"{s['model']}, {s['visual_tokens_per_row']} visual tokens per row, batches {s['batches']}, {s['new_tokens']} new "
        f"tokens, {bench.environment_summary(env)}, {s.get('mode')} mode; medians of {s['repeats']} repeat(s). Ratios against the baseline at the same batch.",
        "",
        "| batch | config | kept visual/row | tokens/s (end to end) | decode tokens/s | peak MiB | KV MiB after prefill |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        tps = "n/a" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.2f}{bench._fmt_ratio(r['tokens_per_s_vs_base'])}"
        dps = ("n/a" if r["decode_tokens_per_s"] is None
               else f"{r['decode_tokens_per_s']:.1f}{bench._fmt_ratio(r['decode_tokens_per_s_vs_base'])}")
        label = r["config"] + (" (control)" if r["control"] else "")
        lines.append(f"| {r['batch_size']} | {label} | {r['kept_visual_per_row']:g} | {tps} | {dps} | "
                     f"{_mib(r['peak_mem_bytes'])} | {_mib(r['kv_bytes_prefill'])} |")
    if s.get("memory_budget_bytes"):
        lines += [
            "",
            f"Capacity under a budget of {s['memory_budget_bytes'] / 2**30:.2f} GiB (weights {_mib(s['model_bytes'])} MiB "
            "+ peak = fixed + per_row x batch, fitted; verified by one run at the predicted batch):",
            "",
            "| config | fixed MiB | per row MiB | capacity (rows) | vs baseline | verified total MiB | under budget |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for c in report["capacity"]:
            ratio = c.get("capacity_vs_base")
            under = {None: "not run", True: "yes", False: "NO"}[c["verified_under_budget"]]
            lines.append(f"| {c['config']} | {_mib(c['fixed_bytes'])} | {_mib(c['per_row_bytes'])} | "
                         f"{'n/a' if c['capacity'] is None else c['capacity']} | "
                         f"{'n/a' if ratio is None else f'x{ratio:.2f}'} | {_mib(c['verified_total_bytes'])} | {under} |")
    return "\n".join(lines) + "\n"


_CSV_FIELDS = ["batch_size", "config", "keep_ratio", "mode", "control", "kept_visual_per_row", "e2e_s", "prefill_s",
               "decode_per_token_s", "tokens_per_s", "tokens_per_s_vs_base", "decode_tokens_per_s",
               "decode_tokens_per_s_vs_base", "peak_mem_bytes", "kv_bytes_prefill"]


def write_batch_outputs(report: dict, out_dir: str, plots: bool = True) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, report["name"])
    files = {"json": base + ".json", "csv": base + ".csv"}
    with open(files["json"], "w") as handle:
        json.dump(report, handle, indent=2, default=bench._json_default)
        handle.write("\n")
    with open(files["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in report["rows"]:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in _CSV_FIELDS})
    if plots:
        files.update(_write_plots(report, base))
    logger.info("wrote %s", ", ".join(files.values()))
    return files


def _write_plots(report: dict, base: str) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    s = report["settings"]
    title = (f"{s['model']}: {s['visual_tokens_per_row']} visual tokens per row, {report['environment']['device']} "
             f"{report['environment']['dtype']}")
    labels = list(dict.fromkeys(r["config"] for r in report["rows"]))
    paths = {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, name in ((axes[0], "tokens_per_s", "tokens/s, end to end"), (axes[1], "decode_tokens_per_s",
                                                                               "decode tokens/s")):
        for i, label in enumerate(labels):
            mine = [r for r in report["rows"] if r["config"] == label]
            ax.plot([r["batch_size"] for r in mine], [r[key] for r in mine], "o-" if i else "o--", label=label,
                    color=f"C{i}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(s["batches"])
        ax.set_xticklabels([str(b) for b in s["batches"]])
        ax.set_xlabel("batch size")
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    paths["plot_throughput"] = base + "_throughput.png"
    fig.savefig(paths["plot_throughput"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.2))
    caps = report["capacity"]
    values = [c["capacity"] or 0 for c in caps]
    ax.bar(range(len(caps)), values, color=[f"C{i}" for i in range(len(caps))])
    ax.set_xticks(range(len(caps)))
    ax.set_xticklabels([c["config"] for c in caps], rotation=20, fontsize=8)
    budget = s.get("memory_budget_bytes")
    ax.set_ylabel("largest batch under the budget")
    ax.set_title("capacity" + (f" under {budget / 2**30:.2f} GiB" if budget else " (no --memory-budget)"))
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    paths["plot_capacity"] = base + "_capacity.png"
    fig.savefig(paths["plot_capacity"], dpi=110)
    plt.close(fig)
    return paths


def main_batch(parser, args, argv: Sequence[str] | None = None) -> int:
    """``sparse-cache-bench --batches ...``: called by :func:`sparse_cache.bench.main` with its parsed arguments."""
    try:
        batches = parse_batches(args.batches)
        budget = None if args.memory_budget is None else parse_memory(args.memory_budget)
        if "cases" in args:
            raise ValueError("batches: --batches sets the batch sizes; give --visual-tokens or --image-size, not --cases")
        image_size = bench.parse_image_size(args.image_size) if "image_size" in args else None
        tokens = None if image_size is not None else getattr(args, "visual_tokens", 1024)
        if args.threads is not None:
            bench._positive_int("threads", args.threads)
        if budget is not None and len(batches) < 2:
            raise ValueError(f"memory_budget: the capacity model is fitted over at least two batch sizes; got --batches "
                             f"{args.batches}")
        settings = bench.BenchSettings(
            model=args.model, visual_tokens=tokens, image_size=image_size, batch_size=batches[0],
            keep_ratios=bench.parse_keep_ratios(args.keep_ratios), new_tokens=args.new_tokens, repeats=args.repeats,
            warmup=args.warmup, device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation,
            scorer=args.scorer, mode=args.mode, prompt=args.prompt, seed=args.seed, cpu_memory=args.cpu_memory,
            clock=args.clock, progress=not args.no_progress,
        ).validate()
        if budget is not None and settings.cpu_memory == "none" and torch.device(settings.device).type == "cpu":
            raise ValueError("memory_budget: on CPU the capacity needs the peak memory; leave --cpu-memory profiler")
    except ValueError as err:
        parser.error(str(err))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    patch, merge = bench.patch_and_merge(bench.model_config(settings.model))
    size = settings.image_size or bench.image_size_for_visual_tokens(settings.visual_tokens, patch, merge)
    area = bench._rounded_area(size[0], size[1], patch * merge)
    model, processor, description = bench.load_model(
        settings.model, settings.device, settings.resolved_dtype(), settings.attn_implementation,
        min(area, testing.TINY_MIN_PIXELS * (patch * merge) ** 2 // 28**2), area, settings.seed,
    )
    command = "sparse-cache-bench " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    try:
        report = run_batch_benchmark(model, processor, settings, batches, memory_budget=budget,
                                     verify=not args.no_verify_capacity, max_verify_batch=args.max_verify_batch,
                                     model_description=description, image_size=size, command=command)
    except KeyboardInterrupt:
        logger.error("interrupted before every batch size was measured: nothing written")
        return 130
    except RuntimeError as err:
        sys.stderr.write(f"sparse-cache-bench: error: {' '.join(str(err).split())}\n")
        return 1
    if args.name is not None:
        report["name"] = args.name
    write_batch_outputs(report, args.out_dir, plots=not args.no_plots)
    sys.stdout.write(format_batch_markdown(report))
    sys.stdout.flush()
    return 0
