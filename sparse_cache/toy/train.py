"""Train the toy VLM from scratch on CPU (about 5 minutes, one thread)::

    python -m sparse_cache.toy.train --out toy-vlm-retrained --seed 0

writes a ``save_pretrained`` checkpoint (model, processor, generation config) and ``training.json``
(settings, held-out accuracy along the way, time, versions, trainer revision, CPU) to ``--out``. It never
writes over the shipped checkpoint (``sparse_cache/assets/toy-vlm``) and refuses a folder that already holds
a checkpoint unless ``--force`` is given. The shipped checkpoint was made by this recipe (seed 0) with an
earlier revision of this trainer; see ``docs/toy-vlm.md`` for what is reproducible.

What makes a model this small learn the task (found by trial; see ``docs/toy-vlm.md``):

- initialisation std 0.1 instead of 0.02 (with 0.02 it stays at chance);
- a curriculum: during the first half, every other step uses dense 4x4 boards (16 visual tokens, 4-8
  cells coloured, so every question has distractors; sparse 4x4 boards learnt much slower);
- two auxiliary losses read through the LM head: each image token predicts its own cell's colour word
  (background: "gray"), and the question's colour token predicts the answer (without the latter,
  accuracy was 0.80 after 600 steps instead of 1.0);
- half of the 8x8 steps are two-turn conversations with a different colour in the second turn, so that
  a follow-up question is answered from the image; training never repeats a question, so the model
  has no reason to copy an earlier answer (protocol (b) "same" of the quality benchmark relies on it);
- 800 steps of batch 32, AdamW 2e-3, 20 warm-up steps, cosine decay (400 steps reached 0.95-0.97).

The loss is on the answer token and the ``<|im_end|>`` after it (so that ``generate`` stops).
Reproducibility: on one machine, for a given seed, thread count and torch build, a re-run gives the same weights
bit for bit; on another CPU (other vector instructions, other torch build) the floating-point sums differ and the
weights drift apart over 800 steps (max abs difference ~0.2 observed), while the held-out accuracy (1.000 for
seed 0) is what reproduces.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from .model import TOY_VLM_PATH, conversation_messages, init_toy_model, toy_processor
from .task import ANSWERS, BACKGROUND_WORD, COLOURS, GRID, make_followup, make_rng, make_scene, question_for

logger = logging.getLogger(__name__)

#: revision of this trainer, recorded in training.json: 1 made the shipped checkpoint (its training.json has no
#: "trainer" entry and its config no "layers" field); 2 added both, the CPU description and the output guards.
#: Bump it when a change could change the weights a seed gives.
TRAINER_REVISION = 2


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 800
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = 0.01
    init_std: float = 0.1
    layers: int = 4  # decoder layers
    curriculum: float = 0.5  # fraction of steps during which every other step uses 4x4 boards
    followup: float = 0.5  # share of 8x8 steps that are two-turn conversations
    aux_image: float = 0.2  # weight of "each image token predicts its cell colour"
    aux_colour: float = 0.5  # weight of "the question's colour token predicts the answer"
    eval_every: int = 100
    eval_samples: int = 256
    threads: int = 1  # these small ops gain nothing from 2 threads, and lose 5x when the cores are shared


class BatchEncoder:
    """Builds training batches exactly as the processor would, without its per-image PIL work.

    Texts go through ``apply_chat_template`` and the tokenizer (image placeholders expanded as the
    processor does); pixels are normalised and patchified in torch, in the processor's patch order.
    :meth:`check_against_processor` asserts both match the processor's output.
    """

    def __init__(self, processor):
        self.processor = processor
        tok = processor.tokenizer
        self.tokenizer = tok
        ip = processor.image_processor
        self.patch, self.merge, self.temporal = ip.patch_size, ip.merge_size, ip.temporal_patch_size
        self.mean = torch.tensor(ip.image_mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(ip.image_std, dtype=torch.float32)[:, None, None]
        self.rescale = float(ip.rescale_factor)
        self.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
        self.answer_ids = torch.tensor([tok.convert_tokens_to_ids(a) for a in ANSWERS])
        self.colour_ids = torch.tensor([_word_id(tok, " " + c) for c in COLOURS])
        cell_words = [" " + c for c in COLOURS] + [" " + BACKGROUND_WORD]  # index -1 (background) is the last
        self.cell_word_ids = torch.tensor([_word_id(tok, w) for w in cell_words])
        self.eos_id = tok.eos_token_id

    def pixel_values(self, arrays: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        patches, grids = [], []
        p, m, t = self.patch, self.merge, self.temporal
        for array in arrays:
            image = torch.from_numpy(array).permute(2, 0, 1).float() * self.rescale
            image = (image - self.mean) / self.std
            c, h, w = image.shape
            gh, gw = h // p, w // p
            x = image.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
            x = x[:, :, :, :, :, None].expand(*x.shape[:5], t, p, p)
            patches.append(x.reshape(gh * gw, c * t * p * p))
            grids.append([1, gh, gw])
        return torch.cat(patches), torch.tensor(grids, dtype=torch.long)

    def texts(self, conversations: list[tuple[list[str], list[str]]], num_visual: list[int]) -> list[str]:
        out = []
        for (questions, answers), n in zip(conversations, num_visual):
            text = self.processor.apply_chat_template(conversation_messages(questions, answers), tokenize=False)
            out.append(text.replace(self.processor.image_token, self.processor.image_token * n, 1))
        return out

    def encode(self, scenes, conversations):
        """Batch of ``scenes`` with ``conversations[i] = (questions, answers)``, plus the targets."""
        arrays = [s.pixels() for s in scenes]
        pixel_values, grids = self.pixel_values(arrays)
        num_visual = [int(g.prod()) // self.merge**2 for g in grids]
        enc = self.tokenizer(self.texts(conversations, num_visual), return_tensors="pt", padding=True)
        ids = enc["input_ids"]
        mm = (ids == self.image_token_id).long()
        batch = dict(
            input_ids=ids,
            attention_mask=enc["attention_mask"],
            mm_token_type_ids=mm,
            pixel_values=pixel_values,
            image_grid_thw=grids,
        )
        # cell colour targets of every image token, row-major (the order of the visual tokens)
        cell_targets = torch.cat([self.cell_word_ids[torch.from_numpy(s.cells.ravel())] for s in scenes])
        return batch, cell_targets

    def check_against_processor(self, scenes, conversations) -> None:
        batch, _ = self.encode(scenes, conversations)
        texts = [
            self.processor.apply_chat_template(conversation_messages(q, a), tokenize=False) for q, a in conversations
        ]
        ref = self.processor(text=texts, images=[s.image() for s in scenes], return_tensors="pt", padding=True)
        for key in ("input_ids", "attention_mask", "image_grid_thw"):
            if not torch.equal(batch[key], ref[key]):
                raise RuntimeError(f"training batch differs from the processor's output in {key}")
        if "mm_token_type_ids" in ref and not torch.equal(batch["mm_token_type_ids"], ref["mm_token_type_ids"].long()):
            raise RuntimeError("training batch differs from the processor's output in mm_token_type_ids")
        if not torch.allclose(batch["pixel_values"], ref["pixel_values"].float(), atol=1e-5):
            raise RuntimeError("training pixel values differ from the processor's output")


def _word_id(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:  # pragma: no cover - the toy tokenizer guarantees it
        raise RuntimeError(f"{word!r} is not one token of the toy tokenizer")
    return ids[0]


def draw_batch(rng: np.random.Generator, kind: str, size: int):
    """``size`` scenes and conversations of ``kind``: ``"small"`` (4x4, one turn), ``"single"``,
    ``"followup"`` (two turns, different colours) or ``"followup-same"`` (the same colour twice; held-out
    evaluation only: training never asks the same question twice, so the model has no reason to copy its
    earlier answer instead of looking at the image)."""
    scenes, conversations = [], []
    for _ in range(size):
        if kind in ("followup", "followup-same"):
            conv = make_followup(rng, same=kind == "followup-same")
            scenes.append(conv.scene)
            conversations.append((list(conv.questions), list(conv.answers)))
        else:
            grid = 4 if kind == "small" else GRID
            colour = COLOURS[int(rng.integers(len(COLOURS)))]
            # small boards are dense (4-8 of 16 cells coloured) so that every question has distractors
            num = int(rng.integers(4, 9)) if kind == "small" else None
            scene = make_scene(rng, [(colour, bool(rng.integers(2)))], grid=grid, num_coloured=num)
            scenes.append(scene)
            conversations.append(([question_for(colour)], [scene.answer(colour)]))
    return scenes, conversations


def step_kind(step: int, config: TrainConfig, rng: np.random.Generator) -> str:
    if step < config.curriculum * config.steps and step % 2 == 0:
        return "small"
    return "followup" if rng.random() < config.followup else "single"


def losses(model, encoder: BatchEncoder, batch: dict, cell_targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Answer (+ end of turn) cross-entropy and the two auxiliary losses; also answer accuracy."""
    logits = model(**batch).logits.float()
    ids = batch["input_ids"]
    is_answer = torch.isin(ids, encoder.answer_ids)
    rows, cols = torch.nonzero(is_answer, as_tuple=True)
    answer_logits = logits[rows, cols - 1]
    answer_loss = F.cross_entropy(answer_logits, ids[rows, cols])
    eos_loss = F.cross_entropy(logits[rows, cols], torch.full_like(cols, encoder.eos_id))
    accuracy = (answer_logits.argmax(-1) == ids[rows, cols]).float().mean()
    # the k-th colour token of a row predicts the k-th answer of that row (same turn)
    crows, ccols = torch.nonzero(torch.isin(ids, encoder.colour_ids), as_tuple=True)
    colour_loss = F.cross_entropy(logits[crows, ccols], ids[rows, cols])
    irows, icols = torch.nonzero(ids == encoder.image_token_id, as_tuple=True)
    image_loss = F.cross_entropy(logits[irows, icols], cell_targets)
    return dict(answer=answer_loss, eos=eos_loss, colour=colour_loss, image=image_loss, accuracy=accuracy)


