"""The benchmark command (sparse_cache.bench), its presets and the GPU script, on the tiny preset.

Nothing here is timed: the runs prove that the outputs are complete and well formed, and check the
quantities that do not depend on the machine (KV bytes, kept tokens, the bytes model's arithmetic).
"""

import contextlib
import csv
import io
import json
import math
import os
import re
import subprocess
import sys
import tarfile

import pytest
import torch
from transformers import DynamicCache

from sparse_cache import bench, presets, testing
from sparse_cache.models import families
from sparse_cache.select import scaled_layer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KEEP_RATIOS = (1.0, 0.5, 0.25, 0.1)
VISUAL, BATCH, NEW, REPEATS = 64, 2, 3, 2
CONFIGS = ["baseline", "keep=1", "keep=0.5", "keep=0.25", "keep=0.1"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One CLI run on the tiny preset: (stdout, parsed JSON, CSV rows, file paths, tiny model)."""
    out_dir = tmp_path_factory.mktemp("bench")
    argv = [
        "--model", "tiny", "--visual-tokens", str(VISUAL), "--batch-size", str(BATCH), "--new-tokens", str(NEW),
        "--repeats", str(REPEATS), "--warmup", "0", "--out-dir", str(out_dir), "--no-progress",
        "--log-level", "WARNING", "--threads", "1",
    ]
    stdout = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(stdout):
            assert bench.main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # --threads is process-wide: leave the other tests as they were
    name = f"tiny-v{VISUAL}-b{BATCH}-n{NEW}-cpu-float32"
    paths = {kind: out_dir / f"{name}{suffix}" for kind, suffix in
             (("json", ".json"), ("csv", ".csv"), ("time", "_time.png"), ("memory", "_memory.png"))}
    with open(paths["json"]) as handle:
        data = json.load(handle)
    with open(paths["csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    model = presets.build_preset_model("tiny")
    return stdout.getvalue(), data, rows, paths, model


# --------------------------------------------------------------------------- sizes and presets


@pytest.mark.parametrize(
    "tokens, grid, size",
    [(16320, (120, 136), (3808, 3360)), (576, (24, 24), (672, 672)), (4096, (64, 64), (1792, 1792)),
     (1024, (32, 32), (896, 896)), (64, (8, 8), (224, 224))],
)
def test_image_size_for_visual_tokens(tokens, grid, size):
    assert bench.visual_grid_for_tokens(tokens) == grid
    assert bench.image_size_for_visual_tokens(tokens) == size


def test_visual_grid_is_close_for_awkward_counts():
    for tokens in (5, 97, 1000, 2047, 4099):
        rows, cols = bench.visual_grid_for_tokens(tokens)
        assert rows <= cols <= 2 * rows
        assert abs(rows * cols - tokens) <= max(1, 0.02 * tokens)


#: text (hidden, layers, heads, KV heads, head_dim, intermediate, vocab, tied) and vision (depth, width, heads, patch,
#: merged output width, DeepStack blocks) of the published config.json of each preset's checkpoint
PUBLISHED_SHAPES = {
    "qwen2.5-vl-3b": ((2048, 36, 16, 2, 128, 11008, 151936, True), (32, 1280, 16, 14, 2048, None)),
    "qwen2.5-vl-7b": ((3584, 28, 28, 4, 128, 18944, 152064, False), (32, 1280, 16, 14, 3584, None)),
    "qwen2-vl-7b": ((3584, 28, 28, 4, 128, 18944, 152064, False), (32, 1280, 16, 14, 3584, None)),
    "qwen3-vl-4b": ((2560, 36, 32, 8, 128, 9728, 151936, True), (24, 1024, 16, 16, 2560, [5, 11, 17])),
    "qwen3-vl-8b": ((4096, 36, 32, 8, 128, 12288, 151936, False), (27, 1152, 16, 16, 4096, [8, 16, 24])),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_SHAPES))
def test_large_presets_match_the_published_checkpoints(name):
    model = presets.build_preset_model(name, materialize=False)  # meta device: no memory
    count = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert count == presets.PRESETS[name].published_parameters
    text, vision = model.config.get_text_config(), model.config.vision_config
    (hidden, layers, heads, kv_heads, head_dim, intermediate, vocab, tied), expected_vision = PUBLISHED_SHAPES[name]
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads, text.intermediate_size,
            text.vocab_size, bool(model.config.tie_word_embeddings)) == PUBLISHED_SHAPES[name][0]
    width = getattr(vision, "embed_dim", None) or vision.hidden_size  # Qwen2-VL names the tower's width embed_dim
    out = getattr(vision, "out_hidden_size", None) or vision.hidden_size  # ... and its merged output hidden_size
    assert (vision.depth, width, vision.num_heads, vision.patch_size, out,
            getattr(vision, "deepstack_visual_indexes", None)) == expected_vision
    assert model.model.language_model.layers[0].self_attn.q_proj.out_features == heads * head_dim
    assert (model.lm_head.weight is model.model.language_model.embed_tokens.weight) == tied
    assert bench.patch_and_merge(model.config) == (expected_vision[3], 2)


def test_small_preset_materialises_with_random_weights():
    model = presets.build_preset_model("small", dtype=torch.bfloat16)
    params = list(model.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in params)
    assert model.model.language_model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.model.language_model.rotary_emb.inv_freq[:1], torch.ones(1))
    q = model.model.language_model.layers[0].self_attn.q_proj
    assert 0.01 < q.weight.float().std().item() < 0.03 and not q.bias.any()
    assert bool((model.model.language_model.norm.weight == 1).all())
    again = presets.build_preset_model("small", dtype=torch.bfloat16)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)  # seeded


@pytest.mark.parametrize("name, family", [("tiny-qwen2-vl", "qwen2_vl"), ("tiny-qwen3-vl", "qwen3_vl"),
                                          ("tiny-qwen3-vl-moe", "qwen3_vl_moe")])
def test_every_family_runs_on_its_tiny_preset(tmp_path, name, family):
    """The bench builds each family's tiny preset (its own class and patch size) and prunes in both modes."""
    model = presets.build_preset_model(name)
    assert type(model).__name__ == presets.model_class_for_config(testing.tiny_vlm_config(family))
    patch = 16 if family.startswith("qwen3") else 14
    assert presets.preset_processor(name=name).image_processor.patch_size == patch
    argv = ["--model", name, "--visual-tokens", "16", "--new-tokens", "2", "--repeats", "1", "--warmup", "0",
            "--keep-ratios", "0.25", "--mode", "both", "--out-dir", str(tmp_path), "--no-progress",
            "--log-level", "WARNING", "--cpu-memory", "none", "--no-plots"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert bench.main(argv) == 0
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    data = json.loads(path.read_text())
    assert data["settings"]["visual_tokens_per_row"] == 16
    rows = {r["config"]: r for r in data["results"]}
    for mode in ("post-prefill", "in-prefill"):
        row = rows[f"{mode} keep=0.25"]
        assert row["pruned"] and row["kept_visual_per_row"] == 4 < 16  # pruning happened
        assert row["physical_length_prefill"] < data["settings"]["sequence_length"]


def test_a_model_of_no_supported_family_is_one_line_naming_the_families(tmp_path, capsys):
    """A text-only checkpoint is refused from its config with one line (not transformers' list of config classes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=64)).save_pretrained(tmp_path / "llama")
    capsys.readouterr()  # save_pretrained's progress bar
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--model", str(tmp_path / "llama"), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sparse-cache-bench: error: model: "), err
    assert "is a 'llama' model (LlamaConfig)" in err
    for family in families():  # every family named; the classes of those the command line handles
        assert family.family in err, err
        assert not family.command_line or all(name in err for name in family.model_classes), err
    assert len(err) < 600


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match=r"preset: unknown preset 'huge'.*valid presets"):
        presets.build_preset_model("huge")


# --------------------------------------------------------------------------- one CLI run


def test_cli_writes_json_csv_and_plots(cli_run):
    stdout, data, rows, paths, _ = cli_run
    for kind in ("time", "memory"):
        with open(paths[kind], "rb") as handle:
            assert handle.read(8) == PNG_MAGIC
    assert [r["config"] for r in data["results"]] == CONFIGS  # baseline first, every keep ratio
    assert [r["keep_ratio"] for r in data["results"]] == [None, *KEEP_RATIOS]
    assert [r["config"] for r in rows] == CONFIGS
    assert {"prefill_s", "decode_per_token_s", "e2e_s", "kv_bytes_prefill", "peak_mem_bytes",
            "bytes_model_decode_per_token_s", "decode_measured_over_model", "model", "device"} <= set(rows[0])
    env = data["environment"]
    for key in ("torch", "transformers", "device", "dtype", "attn_implementation", "cpu", "date_utc", "python"):
        assert env[key], key
    assert (env["device"], env["dtype"], env["attn_implementation"]) == ("cpu", "float32", "sdpa")
    assert data["settings"]["visual_tokens_per_row"] == VISUAL
    assert data["settings"]["command"].startswith("sparse-cache-bench --model tiny")
    assert set(data["targets"]) == set(bench.TARGETS)
    # interleaved: every configuration once per repeat, the order reversed on odd repeats
    order = [(r["repeat"], r["config"]) for r in data["runs"]]
    assert order == [(0, c) for c in CONFIGS] + [(1, c) for c in reversed(CONFIGS)]
    assert all(run["forwards"] == NEW for run in data["runs"])
    # the markdown table: a header, then the configurations in order
    table = [line for line in stdout.splitlines() if line.startswith("| ")]
    speed, memory = table[: len(CONFIGS) + 1], table[len(CONFIGS) + 1 :]  # two tables, 7 and 8 columns
    for part in (speed, memory):
        assert part[0].startswith("| config |") and [line.split("|")[1].strip() for line in part[1:]] == CONFIGS
        assert part[0].count("|") <= 10


def test_cli_measures_every_quantity(cli_run):
    _, data, _, _, _ = cli_run
    base, *pruned = data["results"]
    for row in data["results"]:
        assert row["repeats"] == REPEATS
        for metric in ("prefill_s", "vision_s", "ttft_s", "decode_per_token_s", "e2e_s"):
            assert row[metric] > 0, (row["config"], metric)
        assert row["ttft_s"] >= row["prefill_s"] and row["e2e_s"] >= row["ttft_s"]
        assert row["peak_mem_bytes"] > 0
    assert base["score_s"] is None and base["compact_s"] is None
    assert all(r["score_s"] > 0 for r in pruned)
    assert pruned[0]["compact_s"] == 0  # keep 1.0 drops nothing: no compaction
    assert all(r["compact_s"] > 0 for r in pruned[1:])
    assert base["prefill_vs_base"] == 1 and base["decode_measured_over_model"] == 1


def test_kv_bytes_shrink_with_the_tokens_kept(cli_run):
    _, data, _, _, model = cli_run
    base = data["results"][0]
    sequence = data["settings"]["sequence_length"]
    assert base["physical_length_prefill"] == sequence
    for row, ratio in zip(data["results"][1:], KEEP_RATIOS):
        kept = math.floor(ratio * VISUAL + 0.5)
        assert row["kept_visual_per_row"] == kept
        assert row["physical_length_prefill"] == sequence - (VISUAL - kept)
    text = model.config.get_text_config()
    head_dim = text.hidden_size // text.num_attention_heads
    for row in data["results"]:
        physical = row["physical_length_prefill"]
        # layers * 2 (keys, values) * kv_heads * head_dim * dtype size * physical length * batch
        expected = text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * 4 * physical * BATCH
        assert row["kv_bytes_prefill"] == expected == bench.expected_kv_bytes(model, physical, BATCH, torch.float32)
        assert row["kv_vs_base"] == pytest.approx(physical / sequence)
        # after decoding: the new tokens but the last, which is never fed back
        assert row["kv_bytes_final"] == bench.expected_kv_bytes(model, physical + NEW - 1, BATCH, torch.float32)


def test_bytes_model_arithmetic(cli_run):
    _, data, _, _, model = cli_run
    weights = data["settings"]["decode_weight_bytes"]
    language = model.model.language_model
    embed = {id(p) for p in language.embed_tokens.parameters()}
    expected_weights = sum(p.numel() * 4 for p in language.parameters() if id(p) not in embed)
    expected_weights += model.lm_head.weight.numel() * 4
    assert weights == expected_weights == bench.decode_weight_bytes(model)
    base = data["results"][0]
    for row in data["results"]:
        per_entry = row["kv_bytes_prefill"] / (BATCH * row["physical_length_prefill"])
        assert row["kv_bytes_decode_avg"] == pytest.approx(row["kv_bytes_prefill"] + per_entry * BATCH * NEW / 2)
        predicted = base["decode_per_token_s"] * (weights + row["kv_bytes_decode_avg"]) / (
            weights + base["kv_bytes_decode_avg"])
        assert row["bytes_model_decode_per_token_s"] == pytest.approx(predicted)
        assert row["decode_measured_over_model"] == pytest.approx(row["decode_per_token_s"] / predicted)
    fewer = [r["bytes_model_decode_per_token_s"] for r in data["results"][1:]]
    assert fewer == sorted(fewer, reverse=True)  # less KV, less predicted time


def test_run_benchmark_api_with_image_size_and_one_new_token(tmp_path):
    model = presets.build_preset_model("tiny")
    processor = presets.preset_processor()
    settings = bench.BenchSettings(
        model="tiny", visual_tokens=None, image_size=(112, 112), keep_ratios=(0.5,), new_tokens=1, repeats=1,
        warmup=0, cpu_memory="none", progress=False, scorer="random",
    )
    result = bench.run_benchmark(model, processor, settings)
    assert [r["config"] for r in result.rows] == ["baseline", "keep=0.5"]
    assert result.settings["visual_tokens_per_row"] == 16
    assert result.rows[1]["kept_visual_per_row"] == 8
    assert result.rows[0]["decode_per_token_s"] is None and result.rows[0]["peak_mem_bytes"] is None
    assert result.targets["decode_bytes_model"]["met"] is None
    files = bench.write_outputs(result, str(tmp_path), plots=False)
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in files.values())
    assert "| keep=0.5 | 8 |" in bench.format_markdown(result)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--keep-ratios", "1.0,1.5"], r"keep_ratios: 1\.5 is outside \(0, 1\]"),
        (["--keep-ratios", "half"], r"keep_ratios: 'half' is not a comma-separated list"),
        (["--visual-tokens", "2"], r"visual_tokens: 2 is not valid; give an int >= 4"),
        (["--cases", "576x16"], r"cases: '576x16' is not VISUAL_TOKENS:BATCH_SIZE"),
        (["--image-size", "big"], r"image_size: 'big' is not WIDTHxHEIGHT"),
        (["--repeats", "0"], r"repeats: 0 is not valid; give an int >= 1"),
        (["--batch-size", "0"], r"batch_size: 0 is not valid"),
        (["--device", "tpu"], r"device: 'tpu' is not a torch device"),
        (["--device", "meta"], r"device: 'meta' is not supported by the benchmark"),
        (["--model", "qwen2.5-vl-72b"], r"model: 'qwen2.5-vl-72b' is neither a preset .*qwen2.5-vl-7b"),
        (["--cases", "16:1,16:2", "--name", "x"], r"name: --name names one run"),
    ],
)
def test_bad_arguments_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv + ["--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cuda"])
    assert "device: 'cuda' was requested but torch.cuda.is_available() is False" in capsys.readouterr().err


# --------------------------------------------------------------------------- the GPU script, on CPU


def test_gpu_script_runs_on_cpu_with_a_small_preset(tmp_path):
    out = tmp_path / "out"
    env = dict(
        os.environ,
        PRESET="tiny", DEVICE="cpu", DTYPE="float32", CASES="16:1,16:2", NEW_TOKENS="2", REPEATS="1",
        WARMUP="1", KEEP_RATIOS="1.0,0.5", PYTHON=sys.executable, OUT=str(out), TMPDIR=str(tmp_path),
        EXTRA_ARGS="--cpu-memory none --threads 1", PARTS="main",
    )
    done = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_bench.sh")], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["env.txt", "log.txt", "results.tar.gz", "summary.md"]
    with tarfile.open(out / "results.tar.gz") as archive:
        names = sorted(os.path.basename(n) for n in archive.getnames() if n not in (".", "./"))
    stems = ["tiny-v16-b1-n2-cpu-float32", "tiny-v16-b2-n2-cpu-float32"]
    assert names == sorted(f"{s}{x}" for s in stems for x in (".csv", ".json", "_memory.png", "_time.png"))
    summary = (out / "summary.md").read_text()
    assert all(f"### {s}" in summary for s in stems)
    assert "transformers" in (out / "env.txt").read_text()


def test_both_modes_interleaved_with_the_flops_model(tmp_path):
    argv = ["--model", "tiny", "--visual-tokens", "64", "--new-tokens", "2", "--repeats", "1", "--warmup", "0",
            "--keep-ratios", "1,0.25", "--mode", "both", "--out-dir", str(tmp_path), "--no-progress",
            "--log-level", "WARNING", "--cpu-memory", "none"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert bench.main(argv) == 0
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    data = json.loads(path.read_text())
    rows = {r["config"]: r for r in data["results"]}
    assert list(rows) == ["baseline", "post-prefill keep=1", "post-prefill keep=0.25", "in-prefill keep=1",
                          "in-prefill keep=0.25"]
    model = presets.build_preset_model("tiny")
    text = model.config.get_text_config(decoder=True)
    seq = data["settings"]["sequence_length"]
    layers = text.num_hidden_layers
    row = rows["in-prefill keep=0.25"]
    scoring = scaled_layer(2, layers)  # SparseVLM's layer 2 of 32, at this model's depth
    assert row["scoring_layer"] == scoring and row["kept_visual_per_row"] == 16
    kept_total = seq - 64 + 16
    computed = [seq] * (scoring + 1) + [kept_total] * (layers - scoring - 1)
    expected = bench.prefill_flops(text, computed) / bench.prefill_flops(text, [seq] * layers)
    assert row["flops_model_prefill_vs_base"] == pytest.approx(expected)
    assert rows["post-prefill keep=0.25"]["flops_model_prefill_vs_base"] == 1.0
    assert data["targets"]["prefill_flops_model"]["worst_config"].startswith("in-prefill")
    # the FLOPs model reduces to (s + (L - s) r) / L on the linear part when every token is visual
    lin_only = type("C", (), dict(hidden_size=8, num_attention_heads=2, num_key_value_heads=2, intermediate_size=8))
    ratio = bench.prefill_flops(lin_only, [1.0] * 3 + [0.25] * 5) / bench.prefill_flops(lin_only, [1.0] * 8)
    assert ratio == pytest.approx((3 + 5 * 0.25) / 8, rel=0.02)


# --------------------------------------------------------------------------- never a speed-up for a run that pruned nothing


def test_keep_one_is_marked_as_a_control(cli_run):
    stdout, data, rows, _, _ = cli_run
    flags = {r["config"]: (r["pruned"], r["control"]) for r in data["results"]}
    assert flags == {"baseline": (None, None), "keep=1": (False, True), "keep=0.5": (True, False),
                     "keep=0.25": (True, False), "keep=0.1": (True, False)}
    for row in data["results"][2:]:  # pruning happened: fewer visual tokens kept, fewer entries stored
        assert row["kept_visual_per_row"] < VISUAL
        assert row["physical_length_prefill"] < data["settings"]["sequence_length"]
    assert all(run["pruned"] == (run["keep_ratio"] not in (None, 1.0)) for run in data["runs"] if run["keep_ratio"])
    assert [r["control"] for r in rows] == ["", "True", "False", "False", "False"]
    assert "keep=1: every visual token kept by request, so its ratios are a control" in stdout


class _UnseenCache(DynamicCache):
    """What a transformers whose generate hides the cache from the library amounts to: a plain cache with no
    selection recorded (the hooks ignore anything but a PrunableDynamicCache)."""

    def __init__(self, model, **kwargs):
        super().__init__(config=model.config)
        self.kept_visual_positions, self.visual_scores = [], []


class _RefusingCache(_UnseenCache):
    def update(self, *args, **kwargs):
        raise RuntimeError("PrunableDynamicCache: the model was called without the cache's hooks seeing it")


@pytest.mark.parametrize("fake, message", [
    (_UnseenCache, "sparse-cache-bench: error: nothing was pruned with transformers {version}: keep=0.5 (post-prefill)"),
    (_RefusingCache, "sparse-cache-bench: error: RuntimeError: PrunableDynamicCache: the model was called without"),
])
def test_a_run_that_prunes_nothing_records_nothing(tmp_path, capsys, monkeypatch, fake, message):
    import transformers

    monkeypatch.setattr(bench, "PrunableDynamicCache", fake)
    argv = ["--model", "tiny", "--visual-tokens", "16", "--new-tokens", "2", "--repeats", "1", "--warmup", "0",
            "--keep-ratios", "1,0.5", "--out-dir", str(tmp_path / "out"), "--no-progress", "--log-level", "ERROR",
            "--cpu-memory", "none"]
    assert bench.main(argv) == 1
    out, err = capsys.readouterr()
    assert out == "" and not (tmp_path / "out").exists()  # no table, no JSON: no ratio of two unpruned runs
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(message.format(version=transformers.__version__)), errors[0]
    assert transformers.__version__ in errors[0]


# --------------------------------------------------------------------------- the paper's setting (LLaVA)

#: llava-hf/llava-1.5-7b-hf and llava-hf/llava-v1.6-vicuna-7b-hf config.json: text (hidden, layers, heads, KV heads,
#: intermediate, vocab) and CLIP tower (layers, width, heads, image size, patch); visual tokens of the preset's image
LLAVA_PUBLISHED = {
    "llava-1.5-7b": ((4096, 32, 32, 32, 11008, 32064), (24, 1024, 16, 336, 14), 576),
    "llava-next-7b": ((4096, 32, 32, 32, 11008, 32064), (24, 1024, 16, 336, 14), 576 + 48 * 48 + 48),
}


@pytest.mark.parametrize("name", sorted(LLAVA_PUBLISHED))
def test_llava_presets_match_the_published_checkpoints(name):
    """Parameter count and shapes of the published checkpoint (meta device), and the visual tokens of the preset's
    image through its offline processor: 576 for LLaVA-1.5, 576 + 2 x 2 tiles + 48 newlines for NeXT at 672 px."""
    model = presets.build_preset_model(name, materialize=False)
    assert type(model).__name__ == presets.model_class_for_config(model.config)
    count = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert count == presets.PRESETS[name].published_parameters
    text, vision = model.config.get_text_config(), model.config.vision_config
    (expected_text, expected_vision, visual) = LLAVA_PUBLISHED[name]
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size) == expected_text
    assert (vision.num_hidden_layers, vision.hidden_size, vision.num_attention_heads, vision.image_size,
            vision.patch_size) == expected_vision
    processor = presets.preset_processor(name=name)
    inputs = testing.make_inputs(processor, ["Describe."], [[testing.synthetic_image(*presets.PRESETS[name].image_size)]])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == visual


def test_depth_overrides_keep_the_published_width():
    model = presets.build_preset_model("llava-1.5-7b", materialize=False,
                                       overrides=dict(num_hidden_layers=2, vision_num_hidden_layers=1))
    text = model.config.get_text_config()
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size) == (2, 4096, 11008)
    assert model.config.vision_config.num_hidden_layers == 1
    assert sum(1 for n, _ in model.model.vision_tower.named_modules() if n.endswith("encoder.layers.0")) == 1
    quarter = presets.preset_config("llava-1.5-7b-quarter")
    assert (quarter.text_config.num_hidden_layers, quarter.text_config.hidden_size) == (32, 1024)


def _bench_json(tmp_path, argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert bench.main(argv + ["--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--out-dir", str(tmp_path),
                                  "--no-progress", "--log-level", "WARNING", "--cpu-memory", "none", "--no-plots"]) == 0
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    return json.loads(path.read_text()), out.getvalue()


def test_keep_tokens_and_the_progressive_schedule_on_the_tiny_llava_preset(tmp_path):
    """``--keep-tokens`` budgets are visual tokens per image; with ``--schedule sparsevlm`` the budget is the
    layer-average of the visual tokens computed and the FLOPs model follows every stage."""
    data, stdout = _bench_json(tmp_path, ["--model", "tiny-llava", "--keep-tokens", "8,6", "--mode", "in-prefill",
                                          "--schedule", "sparsevlm", "--layers", "8"])
    assert data["settings"]["visual_tokens_per_row"] == 16 and data["settings"]["keep_tokens"] == [8, 6]
    assert "OVERRIDDEN" in data["settings"]["model_description"]
    rows = {r["config"]: r for r in data["results"]}
    assert set(rows) == {"baseline", "keep=8 tokens", "keep=6 tokens"}
    text = presets.preset_config("tiny-llava", overrides=dict(num_hidden_layers=8)).get_text_config()
    for tokens in (8, 6):
        row = rows[f"keep={tokens} tokens"]
        stages = row["schedule"]
        assert [layer for layer, _ in stages] == [1, 2, 4]  # 2/6/15 of 32 scaled to 8 layers
        # the layer-average of the visual tokens computed is the budget (exactly, before rounding each stage)
        from sparse_cache.select import layer_average_ratio

        assert layer_average_ratio([tuple(s) for s in stages], 8) == pytest.approx(tokens / 16)
        assert row["pruned"] and row["kept_visual_per_row"] == bench._budget(16, stages[-1][1], None) < 16
        assert row["physical_length_prefill"] < data["settings"]["sequence_length"]
        total = data["settings"]["sequence_length"]
        per_layer = bench.bench_paper.schedule_tokens_per_layer(stages, 8, total, 16)
        assert per_layer[:2] == [total, total] and per_layer[-1] == total - 16 + row["kept_visual_per_row"]
        assert row["flops_model_prefill_vs_base"] == pytest.approx(
            bench.prefill_flops(text, per_layer) / bench.prefill_flops(text, [total] * 8))
    assert "Paper's setting" in stdout and "| keep=6 tokens |" in stdout


def test_keep_tokens_without_a_schedule_on_the_anyres_preset(tmp_path):
    data, stdout = _bench_json(tmp_path, ["--model", "tiny-llava-next", "--keep-tokens", "40", "--keep-ratios", "0.5",
                                          "--mode", "both"])
    assert data["settings"]["visual_tokens_per_row"] == 88  # 112 x 112: 16 base + 8 x 8 tiles + 8 newlines
    rows = {r["config"]: r for r in data["results"]}
    for mode in ("post-prefill", "in-prefill"):
        assert rows[f"{mode} keep=40 tokens"]["kept_visual_per_row"] == 40 and rows[f"{mode} keep=40 tokens"]["pruned"]
        assert rows[f"{mode} keep=0.5"]["kept_visual_per_row"] == 44
    assert rows["in-prefill keep=40 tokens"]["flops_model_prefill_vs_base"] < 1.0
    assert rows["post-prefill keep=40 tokens"]["flops_model_prefill_vs_base"] == 1.0


def test_paper_comparison_lines_at_576_tokens():
    """At LLaVA-1.5's 576 visual tokens the 192-token row is printed next to the paper's reported reductions."""
    from types import SimpleNamespace

    rows = [dict(config="baseline", keep_tokens=None, prefill_tflops_model=1.0),
            dict(config="keep=192 tokens", keep_tokens=192, kept_visual_per_row=102, mode="in-prefill",
                 schedule=[[2, 0.48], [6, 0.32], [15, 0.18]], flops_model_prefill_vs_base=0.39,
                 prefill_tflops_model=0.39, prefill_vs_base=0.40, prefill_measured_over_flops_model=1.03)]
    text = "\n".join(bench.bench_paper.comparison_lines(SimpleNamespace(rows=rows, settings={"visual_tokens_per_row": 576})))
    assert "| keep=192 tokens | 102 | 2: 276, 6: 184, 15: 104 | x0.390 (0.39 of 1) | x0.400 | 1.030 " in text
    assert "x0.463 (4.62T -> 2.14T)" in text and "x0.631 (57.82 ms -> 36.5 ms)" in text


# --------------------------------------------------------------------------- batch mode, decode step, the other parts


def test_batch_mode_parsing_and_capacity_arithmetic():
    from sparse_cache import bench_batch

    assert bench_batch.parse_batches("16,1,4") == (1, 4, 16)
    for bad in ("0,4", "1,1", "a", ""):
        with pytest.raises(ValueError, match="batches: .* is not valid"):
            bench_batch.parse_batches(bad)
    assert bench_batch.parse_memory("80GiB") == 80 * 2**30
    assert bench_batch.parse_memory("512 MiB") == 512 * 2**20
    assert bench_batch.parse_memory("1.5e9") == 1_500_000_000
    for bad in ("-1GiB", "lots", "3 parsecs", "0"):
        with pytest.raises(ValueError, match="memory_budget: .* is not valid"):
            bench_batch.parse_memory(bad)
    fit = bench_batch.fit_peak([1, 4, 16], [110, 140, 260])  # exactly 100 + 10 * batch
    assert fit == pytest.approx((100, 10))
    assert bench_batch.capacity(1000, 400, fit) == 50  # (1000 - 400 - 100) / 10
    assert bench_batch.capacity(450, 400, fit) == 0
    assert bench_batch.fit_peak([4], [140]) is None and bench_batch.capacity(1000, 0, None) is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "tiny-llava", "--visual-tokens", "16"], r"visual_tokens: preset tiny-llava's processor fixes"),
        (["--model", "tiny-llava", "--keep-tokens", "0"], r"keep_tokens: '0' is not a comma-separated list of ints"),
        (["--model", "tiny-llava", "--keep-tokens", "8,8"], r"keep_tokens: \[8, 8\] repeats a value"),
        (["--model", "tiny-llava", "--keep-tokens", "8", "--schedule", "sparsevlm"],
         r"schedule: 'sparsevlm' prunes inside the prefill; it needs mode 'in-prefill'"),
        (["--model", "some/hub-model", "--layers", "2"], r"layers: overrides the depth of a preset"),
        (["--model", "tiny-llava", "--layers", "0"], r"layers: 0 is not valid"),
    ],
)
def test_paper_setting_arguments_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv + ["--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_an_unreachable_schedule_budget_is_one_line(tmp_path, capsys):
    """On 4 layers the first stage (layer 0) computes every visual token: a 4-of-16 layer-average is out of reach."""
    code = bench.main(["--model", "tiny-llava", "--keep-tokens", "4", "--mode", "in-prefill", "--schedule", "sparsevlm",
                       "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--out-dir", str(tmp_path),
                       "--no-progress", "--log-level", "WARNING", "--cpu-memory", "none", "--no-plots"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "keep_ratio: an equivalent keep ratio of 0.25 is below" in err, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batches", "1,x"], r"batches: '1,x' is not valid"),
        (["--memory-budget", "1GiB"], r"memory_budget: --memory-budget needs --batches"),
        (["--batches", "2", "--memory-budget", "1GiB"], r"memory_budget: the capacity model is fitted over at least two"),
        (["--batches", "1,2", "--memory-budget", "huge"], r"memory_budget: 'huge' is not valid"),
        (["--batches", "1,2", "--cases", "16:1"], r"batches: --batches sets the batch sizes"),
    ],
)
def test_batch_mode_bad_arguments_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--model", "tiny"] + argv + ["--no-progress"])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_batch_mode_reports_throughput_and_a_verified_capacity(tmp_path):
    from sparse_cache import bench_batch

    argv = ["--model", "tiny", "--visual-tokens", "16", "--batches", "1,2", "--keep-ratios", "1.0,0.25",
            "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--memory-budget", "4MiB", "--out-dir",
            str(tmp_path), "--no-progress", "--log-level", "WARNING", "--threads", "1"]
    stdout = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(stdout):
            assert bench.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    stem = "tiny-v16-b1_2-n2-cpu-float32-batch"
    assert sorted(os.listdir(tmp_path)) == sorted(
        f"{stem}{x}" for x in (".csv", ".json", "_capacity.png", "_throughput.png"))
    for png in ("_capacity.png", "_throughput.png"):
        assert (tmp_path / f"{stem}{png}").read_bytes()[:8] == PNG_MAGIC
    report = json.loads((tmp_path / f"{stem}.json").read_text())
    assert [(r["batch_size"], r["config"]) for r in report["rows"]] == [
        (b, c) for b in (1, 2) for c in ("baseline", "keep=1", "keep=0.25")]
    for row in report["rows"]:
        assert row["tokens_per_s"] == pytest.approx(row["batch_size"] * 2 / row["e2e_s"])
        assert row["decode_tokens_per_s"] == pytest.approx(row["batch_size"] / row["decode_per_token_s"])
        assert row["peak_mem_bytes"] > 0
    pruned = [r for r in report["rows"] if r["config"] == "keep=0.25"]
    base = [r for r in report["rows"] if r["config"] == "baseline"]
    assert all(p["kept_visual_per_row"] == 4 and p["kv_bytes_prefill"] < b["kv_bytes_prefill"]
               for p, b in zip(pruned, base))  # it pruned
    weights = bench_batch.model_bytes(presets.build_preset_model("tiny"))
    assert report["settings"]["model_bytes"] == weights
    for entry in report["capacity"]:
        assert entry["per_row_bytes"] > 0
        expected = math.floor((4 * 2**20 - weights - entry["fixed_bytes"]) / entry["per_row_bytes"])
        assert entry["capacity"] == max(0, expected) >= 1
        assert entry["verified_batch"] == entry["capacity"] and entry["verified_total_bytes"] > weights
    assert "Capacity under a budget of" in stdout.getvalue() and "| 2 | keep=0.25 |" in stdout.getvalue()
    assert report["per_batch"]["2"]["settings"]["batch_size"] == 2


def test_decode_step_benchmark_on_the_tiny_preset(tmp_path):
    from sparse_cache import bench_decode

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert bench_decode.main(["--model", "tiny", "--visual-tokens", "16", "--keep-ratios", "1.0,0.25", "--steps",
                                  "2", "--compile-backend", "eager", "--out-dir", str(tmp_path), "--log-level",
                                  "WARNING"]) == 0
    report = json.loads((tmp_path / "tiny-v16-s2-cpu-float32-decode.json").read_text())
    base, control, pruned = report["rows"]
    assert (base["config"], control["config"], pruned["config"]) == ("baseline", "keep=1", "keep=0.25")
    assert pruned["physical_length"] < pruned["logical_length"] == base["logical_length"]  # it pruned
    assert control["physical_length"] == control["logical_length"]
    for row in report["rows"]:
        assert row["host_syncs_per_step"] == 0
        assert len(row["dynamic_steps"]) == 2
    # keep=1 and the pruned cache run the model's ops only (no mask to translate, batch 1) and write their cache in
    # place: per layer two slices and two copies instead of transformers' two torch.cat
    layers = presets.build_preset_model("tiny").config.get_text_config(decoder=True).num_hidden_layers
    for row in (control, pruned):
        assert row["ops_per_step"] == base["ops_per_step"] + 4 * layers
        assert row["ops_per_step_cat"] == base["ops_per_step"]
    for row in (control, pruned):
        assert row["compiled_graphs"] == 1  # one graph for every step: no recompile
        assert row["static_eager_step_s"] > 0 and row["static_compiled_step_s"] > 0
    assert "| keep=0.25 |" in stdout.getvalue()


def test_paired_decode_benchmark_on_the_tiny_preset(tmp_path):
    """The interleaved measurement: every configuration steps once per round; ratios are paired per round; the bytes
    model and the unpruned-length model follow their formulas from the recorded lengths."""
    from sparse_cache import bench_decode

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert bench_decode.main(["--model", "tiny", "--visual-tokens", "64", "--keep-ratios", "0.5,0.25", "--rounds",
                                  "3", "--paired-only", "--out-dir", str(tmp_path), "--log-level", "WARNING"]) == 0
    report = json.loads((tmp_path / "tiny-v64-r3-cpu-float32-paired.json").read_text())
    rows = {row["config"]: row for row in report["rows"]}
    assert list(rows) == ["baseline", "keep=1", "keep=0.5", "keep=0.25", "keep=1, short prompt"]
    base, control, short = rows["baseline"], rows["keep=1"], rows["keep=1, short prompt"]
    for keep in ("keep=0.5", "keep=0.25"):
        assert rows[keep]["physical_length"] < rows[keep]["logical_length"] == base["logical_length"]  # it pruned
    assert control["physical_length"] == control["logical_length"] == base["logical_length"]
    assert short["prompt_tokens"] < base["prompt_tokens"] and report["settings"]["short_tokens"] == 16  # 64 x 0.25
    for row in rows.values():
        assert len(row["steps"]) == 3 + 2  # two warm-up rounds
        ratios = [t / b for t, b in zip(row["steps"][2:], base["steps"][2:])]
        assert row["paired_ratio"] == pytest.approx(sorted(ratios)[1])
        assert row["paired_ratio_q25"] <= row["paired_ratio"] <= row["paired_ratio_q75"]
        assert row["mean_entries"] == row["physical_length"] + 1 + (3 + 3) / 2
    w, per = report["settings"]["weight_bytes"], report["settings"]["kv_bytes_per_entry"]
    assert per == 1024 and w > 0
    for row in rows.values():
        expected = (w + per * row["mean_entries"]) / (w + per * base["mean_entries"])
        assert row["bytes_model_ratio"] == pytest.approx(expected)
        assert row["measured_vs_bytes_model"] == pytest.approx(row["paired_ratio"] / expected)
    # the unpruned-length model is the line through the two unpruned controls
    assert control["measured_vs_length_model"] == pytest.approx(1.0)
    assert short["measured_vs_length_model"] == pytest.approx(1.0)
    slope = report["calibration"]["ratio_per_entry"]
    assert slope == pytest.approx((control["paired_ratio"] - short["paired_ratio"])
                                  / (control["mean_entries"] - short["mean_entries"]))
    pruned = rows["keep=0.25"]
    assert pruned["length_model_ratio"] == pytest.approx(
        control["paired_ratio"] + slope * (pruned["mean_entries"] - control["mean_entries"]))
    assert "| keep=1, short prompt |" in stdout.getvalue() and "a KV byte costs" in stdout.getvalue()


def test_paired_decode_benchmark_with_overridden_kv_heads(tmp_path):
    from sparse_cache import bench_decode, presets

    heads = presets.preset_config("tiny").get_text_config(decoder=True).num_attention_heads
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert bench_decode.main(["--model", "tiny", "--visual-tokens", "64", "--keep-ratios", "0.25", "--rounds", "1",
                                  "--paired-only", "--kv-heads", str(heads), "--out-dir", str(tmp_path),
                                  "--log-level", "WARNING"]) == 0
    report = json.loads((tmp_path / f"tiny-v64-r1-cpu-float32-paired-kv{heads}.json").read_text())
    assert report["settings"]["overrides"] == {"num_key_value_heads": heads}
    assert "OVERRIDDEN, not the published model" in stdout.getvalue()
    base_per_entry = bench.expected_kv_bytes(presets.build_preset_model("tiny"), 1, 1, torch.float32)
    kv_heads = presets.preset_config("tiny").get_text_config(decoder=True).num_key_value_heads
    assert report["settings"]["kv_bytes_per_entry"] == base_per_entry * heads // kv_heads


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "-1"], "rounds: -1 is negative"),
    (["--rounds", "0", "--paired-only"], "paired-only: needs rounds > 0"),
    (["--short-tokens", "0"], "short_tokens: 0 is not valid"),
    (["--kv-heads", "3"], "kv_heads: 3 does not divide the 4 query heads of tiny"),
    (["--kv-heads", "0"], "kv_heads: 0 is not valid"),
])
def test_paired_decode_benchmark_refuses_bad_arguments(argv, message, capsys):
    from sparse_cache import bench_decode

    with pytest.raises(SystemExit):
        bench_decode.main(["--model", "tiny", "--visual-tokens", "16", *argv])
    assert message in capsys.readouterr().err


def test_gpu_script_other_parts_run_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = dict(
        os.environ,
        PRESET="tiny", DEVICE="cpu", DTYPE="float32", PARTS="decode,batch,prellm", DECODE_TOKENS="16",
        DECODE_STEPS="2", COMPILE_BACKEND="eager", BATCHES="1,2", BATCH_TOKENS="16", BATCH_NEW_TOKENS="2",
        MEMORY_BUDGET="4MiB", NEW_TOKENS="2", REPEATS="1", WARMUP="0", KEEP_RATIOS="1.0,0.5",
        PRELLM_SCORER="random", PYTHON=sys.executable, OUT=str(out), TMPDIR=str(tmp_path),
        EXTRA_ARGS="--threads 1", PAIRED_ROUNDS="2",
    )
    done = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_bench.sh")], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with tarfile.open(out / "results.tar.gz") as archive:
        names = {os.path.basename(n) for n in archive.getnames() if n not in (".", "./")}
    assert "tiny-v16-s2-cpu-float32-decode.json" in names and "tiny-v16-r2-cpu-float32-paired.json" in names
    assert {"tiny-v16-b1_2-n2-cpu-float32-batch.json", "tiny-v16-b1_2-n2-cpu-float32-batch_throughput.png"} <= names
    summary = (out / "summary.md").read_text()
    assert "### tiny-v16-s2-cpu-float32-decode" in summary and "Capacity under a budget of" in summary
    assert "### tiny-v16-r2-cpu-float32-paired" in summary and "| keep=0.1 |" in summary
    from sparse_cache import cache as cache_module

    if "pre-llm" in cache_module.MODES:
        assert "tiny-v16-b1-n2-cpu-float32-pre-llm.json" in names
    else:
        assert "pre-llm: skipped" in summary


def test_flops_and_weights_model_adds_one_pass_over_the_weights():
    """The weights' time is the baseline decode step's weight share; the rest of the baseline prefill scales with
    the FLOPs ratio (10 s prefill, a 0.2 s step reading 300 B of weights and 100 B of KV: 0.15 s of weights)."""
    from types import SimpleNamespace

    rows = [dict(config="baseline", prefill_s=10.0, decode_per_token_s=0.2, kv_bytes_decode_avg=100.0),
            dict(config="keep=64 tokens", flops_model_prefill_vs_base=0.5)]
    result = SimpleNamespace(rows=rows, settings={"decode_weight_bytes": 300})
    ratio = bench.bench_paper.flops_and_weights_ratio(result, rows[1])
    assert ratio == pytest.approx((0.5 * (10.0 - 0.15) + 0.15) / 10.0)
    assert 0.5 < ratio < 1.0  # never below the FLOPs ratio, never above the baseline
    assert bench.bench_paper.flops_and_weights_ratio(result, rows[0]) is None  # the baseline has no FLOPs ratio
    assert bench.bench_paper.flops_and_weights_ratio(SimpleNamespace(rows=rows, settings={}), rows[1]) is None
