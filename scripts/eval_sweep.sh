#!/usr/bin/env bash
# Accuracy sweep on real benchmarks through lmms-eval (docs/evaluation.md): one unpruned run (keep 1.0) and,
# for every scorer, one run per keep ratio below 1, each over all the tasks, then a summary table.
#
# Needs a GPU machine with internet access (model weights and the lmms-lab datasets come from the Hugging
# Face Hub), torch with CUDA, and the install of docs/evaluation.md:
#   pip install -e ".[eval]" && pip install --no-deps "lmms-eval==0.7.3" && pip install qwen-vl-utils torchvision
# (torchvision matching your CUDA torch). The device tool of the development sessions has no internet access,
# so this cannot run there.
#
#   bash scripts/eval_sweep.sh                      # Qwen2.5-VL-7B, mme/gqa/textvqa_val/pope, 7 runs
#   DRY_RUN=1 bash scripts/eval_sweep.sh            # print the commands only
#   LIMIT=50 TASKS=pope bash scripts/eval_sweep.sh  # a quick look (lmms-eval: --limit is for testing only)
#
# Environment overrides:
#   MODEL (sparse_qwen2_5_vl)  PRETRAINED (Qwen/Qwen2.5-VL-7B-Instruct)  TASKS (mme,gqa,textvqa_val,pope)
#   KEEP_RATIOS (1.0 0.25 0.1)  SCORERS (sparsevlm divprune random)  MODE (in-prefill; or post-prefill)
#   SCORING_LAYER (2: where in-prefill prunes for the scorers without a layer of their own, i.e. divprune and
#   random; sparsevlm keeps its default, layer 2 of 32 scaled to the model's depth, 2 on the 28-layer 7B)
#   EXTRA_MODEL_ARGS (appended to --model_args, e.g. attn_implementation=sdpa)  BATCH_SIZE (1)  LIMIT (none)
#   OUT (eval_results)  SPARSE_CACHE (sparse-cache: the command)  DRY_RUN (0)
# A run whose folder already has results is skipped (delete it to redo it), so an interrupted sweep resumes.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-sparse_qwen2_5_vl}
PRETRAINED=${PRETRAINED:-Qwen/Qwen2.5-VL-7B-Instruct}
TASKS=${TASKS:-mme,gqa,textvqa_val,pope}
KEEP_RATIOS=${KEEP_RATIOS:-1.0 0.25 0.1}
SCORERS=${SCORERS:-sparsevlm divprune random}
MODE=${MODE:-in-prefill}
SCORING_LAYER=${SCORING_LAYER:-2}
EXTRA_MODEL_ARGS=${EXTRA_MODEL_ARGS:-}
BATCH_SIZE=${BATCH_SIZE:-1}
LIMIT=${LIMIT:-}
OUT=${OUT:-eval_results}
SPARSE_CACHE=${SPARSE_CACHE:-sparse-cache}
DRY_RUN=${DRY_RUN:-0}

run() {  # run NAME MODEL_ARGS
  local name=$1 args=$2 dir="$OUT/$1"
  if compgen -G "$dir/*/*_results.json" >/dev/null; then
    echo "--- $name: results already in $dir, skipped"
    return 0
  fi
  local cmd=("$SPARSE_CACHE" eval --model "$MODEL" --tasks "$TASKS" --batch_size "$BATCH_SIZE" --log_samples
             --output_path "$dir" --model_args "pretrained=${PRETRAINED},${args},pruning_log=${dir}/pruning.jsonl${EXTRA_MODEL_ARGS:+,$EXTRA_MODEL_ARGS}")
  if [ -n "$LIMIT" ]; then cmd+=(--limit "$LIMIT"); fi
  echo "=== $name: ${cmd[*]}"
  if [ "$DRY_RUN" = 1 ]; then return 0; fi
  mkdir -p "$dir"
  "${cmd[@]}"
}

for keep in $KEEP_RATIOS; do
  if [ "$keep" = 1 ] || [ "$keep" = 1.0 ]; then
    run "keep1.0" "keep_ratio=1.0"   # the unpruned baseline, on the same code path
    continue
  fi
  for scorer in $SCORERS; do
    layer=""
    if [ "$MODE" = in-prefill ] && [ "$scorer" != sparsevlm ] && [ "$scorer" != sparsevlm_plus ] && [ "$scorer" != fastv ]; then
      layer=",scoring_layer=${SCORING_LAYER}"
    fi
    run "${scorer}-keep${keep}" "keep_ratio=${keep},scorer=${scorer},mode=${MODE}${layer}"
  done
done

if [ "$DRY_RUN" != 1 ]; then
  python -m sparse_cache.eval.sweep "$OUT"   # prints the table and writes $OUT/summary.md
fi
