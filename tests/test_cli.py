"""The ``sparse-cache`` command line, run in-process through ``main(argv)`` (one subprocess smoke test).

The model is a tiny random Qwen2.5-VL saved with ``save_pretrained`` and loaded back through ``--model DIR``,
so the real loading code runs; its answers are noise, only their consistency is checked.
"""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig

from sparse_cache import PrunableDynamicCache, testing
from sparse_cache.cli import _chat_inputs, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "count the objects."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2_5_vl")
    testing.tiny_qwen2_5_vl_model(seed=0).save_pretrained(path)
    testing.tiny_processor().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "photo.png"
    testing.synthetic_image(224, 168, seed=1).save(path)  # 48 visual tokens on a 6 x 8 grid
    return str(path)


def run(capsys, *argv):
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def fields(stdout):
    """``name : value`` lines of the report as a dict."""
    return {k.strip(): v.strip() for k, _, v in (line.partition(" : ") for line in stdout.splitlines())}


# --------------------------------------------------------------------------- success paths


def test_generate_prints_answer_tokens_times_and_writes_overlay(capsys, model_dir, image_path, tmp_path):
    overlay = tmp_path / "kept.png"
    code, out, err = run(capsys, "--model", model_dir, "--image", image_path, "--prompt", PROMPT,
                         "--keep-ratio", "0.25", "--max-new-tokens", "4", "--overlay", str(overlay))
    assert code == 0, err
    report = fields(out)
    assert report["prompt"] == PROMPT
    assert "answer" in report
    assert report["visual tokens"].startswith("12 kept / 48 total (25%), scorer=sparsevlm keep_ratio=0.25")
    assert report["prefill"].endswith(" ms")
    assert report["decode"].endswith("/token)") and " for 3 tokens " in report["decode"]
    assert report["overlay"] == f"written to {overlay}"
    picture = np.asarray(Image.open(overlay))
    original = np.asarray(Image.open(image_path))
    assert picture.shape == original.shape
    red = (picture == np.array([255, 0, 0])).all(axis=-1)
    assert red.any(), "no kept-cell outline"
    # a quarter of the cells are kept: most pixels are dimmed, none brightened
    assert (picture[~red] <= original[~red]).all()
    assert (picture[~red] < original[~red]).any(axis=-1).mean() > 0.5


def test_compare_json_matches_direct_generate(capsys, model_dir, image_path, tmp_path):
    heatmap = tmp_path / "scores.png"
    code, out, err = run(capsys, "--model", model_dir, "--image", image_path, "--prompt", PROMPT,
                         "--keep-tokens", "5", "--scorer", "fastv", "--max-new-tokens", "5",
                         "--compare", "--json", "--heatmap", str(heatmap), "--repeats", "2")
    assert code == 0, err
    result = json.loads(out)
    assert result["visual_tokens_kept"] == 5 and result["visual_tokens_total"] == 48
    assert result["keep_tokens"] == 5 and result["keep_ratio"] is None and result["scorer"] == "fastv"
    assert result["repeats"] == 2 and result["new_tokens"] == 5 and result["decode_steps"] == 4
    for timing in (result, result["unpruned"]):
        assert timing["prefill_ms"] > 0 and timing["decode_ms"] > 0 and timing["decode_ms_per_token"] > 0
    assert set(result["speedup"]) == {"prefill", "decode_per_token", "total"}
    assert all(v > 0 for v in result["speedup"].values())
    assert Image.open(heatmap).size == (224, 168)

    # the answers are those of plain generate calls on the same inputs
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(model_dir)
    inputs = _chat_inputs(processor, Image.open(image_path).convert("RGB"), PROMPT)
    n = inputs["input_ids"].shape[1]
    greedy = dict(max_new_tokens=5, do_sample=False)
    cache = PrunableDynamicCache(model, keep_tokens=5, scorer="fastv")
    pruned = model.generate(**inputs, past_key_values=cache, **greedy)
    full = model.generate(**inputs, **greedy)
    decode = lambda seqs: processor.batch_decode(seqs[:, n:], skip_special_tokens=True)[0].strip()
    assert result["answer"] == decode(pruned)
    assert result["unpruned"]["answer"] == decode(full)


def test_without_image_uses_a_synthetic_one(capsys, model_dir):
    handlers = list(logging.getLogger("sparse_cache").handlers)
    code, out, err = run(capsys, "--model", model_dir, "--max-new-tokens", "2", "--device", "cpu",
                         "--dtype", "float32", "--attn", "eager")
    assert code == 0, err
    report = fields(out)
    assert report["image"] == "synthetic test image (seed 0) (224x224)"
    assert report["prompt"] == "Describe this image."
    assert report["visual tokens"].startswith("16 kept / 64 total")
    assert logging.getLogger("sparse_cache").handlers == handlers  # main() leaves logging as it found it


@pytest.mark.parametrize("budget, kept", [
    (["--mode", "in-prefill", "--keep-ratio", "0.5"], "8 kept / 16 total"),
    (["--mode", "in-prefill", "--schedule", "sparsevlm", "--keep-ratio", "0.5"], " kept / 16 total"),
    (["--adaptive-scale", "0.5"], " kept / 16 total"),
])
def test_modes_and_budgets(capsys, model_dir, tmp_path, budget, kept):
    small = tmp_path / "small.png"
    testing.synthetic_image(112, 112).save(small)
    code, out, err = run(capsys, "--model", model_dir, "--image", str(small), "--max-new-tokens", "2", *budget)
    assert code == 0, err
    line = fields(out)["visual tokens"]
    assert kept in line and budget[1] in line


