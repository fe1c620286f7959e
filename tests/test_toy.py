"""The shipped toy VLM: task generator, offline loading, accuracy, and the quality benchmark.

No training happens here: the checkpoint in sparse_cache/assets/toy-vlm is loaded as shipped.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from sparse_cache import PrunableDynamicCache
from sparse_cache._compat import CACHE_KWARG
from sparse_cache.toy import (
    CELL_PX,
    COLOURS,
    PALETTE,
    TOY_VLM_PATH,
    build_inputs,
    followup_text,
    load_toy_vlm,
    make_followup,
    make_sample,
    make_scene,
    toy_processor,
)
from sparse_cache.toy import quality, stats
from sparse_cache.toy.train import BatchEncoder, draw_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The toy model's ops are tiny: one thread is as fast uncontended and several times faster when the
    cores are shared (measured: 0.4 s vs 1.4 s for 100 images' vision tower on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy():
    return load_toy_vlm()


# --------------------------------------------------------------------------- task generator


def test_sample_is_consistent_and_deterministic():
    image, question, answer, cells = make_sample(7)
    again = make_sample(7)
    assert question == again.question and answer == again.answer and cells == again.queried_cells
    assert np.array_equal(np.asarray(image), np.asarray(again.image))
    assert image.size == (8 * CELL_PX, 8 * CELL_PX)
    colour = question.split()[3]
    assert question == f"is there a {colour} cell ?" and colour in COLOURS
    assert (answer == "yes") == bool(cells) and len(cells) <= 2
    pixels = np.asarray(image).astype(int)
    for cell in range(64):  # queried cells, and only they, have the queried colour (up to the jitter)
        r, c = divmod(cell, 8)
        centre = pixels[r * CELL_PX + CELL_PX // 2, c * CELL_PX + CELL_PX // 2]
        close = np.abs(centre - np.array(PALETTE[colour])).max() <= 12
        assert close == (cell in cells)


def test_samples_are_balanced():
    rng = np.random.default_rng(0)
    samples = [make_sample(rng) for _ in range(400)]
    yes = sum(s.answer == "yes" for s in samples)
    assert 160 < yes < 240
    counts = {len(s.queried_cells) for s in samples if s.answer == "yes"}
    assert counts == {1, 2}


def test_followup_colours():
    for seed in range(20):
        same = make_followup(seed, same=True)
        assert same.questions[0] == same.questions[1] and same.queried_cells[0] == same.queried_cells[1]
        diff = make_followup(seed, same=False)
        assert diff.colours[0] != diff.colours[1]
        for colour, answer, cells in zip(diff.colours, diff.answers, diff.queried_cells):
            assert diff.scene.cells_of(colour) == cells and (answer == "yes") == bool(cells)


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: make_sample(0, colour="mauve"), ValueError, "valid colours"),
        (lambda: make_sample("0"), TypeError, "rng"),
        (lambda: make_scene(0, grid=1), ValueError, "grid"),
        (lambda: make_scene(0, [("red", True), ("red", False)]), ValueError, "distinct"),
        (lambda: make_scene(0, grid=2, num_coloured=5), ValueError, "fit"),
    ],
)
def test_bad_task_arguments(call, error, words):
    with pytest.raises(error, match=words):
        call()


def test_training_batches_match_the_processor():
    processor = toy_processor()
    encoder = BatchEncoder(processor)
    rng = np.random.default_rng(3)
    for kind in ("small", "single", "followup"):
        encoder.check_against_processor(*draw_batch(rng, kind, 2))


# --------------------------------------------------------------------------- checkpoint


def test_checkpoint_loads_offline_in_a_fresh_process():
    code = (
        "import sparse_cache.toy as toy\n"
        "from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration\n"
        "p = AutoProcessor.from_pretrained(toy.TOY_VLM_PATH)\n"
        "m = Qwen2_5_VLForConditionalGeneration.from_pretrained(toy.TOY_VLM_PATH)\n"
        "print(type(p).__name__, type(p.image_processor).__name__, sum(x.numel() for x in m.parameters()))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    name, image_processor, params = result.stdout.split()[-3:]
    assert name == "TinyQwen2_5_VLProcessor" and image_processor == "Qwen2VLImageProcessorPil"
    assert int(params) < 2_000_000
    size = sum(os.path.getsize(os.path.join(TOY_VLM_PATH, f)) for f in os.listdir(TOY_VLM_PATH))
    assert size < 8 * 2**20


def test_processor_is_the_toy_processor(toy):
    _, processor = toy
    sample = make_sample(11)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    got = processor(text=[text], images=[sample.image], return_tensors="pt")
    want = toy_processor()(text=[text], images=[sample.image], return_tensors="pt")
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert got["image_grid_thw"].tolist() == [[1, 16, 16]]
    assert int((got["input_ids"] == processor.image_token_id).sum()) == 64


def test_accuracy_on_fresh_samples(toy):
    model, processor = toy
    rng = np.random.default_rng(20_240_501)  # a stream the training never drew from
    samples = [make_sample(rng) for _ in range(200)]
    metrics = quality.evaluate_single(model, processor, samples, quality.UNPRUNED, 1.0, batch_size=100)
    assert metrics["accuracy"] >= 0.97, metrics


def test_generate_answers_with_end_of_turn(toy):
    model, processor = toy
    sample = make_sample(5)
    inputs = build_inputs(processor, [sample.image], [sample.question])
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert processor.decode(out[0, inputs["input_ids"].shape[1] :]) == f"{sample.answer}<|im_end|>"


def test_bad_load_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="train one"):
        load_toy_vlm(path=tmp_path)
    with pytest.raises(ValueError, match="attn_implementation"):
        load_toy_vlm(attn_implementation="flash_attention_2")


# --------------------------------------------------------------------------- pruning on the toy model


def test_followup_on_unpruned_cache_matches_dynamic_cache(toy):
    """Protocol (b)'s two generate calls give the same logits through PrunableDynamicCache(keep_ratio=1)."""
    model, processor = toy
    conversations = [make_followup(seed, same=False) for seed in range(4)]
    inputs = build_inputs(processor, [c.image for c in conversations], [c.questions[0] for c in conversations])
    logits = []
    for cache in (DynamicCache(config=model.config), PrunableDynamicCache(model, keep_ratio=1.0)):
        out = model.generate(**inputs, **{CACHE_KWARG: cache}, max_new_tokens=1, do_sample=False)
        answers = processor.batch_decode(out[:, -1:])
        new = processor.tokenizer(
            [followup_text(processor, a, c.questions[1]) for a, c in zip(answers, conversations)],
            add_special_tokens=False,
            return_tensors="pt",
        )["input_ids"]
        ids = torch.cat([out, new], 1)
        mask = torch.ones_like(ids)
        out2 = model.generate(
            input_ids=ids, attention_mask=mask, **{CACHE_KWARG: cache}, max_new_tokens=1, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )
        logits.append(out2.logits[0])
    assert torch.equal(logits[0], logits[1])