@torch.no_grad()
def evaluate(model, encoder: BatchEncoder, eval_set) -> dict[str, float]:
    model.eval()
    out = {}
    for name, (scenes, conversations) in eval_set.items():
        correct = total = 0
        for start in range(0, len(scenes), 64):
            batch, cells = encoder.encode(scenes[start : start + 64], conversations[start : start + 64])
            result = losses(model, encoder, batch, cells)
            n = sum(len(a) for _, a in conversations[start : start + 64])
            correct += float(result["accuracy"]) * n
            total += n
        out[name] = correct / total
    model.train()
    return out


def check_output_folder(out: str | Path, force: bool = False) -> None:
    """``FileExistsError`` if ``out`` is the shipped checkpoint or already holds one, unless ``force``."""
    if force:
        return
    out = Path(out)
    if out.exists() and out.resolve() == Path(TOY_VLM_PATH).resolve():
        raise FileExistsError(
            f"{out} is the shipped toy VLM; train into another folder (e.g. --out toy-vlm-retrained), or pass --force "
            "to replace the shipped checkpoint"
        )
    existing = [name for name in ("model.safetensors", "training.json") if (out / name).exists()]
    if existing:
        raise FileExistsError(f"{out} already holds a checkpoint ({', '.join(existing)}); pass --force to overwrite it")


