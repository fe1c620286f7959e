"""``sparse-cache eval ...``: lmms-eval's command line with this package's ``sparse_*`` models registered.

Every argument goes to lmms-eval's ``eval`` command unchanged (``sparse-cache eval --help`` shows lmms-eval's
options after this package's model arguments). At the end it logs, per model, how many visual tokens the
pruning caches kept.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from . import INSTALL_HINT, LMMS_EVAL_VERSION, model_ids

PROG = "sparse-cache eval"

USAGE = f"""\
usage: {PROG} --model MODEL --model_args pretrained=ID_OR_PATH,keep_ratio=R[,scorer=NAME][,mode=MODE][,...]
                         --tasks TASKS [lmms-eval options ...]

Runs lmms-eval (tested with {LMMS_EVAL_VERSION}) with these models registered: {", ".join(model_ids())}.
Each is lmms-eval's own model class of that name without the "sparse_" prefix (same prompts, preprocessing and
generation settings) with a pruning cache made for every generate call. Model arguments added to lmms-eval's:
  keep_ratio=R | keep_tokens=N | adaptive_scale=L | schedule=sparsevlm   the budget (keep_ratio=1.0: unpruned baseline)
  scorer=NAME (default sparsevlm), scoring_layer=L, seed=N, mode=post-prefill|in-prefill, recycle=True
  dtype=float32|float16|bfloat16   load the weights in this dtype (lmms-eval's Qwen classes use bfloat16)
  pruning_log=PATH                 append one JSON line per generate call (visual and kept tokens per row)
Example (GPU):
  {PROG} --model sparse_qwen2_5_vl --tasks mme --batch_size 1 --output_path results/ \\
      --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,keep_ratio=0.25,scorer=sparsevlm,mode=in-prefill
Install: {INSTALL_HINT}
"""


def _lmms_eval_missing() -> str | None:
    try:
        import lmms_eval  # noqa: F401
        from lmms_eval.cli import dispatch  # noqa: F401
        from lmms_eval.models import registry_v2  # noqa: F401
    except ImportError as exc:
        return f"{PROG}: error: lmms-eval is not importable ({exc}); install it with: {INSTALL_HINT}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Register the models and run lmms-eval's ``eval`` command with ``argv``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        if not argv:
            return 0
    missing = _lmms_eval_missing()
    if missing:
        print(missing, file=sys.stderr)
        return 1
    from lmms_eval.cli import dispatch

    from . import register
    from .models import LIVE_STATS

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(name)s - %(message)s"))
    package_logger = logging.getLogger("sparse_cache")
    package_logger.addHandler(handler)
    if package_logger.level == logging.NOTSET:
        package_logger.setLevel(logging.INFO)
    register()
    failures = _count_failures()
    saved = sys.argv
    sys.argv = ["lmms-eval", "eval", *argv]
    try:
        dispatch.main()
    except SystemExit as exc:  # lmms-eval's argparse (--help, bad arguments) and its own exits
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code:
            return code
    finally:
        sys.argv = saved
        for model_id, stats, kwargs in LIVE_STATS:
            package_logger.info("sparse_cache.eval: %s: %s", model_id, stats.summary())
            if stats.pruned_nothing() and kwargs.get("keep_ratio") != 1.0:
                failures.append(f"{model_id} asked to prune ({_budget(kwargs)}) but kept every visual token: "
                                f"{stats.summary()}")
        package_logger.removeHandler(handler)
    if failures:
        print(f"{PROG}: error: {len(failures)} evaluation(s) failed: {'; '.join(failures)}", file=sys.stderr)
        return 1
    return 0


def _budget(kwargs: dict) -> str:
    return ", ".join(f"{k}={kwargs[k]}" for k in ("keep_ratio", "keep_tokens", "adaptive_scale", "schedule") if kwargs.get(k) is not None)


def _count_failures() -> list[str]:
    """lmms-eval logs an evaluation's exception and exits 0; record each one so that this command exits 1."""
    import lmms_eval.__main__ as lmms_main

    failures: list[str] = []
    original = lmms_main.cli_evaluate_single

    def cli_evaluate_single(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
            raise

    lmms_main.cli_evaluate_single = cli_evaluate_single
    return failures


if __name__ == "__main__":
    sys.exit(main())
