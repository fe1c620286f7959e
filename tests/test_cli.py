"""The ``sparse-cache`` command line, run in-process through ``main(argv)`` (one subprocess smoke test).

The model is a tiny random Qwen2.5-VL saved with ``save_pretrained`` and loaded back through ``--model DIR``,
so the real loading code runs; its answers are noise, only their consistency is checked.
"""

import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
import transformers
from transformers import (
    AutoConfig,
    AutoProcessor,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
)

import sparse_cache
from sparse_cache import PrunableDynamicCache, cli, testing
from sparse_cache._compat import CACHE_KWARG
from sparse_cache.cli import Timing, _chat_inputs, main
from sparse_cache.select import budget, derive_schedule

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
    assert result["visual_tokens_total"] == 48 and result["visual_tokens_kept"] == 5  # pruning happened
    assert result["pruned"] is True and result["not_pruned_because"] is None
    assert result["keep_tokens"] == 5 and result["keep_ratio"] is None and result["scorer"] == "fastv"
    # the reported times are those of the timing runs: exactly --timing-tokens (default 16) new tokens each
    timing = result["timing"]
    assert timing["new_tokens"] == cli.DEFAULT_TIMING_TOKENS == 16 and timing["repeats"] == result["repeats"] == 2
    assert timing["warmup"] == 1 and timing["noise_dominated"] is True  # 48 visual tokens
    assert timing["order"] == ["unpruned", "pruned"] * 2
    assert [(r["config"], r["pair"]) for r in timing["runs"]] == [
        ("unpruned", 0), ("pruned", 0), ("unpruned", 1), ("pruned", 1)]
    for run_timing in (result, result["unpruned"], *timing["runs"]):
        assert run_timing["new_tokens"] == 16 and run_timing["decode_steps"] == 15
        assert run_timing["prefill_ms"] > 0 and run_timing["decode_ms"] > 0 and run_timing["decode_ms_per_token"] > 0
    assert set(result["speedup"]) == {"prefill", "decode_per_token", "total"}
    for spread in result["speedup"].values():
        assert set(spread) == {"median", "min", "max", "n"} and spread["n"] == 2
        assert 0 < spread["min"] <= spread["median"] <= spread["max"]
    assert "control_ratio" not in result
    notes = " | ".join(result["notes"])
    assert "prefill is not expected to be faster in post-prefill mode" in notes
    assert "timing on a 48-visual-token input is noise-dominated" in notes and "docs/benchmarks.md" in notes
    assert "2 timed pairs give no meaningful spread" in notes
    width, height = Image.open(heatmap).size
    assert height == 168 and width > 224  # the heat map at the image's size, its colour bar on the right

    # the answers are those of plain generate calls on the same inputs, at --max-new-tokens
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(model_dir)
    inputs = _chat_inputs(processor, Image.open(image_path).convert("RGB"), PROMPT)
    n = inputs["input_ids"].shape[1]
    greedy = dict(max_new_tokens=5, do_sample=False)
    cache = PrunableDynamicCache(model, keep_tokens=5, scorer="fastv")
    pruned = model.generate(**inputs, **{CACHE_KWARG: cache}, **greedy)
    assert cache.kept_visual_positions[0].numel() == 5 < 48  # pruning happened before comparing answers
    full = model.generate(**inputs, **greedy)
    decode = lambda seqs: processor.batch_decode(seqs[:, n:], skip_special_tokens=True)[0].strip()
    assert result["answer"] == decode(pruned)
    assert result["unpruned"]["answer"] == decode(full)


def test_compare_report_in_words(capsys, model_dir, image_path):
    code, out, err = run(capsys, "--model", model_dir, "--image", image_path, "--prompt", PROMPT,
                         "--keep-ratio", "0.25", "--max-new-tokens", "2", "--compare", "--repeats", "3",
                         "--timing-tokens", "4")
    assert code == 0, err
    report = fields(out)
    assert report["visual tokens"].startswith("12 kept / 48 total")
    assert report["prefill"].endswith("(median of 3 runs of 4 new tokens)")
    assert report["unpruned prefill"].endswith("(median of 3 runs of 4 new tokens)")
    assert " for 3 tokens " in report["decode"] and " for 3 tokens " in report["unpruned decode"]
    speedup = report["speed-up"]
    assert speedup.startswith("noise-dominated on this small input, see the notes: prefill ")
    assert "[not expected to differ: post-prefill]" in speedup
    assert re.search(r"decode \d+\.\d\dx \(\d+\.\d\dx-\d+\.\d\dx\) per token", speedup), speedup
    assert "median (min-max) of 3 interleaved unpruned/pruned pairs" in speedup
    notes = [line for line in out.splitlines() if line.startswith("note ")]
    assert any("prefill is not expected to be faster in post-prefill mode" in n for n in notes)
    assert any("noise-dominated" in n and "docs/benchmarks.md" in n for n in notes)