def machine_description() -> dict:
    """What the weights a seed gives depend on besides the code: the CPU, its vector instructions, the threads."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: None)()
    return {
        "machine": platform.machine(),
        "cpu": cpu,
        "torch_cpu_capability": capability,
        "torch_threads": torch.get_num_threads(),
        "os": platform.system(),
    }


def train(config: TrainConfig, out: str | Path | None = None, progress: bool = True, force: bool = False):
    """Train a toy VLM; save it (and its processor) to ``out`` if given. Returns ``(model, processor, summary)``.

    ``out`` must not be the shipped checkpoint nor hold one already (:func:`check_output_folder`) unless ``force``.
    """
    if out is not None:
        check_output_folder(out, force)
    if config.steps < 1 or config.batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {config.steps} and {config.batch_size}")
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    processor = toy_processor()
    encoder = BatchEncoder(processor)
    rng = make_rng(np.random.default_rng([config.seed, 0]))
    eval_rng = np.random.default_rng([config.seed, 1])
    encoder.check_against_processor(*draw_batch(eval_rng, "followup", 2))
    encoder.check_against_processor(*draw_batch(eval_rng, "small", 2))
    eval_set = {
        "single": draw_batch(eval_rng, "single", config.eval_samples),
        "followup": draw_batch(eval_rng, "followup", config.eval_samples // 2),
        "followup-same": draw_batch(eval_rng, "followup-same", config.eval_samples // 2),
    }
    model = init_toy_model(config.seed, std=config.init_std, tokenizer=processor.tokenizer, num_layers=config.layers)
    model.train()
    logger.info("toy VLM: %d parameters", sum(p.numel() for p in model.parameters()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress_ = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.5 * (1 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    history = []
    start = time.time()
    bar = _progress(range(config.steps), progress)
    for step in bar:
        kind = step_kind(step, config, rng)
        batch, cells = encoder.encode(*draw_batch(rng, kind, config.batch_size))
        result = losses(model, encoder, batch, cells)
        loss = (
            result["answer"] + result["eos"]
            + config.aux_colour * result["colour"] + config.aux_image * result["image"]
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if hasattr(bar, "set_postfix"):
            batch_accuracy = result["accuracy"].item()
            bar.set_postfix(kind=kind, loss=f"{loss.detach().item():.3f}", acc=f"{batch_accuracy:.2f}")
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            accuracy = evaluate(model, encoder, eval_set)
            history.append({"step": step + 1, "seconds": round(time.time() - start, 1), **accuracy})
            logger.info("step %d: held-out accuracy %s", step + 1, {k: round(v, 4) for k, v in accuracy.items()})
    model.eval()
    summary = {
        "config": asdict(config),
        "train_seconds": round(time.time() - start, 1),
        "held_out_accuracy": history[-1] if history else None,
        "history": history,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainer": {"revision": TRAINER_REVISION, "module": __name__},
        "machine": machine_description(),
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
        (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.info("saved the toy VLM to %s", out)
    return model, processor, summary


def _progress(iterable, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the `bench` extra
        logger.warning("tqdm is not installed (pip install 'sparse-cache[bench]'); training without a progress bar")
        return iterable
    return tqdm(iterable, desc="training toy VLM", unit="step")


def main(argv=None) -> int:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m sparse_cache.toy.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True,
                        help="folder to write the checkpoint to (not the shipped sparse_cache/assets/toy-vlm)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite a checkpoint already in --out (also the shipped one)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override another TrainConfig field ({', '.join(TrainConfig.__dataclass_fields__)})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in TrainConfig.__dataclass_fields__:
            parser.error(f"--set: expected KEY=VALUE with KEY a TrainConfig field, got {item!r}")
        overrides[key] = type(getattr(defaults, key))(value)
    config = TrainConfig(seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr, threads=args.threads,
                         **overrides)
    try:
        check_output_folder(args.out, args.force)  # before minutes of training
    except FileExistsError as error:
        parser.error(f"--out: {error}")
    _, _, summary = train(config, args.out, progress=not args.no_progress, force=args.force)
    print(json.dumps({"out": str(args.out), "train_seconds": summary["train_seconds"],
                      "held_out_accuracy": summary["held_out_accuracy"]}, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
