"""Evaluate pruned models on real benchmarks through lmms-eval (``pip install -e ".[eval]"``, see README).

lmms-eval (the VLM field's evaluation harness) finds this package's models through the Python entry-point
group ``lmms_eval.models`` (declared in ``setup.cfg``; lmms-eval >= 0.7 reads it when it builds its model
registry), or through :func:`register`, which ``sparse-cache eval`` calls before it hands its arguments to
lmms-eval's own command line::

    sparse-cache eval --model sparse_qwen2_5_vl \\
        --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,keep_ratio=0.25,scorer=sparsevlm,mode=in-prefill \\
        --tasks mme,pope --batch_size 1 --output_path results/

Each ``sparse_<name>`` model is lmms-eval's own ``<name>`` model class (:data:`FAMILIES`), unchanged (its
prompts, chat template, image preprocessing and generation settings), with one pruning cache made for every
``generate`` call (:mod:`sparse_cache.eval.models`). ``keep_ratio=1.0`` is the unpruned baseline on the
same code path.

This module imports neither torch nor lmms-eval: the entry point only names classes.
"""

from __future__ import annotations

#: lmms-eval model id -> (simple class path, chat class path or None) of the lmms-eval class each
#: ``sparse_<id>`` model wraps; one line per supported family
FAMILIES: dict[str, tuple[str, str | None]] = {
    "qwen2_vl": ("lmms_eval.models.simple.qwen2_vl.Qwen2_VL", None),
    "qwen2_5_vl": ("lmms_eval.models.simple.qwen2_5_vl.Qwen2_5_VL", "lmms_eval.models.chat.qwen2_5_vl.Qwen2_5_VL"),
    # Qwen3-VL dense and MoE (lmms-eval picks the class from the checkpoint's config)
    "qwen3_vl": ("lmms_eval.models.simple.qwen3_vl.Qwen3_VL", "lmms_eval.models.chat.qwen3_vl.Qwen3_VL"),
    # LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision checkpoints in the transformers format
    "llava_hf": ("lmms_eval.models.simple.llava_hf.LlavaHf", "lmms_eval.models.chat.llava_hf.LlavaHf"),
    "video_llava": ("lmms_eval.models.simple.video_llava.VideoLLaVA", None),
}

#: prefix of this package's model ids in lmms-eval's registry
PREFIX = "sparse_"
#: the lmms-eval release the integration is tested with (``.ci/run`` installs it)
LMMS_EVAL_VERSION = "0.7.3"
#: the two-step install: the extra holds the dependencies lmms-eval's code paths import here; lmms-eval itself
#: goes without its declared dependencies (torchvision among them, which would replace a CPU build of torch)
INSTALL_HINT = f'pip install -e ".[eval]" && pip install --no-deps "lmms-eval=={LMMS_EVAL_VERSION}"'


def model_ids() -> list[str]:
    """The ``--model`` names this package adds to lmms-eval (``sparse_qwen2_5_vl``, ...)."""
    return [PREFIX + name for name in FAMILIES]


def class_path(name: str, chat: bool) -> str:
    """Where lmms-eval imports the wrapper of family ``name`` (the class is built on first import)."""
    suffix = "Chat" if chat else "Simple"
    return f"sparse_cache.eval.models.Sparse_{name}_{suffix}"


def manifests() -> list:
    """lmms-eval model manifests of every family (the ``lmms_eval.models`` entry point's payload)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(
            model_id=PREFIX + name,
            simple_class_path=class_path(name, chat=False),
            chat_class_path=class_path(name, chat=True) if chat is not None else None,
        )
        for name, (_, chat) in FAMILIES.items()
    ]


def register() -> list[str]:
    """Add the ``sparse_*`` models to lmms-eval's registry in this process (needed when the package was not
    installed with its entry points, e.g. run from a source tree); returns their ids."""
    from lmms_eval import models as lmms_models

    for manifest in manifests():
        lmms_models.MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)
        lmms_models.AVAILABLE_MODELS[manifest.model_id] = (manifest.chat_class_path or manifest.simple_class_path).rsplit(".", 1)[-1]
    return model_ids()