def test_compare_runs_are_warmed_up_and_interleaved(capsys, model_dir, image_path, monkeypatch):
    """Call order, recorded outside the CLI: answers, one warm-up of each configuration, then pairs."""
    calls = []
    original = cli.timed_generate

    def recording(model, inputs, max_new_tokens, device, cache=None, exact=False):
        calls.append(("unpruned" if cache is None else "pruned", max_new_tokens, exact))
        return original(model, inputs, max_new_tokens, device, cache=cache, exact=exact)

    monkeypatch.setattr(cli, "timed_generate", recording)
    code, out, err = run(capsys, "--model", model_dir, "--image", image_path, "--max-new-tokens", "3",
                         "--compare", "--repeats", "4", "--timing-tokens", "5", "--json")
    assert code == 0, err
    assert calls == [
        ("pruned", 2, False),  # warm-up, also checks that pruning happens
        ("pruned", 3, False), ("unpruned", 3, False),  # the answers, at --max-new-tokens
        ("unpruned", 5, True), ("pruned", 5, True),  # warm-up of each timing configuration
        *[("unpruned", 5, True), ("pruned", 5, True)] * 4,  # interleaved timed pairs
    ]
    result = json.loads(out)
    assert result["timing"]["order"] == ["unpruned", "pruned"] * 4 and result["speedup"]["total"]["n"] == 4


def test_speedup_is_the_median_of_paired_ratios():
    # pair i: unpruned (prefill 10, decode 3 steps of 2 s), pruned (prefill p_i, decode 3 steps of 1 s)
    unpruned = [Timing(10.0, 6.0, 4)] * 3
    pruned = [Timing(p, 3.0, 4) for p in (5.0, 20.0, 8.0)]
    ratios = cli.ratio_summary(unpruned, pruned)
    assert ratios["prefill"] == {"median": 1.25, "min": 0.5, "max": 2.0, "n": 3}
    assert ratios["decode_per_token"] == {"median": 2.0, "min": 2.0, "max": 2.0, "n": 3}
    assert ratios["total"]["median"] == pytest.approx(16 / 11)
    # no decode step: no per-token ratio, never a made-up one
    assert cli.ratio_summary([Timing(1.0, 0.0, 1)], [Timing(1.0, 0.0, 1)])["decode_per_token"]["median"] is None


def test_timing_notes_in_plain_words():
    ratios = {"prefill": {"median": 1.1, "min": 0.9, "max": 1.3, "n": 5},
              "decode_per_token": {"median": 1.5, "min": 1.2, "max": 1.8, "n": 5}}
    notes = cli.timing_notes(ratios, mode="in-prefill", visual_tokens=4096, control=False, repeats=5)
    assert notes == ["prefill: the spread 0.90x-1.30x straddles 1.0, so this run shows no reliable difference"]
    notes = cli.timing_notes(ratios, mode="post-prefill", visual_tokens=64, control=False, repeats=1)
    assert notes[0].startswith("prefill is not expected to be faster in post-prefill mode")
    assert any(n.startswith("timing on a 64-visual-token input is noise-dominated") for n in notes)
    assert notes[-1] == "1 timed pair gives no meaningful spread; use --repeats 5 or more"
    notes = cli.timing_notes(ratios, mode="post-prefill", visual_tokens=4096, control=True, repeats=5)
    assert notes == [notes[0]] and "control" in notes[0] and "not a speed-up" in notes[0]


@pytest.mark.parametrize("budget_args, total", [(["--keep-ratio", "1"], 48), (["--keep-tokens", "60"], 48)])
def test_nothing_pruned_by_request_is_a_control_not_a_speedup(capsys, model_dir, image_path, budget_args, total):
    code, out, err = run(capsys, "--model", model_dir, "--image", image_path, "--max-new-tokens", "2",
                         "--compare", "--repeats", "2", "--timing-tokens", "3", *budget_args)
    assert code == 0, err
    report = fields(out)
    assert report["visual tokens"].startswith(f"{total} kept / {total} total (100%)")
    assert report["pruning"].startswith("none: ") and "by request" in report["pruning"]
    assert report["speed-up"] == "none claimed (nothing was pruned)"
    assert report["control ratio"].startswith("prefill ")
    assert "not a speed-up" in out and "not expected to differ" not in out
    code, out, err = run(capsys, "--model", model_dir, "--image", image_path, "--max-new-tokens", "2",
                         "--compare", "--repeats", "2", "--timing-tokens", "3", "--json", *budget_args)
    assert code == 0, err
    result = json.loads(out)
    assert result["pruned"] is False and "by request" in result["not_pruned_because"]
    assert result["speedup"] is None and set(result["control_ratio"]) == {"prefill", "decode_per_token", "total"}
    assert result["visual_tokens_kept"] == result["visual_tokens_total"] == total


