"""Collect the results of a keep-ratio x scorer sweep (``scripts/eval_sweep.sh``) into one markdown table.

::

    python -m sparse_cache.eval.sweep OUT_DIR        # prints the table; writes OUT_DIR/summary.md

``OUT_DIR`` holds one folder per run (``keep1.0``, ``sparsevlm-keep0.25``, ...), each with lmms-eval's
``--output_path`` files (``<model>/<time>_results.json``) and the run's ``pruning.jsonl``
(``pruning_log=``). One row per run: the headline metric of each task (:data:`HEADLINE`; every numeric metric
for other tasks) and the share of visual tokens kept over all calls.
"""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

#: task -> metrics shown (lmms-eval's names, without the ",none" filter suffix); MME's total is added
HEADLINE = {
    "mme": ("mme_perception_score", "mme_cognition_score"),
    "gqa": ("exact_match",),
    "textvqa_val": ("exact_match",),
    "pope": ("pope_f1_score", "pope_accuracy"),
}


def _metrics(task: str, values: dict) -> dict[str, float]:
    numeric = {k.split(",")[0]: v for k, v in values.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in k}
    names = HEADLINE.get(task, tuple(sorted(numeric)))
    out = {f"{task} {name}": numeric[name] for name in names if name in numeric}
    if task == "mme" and all(n in numeric for n in HEADLINE["mme"]):
        out["mme total"] = sum(numeric[n] for n in HEADLINE["mme"])
    return out


def collect(out_dir: str | Path) -> list[dict]:
    """One dict per run folder: ``run``, metrics, ``kept`` (share of visual tokens kept, or None)."""
    rows = []
    for run in sorted(p for p in Path(out_dir).iterdir() if p.is_dir()):
        results = sorted(glob.glob(str(run / "*" / "*_results.json")))
        if not results:
            continue
        data = json.loads(Path(results[-1]).read_text())
        row: dict = {"run": run.name}
        for task, values in sorted(data.get("results", {}).items()):
            row.update(_metrics(task, values))
        log = run / "pruning.jsonl"
        if log.is_file():
            calls = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            visual = sum(sum(c["visual"]) for c in calls)
            row["kept"] = sum(sum(c["kept"]) for c in calls) / visual if visual else None
        rows.append(row)
    return rows


def to_markdown(rows: list[dict]) -> str:
    columns = [c for c in dict.fromkeys(k for r in rows for k in r) if c != "run"]
    lines = ["| run | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            cells.append("" if v is None else (f"{v:.1%}" if c == "kept" else f"{v:.4g}"))
        lines.append(f"| {r['run']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m sparse_cache.eval.sweep OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    if not out.is_dir():
        print(f"error: OUT_DIR {out} is not a folder", file=sys.stderr)
        return 1
    table = to_markdown(collect(out))
    (out / "summary.md").write_text(table, encoding="utf-8")
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