def test_text_guided_scoring_beats_random_on_followup_recall(toy):
    """Protocol (b), same colour, 10% kept: text-guided scoring keeps far more of the queried cells than random.

    SparseVLM is scored at layer 0, where this model's question tokens attend to the cells of the queried
    colour. At its default layer 2 (half-way up a 4-layer model) the raters' attention no longer follows
    the question, and SparseVLM keeps no more of the queried cells than random (docs/toy-vlm.md).
    """
    model, processor = toy
    rng = np.random.default_rng(99)
    conversations = [make_followup(rng, same=True) for _ in range(60)]
    batches = quality.encode_batches(processor, conversations, 60)
    recall = {}
    for scorer in ("sparsevlm@0", "random"):
        metrics = quality.evaluate_followup(model, processor, conversations, scorer, 0.1, batches=batches)
        assert metrics["kept_tokens"] == round(0.1 * 64) < 64  # pruning happened before recall is compared
        recall[scorer] = metrics["queried_recall"]
    assert recall["sparsevlm@0"] > recall["random"] + 0.2, recall


def test_quality_benchmark_runs_on_a_small_sample(toy, tmp_path):
    model, processor = toy
    report = quality.run_quality(
        model, processor, scorers=["sparsevlm", "random", "oracle"], keep_ratios=[1.0, 0.1], samples=6, batch_size=6
    )
    protocols = {r["protocol"] for r in report["results"]}
    expected = set(quality.PROTOCOLS) - set(report["skipped"])
    assert protocols == expected
    for row in report["results"]:
        assert 0.0 <= row["accuracy"] <= 1.0
        if row["scorer"] == "oracle" and row["n"] and not np.isnan(row["queried_recall"]):
            assert row["queried_recall"] == 1.0
        if row["keep_ratio"] == 0.1:
            assert row["kept_tokens"] == round(0.1 * 64) < 64  # pruned (a cache that prunes nothing raises)
    paths = quality.write_report(report, tmp_path)
    assert json.loads(paths["json"].read_text())["settings"]["samples"] == 6
    assert "followup-same" in paths["markdown"].read_text()
    assert paths["plot"].stat().st_size > 0