class _UnseenCache(DynamicCache):
    """What a transformers whose generate hides the cache from the library amounts to: a plain cache that
    reports no selection (the hooks ignore anything but a PrunableDynamicCache)."""

    def __init__(self, model, **kwargs):
        super().__init__(config=model.config)
        self.kept_visual_positions, self.visual_scores = [], []

    def get_physical_length(self, layer_idx=0):
        return self.get_seq_length(layer_idx)


class _RefusingCache(_UnseenCache):
    """A core that detects that it was not used raises inside generate."""

    def update(self, *args, **kwargs):
        raise RuntimeError("PrunableDynamicCache: the model was called without the cache's hooks seeing it")


@pytest.mark.parametrize("extra", [[], ["--compare"], ["--compare", "--json"], ["--adaptive-scale", "0.5"],
                                   ["--keep-tokens", "5", "--mode", "in-prefill"]])
def test_a_run_that_asked_to_prune_and_kept_everything_is_an_error(capsys, model_dir, image_path, monkeypatch,
                                                                   extra):
    monkeypatch.setattr(sparse_cache, "PrunableDynamicCache", _UnseenCache)
    code, out, err = run(capsys, "--model", model_dir, "--image", image_path, "--max-new-tokens", "2", *extra)
    assert code == 1
    assert out == ""  # no answer, no times, no speed-up
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("sparse-cache: error: nothing was pruned with transformers ")
    assert transformers.__version__ in err and "48 visual tokens" in err and "no speed-up is reported" in err


def test_a_runtime_error_of_the_core_is_one_line(capsys, model_dir, image_path, monkeypatch):
    monkeypatch.setattr(sparse_cache, "PrunableDynamicCache", _RefusingCache)
    code, out, err = run(capsys, "--model", model_dir, "--image", image_path, "--compare")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("sparse-cache: error: generate failed: PrunableDynamicCache: the model was called")
    assert f"(transformers {transformers.__version__})" in err
    code, _, err = run(capsys, "--model", model_dir, "--image", image_path, "--debug")
    assert code == 1 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("sparse-cache: error:")


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


def _schedule_kept(model_dir, keep_ratio, total):
    """Visual tokens left after the last stage of the progressive schedule (ratios of the image's own count)."""
    layers = AutoConfig.from_pretrained(model_dir).get_text_config(decoder=True).num_hidden_layers
    return budget(total, derive_schedule(keep_ratio, layers)[-1][1], None)


@pytest.mark.parametrize("budget_args, kept", [
    (["--keep-ratio", "0.25"], lambda model_dir: 4),
    (["--keep-tokens", "3"], lambda model_dir: 3),
    (["--mode", "in-prefill", "--keep-ratio", "0.5"], lambda model_dir: 8),
    (["--mode", "in-prefill", "--keep-tokens", "5"], lambda model_dir: 5),
    (["--mode", "in-prefill", "--schedule", "sparsevlm", "--keep-ratio", "0.5"],
     lambda model_dir: _schedule_kept(model_dir, 0.5, 16)),
    (["--adaptive-scale", "0.5"], None),  # rank-based: some, not all (checked below)
    (["--mode", "pre-llm", "--scorer", "dart_embed", "--keep-ratio", "0.25"], lambda model_dir: 4),
], ids=["keep-ratio", "keep-tokens", "in-prefill", "in-prefill-tokens", "schedule", "adaptive", "pre-llm"])
def test_modes_and_budgets(capsys, model_dir, tmp_path, budget_args, kept):
    small = tmp_path / "small.png"
    testing.synthetic_image(112, 112).save(small)  # 4 x 4 = 16 visual tokens
    code, out, err = run(capsys, "--model", model_dir, "--image", str(small), "--max-new-tokens", "2", *budget_args)
    assert code == 0, err
    line = fields(out)["visual tokens"]
    match = re.match(r"(\d+) kept / (\d+) total", line)
    assert match and int(match.group(2)) == 16, line
    assert 0 < int(match.group(1)) < 16, line  # pruning happened
    assert "pruning" not in fields(out)
    if kept is not None:
        assert int(match.group(1)) == kept(model_dir), line
    assert budget_args[1] in line.replace("=", " ")


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


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """A tiny model and its tiny processor of every family, saved as a checkpoint directory."""
    dirs = {}
    for family in testing.FAMILIES:
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        testing.tiny_vlm_model(family, seed=0).save_pretrained(path)
        testing.tiny_family_processor(family).save_pretrained(path)
        dirs[family] = str(path)
    return dirs


