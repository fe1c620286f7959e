"""A trained toy Qwen2.5-VL that ships with the package: the offline default model and quality benchmark.

    from sparse_cache.toy import load_toy_vlm, make_sample, build_inputs
    model, processor = load_toy_vlm()                  # ~0.9 M parameters, loads offline in < 1 s
    image, question, answer, cells = make_sample(0)    # "is there a red cell ?" -> "yes" / "no"
    inputs = build_inputs(processor, [image], [question])
    out = model.generate(**inputs, max_new_tokens=2)

The task (:mod:`sparse_cache.toy.task`): an 8x8 board of 28-px cells (224 x 224 px, 64 visual tokens,
the ``k``-th image token is cell ``k`` row-major), 8-12 cells coloured from a 12-colour palette, and the
question "is there a <colour> cell ?". The checkpoint in :data:`TOY_VLM_PATH` was trained with the recipe of
``python -m sparse_cache.toy.train --out DIR --seed 0`` (which never writes over it without ``--force``);
``python -m sparse_cache.toy.quality`` is the quality benchmark of every pruning method on it (written to
``./toy_quality`` by default). See ``docs/toy-vlm.md``.

Importing this package registers the ``TinyQwen2_5_VLProcessor`` class (no torchvision needed) with
``AutoProcessor``, so ``AutoProcessor.from_pretrained(TOY_VLM_PATH)`` works afterwards.
"""

from .model import (
    TOY_MAX_PIXELS,
    TOY_MIN_PIXELS,
    TOY_VLM_PATH,
    build_inputs,
    conversation_messages,
    followup_text,
    init_toy_model,
    load_toy_vlm,
    toy_config,
    toy_processor,
    toy_tokenizer,
)
from .task import (
    ANSWERS,
    BACKGROUND,
    CELL_PX,
    COLOURS,
    GRID,
    PALETTE,
    Scene,
    ToyConversation,
    ToySample,
    make_followup,
    make_scene,
    make_sample,
    question_for,
)

__all__ = [
    "TOY_VLM_PATH",
    "TOY_MIN_PIXELS",
    "TOY_MAX_PIXELS",
    "load_toy_vlm",
    "toy_processor",
    "toy_tokenizer",
    "toy_config",
    "init_toy_model",
    "build_inputs",
    "conversation_messages",
    "followup_text",
    "PALETTE",
    "COLOURS",
    "BACKGROUND",
    "CELL_PX",
    "GRID",
    "ANSWERS",
    "Scene",
    "ToySample",
    "ToyConversation",
    "make_scene",
    "make_sample",
    "make_followup",
    "question_for",
]
