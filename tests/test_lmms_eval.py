"""lmms-eval integration (sparse_cache/eval/): the toy VLM through lmms-eval's real evaluator, offline.

The end-to-end test runs ``sparse-cache eval`` in a subprocess on a local task made of the toy VLM's own
samples (sparse_cache/eval/toy_task.py), once unpruned (``keep_ratio=1.0``) and once pruned (random scorer,
10% kept inside the prefill after layer 0, the setting where the toy's single-question accuracy drops), in one
lmms-eval process (``--config`` with two runs), and checks:

- pruning happened: every ``generate`` call of the pruned run kept exactly the budget of its 64 visual tokens
  (the per-call log), and the unpruned run kept all of them;
- lmms-eval's reported accuracy equals the package's own toy accuracy (``sparse_cache.toy.quality.evaluate_single``)
  for the same samples and settings, and so does every sample's correctness;
- the pruned accuracy is below the unpruned one (so the comparison can tell them apart).

It needs the ``eval`` extra and lmms-eval (README, "Evaluate on benchmarks"); without them it is skipped, unless
``SPARSE_CACHE_REQUIRE_LMMS_EVAL=1`` (set by .ci/run once the install succeeded), where it fails.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sparse_cache import cli
from sparse_cache.eval import FAMILIES, INSTALL_HINT, class_path, model_ids
from sparse_cache.eval import vision
from sparse_cache.eval.sweep import collect, to_markdown

ROOT = Path(__file__).resolve().parent.parent
HAS_LMMS_EVAL = importlib.util.find_spec("lmms_eval") is not None
REQUIRED = os.environ.get("SPARSE_CACHE_REQUIRE_LMMS_EVAL") == "1"
SKIP_REASON = f"lmms-eval is not installed (install: {INSTALL_HINT})"


def _need_lmms_eval():
    if not HAS_LMMS_EVAL:
        if REQUIRED:
            pytest.fail(f"SPARSE_CACHE_REQUIRE_LMMS_EVAL=1 but {SKIP_REASON}")
        pytest.skip(SKIP_REASON)


# --------------------------------------------------------------------------- without lmms-eval


def test_eval_is_listed_and_help_stays_light(capsys):
    assert cli.main(["--help"]) == 0
    assert "eval" in capsys.readouterr().out
    code = "import sys, sparse_cache.cli as c; c.build_parser(); print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lmms_eval')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert out.strip() == "[]"


def test_eval_usage_without_arguments(capsys):
    assert cli.main(["eval"]) == 0
    out = capsys.readouterr().out
    for model_id in model_ids():
        assert model_id in out
    assert "keep_ratio" in out and INSTALL_HINT in out


@pytest.mark.skipif(HAS_LMMS_EVAL, reason="checks the message shown when lmms-eval is missing")
def test_eval_without_lmms_eval_is_one_clear_error(capsys):
    assert cli.main(["eval", "--model", "sparse_qwen2_5_vl", "--tasks", "mme"]) == 1
    err = capsys.readouterr().err
    assert "lmms-eval is not importable" in err and INSTALL_HINT in err


def test_model_names():
    assert model_ids() == [f"sparse_{name}" for name in FAMILIES]
    assert "sparse_qwen2_5_vl" in model_ids()
    assert class_path("qwen2_5_vl", chat=True) == "sparse_cache.eval.models.Sparse_qwen2_5_vl_Chat"


def test_vision_stand_in_resizes_as_qwen_vl_utils():
    board = Image.new("RGB", (224, 224), (128, 128, 128))
    message = [{"role": "user", "content": [{"type": "image", "image": board}, {"type": "text", "text": "q"}]}]
    images, videos, kwargs = vision.process_vision_info([message], return_video_kwargs=True, return_video_metadata=True)
    assert [im.size for im in images] == [(224, 224)] and videos is None and kwargs == {"do_sample_frames": False}
    # the values qwen_vl_utils 0.0.14's smart_resize gives (it and this copy agreed on 20,000 random sizes and bounds)
    assert vision.smart_resize(224, 224, 28) == (224, 224)
    assert vision.smart_resize(100, 300, 28) == (112, 308)
    assert vision.smart_resize(224, 224, 28, min_pixels=200704) == (448, 448)
    assert vision.smart_resize(2000, 1000, 28, max_pixels=50176) == (308, 140)
    rgba = Image.new("RGBA", (56, 84), (255, 0, 0, 0))
    element = {"image": rgba, "min_pixels": 28 * 28, "max_pixels": 28 * 28 * 16}
    assert vision.fetch_image(element).getpixel((0, 0)) == (255, 255, 255)  # transparent over white
    with pytest.raises(RuntimeError, match="video input needs qwen-vl-utils"):
        vision.process_vision_info([[{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}]}]])
    with pytest.raises(ValueError, match="max_pixels"):
        vision.smart_resize(224, 224, 28, min_pixels=1000, max_pixels=10)


# --------------------------------------------------------------------------- with lmms-eval


def test_every_family_resolves_through_lmms_eval_registry():
    _need_lmms_eval()
    from importlib.metadata import entry_points

    from lmms_eval.models import get_model, list_available_models

    from sparse_cache.eval import register
    from sparse_cache.eval.models import SparseCacheModel

    if any(ep.value == "sparse_cache.eval:manifests" for ep in entry_points(group="lmms_eval.models")):
        # installed with setup.cfg's entry point (as in CI): lmms-eval found the models by itself
        assert set(model_ids()) <= set(list_available_models())
    register()
    for name, (simple, chat) in FAMILIES.items():
        cls = get_model(f"sparse_{name}")
        expected = chat or simple
        assert issubclass(cls, SparseCacheModel)
        assert f"{cls.__mro__[2].__module__}.{cls.__mro__[2].__name__}" == expected
        assert cls.model_id == f"sparse_{name}"
        assert get_model(f"sparse_{name}", force_simple=True).__mro__[2].__module__ == simple.rsplit(".", 1)[0]


def test_bad_model_args_are_refused():
    _need_lmms_eval()
    from sparse_cache.eval.models import Sparse_qwen2_5_vl_Chat
    from sparse_cache.toy import TOY_VLM_PATH

    with pytest.raises(ValueError, match="sparse_qwen2_5_vl: no budget in --model_args: give keep_ratio="):
        Sparse_qwen2_5_vl_Chat(pretrained=TOY_VLM_PATH, device="cpu", device_map="cpu")
    with pytest.raises(ValueError, match="scorer: unknown scorer 'sparse'; valid names are"):
        Sparse_qwen2_5_vl_Chat(pretrained=TOY_VLM_PATH, device="cpu", device_map="cpu", keep_ratio=0.5, scorer="sparse")
    with pytest.raises(ValueError, match="mode: unknown mode 'inprefill'"):
        Sparse_qwen2_5_vl_Chat(pretrained=TOY_VLM_PATH, device="cpu", device_map="cpu", keep_ratio=0.5, mode="inprefill")
    with pytest.raises(ValueError, match="scoring_layer"):  # the cache's own check, once the model is loaded
        Sparse_qwen2_5_vl_Chat(pretrained=TOY_VLM_PATH, device="cpu", device_map="cpu", keep_ratio=0.5, scorer="random",
                               mode="in-prefill")
    with pytest.raises(ValueError, match="dtype: expected one of"):
        Sparse_qwen2_5_vl_Chat(pretrained=TOY_VLM_PATH, device="cpu", device_map="cpu", keep_ratio=0.5, dtype="fp8")


#: samples in the dataset file; --limit evaluates the first LIMIT of them
SAMPLES, LIMIT = 24, 16
PRUNED = {"keep_ratio": 0.1, "scorer": "random", "mode": "in-prefill", "scoring_layer": 0}


def _toy_model_args(**extra) -> str:
    from sparse_cache.eval.toy_task import TOY_MODEL_ARGS
    from sparse_cache.toy import TOY_VLM_PATH

    return ",".join([f"pretrained={TOY_VLM_PATH}", TOY_MODEL_ARGS] + [f"{k}={v}" for k, v in extra.items()])


def test_toy_vlm_through_lmms_eval_matches_package_accuracy(tmp_path):
    _need_lmms_eval()
    import torch

    from sparse_cache.eval.toy_task import TASK_NAME, toy_samples, write_toy_task
    from sparse_cache.select import budget
    from sparse_cache.toy import load_toy_vlm
    from sparse_cache.toy.quality import evaluate_single

    write_toy_task(tmp_path / "task", samples=SAMPLES)
    runs = {"unpruned": {"keep_ratio": 1.0}, "pruned": PRUNED}
    config = [
        {
            "model": "sparse_qwen2_5_vl",
            "model_args": _toy_model_args(**settings, pruning_log=tmp_path / "runs" / name / "pruning.jsonl"),
            "tasks": TASK_NAME,
            "include_path": str(tmp_path / "task"),
            "batch_size": 1,
            "limit": LIMIT,
            "log_samples": True,
            "output_path": str(tmp_path / "runs" / name),
        }
        for name, settings in runs.items()
    ]
    for name in runs:
        (tmp_path / "runs" / name).mkdir(parents=True)
    (tmp_path / "runs.yaml").write_text(json.dumps(config))  # JSON is YAML
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run([sys.executable, "-m", "sparse_cache", "eval", "--config", str(tmp_path / "runs.yaml")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])

    samples = toy_samples(SAMPLES)[:LIMIT]
    model, processor = load_toy_vlm()
    num_visual = 64
    for name, settings in runs.items():
        # pruning happened (or, unpruned, did not): one log line per generate call, exact kept counts
        calls = [json.loads(line) for line in (tmp_path / "runs" / name / "pruning.jsonl").read_text().splitlines()]
        assert len(calls) == LIMIT, name
        expected_kept = budget(num_visual, settings["keep_ratio"], None)
        assert 0 < budget(num_visual, PRUNED["keep_ratio"], None) < num_visual
        assert all(c["visual"] == [num_visual] and c["kept"] == [expected_kept] for c in calls), (name, calls[:3])

        (results_file,) = glob.glob(str(tmp_path / "runs" / name / "*" / "*_results.json"))
        reported = json.loads(Path(results_file).read_text())["results"][TASK_NAME]["accuracy,none"]
        (samples_file,) = glob.glob(str(tmp_path / "runs" / name / "*" / f"*_samples_{TASK_NAME}.jsonl"))
        logged = {r["doc_id"]: r for r in map(json.loads, Path(samples_file).read_text().splitlines())}
        assert sorted(logged) == list(range(LIMIT))

        # the package's own toy evaluation of the same samples, one per call as lmms-eval's batch_size=1
        scorer = "unpruned" if settings["keep_ratio"] == 1.0 else f"{settings['scorer']}@{settings['scoring_layer']}"
        mode = settings.get("mode")
        with torch.no_grad():
            own = [evaluate_single(model, processor, [s], scorer, settings["keep_ratio"], mode=mode, batch_size=1)
                   for s in samples]
        own_correct = [r["accuracy"] for r in own]
        assert [logged[i]["accuracy"] for i in range(LIMIT)] == own_correct, name
        assert [logged[i]["target"] for i in range(LIMIT)] == [s.answer for s in samples]
        assert reported == pytest.approx(sum(own_correct) / LIMIT, abs=1e-12), name
        runs[name] = dict(settings, accuracy=reported)
    assert runs["unpruned"]["accuracy"] == 1.0
    assert runs["pruned"]["accuracy"] < runs["unpruned"]["accuracy"]
    assert "kept 96 of 1024 visual tokens" in proc.stderr

    # the sweep's summary table reads the same files
    rows = {r["run"]: r for r in collect(tmp_path / "runs")}
    assert rows["pruned"][f"{TASK_NAME} accuracy"] == runs["pruned"]["accuracy"]
    assert rows["unpruned"]["kept"] == 1.0 and rows["pruned"]["kept"] == pytest.approx(6 / 64)
    assert "| pruned |" in to_markdown(list(rows.values()))


def test_sweep_script_dry_run():
    env = {**os.environ, "DRY_RUN": "1", "OUT": "sweep_out"}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "eval_sweep.sh")], capture_output=True, text=True, env=env,
                         check=True).stdout
    commands = [line for line in out.splitlines() if line.startswith("=== ")]
    assert len(commands) == 7  # the baseline, then 3 scorers x 2 keep ratios
    assert "--model sparse_qwen2_5_vl --tasks mme,gqa,textvqa_val,pope" in commands[0]
    assert "pretrained=Qwen/Qwen2.5-VL-7B-Instruct,keep_ratio=1.0," in commands[0]
    assert "keep_ratio=0.1,scorer=random,mode=in-prefill,scoring_layer=2," in commands[-1]