#: (patch size, visual tokens of the 224x168 test image) per family: 6 x 8 merged tokens of 28 px, or of 32 px
#: after the processor rounds 224x168 to 224x160 (5 x 7)
FAMILY_GRIDS = {"qwen2_vl": (14, 48), "qwen2_5_vl": (14, 48), "qwen3_vl": (16, 35), "qwen3_vl_moe": (16, 35)}


@pytest.mark.parametrize("family", testing.FAMILIES)
def test_every_family_generates_from_a_saved_checkpoint(capsys, family_dirs, image_path, tmp_path, family):
    """``--model DIR`` of each family loads its own class offline (AutoConfig / AutoProcessor round-trip) and prunes."""
    path = family_dirs[family]
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == family
    processor = AutoProcessor.from_pretrained(path)
    patch, total = FAMILY_GRIDS[family]
    assert processor.image_processor.patch_size == patch == config.vision_config.patch_size
    overlay = tmp_path / "kept.png"
    for mode in ("post-prefill", "in-prefill"):
        code, out, err = run(capsys, "--json", "--model", path, "--image", image_path, "--prompt", PROMPT,
                             "--keep-ratio", "0.25", "--max-new-tokens", "3", "--mode", mode, "--overlay", str(overlay))
        assert code == 0, err
        result = json.loads(out)
        assert result["visual_tokens_total"] == total
        assert 0 < result["visual_tokens_kept"] < total, result  # pruning happened
        assert result["visual_tokens_kept"] == budget(total, 0.25, None)
        assert result["pruned"] and result["model"] == path and result["mode"] == mode
    picture = np.asarray(Image.open(overlay))
    assert picture.shape == np.asarray(Image.open(image_path)).shape
    assert (picture == np.array([255, 0, 0])).all(axis=-1).any(), "no kept-cell outline"


@pytest.mark.parametrize("family", ["qwen3_vl"])
def test_overlay_of_a_small_image_with_patch_16(capsys, family_dirs, tmp_path, family):
    """Qwen3-VL's patches are 16 pixels: a 20x20 image upscaled to 64x64 (2 x 2 tokens of 32 px) is drawn at 64x64
    (with patch 14 assumed the canvas would be 56x56), and each kept token outlines one 32 px quarter."""
    small, overlay = tmp_path / "small.png", tmp_path / "kept.png"
    testing.synthetic_image(20, 20).save(small)
    code, out, err = run(capsys, "--json", "--model", family_dirs[family], "--image", str(small), "--max-new-tokens",
                         "1", "--overlay", str(overlay), "--keep-tokens", "1")
    assert code == 0, err
    result = json.loads(out)
    assert (result["visual_tokens_kept"], result["visual_tokens_total"]) == (1, 4)  # pruning happened
    picture = np.asarray(Image.open(overlay))
    assert picture.shape == (64, 64, 3)
    red = (picture == np.array([255, 0, 0])).all(axis=-1)
    quarters = [red[r:r + 32, c:c + 32] for r in (0, 32) for c in (0, 32)]
    outlined = [q[0].all() and q[-1].all() and q[:, 0].all() and q[:, -1].all() for q in quarters]
    assert sum(outlined) == 1, "exactly one 32 px token cell outlined"


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
    Qwen2VLConfig().save_pretrained(root / "qwen2-vl-config-only")  # a supported family, but no weights
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    llama.save_pretrained(root / "llama")  # a text-only model: refused from its config, before any weight loads
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
    (["--model", "{bad}/llama"], 1, "--model: {bad}/llama is a 'llama' model (LlamaConfig); sparse-cache supports"),
    (["--model", "{bad}/qwen2-vl-config-only"], 1, "--model: cannot load {bad}/qwen2-vl-config-only: "),
    (["--model", "{bad}/no-such-model"], 1, "--model: no such directory"),
    (["--model", "{bad}/empty-dir"], 1, "has no config.json"),
    (["--model", "{bad}/good.png"], 1, "is a file"),
    (["--model", "{model}", "--scoring-layer", "9"], 1, "scoring_layer: 9 is outside"),
    (["--overlay", "{bad}/no-dir/kept.png"], 1, "--overlay: the folder"),
    (["--keep-ratio", "0"], 2, "--keep-ratio: expected a number in (0, 1]"),
    (["--keep-ratio", "0.5", "--keep-tokens", "3"], 2, "not allowed with"),
    (["--scorer", "nope"], 2, "invalid choice"),
    (["--device", "tpu9"], 1, "--device"),
    (["--model", "{model}", "--schedule", "sparsevlm"], 1, "--schedule sparsevlm prunes inside the prefill; add --mode in-prefill"),
    (["--model", "{model}", "--mode", "in-prefill", "--schedule", "sparsevlm", "--keep-tokens", "3"], 1,
     "pass --keep-ratio instead of --keep-tokens"),
    (["--model", "{model}", "--mode", "in-prefill", "--schedule", "sparsevlm", "--scoring-layer", "1"], 1,
     "leave --scoring-layer out"),
    (["--model", "{model}", "--adaptive-scale", "0.5", "--scorer", "fastv"], 1, "--adaptive-scale needs the raters'"),
    (["--adaptive-scale", "-1"], 2, "--adaptive-scale: expected a number in (0, 1)"),
    (["--adaptive-scale", "inf"], 2, "--adaptive-scale: expected a number in (0, 1)"),
    (["--adaptive-scale", "nan"], 2, "--adaptive-scale: expected a number in (0, 1)"),
    (["--adaptive-scale", "1"], 2, "--adaptive-scale: expected a number in (0, 1)"),
]