def _within(value, ci):
    return value is None or ci[0] <= value <= ci[1]


def test_quality_report_carries_intervals_and_sample_counts(toy, tmp_path):
    """Every figure has its interval (holding the figure) and its n, in memory and in the JSON; the paired
    comparisons are there for every pruned row, and recomputing them gives the same numbers (fixed seed)."""
    model, processor = toy
    report = quality.run_quality(
        model, processor, scorers=["sparsevlm", "random", "oracle"], keep_ratios=[1.0, 0.1],
        protocols=["followup-different"], samples=12, batch_size=12,
    )
    results = report["results"]
    assert {r["n"] for r in results} == {12}
    n_yes = sum(c.answers[1] == "yes" for c in quality_data(12, "followup-different"))
    assert {r["n_recall"] for r in results} == {n_yes} and 0 < n_yes < 12
    for row in results:
        assert row["accuracy_ci"] == list(stats.wilson_interval(round(row["accuracy"] * 12), 12))
        assert _within(row["accuracy"], row["accuracy_ci"]) and _within(row["queried_recall"], row["queried_recall_ci"])
        per_sample = row[quality.PER_SAMPLE]
        assert per_sample["accuracy"].mean() == row["accuracy"]
        assert np.nanmean(per_sample["queried_recall"]) == pytest.approx(row["queried_recall"])
        assert list(stats.bootstrap_interval(per_sample["queried_recall"][~np.isnan(per_sample["queried_recall"])])) \
            == row["queried_recall_ci"]
    pruned = [r for r in results if r["keep_ratio"] == 0.1]
    assert all(r["kept_tokens"] == round(0.1 * 64) < 64 for r in pruned)  # pruning happened
    comparisons = report["comparisons"]
    # each pruned scorer against unpruned (accuracy), random and sparsevlm (accuracy and recall), not itself
    assert len(comparisons) == 3 * 1 + 2 * 2 + 2 * 2
    for c in comparisons:
        assert c["n"] == (12 if c["metric"] == "accuracy" else n_yes)
        assert c["ci"][0] <= c["difference"] <= c["ci"][1] and c["separated"] == (c["ci"][0] > 0 or c["ci"][1] < 0)
    oracle = next(c for c in comparisons if (c["scorer"], c["baseline"], c["metric"]) == ("oracle", "random",
                                                                                        "queried_recall"))
    assert oracle["difference"] > 0.5 and oracle["separated"]  # keeps every queried cell, random 10%
    assert quality.paired_comparisons(results) == comparisons  # reproducible: fixed bootstrap seed
    paths = quality.write_report(report, tmp_path, plot=False)
    written = json.loads(paths["json"].read_text())
    assert written["settings"]["intervals"] == quality.INTERVALS and written["settings"]["samples"] == 12
    for row, original in zip(written["results"], results):
        assert quality.PER_SAMPLE not in row
        for key in ("n", "n_recall", "accuracy", "accuracy_ci", "queried_recall", "queried_recall_ci"):
            assert row[key] == original[key]
    assert written["comparisons"] == json.loads(json.dumps(comparisons))
    text = paths["markdown"].read_text()
    assert "n = 12 samples" in text and "Paired difference" in text
    assert quality.markdown_report(written) == text  # the tables can be rebuilt from the JSON alone


