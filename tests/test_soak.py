"""Soak: many pruned ``generate`` calls on one model, alternating configurations.

Asserts that resident memory stays flat after a warm-up and that nothing outlives its call: every cache
is collected once its output is dropped, and with no cache alive the model carries no hook and no wrapper.
``SPARSE_CACHE_SOAK_CALLS`` sets the number of calls (1000 by default; CI runs the default).
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import weakref

import pytest
import torch

from sparse_cache import PrunableDynamicCache, testing

CALLS = int(os.environ.get("SPARSE_CACHE_SOAK_CALLS", "1000"))
WARMUP = max(1, CALLS // 10)
RSS_GROWTH_BOUND_MIB = 24.0

logger = logging.getLogger(__name__)


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads resident memory from /proc")
def test_soak_memory_flat_and_nothing_outlives_its_call(processor):
    model = testing.tiny_qwen2_5_vl_model(seed=11)
    inputs = [
        testing.make_inputs(processor, ["what colour is the square?"], [[testing.synthetic_image(112, 84, seed=1)]]),
        testing.make_inputs(
            processor,
            ["count the objects.", "is there a circle on the left of the image?"],
            [[testing.synthetic_image(112, 112, seed=2)], [testing.synthetic_image(84, 112, seed=3)]],
        ),
    ]
    configs = [
        dict(keep_ratio=0.25),
        dict(keep_ratio=0.5, mode="in-prefill"),
        dict(keep_tokens=3, scorer="random", seed=5),
        dict(keep_ratio=0.3, scorer="cosine"),
        dict(mode="in-prefill", schedule=[(1, 0.5), (2, 0.25)]),
        dict(keep_ratio=0.5, scorer="fastv"),
    ]
    samplings = [dict(do_sample=False), dict(do_sample=True, top_k=5)]
    baseline_hooks = hook_count(model)
    refs: list[weakref.ref] = []
    rss_after_warmup = None
    samples = []
    cases = itertools.cycle(itertools.product(configs, inputs, samplings))
    for call in range(CALLS):
        config, batch, sampling = next(cases)
        torch.manual_seed(call)
        cache = PrunableDynamicCache(model, **config)
        out = model.generate(**batch, past_key_values=cache, max_new_tokens=2, min_new_tokens=2, **sampling)
        assert out.shape[1] == batch["input_ids"].shape[1] + 2
        assert cache.get_physical_length() < cache.get_seq_length()  # it pruned, every call
        refs.append(weakref.ref(cache))
        del cache, out
        if call % 50 == 49 or call == CALLS - 1:
            gc.collect()
            alive = sum(ref() is not None for ref in refs)
            assert alive == 0, f"call {call}: {alive} caches outlived their call"
            assert hook_count(model) == baseline_hooks, f"call {call}: hooks left on the model"
            assert "prepare_inputs_for_generation" not in vars(model)
            refs.clear()
            rss = rss_mib()
            samples.append((call + 1, rss))
            if call + 1 >= WARMUP and rss_after_warmup is None:
                rss_after_warmup = rss
            logger.info("soak: %d calls, RSS %.1f MiB", call + 1, rss)
    growth = samples[-1][1] - rss_after_warmup
    print(f"\nsoak: {CALLS} calls; RSS after warm-up {rss_after_warmup:.1f} MiB, at the end {samples[-1][1]:.1f} MiB "
          f"(growth {growth:+.1f} MiB); samples {[(n, round(r, 1)) for n, r in samples]}")
    assert growth <= RSS_GROWTH_BOUND_MIB, samples