@pytest.mark.parametrize("argv, status, message", ERRORS, ids=[e[2] for e in ERRORS])
def test_errors_are_one_line(capsys, bad_files, model_dir, argv, status, message):
    argv = [a.format(bad=bad_files, model=model_dir) for a in argv]
    message = message.format(bad=bad_files)
    if "--model" not in argv:
        argv += ["--model", model_dir]  # fail on the argument under test, not on the default model
    code, out, err = run(capsys, *argv)
    assert code == status
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("sparse-cache") and message in err
    assert "Traceback" not in err


def test_a_model_of_no_supported_family_is_refused_with_the_families(capsys, bad_files):
    """The one-line refusal lists every registered family and its classes (read from the registry)."""
    code, out, err = run(capsys, "--model", str(bad_files / "llama"))
    assert code == 1 and out == "" and err.count("\n") == 1, err
    for family in sparse_cache.models.families():
        assert family.family in err
        assert not family.command_line or all(name in err for name in family.model_classes), err


def test_debug_shows_the_traceback(capsys, bad_files, model_dir):
    code, _, err = run(capsys, "--model", model_dir, "--image", f"{bad_files}/missing.jpg", "--debug")
    assert code == 1
    assert "Traceback" in err and err.rstrip().endswith(f"--image: no such file: {bad_files}/missing.jpg")


# --------------------------------------------------------------------------- flags checked before the model loads


def test_schedule_below_what_the_models_depth_allows_says_what_to_pass(capsys, monkeypatch):
    """The bundled 4-layer model computes every visual token in layer 0, so the default 0.25 cannot be the layer
    average of a progressive schedule: one line naming the flags and a value that works, before the weights load."""
    from sparse_cache import toy

    monkeypatch.setattr(toy, "load_toy_vlm", lambda *a, **k: pytest.fail("the weights were loaded"))
    code, out, err = run(capsys, "--mode", "in-prefill", "--schedule", "sparsevlm")
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert "--keep-ratio 0.25 (the default)" in err and "above 0.250" in err
    suggestion = re.search(r"pass e\.g\. --keep-ratio ([0-9.]+)", err)
    assert suggestion, err
    monkeypatch.undo()
    code, out, err = run(capsys, "--mode", "in-prefill", "--schedule", "sparsevlm", "--keep-ratio",
                         suggestion.group(1), "--max-new-tokens", "2")
    assert code == 0, err
    report = fields(out)
    kept = int(report["visual tokens"].split()[0])
    assert 0 < kept < 64
    assert report["schedule"].startswith("visual tokens kept ") and f"{kept} after layer 2" in report["schedule"]


def test_an_unreachable_hub_is_one_line_without_retries(capsys, monkeypatch):
    """A Hub id with no network: one line at once, not the Hub client's retry lines and backoff."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    code, out, err = run(capsys, "--model", "nobody-here/no-such-model-xyz")
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert "--model: cannot reach the Hugging Face Hub at http://127.0.0.1:9" in err
    assert "Retrying" not in err


def test_flag_names_known_without_the_library_match_the_library():
    """--help is built without importing torch: its scorer, mode and family lists must be the library's."""
    from sparse_cache.cache import MODES
    from sparse_cache.presets import supported_families_text
    from sparse_cache.scorers import SCORERS

    assert cli.SCORER_NAMES == tuple(sorted(SCORERS))
    assert cli.MODES == MODES
    assert cli.FAMILIES_TEXT == supported_families_text()
    assert set(cli.ADAPTIVE_SCORERS) == {n for n, s in SCORERS.items() if getattr(s, "provides_rater_attention", False)}


FAST_PATHS = [
    ["--version"],
    ["--help"],
    ["generate", "--help"],
    ["generate", "--keep-ratio", "2"],
    ["generate", "--adaptive-scale", "inf"],
    ["generate", "--scorer", "nope"],
    ["generate", "--image", "/no/such/file.jpg"],
    ["generate", "--schedule", "sparsevlm"],
    [],
]