def test_quality_coverage_rows_count_what_cache_stats_kept(toy, tmp_path):
    """A coverage row (sparsevlm, keep_ratio="auto") reports the visual tokens each sample kept, as the cache's
    own stats count them for the same batch; pruning happened; it is compared with unpruned and with the fixed
    count of its mean; ``--only coverage`` adds such rows to an existing report and leaves the others alone."""
    model, processor = toy
    protocol = "followup-different"
    report = quality.run_quality(model, processor, scorers=["random"], keep_ratios=[1.0, 0.5], protocols=[protocol],
                                 samples=12, batch_size=12, coverages=[0.5])
    row = next(r for r in report["results"] if r.get("coverage") == 0.5)
    assert row["keep_ratio"] == "auto" and row["scorer"] == quality.DEFAULT_SCORER and row["visual_tokens"] == 64
    kept = row[quality.PER_SAMPLE]["kept_tokens"]
    # the same first turn on a cache built here: its stats count the same tokens per sample
    conversations = quality_data(12, protocol)
    inputs = quality.encode_batches(processor, conversations, 12)[0][1]
    cache = PrunableDynamicCache(model, keep_ratio="auto", coverage=0.5)
    model.generate(**inputs, **{CACHE_KWARG: cache}, max_new_tokens=1, do_sample=False)
    counts = [r.visual_tokens_kept for r in cache.stats.rows]
    assert counts == [int(k.numel()) for k in cache.kept_visual_positions] == kept.astype(int).tolist()
    assert row["kept_tokens"] == np.mean(counts) < 64 and row["samples_keeping_all"] < 12  # pruning happened
    assert row["kept_tokens_range"] == [min(counts), max(counts)] and _within(row["kept_tokens"], row["kept_tokens_ci"])
    assert row["kept_share"] == pytest.approx(np.mean(counts) / 64)
    matched = next(r for r in report["results"] if r.get("matched_to") == "coverage=0.5")
    assert matched["keep_tokens"] == int(np.floor(np.mean(counts) + 0.5)) and matched["kept_tokens"] == matched[
        "keep_tokens"]
    ours = [c for c in report["comparisons"] if c.get("coverage") == 0.5]
    assert sorted((c["baseline"], c["metric"]) for c in ours) == [
        (quality.MATCHED, "accuracy"), (quality.MATCHED, "queried_recall"), (quality.UNPRUNED, "accuracy")]
    assert all(c["keep_ratio"] == "auto" for c in ours)
    assert not any(c.get("matched_to") or c["scorer"] == quality.DEFAULT_SCORER and c["keep_ratio"] != "auto"
                   for c in report["comparisons"])  # the matched row is a baseline only
    text = quality.markdown_report(report)
    assert "Coverage budgets" in text and f"| 0.5 | {row['kept_tokens']:.1f} [" in text

    # --only coverage: into an existing report written without coverage rows
    first = quality.run_quality(model, processor, scorers=["random"], keep_ratios=[1.0, 0.5], protocols=[protocol],
                                samples=12, batch_size=12)
    quality.write_report(first, tmp_path, plot=False)
    before = json.loads((tmp_path / "quality.json").read_text())
    argv = ["--only", "coverage", "--coverages", "0.5", "--samples", "12", "--protocols", protocol, "--batch-size",
            "12", "--out-dir", str(tmp_path), "--no-plot", "--no-progress"]
    assert quality.main(argv) == 0
    after = json.loads((tmp_path / "quality.json").read_text())
    assert [r for r in after["results"] if r.get("coverage") is None and r.get("matched_to") is None] \
        == before["results"]
    assert [c for c in after["comparisons"] if c.get("coverage") is None] == before["comparisons"]
    merged = next(r for r in after["results"] if r.get("coverage") == 0.5)
    assert merged["kept_tokens"] == row["kept_tokens"] and merged["accuracy"] == row["accuracy"]
    assert after["settings"]["coverages"] == [0.5] and after["settings"]["scorers"] == ["random"]
    assert (tmp_path / "quality.md").read_text() == quality.markdown_report(after)
    with pytest.raises(SystemExit):  # another seed: other samples than the report's
        quality.main(argv + ["--seed", "1"])


def quality_data(samples, protocol, seed=0):
    """The conversations :func:`quality.run_quality` draws for ``protocol`` (same seeding)."""
    rng = np.random.default_rng([seed, list(quality.PROTOCOLS).index(protocol)])
    return [make_followup(rng, same=protocol.endswith("same")) for _ in range(samples)]


class _UnseenCache(DynamicCache):
    """What a transformers whose generate hides the cache from the library amounts to: a plain cache with no
    selection recorded (the hooks ignore anything but a PrunableDynamicCache)."""

    def __init__(self, model, **kwargs):
        super().__init__(config=model.config)
        self.kept_visual_positions, self.visual_scores = [], []

    def get_physical_length(self, layer_idx=0):
        return self.get_seq_length(layer_idx)