def test_overlay_of_an_image_smaller_than_the_model_input(capsys, model_dir, tmp_path):
    """A 20x20 image is upscaled to 56x56 (2 x 2 tokens) by the processor: the overlay is drawn at that size."""
    small, overlay = tmp_path / "small.png", tmp_path / "kept.png"
    testing.synthetic_image(20, 20).save(small)
    code, out, err = run(capsys, "--model", model_dir, "--image", str(small), "--max-new-tokens", "1",
                         "--overlay", str(overlay), "--keep-tokens", "2")
    assert code == 0, err
    assert fields(out)["visual tokens"].startswith("2 kept / 4 total")
    assert "no decode step" in fields(out)["decode"]
    assert Image.open(overlay).size == (56, 56)


def test_default_toy_model(capsys, tmp_path):
    try:
        from sparse_cache.toy import TOY_VLM_PATH, load_toy_vlm, make_sample  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"the toy VLM (sparse_cache.toy) is not importable yet: {exc}")
    if not os.path.isfile(os.path.join(TOY_VLM_PATH, "config.json")):
        pytest.skip(f"the toy VLM checkpoint is not there yet: {TOY_VLM_PATH}")
    overlay = tmp_path / "overlay.png"
    code, out, err = run(capsys, "--json", "--max-new-tokens", "4", "--overlay", str(overlay))
    assert code == 0, err
    result = json.loads(out)
    assert result["model"].startswith("toy VLM")
    assert result["prompt"].startswith("is there a ")
    assert result["expected_answer"] in ("yes", "no")
    assert result["visual_tokens_total"] == 64 and result["visual_tokens_kept"] == 16
    assert Image.open(overlay).size == (224, 224)


def test_console_entry_smoke(model_dir):
    """``python -m sparse_cache.cli`` (what the console script calls) runs end to end in a fresh process."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "sparse_cache.cli", "generate", "--model", model_dir, "--max-new-tokens", "2"],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "visual tokens" in proc.stdout and "16 kept / 64 total" in proc.stdout


def test_help_and_missing_command(capsys):
    assert main(["generate", "--help"]) == 0
    assert "--keep-ratio" in capsys.readouterr().out
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "required" in err


# --------------------------------------------------------------------------- errors a user can act on


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "notes.png").write_text("this is not an image\n")
    good = root / "good.png"
    testing.synthetic_image(112, 112).save(good)
    (root / "truncated.png").write_bytes(good.read_bytes()[:200])
    qwen2_vl = root / "qwen2-vl"
    Qwen2VLConfig().save_pretrained(qwen2_vl)
    (root / "empty-dir").mkdir()
    return root


ERRORS = [
    # (argv after "generate", exit status, text the one-line message must contain)
    (["--image", "{bad}/missing.jpg"], 1, "--image: no such file"),
    (["--image", "{bad}"], 1, "is a directory"),
    (["--image", ""], 1, "--image: empty path"),
    (["--image", "{bad}/notes.png"], 1, "cannot read"),
    (["--image", "{bad}/truncated.png"], 1, "cannot read"),
    (["--prompt", "  "], 1, "--prompt: empty prompt"),
    (["--model", "{bad}/qwen2-vl"], 1, "is a 'qwen2_vl' model"),
    (["--model", "{bad}/no-such-model"], 1, "--model: no such directory"),
    (["--model", "{bad}/empty-dir"], 1, "has no config.json"),
    (["--model", "{bad}/good.png"], 1, "is a file"),
    (["--model", "{model}", "--scoring-layer", "9"], 1, "scoring_layer: 9 is outside"),
    (["--overlay", "{bad}/no-dir/kept.png"], 1, "--overlay: the folder"),
    (["--keep-ratio", "0"], 2, "--keep-ratio: expected a number in (0, 1]"),
    (["--keep-ratio", "0.5", "--keep-tokens", "3"], 2, "not allowed with"),
    (["--scorer", "nope"], 2, "invalid choice"),
    (["--device", "tpu9"], 1, "--device"),
    (["--model", "{model}", "--schedule", "sparsevlm"], 1, "schedule: a progressive schedule prunes inside"),
    (["--model", "{model}", "--adaptive-scale", "1", "--scorer", "fastv"], 1, "adaptive_scale: the rank-based"),
    (["--adaptive-scale", "-1"], 2, "--adaptive-scale: expected a number > 0"),
]


@pytest.mark.parametrize("argv, status, message", ERRORS, ids=[e[2] for e in ERRORS])
def test_errors_are_one_line(capsys, bad_files, model_dir, argv, status, message):
    argv = [a.format(bad=bad_files, model=model_dir) for a in argv]
    if "--model" not in argv:
        argv += ["--model", model_dir]  # fail on the argument under test, not on the default model
    code, out, err = run(capsys, *argv)
    assert code == status
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("sparse-cache") and message in err
    assert "Traceback" not in err


def test_debug_shows_the_traceback(capsys, bad_files, model_dir):
    code, _, err = run(capsys, "--model", model_dir, "--image", f"{bad_files}/missing.jpg", "--debug")
    assert code == 1
    assert "Traceback" in err and err.rstrip().endswith(f"--image: no such file: {bad_files}/missing.jpg")
