#!/usr/bin/env bash
# Reference GPU benchmark of sparse_cache (issue 4): the Qwen2.5-VL-7B architecture with random weights
# (preset qwen2.5-vl-7b, no download), bf16, sdpa, keep ratios 1.0/0.5/0.25/0.1 against the unpruned
# baseline, 256 new tokens, at the reference cases:
#   16320 visual tokens (a 3808x3360 image) at batch 1, and 576 visual tokens (672x672) at batch 1 and 16.
# The model is built once and the three cases run in one process (sparse-cache-bench --cases).
#
# On the device tool (see docs/benchmarks.md):  run(command="bash scripts/gpu_bench.sh", timeout_s=600)
# What comes back from $OUT (at most 8 files there): summary.md (the markdown tables), log.txt,
# env.txt (nvidia-smi and versions) and results.tar.gz (per case: JSON, CSV, time and memory PNGs).
#
# Environment overrides (the test-suite runs this script on CPU with PRESET=tiny DEVICE=cpu ...):
#   PRESET (qwen2.5-vl-7b; also qwen2-vl-7b, qwen3-vl-4b, qwen3-vl-8b: with Qwen3-VL's 32 px per merged token the
#   same visual-token counts are bigger images) DEVICE (cuda) DTYPE (bfloat16) ATTN (sdpa) CASES (16320:1,576:1,576:16)
#   NEW_TOKENS (256) REPEATS (3) WARMUP (1) KEEP_RATIOS (1.0,0.5,0.25,0.1) PYTHON (python3)
#   OUT (results folder; the device tool sets it; default bench_results/gpu) EXTRA_ARGS (more CLI flags)
#   TIME_LIMIT (570: seconds before the benchmark is stopped and what is finished is archived)
# If the whole run does not fit one call's 10 minutes, split it: CASES=16320:1 then CASES=576:1,576:16.
#
# PARTS (default main,decode,batch,prellm) selects what runs, in this order, each under its own time limit; every
# part appends its tables to summary.md and its files to results.tar.gz:
#   main    the cases above (sparse-cache-bench --cases), keep ratios against the baseline;
#   decode  the decode step at DECODE_TOKENS (16320,576) visual tokens: plain DynamicCache against the pruned cache
#           (per-step time, aten ops, host syncs; the same cache with transformers' torch.cat update), and the
#           fixed-shape decode of sparse_cache.static_cache eager and torch.compile'd, pruned and unpruned (keep 1)
#           (python -m sparse_cache.bench_decode; DECODE_KEEP_RATIOS 1.0,0.25: one compile each; DECODE_STEPS 64,
#           COMPILE_BACKEND inductor); then the paired decode steps against the bytes models at PAIRED_KEEP_RATIOS
#           (1.0,0.5,0.25,0.1), PAIRED_ROUNDS (64) rounds (bench_decode --paired-only; the baseline runs on a copy
#           of the model, so the weights are held twice);
#   batch   throughput at BATCHES (1,4,16) with BATCH_TOKENS (4096) visual tokens per row and BATCH_NEW_TOKENS (64)
#           new tokens, every keep ratio, and the capacity under MEMORY_BUDGET (80GiB: weights + peak), verified by
#           one run at the predicted batch (sparse-cache-bench --batches ... --memory-budget ...);
#   prellm  --mode pre-llm (visual tokens dropped before the language model) at BATCH_TOKENS with PRELLM_SCORER
#           (cdpruner); skipped with a message when this checkout's PrunableDynamicCache has no pre-llm mode.
# One GPU call of 10 minutes does not hold every part for the 7B preset: run PARTS=main, then PARTS=decode,batch,prellm
# (each call rewrites OUT's summary.md and results.tar.gz: give each its own OUT; PART_TIME_LIMIT, 570 s by default,
# bounds each part; TIME_LIMIT still bounds main).
set -euo pipefail
cd "$(dirname "$0")/.."

PRESET=${PRESET:-qwen2.5-vl-7b}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
ATTN=${ATTN:-sdpa}
CASES=${CASES:-16320:1,576:1,576:16}
NEW_TOKENS=${NEW_TOKENS:-256}
REPEATS=${REPEATS:-3}
WARMUP=${WARMUP:-1}
KEEP_RATIOS=${KEEP_RATIOS:-1.0,0.5,0.25,0.1}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-bench_results/gpu}
EXTRA_ARGS=${EXTRA_ARGS:-}
TIME_LIMIT=${TIME_LIMIT:-570}
PARTS=${PARTS:-main,decode,batch,prellm}
PART_TIME_LIMIT=${PART_TIME_LIMIT:-570}
DECODE_TOKENS=${DECODE_TOKENS:-16320,576}
DECODE_STEPS=${DECODE_STEPS:-64}
DECODE_KEEP_RATIOS=${DECODE_KEEP_RATIOS:-1.0,0.25}
PAIRED_KEEP_RATIOS=${PAIRED_KEEP_RATIOS:-1.0,0.5,0.25,0.1}
PAIRED_ROUNDS=${PAIRED_ROUNDS:-64}
COMPILE_BACKEND=${COMPILE_BACKEND:-inductor}
BATCHES=${BATCHES:-1,4,16}
BATCH_TOKENS=${BATCH_TOKENS:-4096}
BATCH_NEW_TOKENS=${BATCH_NEW_TOKENS:-64}
MEMORY_BUDGET=${MEMORY_BUDGET:-80GiB}
PRELLM_SCORER=${PRELLM_SCORER:-cdpruner}
for part in ${PARTS//,/ }; do
  case "$part" in main|decode|batch|prellm) ;; *) echo "PARTS: unknown part '$part'; valid: main,decode,batch,prellm" >&2; exit 2 ;; esac