def test_quality_refuses_a_cache_that_pruned_nothing(toy, monkeypatch, capsys, tmp_path):
    """Never a table of unpruned accuracies and 100% recall labelled as pruned ones."""
    import transformers

    model, processor = toy
    monkeypatch.setattr(quality, "PrunableDynamicCache", _UnseenCache)
    samples = [make_sample(seed) for seed in range(2)]
    with pytest.raises(RuntimeError, match=rf"nothing was pruned with transformers {transformers.__version__}"):
        quality.evaluate_single(model, processor, samples, "random", 0.5, batch_size=2)
    conversations = [make_followup(seed, same=True) for seed in range(2)]
    with pytest.raises(RuntimeError, match="nothing was pruned"):
        quality.evaluate_followup(model, processor, conversations, "random", 0.5, batch_size=2)
    with pytest.raises(RuntimeError, match="nothing was pruned.*coverage=0.5 should drop some"):
        quality.evaluate_single(model, processor, samples, "sparsevlm", {"coverage": 0.5}, batch_size=2)
    assert quality.evaluate_single(model, processor, samples, "random", 1.0, batch_size=2)["kept_tokens"] == 64
    argv = ["--samples", "2", "--scorers", "random", "--keep-ratios", "0.5", "--protocols", "single",
            "--batch-size", "2", "--no-plot", "--no-progress", "--out-dir", str(tmp_path / "out")]
    assert quality.main(argv) == 1
    out, err = capsys.readouterr()
    assert out == "" and not (tmp_path / "out").exists()
    errors = [line for line in err.splitlines() if "error" in line]  # (err also holds the weight-loading bar)
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("python -m sparse_cache.toy.quality: error: nothing was pruned with transformers ")


# --------------------------------------------------------------------------- default output paths


def _tree_digest(root):
    import hashlib

    digest = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                digest[os.path.relpath(path, root)] = hashlib.sha256(handle.read()).hexdigest()
    return digest


def test_the_docs_quality_command_leaves_the_committed_results_alone(tmp_path, monkeypatch, capsys):
    """``python -m sparse_cache.toy.quality`` as docs/toy-vlm.md shows it, run from a copy of the repository root:
    nothing under benchmarks/ changes, the report goes to the scratch folder, and a second run refuses to
    overwrite it without --force (before any work)."""
    import shutil

    shutil.copytree(os.path.join(REPO, "benchmarks"), tmp_path / "benchmarks")
    before = _tree_digest(tmp_path / "benchmarks")
    monkeypatch.chdir(tmp_path)
    tiny = ["--samples", "2", "--scorers", "random", "--keep-ratios", "0.5", "--protocols", "single",
            "--batch-size", "2", "--no-progress"]
    assert quality.main(tiny) == 0
    assert _tree_digest(tmp_path / "benchmarks") == before
    out_dir = tmp_path / quality.DEFAULT_OUT_DIR
    assert sorted(os.listdir(out_dir)) == ["quality.json", "quality.md", "quality.png"]
    capsys.readouterr()
    monkeypatch.setattr(quality, "load_toy_vlm", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    with pytest.raises(SystemExit) as refused:
        quality.main(tiny)
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "already holds" in err and "--force" in err
    with pytest.raises(SystemExit):
        quality.main(tiny + ["--out-dir", "benchmarks/quality"])  # the committed results: refused too
    assert _tree_digest(tmp_path / "benchmarks") == before


def test_training_never_writes_over_the_shipped_checkpoint(tmp_path, capsys):
    from sparse_cache.toy import train

    before = _tree_digest(TOY_VLM_PATH)
    with pytest.raises(SystemExit) as refused:
        train.main(["--out", TOY_VLM_PATH, "--steps", "1", "--no-progress"])
    assert refused.value.code == 2 and "shipped toy VLM" in capsys.readouterr().err
    relative = os.path.relpath(TOY_VLM_PATH)  # the spelling the docs used to show
    with pytest.raises(SystemExit):
        train.main(["--out", relative, "--steps", "1", "--no-progress"])
    with pytest.raises(FileExistsError):
        train.train(train.TrainConfig(steps=1), TOY_VLM_PATH, progress=False)
    assert _tree_digest(TOY_VLM_PATH) == before
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path), "--steps", "1", "--no-progress"])
    assert "already holds a checkpoint" in capsys.readouterr().err
    described = train.machine_description()
    assert described["machine"] and "torch_threads" in described
