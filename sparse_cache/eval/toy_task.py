"""A local lmms-eval task made of the toy VLM's own samples (offline; for tests and for trying the harness).

::

    python -m sparse_cache.eval.toy_task --out toy_task --samples 40
    sparse-cache eval --model sparse_qwen2_5_vl --include_path toy_task --tasks sparse_cache_toy \\
        --model_args pretrained=$(python -c "from sparse_cache.toy import TOY_VLM_PATH; print(TOY_VLM_PATH)"),\\
    device=cpu,device_map=cpu,dtype=float32,min_pixels=3136,max_pixels=50176,keep_ratio=0.25 --batch_size 1

writes ``OUT/toy.parquet`` (one row per sample of :func:`sparse_cache.toy.make_sample`: ``id``, ``image``,
``question``, ``answer``, ``queried_cells``; sample ``i`` is ``make_sample(seed + i)``), ``OUT/sparse_cache_toy.yaml``
(the task: ``generate_until``, one new token, greedy; metric ``accuracy``: the stripped answer equals "yes"/"no",
as in :mod:`sparse_cache.toy.quality`) and ``OUT/utils.py`` (the task's functions, which live in this module).
``min_pixels``/``max_pixels`` keep the toy's 224 x 224 px boards at 64 visual tokens (lmms-eval's Qwen default
``min_pixels`` would upscale them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TASK_NAME = "sparse_cache_toy"
DATASET_FILE = "toy.parquet"
#: model_args that make lmms-eval's Qwen2.5-VL class run the toy as sparse_cache.toy does (float32 on CPU,
#: its own pixel bounds); add keep_ratio= etc.
TOY_MODEL_ARGS = "device=cpu,device_map=cpu,dtype=float32,attn_implementation=sdpa,min_pixels=3136,max_pixels=50176"

_YAML = """\
task: {task}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 1
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0
"""

_UTILS = '''\
"""Functions of the {task} task (written by sparse_cache.eval.toy_task)."""
from sparse_cache.eval.toy_task import doc_to_text, doc_to_visual, process_results  # noqa: F401
'''


def doc_to_visual(doc: dict) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict) -> str:
    return doc["question"]


def process_results(doc: dict, results: list) -> dict:
    """``accuracy`` 1.0 when the answer, stripped, is the expected "yes"/"no" (as the toy quality benchmark)."""
    answer = results[0].strip() if results else ""
    return {"accuracy": float(answer == doc["answer"])}


def toy_samples(count: int, seed: int = 0) -> list:
    """The samples of the task: ``make_sample(seed + i)`` for ``i < count``."""
    from ..toy import make_sample

    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"samples: expected an int >= 1, got {count!r}")
    return [make_sample(seed + i) for i in range(count)]


def write_toy_task(out_dir: str | Path, samples: int = 40, seed: int = 0) -> Path:
    """Write the task's dataset, YAML and functions into ``out_dir`` (created); returns the YAML's path."""
    import datasets

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    drawn = toy_samples(samples, seed)
    features = datasets.Features({
        "id": datasets.Value("int64"),
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "queried_cells": datasets.Sequence(datasets.Value("int64")),
    })
    table = datasets.Dataset.from_dict({
        "id": [seed + i for i in range(samples)],
        "image": [s.image for s in drawn],
        "question": [s.question for s in drawn],
        "answer": [s.answer for s in drawn],
        "queried_cells": [list(s.queried_cells) for s in drawn],
    }, features=features)
    table.to_parquet(str(out / DATASET_FILE))
    yaml_path = out / f"{TASK_NAME}.yaml"
    yaml_path.write_text(_YAML.format(task=TASK_NAME, data=out / DATASET_FILE), encoding="utf-8")
    (out / "utils.py").write_text(_UTILS.format(task=TASK_NAME), encoding="utf-8")
    return yaml_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse_cache.eval.toy_task", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the task into")
    parser.add_argument("--samples", type=int, default=40, help="number of samples (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="sample i is make_sample(seed + i) (default 0)")
    args = parser.parse_args(argv)
    path = write_toy_task(args.out, args.samples, args.seed)
    print(f"wrote {path} ({args.samples} samples); run it with --include_path {path.parent} --tasks {TASK_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