done
has_part() { [[ ",$PARTS," == *",$1,"* ]]; }

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# Per-case files go to a scratch folder and travel back as one archive (the device tool returns 8 files).
RUNS=$(mktemp -d "${TMPDIR:-/tmp}/sparse_cache_bench.XXXXXX")
trap 'rm -rf "$RUNS"' EXIT

# Packages missing on the device image travel as wheels in .whl/ (named in the run's carry list).
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  if command -v nvidia-smi >/dev/null; then nvidia-smi || true; fi
  "$PYTHON" -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} >"$OUT/env.txt" 2>&1

# The benchmark stops (SIGINT) after TIME_LIMIT seconds so that the cases already finished are still
# archived before the device tool's 600 s limit; each case writes its files as soon as it ends.
status=0
: >"$OUT/summary.md"
: >"$OUT/log.txt"
if has_part main; then
  # shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
  timeout --signal=INT "$TIME_LIMIT" "$PYTHON" -m sparse_cache.bench \
    --model "$PRESET" --device "$DEVICE" --dtype "$DTYPE" --attn "$ATTN" \
    --cases "$CASES" --new-tokens "$NEW_TOKENS" --repeats "$REPEATS" --warmup "$WARMUP" \
    --keep-ratios "$KEEP_RATIOS" --out-dir "$RUNS" --no-progress $EXTRA_ARGS \
    >>"$OUT/summary.md" 2>>"$OUT/log.txt" || status=$?
fi
if has_part decode; then
  for tokens in ${DECODE_TOKENS//,/ }; do
    timeout --signal=INT "$PART_TIME_LIMIT" "$PYTHON" -m sparse_cache.bench_decode \
      --model "$PRESET" --device "$DEVICE" --dtype "$DTYPE" --attn "$ATTN" --visual-tokens "$tokens" \
      --keep-ratios "$DECODE_KEEP_RATIOS" --steps "$DECODE_STEPS" --compile-backend "$COMPILE_BACKEND" --out-dir "$RUNS" \
      --rounds 0 >>"$OUT/summary.md" 2>>"$OUT/log.txt" || status=$?
    timeout --signal=INT "$PART_TIME_LIMIT" "$PYTHON" -m sparse_cache.bench_decode \
      --model "$PRESET" --device "$DEVICE" --dtype "$DTYPE" --attn "$ATTN" --visual-tokens "$tokens" \
      --keep-ratios "$PAIRED_KEEP_RATIOS" --paired-only --rounds "$PAIRED_ROUNDS" --out-dir "$RUNS" \
      >>"$OUT/summary.md" 2>>"$OUT/log.txt" || status=$?
  done
fi
if has_part batch; then
  # shellcheck disable=SC2086
  timeout --signal=INT "$PART_TIME_LIMIT" "$PYTHON" -m sparse_cache.bench \
    --model "$PRESET" --device "$DEVICE" --dtype "$DTYPE" --attn "$ATTN" --visual-tokens "$BATCH_TOKENS" \
    --batches "$BATCHES" --memory-budget "$MEMORY_BUDGET" --new-tokens "$BATCH_NEW_TOKENS" --repeats "$REPEATS" \
    --warmup "$WARMUP" --keep-ratios "$KEEP_RATIOS" --out-dir "$RUNS" --no-progress $EXTRA_ARGS \
    >>"$OUT/summary.md" 2>>"$OUT/log.txt" || status=$?
fi
if has_part prellm; then
  if "$PYTHON" -c "import sys, sparse_cache.cache as c; sys.exit(0 if 'pre-llm' in c.MODES else 1)"; then
    # shellcheck disable=SC2086
    timeout --signal=INT "$PART_TIME_LIMIT" "$PYTHON" -m sparse_cache.bench \
      --model "$PRESET" --device "$DEVICE" --dtype "$DTYPE" --attn "$ATTN" --visual-tokens "$BATCH_TOKENS" \
      --mode pre-llm --scorer "$PRELLM_SCORER" --new-tokens "$NEW_TOKENS" --repeats "$REPEATS" --warmup "$WARMUP" \
      --keep-ratios "$KEEP_RATIOS" --out-dir "$RUNS" --no-progress $EXTRA_ARGS \
      >>"$OUT/summary.md" 2>>"$OUT/log.txt" || status=$?
  else
    echo "pre-llm: skipped: this checkout's PrunableDynamicCache has no mode 'pre-llm' (sparse_cache.cache.MODES)" \
      | tee -a "$OUT/summary.md" >&2
  fi
fi

tar -czf "$OUT/results.tar.gz" -C "$RUNS" .
cat "$OUT/summary.md"
echo "results: $OUT/summary.md $OUT/results.tar.gz ($(tar -tzf "$OUT/results.tar.gz" | grep -c -v '/$') files)"
if [ "$status" -ne 0 ]; then
  tail -n 40 "$OUT/log.txt"
  echo "sparse-cache-bench exited with status $status (124/130: stopped after TIME_LIMIT=${TIME_LIMIT}s)" >&2
  exit "$status"
fi
