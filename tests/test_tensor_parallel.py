"""Tensor parallelism: ``from_pretrained(..., tp_plan="auto")`` under ``torch.distributed.run`` (gloo, CPU).

Two launches (``python -m torch.distributed.run --nproc-per-node N tests/tp_cases.py``): 2 ranks over every
supported family (4 query heads, 2 KV heads: 2 + 1 per rank; Qwen3-VL's plan shards only its embedding), 3 ranks
over Qwen2.5-VL and LLaVA with 6 query / 3 KV heads. Each rank writes its results to a file; this process runs the
same cases on the same checkpoints without ``tp_plan`` (the single-process reference) and compares: every case
first asserted that pruning happened (in the workers and here), then every rank kept exactly the reference's
visual tokens, with its scores (1e-5) and per-step logits (1e-4).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import tp_cases

pytestmark = pytest.mark.distributed

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LAUNCH_TIMEOUT = 900
_launches: dict = {}


def _launch(ranks: int, tmp_path_factory) -> tuple[list[dict], dict]:
    """(per-rank results, reference results) of the ``ranks`` launch; run once per session."""
    if ranks in _launches:
        return _launches[ranks]
    root = str(tmp_path_factory.mktemp(f"tp{ranks}"))
    tp_cases.save_checkpoints(root, ranks)
    out = os.path.join(root, "out")
    os.makedirs(out)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               os.path.join(HERE, "tp_cases.py"), "--root", root, "--ranks", str(ranks), "--out", out]
    log = open(os.path.join(root, "launch.log"), "w+")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = tp_cases.run_all(root, ranks, tp=False)  # meanwhile, the single-process reference
    finally:
        torch.set_num_threads(threads)
    try:
        code = proc.wait(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = "timeout"
    log.seek(0)
    text = log.read()
    log.close()
    files = [os.path.join(out, f"rank{r}.pt") for r in range(ranks)]
    if code != 0 or not all(os.path.exists(f) for f in files):
        pytest.fail(f"torch.distributed.run with {ranks} ranks exited with {code}; its output:\n{text[-6000:]}")
    results = [torch.load(f, weights_only=False) for f in files]
    _launches[ranks] = (results, reference)
    return _launches[ranks]


def _close(got, expected, atol, what):
    assert len(got) == len(expected), f"{what}: {len(got)} entries, expected {len(expected)}"
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape, f"{what} {i}: shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        diff = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
        assert diff <= atol, f"{what} {i}: differs by {diff} (> {atol})"


def _equal(got, expected, what):
    assert len(got) == len(expected), f"{what}: {len(got)} rows, expected {len(expected)}"
    for row, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"{what}, row {row}: {a.tolist()} != {b.tolist()}"


CASES = [(ranks, case["name"]) for ranks in (2, 3) for case in tp_cases.cases(ranks)]


@pytest.mark.parametrize("ranks,name", CASES, ids=[f"{r}ranks-{n}" for r, n in CASES])
def test_every_rank_keeps_the_single_process_set_and_logits(ranks, name, tmp_path_factory):
    results, reference = _launch(ranks, tmp_path_factory)
    expected = reference[name]
    assert "error" not in expected, f"single-process reference failed:\n{expected['error']}"
    assert "load_error" not in expected, expected["load_error"]
    errors = {r[name].get("load_error") for r in results if name in r}
    if errors and None not in errors:  # transformers' own loading, before this package is involved
        import transformers

        pytest.skip(f"transformers {transformers.__version__} cannot load the tiny {name.split('/')[0]} with "
                    f"tp_plan='auto': {sorted(errors)[0]}")
    for rank, result in enumerate(results):
        assert name in result, f"rank {rank} did not run {name} (an earlier case failed: see its test)"
        assert "error" not in result[name], f"rank {rank}:\n{result[name]['error']}"
    for rank, result in enumerate(results):
        got = result[name]
        # the workers asserted pruning; the counts say it again here: fewer kept than visual tokens in every row
        assert sum(k.numel() for k in got["kept"]) < sum(s.numel() for s in got["scores"]), "nothing was pruned"
        _equal(got["kept"], expected["kept"], f"rank {rank} kept")
        _close(got["scores"], expected["scores"], 1e-5, f"rank {rank} scores of row")
        _close(got["logits"], expected["logits"], 1e-4, f"rank {rank} logits of step")
        assert got["physical"] == expected["physical"]
        if "kept_after_turn" in expected:
            _equal(got["kept_after_turn"], expected["kept_after_turn"], f"rank {rank} kept after the second turn")


def test_refusals_and_disagreement_are_errors(tmp_path_factory):
    results, _ = _launch(2, tmp_path_factory)
    for rank, result in enumerate(results):
        refusals = result["refusals"]
        message = refusals["sequence_parallel"]
        assert message is not None, f"rank {rank}: a sequence-parallel plan was accepted"
        assert "sequence parallelism" in message and "model.language_model.norm" in message, message
        for key in ("disagreement", "disagreement_pre_llm"):
            message = refusals[key]
            assert message is not None, f"rank {rank}: ranks that kept different sets went unnoticed ({key})"
            assert "different set of visual tokens" in message, message
    # by default every rank adopts rank 0's scores: even rank-dependent scores give one kept set
    _equal(results[1]["refusals"]["shared_noise_kept"], results[0]["refusals"]["shared_noise_kept"], "rank 1 kept")