@pytest.mark.parametrize("argv", FAST_PATHS, ids=[" ".join(a) or "(none)" for a in FAST_PATHS])
def test_help_version_and_argument_errors_answer_without_torch(argv):
    """``python -m sparse_cache`` answers these without importing torch or transformers, in well under a second
    (asserted with a generous margin for a loaded machine)."""
    code = (
        "import sys, time\n"
        "start = time.perf_counter()\n"
        "from sparse_cache.cli import main\n"
        f"status = main({argv!r})\n"
        "elapsed = time.perf_counter() - start\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
        "print('RESULT', status, elapsed, ','.join(heavy) or '-', file=sys.stderr)\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    result = [line for line in proc.stderr.splitlines() if line.startswith("RESULT ")]
    assert result, proc.stderr
    _, status, elapsed, heavy = result[-1].split()
    assert heavy == "-", f"imported {heavy}"
    assert float(elapsed) < 5.0
    assert int(status) == (0 if "--help" in argv or "--version" in argv else 1 if "--image" in argv or "--schedule" in argv else 2)
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("RESULT ")]
    if int(status):
        assert len(errors) == 1 and errors[0].startswith("sparse-cache"), proc.stderr


def test_python_m_sparse_cache_version_is_fast():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "sparse_cache", "--version"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == f"sparse-cache {sparse_cache.__version__}"
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not {"torch", "transformers"} & imported


def test_toy_answers_are_words_and_off_task_inputs_are_flagged(capsys):
    """A repeated toy answer reads ``yes no no``, not ``yesnono``; a prompt outside the toy task gets a note."""
    from sparse_cache.toy import load_toy_vlm

    _, processor = load_toy_vlm()
    ids = [processor.tokenizer.convert_tokens_to_ids(w) for w in ("yes", "no", "no")]
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert cli.toy_answer_text(processor, ids + [end]) == "yes no no"
    assert cli.toy_input_note(False, "is there a red cell ?") is None
    assert "another prompt" in cli.toy_input_note(False, "Describe this image.")
    assert "another image and prompt" in cli.toy_input_note(True, "Describe this image.")
    code, out, err = run(capsys, "--prompt", "Describe this image.", "--max-new-tokens", "4")
    assert code == 0, err
    assert "only answers 'is there a <colour> cell ?'" in fields(out)["note"]


# --------------------------------------------------------------------------- sparse-cache-bench's front door


def test_bench_checks_matplotlib_before_the_work(capsys, monkeypatch):
    from sparse_cache import bench

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "not installed"
    monkeypatch.setattr(bench, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    with pytest.raises(SystemExit) as refused:
        bench.main(["--model", "tiny", "--visual-tokens", "16", "--no-progress"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib" in err and "--no-plots" in err


def test_profiler_chatter_is_kept_off_stderr():
    """The torch profiler's native start/stop lines would break the bench's progress bar; other lines pass."""
    code = (
        "import os, re, sys\n"
        "from sparse_cache.bench import _native_stderr_filtered, _PROFILER_CHATTER\n"
        "with _native_stderr_filtered(_PROFILER_CHATTER):\n"
        "    os.write(2, b'USDT:2026 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\\n')\n"
        "    os.write(2, b'a real warning\\n')\n"
        "sys.stderr.write('after\\n')\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["a real warning", "after"]


def test_prefill_time_includes_the_vision_tower_on_every_transformers(model_dir, image_path, monkeypatch):
    """One definition of the prefill: vision tower + the first forward, whether this transformers runs the vision
    tower inside the first forward (older) or just before it (newer)."""
    import time as time_module

    loaded = cli.load_model(model_dir, cli._resolve_device("cpu"), cli._resolve_dtype("float32", None, False), "sdpa")
    inputs = _chat_inputs(loaded.processor, cli.load_image(image_path), PROMPT)
    vision = cli.vision_tower(loaded.model)
    assert vision is not None
    slow = 0.3
    original = vision.forward

    def slow_forward(*args, **kwargs):
        time_module.sleep(slow)
        return original(*args, **kwargs)

    monkeypatch.setattr(vision, "forward", slow_forward)
    _, timing = cli.timed_generate(loaded.model, inputs, 2, cli._resolve_device("cpu"))
    assert timing.prefill_s >= slow


# --------------------------------------------------------------------------- LLaVA families


@pytest.fixture(scope="module")
def llava_dirs(tmp_path_factory):
    """Tiny LLaVA-family checkpoints (model + processor saved as a directory)."""
    dirs = {}
    for family in testing.LLAVA_FAMILIES:
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        testing.tiny_vlm_model(family, seed=0).save_pretrained(path)
        testing.tiny_family_processor(family).save_pretrained(path)
        dirs[family] = str(path)
    return dirs


def _image_tokens(processor, image_path, token_id):
    image = Image.open(image_path).convert("RGB")
    return int((_chat_inputs(processor, image, PROMPT)["input_ids"] == token_id).sum())


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_llava_families_generate_from_a_saved_checkpoint(capsys, llava_dirs, image_path, tmp_path, family):
    """``--model DIR`` of LLaVA-1.5 / LLaVA-NeXT loads offline, prunes in both modes and draws the overlay and the
    heat map through the adapter's views (LLaVA-1.5: the centre crop; NeXT: base tile + tile map + newlines)."""
    path = llava_dirs[family]
    config = AutoConfig.from_pretrained(path)
    total = _image_tokens(AutoProcessor.from_pretrained(path), image_path, config.image_token_id)
    assert total == (16 if family == "llava" else 16 + 6 * 8 + 6)  # 224 x 168: a 2 x 2-tile map, un-padded to 6 x 8
    overlay, heatmap = tmp_path / "kept.png", tmp_path / "scores.png"
    for mode in ("post-prefill", "in-prefill"):
        code, out, err = run(capsys, "--json", "--model", path, "--image", image_path, "--prompt", PROMPT,
                             "--keep-ratio", "0.25", "--max-new-tokens", "3", "--mode", mode,
                             "--overlay", str(overlay), "--heatmap", str(heatmap))
        assert code == 0, err
        result = json.loads(out)
        assert result["visual_tokens_total"] == total
        assert result["visual_tokens_kept"] == budget(total, 0.25, None) < total  # pruning happened
        assert result["pruned"] and result["overlay"] == str(overlay)
    picture = np.asarray(Image.open(overlay))
    if family == "llava":
        assert picture.shape == (168, 168, 3)  # the centre square of the 224 x 168 image, which the model sees
    else:
        assert picture.shape[0] == 168 and picture.shape[1] > 2 * 224 + 8  # base, tile map and newline column
    assert (picture == np.array([255, 0, 0])).all(axis=-1).any(), "no kept-cell outline"
    assert Image.open(heatmap).size[0] > picture.shape[1]  # with its colour bar


@pytest.mark.parametrize("family", ["llava_onevision", "video_llava"])
def test_llava_families_whose_processor_needs_torchvision(capsys, monkeypatch, llava_dirs, image_path, tmp_path,
                                                          family):
    """Without torchvision AutoProcessor returns only the tokenizer for these families: the CLI says so in one line.
    Given the family's processor (as AutoProcessor returns it where torchvision is installed), it prunes and draws."""
    path = llava_dirs[family]
    code, out, err = run(capsys, "--model", path, "--image", image_path, "--max-new-tokens", "2")
    if code == 1:  # no torchvision here
        assert err.count("\n") == 1 and "loaded no image processor" in err and "torchvision" in err
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained",
                        classmethod(lambda cls, *a, **k: testing.tiny_family_processor(family)))
    overlay = tmp_path / "kept.png"
    code, out, err = run(capsys, "--json", "--model", path, "--image", image_path, "--prompt", PROMPT,
                         "--keep-tokens", "4", "--max-new-tokens", "2", "--overlay", str(overlay))
    assert code == 0, err
    result = json.loads(out)
    assert result["visual_tokens_kept"] == 4 < result["visual_tokens_total"]  # pruning happened
    assert (np.asarray(Image.open(overlay)) == np.array([255, 0, 0])).all(axis=-1).any()


def test_a_vlm_of_no_supported_family_is_refused_naming_the_families(capsys, tmp_path):
    """A VLM class outside the supported list (LLaVA-NeXT-Video) is refused from its config, in one line naming
    every supported family and class."""
    from transformers import LlavaNextVideoConfig

    from sparse_cache.models import families

    LlavaNextVideoConfig().save_pretrained(tmp_path / "next-video")
    code, out, err = run(capsys, "--model", str(tmp_path / "next-video"))
    assert code == 1 and err.count("\n") == 1, err
    assert "is a 'llava_next_video' model (LlavaNextVideoConfig); sparse-cache supports" in err
    for family in families():
        assert family.family in err and all(name in err for name in family.model_classes), err

# --------------------------------------------------------------------------- budgets that pick themselves


def test_coverage_and_visual_token_cap_reach_the_cache(capsys, model_dir, image_path):
    """--coverage / --max-visual-tokens are the library's keep_ratio="auto" targets: the kept counts are those of
    the same cache built directly (cache.stats), and pruning happened."""
    loaded = cli.load_model(model_dir, cli._resolve_device("cpu"), cli._resolve_dtype("float32", None, False), "sdpa")
    inputs = _chat_inputs(loaded.processor, cli.load_image(image_path), PROMPT)
    for flag, value, target in (("--coverage", "0.5", {"coverage": 0.5}), ("--max-visual-tokens", "7",
                                                                           {"max_visual_tokens": 7})):
        code, out, err = run(capsys, "--model", model_dir, "--image", image_path, "--prompt", PROMPT, flag, value,
                             "--max-new-tokens", "2", "--json")
        assert code == 0, err
        result = json.loads(out)
        cache = PrunableDynamicCache(loaded.model, **target)
        loaded.model.generate(**inputs, **{CACHE_KWARG: cache}, max_new_tokens=2, do_sample=False)
        expected = cache.stats.visual_tokens_kept
        assert expected == cache.kept_visual_positions[0].numel() < 48  # the direct call pruned
        assert result["visual_tokens_kept"] == expected and result["visual_tokens_total"] == 48
        assert result["pruned"] is True and result["keep_ratio"] == "auto"
        assert {k: result[k] for k in target} == target
        assert result["stats"]["budget"] == cache.stats.budget and result["stats"]["visual_tokens_kept"] == expected
        if "max_visual_tokens" in target:
            assert expected == 7
    code, out, err = run(capsys, "--model", model_dir, "--image", image_path, "--prompt", PROMPT, "--coverage", "0.5",
                         "--max-new-tokens", "2")
    assert code == 0, err
    assert fields(out)["visual tokens"].endswith("scorer=sparsevlm keep_ratio=auto coverage=0.5 mode=post-prefill")


def test_a_byte_budget_keeps_the_kv_under_it(capsys, model_dir, image_path):
    code, out, err = run(capsys, "--model", model_dir, "--image", image_path, "--prompt", PROMPT, "--json",
                         "--max-new-tokens", "2", "--max-kv-bytes", "1")
    assert code == 1 and out == "" and err.count("\n") == 1, err
    needed = int(re.search(r"--max-kv-bytes >= (\d+)", err).group(1))
    assert err.startswith("sparse-cache: error: --max-kv-bytes: 1 bytes is smaller than the KV of the text"), err
    budget_bytes = needed + 5 * (needed // 100)  # the text, one visual token and a few more
    code, out, err = run(capsys, "--model", model_dir, "--image", image_path, "--prompt", PROMPT, "--json",
                         "--max-new-tokens", "2", "--max-kv-bytes", str(budget_bytes))
    assert code == 0, err
    result = json.loads(out)
    assert result["max_kv_bytes"] == budget_bytes and result["pruned"] is True
    assert 1 <= result["visual_tokens_kept"] < 48  # pruning happened
    assert result["stats"]["rows"][0]["kv_bytes_after"] <= budget_bytes < result["stats"]["rows"][0]["kv_bytes_before"]


def test_a_budget_that_picks_every_token_is_a_control_not_a_claim(capsys, model_dir, image_path):
    """--coverage 1 keeps every token with any attention mass (all of them): reported as a control run."""
    code, out, err = run(capsys, "--model", model_dir, "--image", image_path, "--prompt", PROMPT, "--json",
                         "--max-new-tokens", "2", "--coverage", "1")
    assert code == 0, err
    result = json.loads(out)
    assert result["visual_tokens_kept"] == 48 and result["pruned"] is False
    assert result["not_pruned_because"].startswith("--coverage 1 kept every one of the image's 48 visual tokens")


AUTO_BUDGET_ERRORS = [
    (["--coverage", "0.5", "--keep-ratio", "0.3"], 2, "argument --keep-ratio: not allowed with argument --coverage"),
    (["--max-kv-bytes", "9", "--keep-tokens", "3"], 2, "not allowed with argument --max-kv-bytes"),
    (["--coverage", "0.5", "--max-visual-tokens", "3"], 2, "not allowed with argument --coverage"),
    (["--coverage", "0"], 2, "--coverage: expected a number in (0, 1]"),
    (["--max-visual-tokens", "0"], 2, "--max-visual-tokens: expected a positive integer"),
    (["--coverage", "0.8", "--scorer", "random"], 1,
     "--coverage: needs scores that are a mass (non-negative attention shares); scorer 'random'"),
    (["--coverage", "0.8", "--mode", "in-prefill", "--schedule", "sparsevlm"], 1,
     "--coverage: a progressive schedule sets every stage's ratio; leave --schedule unset"),
]


@pytest.mark.parametrize("argv, status, message", AUTO_BUDGET_ERRORS, ids=[e[2] for e in AUTO_BUDGET_ERRORS])
def test_auto_budget_errors_name_the_flag_before_the_model_loads(capsys, monkeypatch, model_dir, argv, status,
                                                                 message):
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, out, err = run(capsys, "--model", model_dir, *argv)
    assert code == status and out == "" and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
