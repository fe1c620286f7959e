"""``sparse-cache``: try visual token pruning on one image from the command line.

::

    sparse-cache generate                                   # toy VLM on one of its own task images
    sparse-cache generate --image photo.jpg --prompt "What is on the table?" --keep-ratio 0.25 \\
        --model Qwen/Qwen3-VL-4B-Instruct --overlay kept.png --compare

Prints the answer, how many visual tokens were kept, and the prefill and decode times; ``--compare``
also runs the unpruned model in the same process and reports the speed-ups. Errors a user can act on
(a missing or unreadable image, a model of no supported family, ...) are one line on stderr and a
non-zero exit status; ``--debug`` shows tracebacks and the library's debug log.

Timing: ``prefill`` is the wall time from the start of the vision tower to the end of the model's first
forward inside ``generate`` (the vision tower, the whole prompt, and with pruning the scoring and the cache
compaction, which happen inside it; the same on every transformers version, whether ``generate`` runs the
vision tower inside the first forward or just before it);
``decode`` is the rest of ``generate``, i.e. the following one-token steps. CUDA is synchronised around
every timestamp. Without ``--compare`` the answer's own run is timed (``--repeats N``: median of N).
With ``--compare`` the answers come from one pruned and one unpruned run of ``--max-new-tokens``, and
the speed-up from separate timing runs that generate exactly ``--timing-tokens`` tokens (default 16,
EOS ignored): one untimed warm-up of each configuration, then ``--repeats`` (default 5) pairs run
interleaved (unpruned, pruned, unpruned, pruned, ...); the speed-up is the median of the per-pair
ratios with their min-max, and plain-words notes say when the spread straddles 1.0, when the input is
too small for timing to mean anything, and that post-prefill pruning cannot make the prefill faster.

Never silently wrong: a run that asked to prune and kept every visual token (e.g. a transformers
version whose ``generate`` hides the cache from the library) is an error, not a report; a run that
prunes nothing by request (``--keep-ratio 1``) says so and reports its ratios as a control, never as a
speed-up.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from collections.abc import Sequence

from . import cli_budget

# torch, transformers and the library proper are imported inside the functions that need them, so that
# --help, --version and argument errors answer at once (tests/test_cli.py times it).

logger = logging.getLogger(__name__)

PROG = "sparse-cache"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_KEEP_RATIO = 0.25
DEFAULT_PROMPT = "Describe this image."
EXAMPLE_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
_DTYPES = ("float32", "float16", "bfloat16")
#: the library's names, known here without importing it (tests/test_cli.py checks they match the library's)
MODES = ("post-prefill", "in-prefill", "pre-llm")
SCORER_NAMES = ("cdpruner", "cosine", "dart", "dart_embed", "divprune", "fastv", "random", "sparsevlm", "sparsevlm_plus",
                "uniform")
#: the scorers that read only the input embeddings (``default_layer is None``): the ones --mode pre-llm accepts
EMBEDDING_SCORER_NAMES = ("cdpruner", "cosine", "dart_embed", "divprune", "random", "uniform")
FAMILIES_TEXT = (
    "Qwen2-VL (Qwen2VLForConditionalGeneration), Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration), "
    "Qwen3-VL (Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration), "
    "LLaVA-1.5 (LlavaForConditionalGeneration), LLaVA-NeXT (LlavaNextForConditionalGeneration), "
    "LLaVA-OneVision (LlavaOnevisionForConditionalGeneration), Video-LLaVA (VideoLlavaForConditionalGeneration)"
)
#: --compare: timed pairs (unpruned, pruned) by default, untimed warm-up runs of each, new tokens per timed run
DEFAULT_COMPARE_REPEATS = 5
COMPARE_WARMUP = 1
DEFAULT_TIMING_TOKENS = 16
#: below this many visual tokens, per-call costs dwarf what pruning saves: timing is noise (docs/benchmarks.md)
MIN_VISUAL_TOKENS_FOR_TIMING = 1024


class CLIError(Exception):
    """An error the user can act on: shown as one line on stderr (traceback only with ``--debug``)."""


class _UsageError(Exception):
    """A command-line syntax error raised by the parser instead of printing usage and exiting."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block + exit
        raise _UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


# --------------------------------------------------------------------------- argument parsing


def _keep_ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not (0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _timing_tokens(text: str) -> int:
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2 (one prefill and at least one decode step), got {value}")
    return value


def _adaptive_scale(text: str) -> float:
    """SparseVLM's lambda: strictly between 0 and 1 (finite; at 1 or above only rank(P) or fewer tokens, often
    a single one, would be kept)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not (0.0 < value < 1.0):  # also refuses nan and inf
        raise argparse.ArgumentTypeError(
            f"expected a number in (0, 1), got {text} (the share of the n - rank(P) redundant tokens to prune; "
            "1 or more would keep at most rank(P) tokens, often just one)"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    families = FAMILIES_TEXT
    parser = _Parser(
        prog=PROG, description=f"Training-free visual token pruning for vision-language models: {families}."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    gen = commands.add_parser(
        "generate",
        help="answer a prompt about one image with a pruned KV cache",
        description=(
            "Answer a prompt about one image with a PrunableDynamicCache and report the visual tokens kept "
            "and the prefill/decode times. Without --image, a synthetic test image is used (for the default "
            "toy model, one of its task images with a matching question)."
        ),
    )
    # `sparse-cache eval ARGS...` is dispatched in main() before parsing (sparse_cache/eval/cli.py); listed for --help
    commands.add_parser("eval", add_help=False, help="run lmms-eval benchmarks with pruned models (sparse_* models; "
                        "pip install -e \".[eval]\"; see `sparse-cache eval --help`)")
    gen.add_argument("--image", metavar="PATH", help="image file (default: a synthetic test image)")
    gen.add_argument(
        "--prompt", help=f"question about the image (default: the toy task's question, else {DEFAULT_PROMPT!r})"
    )
    budget = gen.add_mutually_exclusive_group()
    budget.add_argument(
        "--keep-ratio", type=_keep_ratio, metavar="R",
        help=f"fraction of the image's visual tokens to keep, in (0, 1] (default {DEFAULT_KEEP_RATIO})",
    )
    budget.add_argument("--keep-tokens", type=_positive_int, metavar="N", help="number of visual tokens to keep")
    budget.add_argument(
        "--adaptive-scale", type=_adaptive_scale, metavar="LAMBDA",
        help="SparseVLM's rank-based budget instead of a fixed one (scorers sparsevlm, sparsevlm_plus): prune "
        "LAMBDA x (n - rank(P)) of an image's n visual tokens, P being the raters' attention; LAMBDA in (0, 1), "
        "e.g. 0.5",
    )
    cli_budget.add_flags(budget, _keep_ratio, _positive_int)  # --coverage, --max-visual-tokens, --max-kv-bytes
    gen.add_argument(
        "--model", metavar="ID_OR_PATH",
        help=f"Hub id or local directory of a model of a supported family ({families}), e.g. {EXAMPLE_MODEL} "
        "(default: the bundled toy VLM, offline)",
    )
    gen.add_argument("--scorer", default="sparsevlm", choices=SCORER_NAMES, help="token scorer (default sparsevlm)")
    gen.add_argument(
        "--scoring-layer", type=_non_negative_int, metavar="L", help="decoder layer that scores (default: the scorer's)"
    )
    gen.add_argument(
        "--mode", default=MODES[0], choices=MODES,
        help=f"{MODES[0]}: compact the cache after the prefill (default); in-prefill: later prefill layers "
        "already compute only the kept tokens; pre-llm: visual tokens are dropped before the language model "
        "(embedding scorers: --scorer cosine, divprune, cdpruner, uniform, random or dart_embed)",
    )
    gen.add_argument(
        "--schedule", choices=["sparsevlm"],
        help="in-prefill only: SparseVLM's progressive 3-stage schedule (layer-average keep ratio: --keep-ratio)",
    )
    gen.add_argument("--max-new-tokens", type=_positive_int, default=32, metavar="N", help="default 32")
    gen.add_argument("--overlay", metavar="PATH", help="write the image with pruned tokens dimmed (PNG)")
    gen.add_argument("--heatmap", metavar="PATH", help="write a heat map of the visual-token scores (PNG)")
    gen.add_argument(
        "--compare", action="store_true",
        help="also run unpruned: its answer, and the speed-up from interleaved timing runs (median and spread)",
    )
    gen.add_argument(
        "--repeats", type=_positive_int, default=None, metavar="N",
        help=f"timed runs of each configuration, medians reported (default {DEFAULT_COMPARE_REPEATS} with --compare, "
        "run as interleaved unpruned/pruned pairs; else 1)",
    )
    gen.add_argument(
        "--timing-tokens", type=_timing_tokens, default=DEFAULT_TIMING_TOKENS, metavar="N",
        help=f"--compare: new tokens every timing run generates, exactly (default {DEFAULT_TIMING_TOKENS}; "
        "the printed answers use --max-new-tokens)",
    )
    gen.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    gen.add_argument(
        "--dtype", default="auto", choices=["auto", *_DTYPES],
        help="weights dtype (default: float32 on cpu and for the toy VLM, bfloat16 on cuda)",
    )
    gen.add_argument(
        "--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation (default: sdpa)"
    )
    gen.add_argument(
        "--seed", type=int, default=0, help="seed of the synthetic image and of random scorers (default: 0)"
    )
    gen.add_argument("--json", action="store_true", help="print the results as one JSON object")
    gen.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    return parser


# --------------------------------------------------------------------------- inputs


def _resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device: unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def _resolve_dtype(name: str, device: torch.device, toy: bool) -> torch.dtype:
    import torch

    if name == "auto":  # the toy VLM was trained in float32 and is tiny: keep it there
        return torch.bfloat16 if device.type == "cuda" and not toy else torch.float32
    return getattr(torch, name)


def load_image(path: str):
    """Open ``path`` as an RGB ``PIL.Image`` (EXIF orientation applied), or raise :class:`CLIError`."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path or not path.strip():
        raise CLIError("--image: empty path; pass an image file, or leave --image out to use a synthetic test image")
    if os.path.isdir(path):
        raise CLIError(f"--image: {path} is a directory, not an image file")
    if not os.path.exists(path):
        raise CLIError(f"--image: no such file: {path}")
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            image = image.convert("RGB")
    except UnidentifiedImageError:
        raise CLIError(f"--image: cannot read {path} as an image (unknown or corrupt format)") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated files, permissions, broken headers
        raise CLIError(f"--image: cannot read {path}: {_one_line(exc)}") from None
    return image


def _check_output_path(path: str | None, option: str) -> None:
    """Fail before loading any model if an output image cannot be written there."""
    if path is None:
        return
    from PIL import Image

    if not path.strip() or os.path.isdir(path):
        raise CLIError(f"{option}: {path!r} is not a file path; pass e.g. {option} kept.png")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CLIError(f"{option}: the folder {parent} does not exist")
    extension = os.path.splitext(path)[1].lower()
    if extension not in Image.registered_extensions():
        raise CLIError(f"{option}: unknown image extension {extension or '(none)'!r} in {path}; use .png")


def _chat_inputs(processor, image, prompt: str):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[image], return_tensors="pt")


# --------------------------------------------------------------------------- models


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: object
    name: str
    is_toy: bool


def _looks_like_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _check_hub_reachable(name: str, timeout: float = 10.0) -> None:
    """One request to the Hub before loading ``name`` from it, so that an unreachable Hub is one line at once instead
    of the Hub client's retries (minutes of backoff). Skipped when ``name`` is in the local cache or offline."""
    try:
        from huggingface_hub import constants, try_to_load_from_cache
        from huggingface_hub.utils import get_session
    except ImportError:  # an older or newer client: let from_pretrained report
        return
    if constants.HF_HUB_OFFLINE:
        return
    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return  # cached: from_pretrained may still revalidate, but it has a copy to fall back on
    except Exception:  # an invalid repo id: from_pretrained says so in one line
        return
    url = f"{constants.ENDPOINT.rstrip('/')}/api/models/{name}"
    try:
        get_session().head(url, timeout=timeout)
    except Exception as exc:  # requests' or httpx' connection errors, timeouts, proxy and SSL errors
        raise CLIError(
            f"--model: cannot reach the Hugging Face Hub at {constants.ENDPOINT} to download {name} "
            f"({type(exc).__name__}: {_one_line(exc)}); check the network, or pass a local model directory"
        ) from exc


def load_model(
    name: str | None, device: torch.device, dtype: torch.dtype, attn: str, check_config=None
) -> LoadedModel:
    """The toy VLM (``name=None``) or a model of a supported family (:func:`sparse_cache.models.families`) from the
    Hub or a local directory, loaded with its family's ``...ForConditionalGeneration`` class; :class:`CLIError`
    (one line listing the supported families and classes) for anything else. ``check_config(config)``, if given,
    runs on the model's config before any weights load (flag checks that depend on the model's depth)."""
    if name is None:
        try:
            from .toy import TOY_VLM_PATH, load_toy_vlm
        except ImportError as exc:
            raise CLIError(
                f"the default toy model is not available ({_one_line(exc)}); pass --model ID_OR_PATH, "
                f"e.g. --model {EXAMPLE_MODEL}"
            ) from exc
        if check_config is not None:
            from transformers import AutoConfig

            check_config(AutoConfig.from_pretrained(TOY_VLM_PATH))
        try:
            model, processor = load_toy_vlm(attn_implementation=attn, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise CLIError(f"cannot load the toy model from {TOY_VLM_PATH}: {_one_line(exc)}") from exc
        return LoadedModel(model.to(device).eval(), processor, "toy VLM (sparse_cache.toy)", True)

    import transformers
    from transformers import AutoConfig, AutoProcessor

    from .presets import model_class_for_config, supported_families_text

    expanded = os.path.expanduser(name)
    if not name.strip():
        raise CLIError(f"--model: empty name; pass a Hub id or a local directory, e.g. --model {EXAMPLE_MODEL}")
    if os.path.isfile(expanded):
        raise CLIError(f"--model: {name} is a file; pass a model directory or a Hub id such as {EXAMPLE_MODEL}")
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise CLIError(
                f"--model: {name} has no config.json; pass a directory written by save_pretrained or a Hub id "
                f"such as {EXAMPLE_MODEL}"
            )
    elif _looks_like_path(name):
        raise CLIError(f"--model: no such directory: {name}")
    if not os.path.isdir(expanded):
        _check_hub_reachable(name)
    try:
        config = AutoConfig.from_pretrained(expanded)
    except (OSError, ValueError, KeyError) as exc:
        raise CLIError(f"--model: cannot load a model config from {name}: {_one_line(exc)}") from exc
    class_name = model_class_for_config(config)
    if class_name is None:
        raise CLIError(
            f"--model: {name} is a {getattr(config, 'model_type', None)!r} model ({type(config).__name__}); "
            f"sparse-cache supports {supported_families_text()}; e.g. {EXAMPLE_MODEL}"
        )
    if check_config is not None:
        check_config(config)
    logger.debug("loading %s as %s", name, class_name)
    try:
        model_class = getattr(transformers, class_name)
        model = model_class.from_pretrained(expanded, dtype=dtype, attn_implementation=attn)
        processor = AutoProcessor.from_pretrained(expanded)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise CLIError(f"--model: cannot load {name}: {_one_line(exc)}") from exc
    if getattr(processor, "image_processor", None) is None:  # AutoProcessor fell back to the tokenizer alone
        raise CLIError(
            f"--model: {name} loaded no image processor (AutoProcessor returned a {type(processor).__name__}); its "
            "processor class may need a package that is missing here (processors with a video processor need "
            "torchvision)"
        )
    return LoadedModel(model.to(device).eval(), processor, name, False)


def default_sample(loaded: LoadedModel, seed: int):
    """``(image, prompt, expected answer or None, description)`` when no ``--image`` is given."""
    if loaded.is_toy:
        from .toy import make_sample

        sample = make_sample(seed)
        return sample.image, sample.question, sample.answer, f"toy task image (seed {seed})"
    from .testing import synthetic_image

    return synthetic_image(224, 224, seed=seed), DEFAULT_PROMPT, None, f"synthetic test image (seed {seed})"


# --------------------------------------------------------------------------- timed generation


@dataclass
class Timing:
    prefill_s: float
    decode_s: float
    new_tokens: int

    @property
    def decode_steps(self) -> int:
        return max(0, self.new_tokens - 1)  # the prefill already produces the first new token

    @property
    def decode_s_per_token(self) -> float | None:
        return self.decode_s / self.decode_steps if self.decode_steps else None

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s


def vision_tower(model):
    """The model's vision tower (``visual``, ``vision_tower`` or ``image_tower`` of its inner model, or of the model
    itself), or None."""
    inner = getattr(model, "model", None)
    for owner in (inner, model):
        for name in ("visual", "vision_tower", "image_tower"):
            if getattr(owner, name, None) is not None:
                return getattr(owner, name)
    return None


class _FirstForwardTimer:
    """Timestamps of the prefill during a ``generate`` call: from the start of the vision tower or of the model's
    first forward, whichever comes first, to the end of that first forward."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.start = self.end = None
        self._handles = []

    def now(self) -> float:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _pre(self, module, args):
        if self.start is None:
            self.start = self.now()

    def _post(self, module, args, output):
        if self.end is None:
            self.end = self.now()

    def __enter__(self):
        self._handles = [self.model.register_forward_pre_hook(self._pre), self.model.register_forward_hook(self._post)]
        vision = vision_tower(self.model)
        if vision is not None:  # transformers >= 5.2x runs it before the model's first forward, older ones inside it
            self._handles.append(vision.register_forward_pre_hook(self._pre))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()


def timed_generate(model, inputs, max_new_tokens: int, device: torch.device, cache=None, exact: bool = False):
    """Greedy ``generate``; returns ``(sequences, Timing)``.

    ``cache`` is passed under the keyword this transformers uses (``cache`` from 5.24, ``past_key_values``
    before); ``exact``: generate exactly ``max_new_tokens`` tokens (EOS ignored), for timing runs.
    """
    import torch

    from ._compat import CACHE_KWARG

    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False)
    if exact:
        kwargs["min_new_tokens"] = max_new_tokens
    if cache is not None:
        kwargs[CACHE_KWARG] = cache
    with torch.no_grad(), _FirstForwardTimer(model, device) as timer:
        sequences = model.generate(**inputs, **kwargs)
        finished = timer.now()
    if timer.start is None or timer.end is None:
        raise RuntimeError("generate did not call the model; cannot time the prefill")
    new_tokens = sequences.shape[1] - inputs["input_ids"].shape[1]
    return sequences, Timing(timer.end - timer.start, finished - timer.end, int(new_tokens))


def _median_timing(timings: list[Timing]) -> Timing:
    return Timing(
        statistics.median(t.prefill_s for t in timings),
        statistics.median(t.decode_s for t in timings),
        timings[0].new_tokens,
    )


def _timing_dict(timing: Timing) -> dict:
    per_token = timing.decode_s_per_token
    return {
        "prefill_ms": 1e3 * timing.prefill_s,
        "decode_ms": 1e3 * timing.decode_s,
        "new_tokens": timing.new_tokens,
        "decode_steps": timing.decode_steps,
        "decode_ms_per_token": None if per_token is None else 1e3 * per_token,
        "total_ms": 1e3 * timing.total_s,
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


#: speed-up metrics of --compare: name -> how to read the time from a Timing
SPEEDUP_METRICS = {
    "prefill": lambda t: t.prefill_s,
    "decode_per_token": lambda t: t.decode_s_per_token,
    "total": lambda t: t.total_s,
}


def ratio_summary(unpruned: list[Timing], pruned: list[Timing]) -> dict:
    """Per metric, the median, min and max of the per-pair ratios unpruned / pruned (> 1: pruned is faster).

    ``unpruned[i]`` and ``pruned[i]`` are the runs of pair ``i`` (run back to back), so drift of the machine
    cancels within a pair; ``n`` is the number of pairs with a ratio.
    """
    out = {}
    for name, read in SPEEDUP_METRICS.items():
        ratios = [r for r in (_ratio(read(u), read(p)) for u, p in zip(unpruned, pruned)) if r is not None]
        out[name] = {
            "median": statistics.median(ratios) if ratios else None,
            "min": min(ratios) if ratios else None,
            "max": max(ratios) if ratios else None,
            "n": len(ratios),
        }
    return out


def timing_notes(ratios: dict, *, mode: str, visual_tokens: int, control: bool, repeats: int) -> list[str]:
    """Plain-words caveats of a --compare timing (see :func:`ratio_summary`)."""
    notes = []
    if control:
        notes.append(
            "nothing was pruned by request: pruned and unpruned runs do the same work, so these ratios are a "
            "control (the timing noise and overhead of this machine), not a speed-up"
        )
    elif mode == "post-prefill":
        notes.append(
            "prefill is not expected to be faster in post-prefill mode: the prefill computes every token and the "
            "cache is pruned at its end; the gain is in decode (use --mode in-prefill to prune inside the prefill)"
        )
    if not control:
        for name, label in (("prefill", "prefill"), ("decode_per_token", "decode per token")):
            r = ratios.get(name) or {}
            if r.get("min") is not None and r["min"] <= 1.0 <= r["max"]:
                notes.append(
                    f"{label}: the spread {_times(r['min'])}-{_times(r['max'])} straddles 1.0, so this run shows no "
                    "reliable difference"
                )
    if visual_tokens < MIN_VISUAL_TOKENS_FOR_TIMING:
        notes.append(
            f"timing on a {visual_tokens}-visual-token input is noise-dominated (fixed per-call costs dwarf the "
            "tokens pruned); see docs/benchmarks.md for measured numbers"
        )
    if repeats < 3:
        notes.append(f"{repeats} timed pair{'s' * (repeats > 1)} give{'s' * (repeats == 1)} no meaningful spread; "
                     "use --repeats 5 or more")
    return notes


def pruning_request(args: argparse.Namespace, keep_ratio: float, total_visual: int) -> str | None:
    """``None`` if the run asks to prune some of the ``total_visual`` tokens, else why it keeps them all."""
    from .select import budget

    if args.adaptive_scale is not None:
        return None
    if cli_budget.arguments(args):
        return cli_budget.pruning_request(args, total_visual)
    if args.keep_tokens is not None:
        if args.keep_tokens >= total_visual:
            return f"--keep-tokens {args.keep_tokens} is not below the image's {total_visual} visual tokens"
        return None
    if budget(total_visual, keep_ratio, None) >= total_visual:
        return f"keep_ratio={keep_ratio:g} keeps every one of the image's {total_visual} visual tokens"
    return None


def _budget_text(args: argparse.Namespace, keep_ratio: float) -> str:
    if args.adaptive_scale is not None:
        return f"--adaptive-scale {args.adaptive_scale:g}"
    if cli_budget.arguments(args):
        return cli_budget.text(args)
    if args.keep_tokens is not None:
        return f"--keep-tokens {args.keep_tokens}"
    return f"keep_ratio={keep_ratio:g}"


def check_pruned(cache, total_visual: int, budget_text: str) -> int:
    """The number of visual tokens ``cache`` kept; :class:`CLIError` if it kept them all.

    Called only for runs that asked to prune. Pruning happened iff the cache recorded kept positions, fewer
    than the visual tokens, and stores fewer entries than the sequence is long.
    """
    import transformers

    from ._compat import MAX_TRANSFORMERS_EXCLUSIVE, MIN_TRANSFORMERS

    kept_positions = getattr(cache, "kept_visual_positions", None)
    kept = int(kept_positions[0].numel()) if kept_positions else None
    physical, logical = cache.get_physical_length(), cache.get_seq_length()
    if kept is not None and kept < total_visual and physical < logical:
        return kept
    if kept is None:
        what = (f"the cache recorded no selection and kept all {total_visual} visual tokens ({physical} of {logical} "
                "entries stored): sparse_cache never saw its cache inside generate")
    else:
        what = f"the cache kept {kept} of {total_visual} visual tokens ({physical} of {logical} entries stored)"
    raise CLIError(
        f"nothing was pruned with transformers {transformers.__version__}: {what}, although {budget_text} asks to "
        f"prune; no speed-up is reported (sparse_cache supports transformers >={MIN_TRANSFORMERS},"
        f"<{MAX_TRANSFORMERS_EXCLUSIVE}; run with --debug for details)"
    )


def _generate(model, inputs, max_new_tokens, device, cache=None, exact=False):
    """:func:`timed_generate`, a ``RuntimeError`` inside ``generate`` (e.g. the library refusing a call it cannot
    prune) becoming a :class:`CLIError` that names the transformers version."""
    import transformers

    try:
        return timed_generate(model, inputs, max_new_tokens, device, cache=cache, exact=exact)
    except RuntimeError as exc:
        message = _one_line(exc)
        if transformers.__version__ not in message:
            message += f" (transformers {transformers.__version__})"
        raise CLIError(f"generate failed: {message}") from exc


# --------------------------------------------------------------------------- flag checks before the model loads

#: scorers that compute the raters' attention the rank-based budget (--adaptive-scale) needs
ADAPTIVE_SCORERS = ("sparsevlm", "sparsevlm_plus")


def check_flags(args: argparse.Namespace) -> None:
    """Flag combinations the library would refuse, refused first and in flag names (no model needed)."""
    if args.adaptive_scale is not None and args.scorer not in ADAPTIVE_SCORERS:
        raise CLIError(
            f"--adaptive-scale needs the raters' attention, which --scorer {args.scorer} does not compute; "
            f"use --scorer {' or --scorer '.join(ADAPTIVE_SCORERS)}, or --keep-ratio/--keep-tokens"
        )
    if args.mode == "pre-llm" and args.scorer not in EMBEDDING_SCORER_NAMES:
        raise CLIError(
            f"--mode pre-llm drops visual tokens before the language model, but --scorer {args.scorer} reads a "
            f"decoder layer's attention inputs; use --scorer {' or '.join(EMBEDDING_SCORER_NAMES)} (or --mode "
            "post-prefill / in-prefill)"
        )
    if args.schedule is None:
        return
    if args.mode != "in-prefill":
        raise CLIError(
            f"--schedule {args.schedule} prunes inside the prefill; add --mode in-prefill (the mode is {args.mode})"
        )
    if args.keep_tokens is not None:
        raise CLIError(
            f"--schedule {args.schedule} derives its stages from --keep-ratio (the layer-average share of visual "
            "tokens); pass --keep-ratio instead of --keep-tokens"
        )
    if args.adaptive_scale is not None:
        raise CLIError(
            f"--schedule {args.schedule} and --adaptive-scale both set how many tokens are kept; pass one of them"
        )
    if args.scoring_layer is not None:
        raise CLIError(
            f"--schedule {args.schedule} scores at the layers of its own stages; leave --scoring-layer out"
        )


def num_decoder_layers(config) -> int:
    text = getattr(config, "text_config", None) or config
    return int(text.num_hidden_layers)


def schedule_checker(args: argparse.Namespace, keep_ratio: float):
    """``check_config`` for :func:`load_model`: can ``--schedule`` reach ``keep_ratio`` on this model's depth?"""
    if args.schedule is None:
        return None

    def check(config) -> None:
        from .select import derive_schedule

        layers = num_decoder_layers(config)
        try:
            derive_schedule(keep_ratio, layers)
        except ValueError:
            stages = derive_schedule(1.0, layers)
            first = stages[0][0]
            minimum = (first + 1) / layers
            suggestion = min(1.0, math.ceil(10 * (minimum + (1 - minimum) / 3)) / 10)
            computing = "layer 0 computes" if first == 0 else f"layers 0-{first} compute"
            given = f"--keep-ratio {keep_ratio:g}" + ("" if args.keep_ratio is not None else " (the default)")
            raise CLIError(
                f"--schedule {args.schedule}: {given} is the layer-average share of visual tokens, and on this "
                f"{layers}-layer model {computing} every visual token before the first stage prunes, "
                f"so it must be above {minimum:.3f}; pass e.g. --keep-ratio {suggestion:g}"
            ) from None

    return check


# --------------------------------------------------------------------------- the command


@dataclass
class CheckedArguments:
    image: object  # the opened --image, or None for the default sample


def check_arguments(args: argparse.Namespace) -> CheckedArguments:
    """Everything that can be checked without torch or a model: the prompt, the image, the output paths and the
    flag combinations (the command line runs it before importing the library, so these errors come at once)."""
    if args.prompt is not None and not args.prompt.strip():
        raise CLIError('--prompt: empty prompt; pass a question about the image, e.g. --prompt "What is shown?"')
    image = load_image(args.image) if args.image is not None else None
    _check_output_path(args.overlay, "--overlay")
    _check_output_path(args.heatmap, "--heatmap")
    check_flags(args)
    return CheckedArguments(image)


def run_generate(args: argparse.Namespace, checked: CheckedArguments | None = None) -> dict:
    """Do what ``sparse-cache generate`` does and return the results as a dict (see :func:`format_report`).
    ``checked``: the result of :func:`check_arguments` when the caller already ran it."""
    if checked is None:
        checked = check_arguments(args)
    image = checked.image

    import torch

    from . import PrunableDynamicCache
    from .visualize import kept_overlay, score_heatmap

    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device, toy=args.model is None)
    auto_budget = cli_budget.arguments(args)  # {"coverage": C} etc.: keep_ratio="auto"
    try:
        cli_budget.check(args)  # the library's validation, in flag names, before the model loads
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    fixed_budget = args.keep_ratio is not None or args.keep_tokens is not None or args.adaptive_scale is not None
    keep_ratio = args.keep_ratio if fixed_budget or auto_budget else DEFAULT_KEEP_RATIO
    repeats = args.repeats or (DEFAULT_COMPARE_REPEATS if args.compare else 1)
    timing_tokens = getattr(args, "timing_tokens", DEFAULT_TIMING_TOKENS)

    loaded = load_model(args.model, device, dtype, args.attn, check_config=schedule_checker(args, keep_ratio))
    model, processor = loaded.model, loaded.processor
    expected = None
    if image is None:
        image, default_prompt, expected, image_name = default_sample(loaded, args.seed)
    else:
        default_prompt, image_name = DEFAULT_PROMPT, args.image
    prompt = args.prompt if args.prompt is not None else default_prompt
    if args.prompt is not None:
        expected = None  # the toy sample's answer is about its own question
    inputs = _chat_inputs(processor, image, prompt).to(device)
    input_len = inputs["input_ids"].shape[1]
    config = model.config
    video_id = getattr(config, "video_token_id", None)
    visual_ids = [config.image_token_id] + ([video_id] if video_id is not None else [])
    total_visual = int(torch.isin(inputs["input_ids"][0], torch.tensor(visual_ids, device=device)).sum())

    def make_cache():
        return PrunableDynamicCache(
            model, keep_ratio=keep_ratio, keep_tokens=args.keep_tokens, scorer=args.scorer,
            scoring_layer=args.scoring_layer, seed=args.seed, mode=args.mode, schedule=args.schedule,
            adaptive_scale=args.adaptive_scale, **auto_budget,
        )

    try:
        make_cache()  # validates the budget/scorer/layer and installs the hooks before any timing
    except (TypeError, ValueError) as exc:
        raise CLIError(_one_line(exc)) from exc
    not_pruned = pruning_request(args, keep_ratio, total_visual)  # None: the run asks to prune
    budget_text = _budget_text(args, keep_ratio)

    def pruned_run(max_new_tokens: int, exact: bool = False):
        run_cache = make_cache()
        out, timing = _generate(model, inputs, max_new_tokens, device, cache=run_cache, exact=exact)
        if not_pruned is None:
            check_pruned(run_cache, total_visual, budget_text)  # before any time or answer is reported
        return out, timing, run_cache

    # Untimed warm-up: the first call pays one-off costs (kernel selection, allocator growth, first use of the
    # pruning code paths); it also fails fast if pruning does not happen.
    logger.debug("warm-up: one pruned two-token generate")
    if auto_budget and not_pruned is None and "max_visual_tokens" not in auto_budget:
        warm = make_cache()  # a coverage or byte budget may itself pick every token: then a control run
        try:
            _generate(model, inputs, 2, device, cache=warm)
        except ValueError as exc:  # e.g. --max-kv-bytes below the text's KV (known only in the call)
            raise CLIError(cli_budget.flag_names(_one_line(exc))) from exc
        not_pruned = cli_budget.kept_everything(warm, total_visual, budget_text)
    pruned_run(2)
    pruned_timings, unpruned_timings, order = [], [], []
    reference = None
    if not args.compare:
        sequences = cache = None
        for _ in range(repeats):
            out, timing, run_cache = pruned_run(args.max_new_tokens)
            pruned_timings.append(timing)
            if cache is None:
                sequences, cache = out, run_cache
    else:
        # Answers at --max-new-tokens (untimed), then the timing runs: exactly timing_tokens new tokens each, one
        # warm-up of each configuration, then interleaved pairs (unpruned, pruned), so drift hits both alike.
        sequences, _, cache = pruned_run(args.max_new_tokens)
        reference, _ = _generate(model, inputs, args.max_new_tokens, device)
        logger.debug("timing: %d warm-up and %d timed pairs of %d new tokens", COMPARE_WARMUP, repeats, timing_tokens)
        for _ in range(COMPARE_WARMUP):
            _generate(model, inputs, timing_tokens, device, exact=True)
            pruned_run(timing_tokens, exact=True)
        for _ in range(repeats):
            unpruned_timings.append(_generate(model, inputs, timing_tokens, device, exact=True)[1])
            order.append("unpruned")
            pruned_timings.append(pruned_run(timing_tokens, exact=True)[1])
            order.append("pruned")

    def answer_of(seqs) -> str:
        if loaded.is_toy:  # its tokens are whole words without leading spaces: keep repeated answers apart
            return toy_answer_text(processor, seqs[0, input_len:])
        return processor.batch_decode(seqs[:, input_len:], skip_special_tokens=True)[0].strip()

    if cache.kept_visual_positions:
        kept = cache.kept_visual_positions[0].cpu()
    else:  # only when nothing was to be pruned (check_pruned refuses it otherwise): every visual token is kept
        kept = torch.nonzero(torch.isin(inputs["input_ids"][0], torch.tensor(visual_ids, device=device))).flatten().cpu()
    timing = _median_timing(pruned_timings)
    result = {
        "model": loaded.name,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "image": image_name,
        "image_size": list(image.size),
        "prompt": prompt,
        "expected_answer": expected,
        "scorer": args.scorer,
        "keep_ratio": "auto" if auto_budget else keep_ratio,
        "keep_tokens": args.keep_tokens,
        "adaptive_scale": args.adaptive_scale,
        **{name: auto_budget.get(name) for name in cli_budget.TARGETS},
        "mode": args.mode,
        "schedule": args.schedule,
        "answer": answer_of(sequences),
        "visual_tokens_kept": int(kept.numel()),
        "visual_tokens_total": total_visual,
        "pruned": not_pruned is None,
        "not_pruned_because": None if not_pruned is None else f"{not_pruned} (nothing pruned, by request)",
        "repeats": repeats,
        **_timing_dict(timing),
    }
    if loaded.is_toy:
        result["input_note"] = toy_input_note(args.image is not None, prompt)
    # per-call metrics of the reported run (sparse_cache.stats): kept per image, KV bytes, scoring/compaction time
    result["stats"] = cache.stats.to_dict() if getattr(cache, "stats", None) is not None else None
    if getattr(cache, "schedule", None):
        from .select import budget as stage_budget

        result["schedule_stages"] = [
            {"after_layer": int(layer), "keep_ratio": float(ratio), "visual_tokens": stage_budget(total_visual, ratio, None)}
            for layer, ratio in cache.schedule
        ]
    if args.compare:
        base = _median_timing(unpruned_timings)
        ratios = ratio_summary(unpruned_timings, pruned_timings)
        control = not_pruned is not None
        result["unpruned"] = {"answer": answer_of(reference), **_timing_dict(base)}
        result["timing"] = {
            "new_tokens": timing_tokens,
            "repeats": repeats,
            "warmup": COMPARE_WARMUP,
            "order": order,
            "noise_dominated": total_visual < MIN_VISUAL_TOKENS_FOR_TIMING,
            "runs": [
                {"config": name, "pair": i // 2, **_timing_dict(t)}
                for i, (name, t) in enumerate(zip(order, _interleave(unpruned_timings, pruned_timings)))
            ],
        }
        result["speedup"] = None if control else ratios  # never a speed-up for a run that pruned nothing
        if control:
            result["control_ratio"] = ratios
        result["notes"] = timing_notes(
            ratios, mode=args.mode, visual_tokens=total_visual, control=control, repeats=repeats
        )
    if inputs.get("image_grid_thw") is None:  # no grid of merged patches: the views of the model's adapter
        result.update(_draw_views(args, model, processor, inputs, image, cache, kept, visual_ids))
        return result
    patch, merge = patch_and_merge(config, processor)
    grid_args = (inputs["input_ids"].cpu(), inputs["image_grid_thw"].cpu(), config.image_token_id)
    canvas = _drawing_canvas(image, inputs["image_grid_thw"][0], patch)
    for path, key in ((args.overlay, "overlay"), (args.heatmap, "heatmap")):
        if path is None:
            continue
        if key == "overlay":
            picture = kept_overlay(canvas, kept, *grid_args, merge_size=merge)
        else:
            if not cache.visual_scores:
                raise CLIError("--heatmap: the cache recorded no scores (nothing was scored in this run)")
            scores = cache.visual_scores[0].cpu()
            picture = score_heatmap(canvas, scores, *grid_args, merge_size=merge, kept_positions=kept,
                                    colorbar=True)
        try:
            picture.save(path)
        except (OSError, ValueError) as exc:
            raise CLIError(f"--{key}: cannot write {path}: {_one_line(exc)}") from exc
        result[key] = path
    return result


def _draw_views(args, model, processor, inputs, image, cache, kept, visual_ids) -> dict:
    """--overlay / --heatmap of a family whose image is laid out in views (a crop; or a base tile, then an anyres
    tile map with a newline token per row), from :meth:`VLMAdapter.image_views`."""
    import torch

    from .models import adapter_for
    from .visualize import views_heatmap, views_overlay

    out = {}
    if args.overlay is None and args.heatmap is None:
        return out
    views = adapter_for(model).image_views({k: v.cpu() for k, v in inputs.items() if hasattr(v, "cpu")},
                                           image_size=image.size, image_processor=getattr(processor, "image_processor", None))
    for path, key in ((args.overlay, "overlay"), (args.heatmap, "heatmap")):
        if path is None:
            continue
        if key == "overlay":
            picture = views_overlay(image, views, kept)
        else:
            if not cache.visual_scores:
                raise CLIError("--heatmap: the cache recorded no scores (nothing was scored in this run)")
            ids = inputs["input_ids"][0].cpu()
            positions = torch.nonzero(torch.isin(ids, torch.tensor(visual_ids))).flatten()
            picture = views_heatmap(image, views, cache.visual_scores[0].cpu(), positions, kept_positions=kept,
                                    colorbar=True)
        try:
            picture.save(path)
        except (OSError, ValueError) as exc:
            raise CLIError(f"--{key}: cannot write {path}: {_one_line(exc)}") from exc
        out[key] = path
    return out


def toy_answer_text(processor, tokens) -> str:
    """The toy VLM's answer, one word per generated token joined by spaces (its vocabulary's words carry no
    leading space, so a plain decode glues a repeated answer into ``yesyes``)."""
    words = [processor.decode([int(t)], skip_special_tokens=True).strip() for t in tokens]
    return " ".join(w for w in words if w)


def toy_input_note(user_image: bool, prompt: str) -> str | None:
    """A note when the toy VLM gets an input outside its task (its answers are then arbitrary), else None."""
    from .toy.task import COLOURS, QUESTION_TEMPLATE

    own_question = prompt.strip() in {QUESTION_TEMPLATE.format(colour=c) for c in COLOURS}
    other = [what for what, outside in (("image", user_image), ("prompt", not own_question)) if outside]
    if not other:
        return None
    return (
        f"the toy VLM only answers {QUESTION_TEMPLATE.format(colour='<colour>')!r} about its own 8x8 boards; "
        f"with another {' and '.join(other)} its yes/no answers are arbitrary (pass --model for a real VLM)"
    )


def _interleave(first: list, second: list) -> list:
    return [x for pair in zip(first, second) for x in pair]


def patch_and_merge(config, processor=None) -> tuple[int, int]:
    """``(patch_size, spatial_merge_size)`` in which ``image_grid_thw`` counts: the model's vision config (14 and 2
    for Qwen2/2.5-VL, 16 and 2 for Qwen3-VL), else its image processor's."""
    vision = getattr(config, "vision_config", None)
    image_processor = getattr(processor, "image_processor", None)
    values = []
    for config_key, processor_key in (("patch_size", "patch_size"), ("spatial_merge_size", "merge_size")):
        value = getattr(vision, config_key, None) or getattr(image_processor, processor_key, None)
        if value is None:
            raise CLIError(f"cannot tell the model's vision {config_key} from its config or its processor")
        values.append(int(value))
    return values[0], values[1]


def _drawing_canvas(image, grid_thw, patch: int):
    """The image to draw on: the original, or the processor's (upscaled) size when the original is smaller
    (``grid_thw`` counts patches of ``patch`` pixels)."""
    from PIL import Image

    size = (int(grid_thw[2]) * patch, int(grid_thw[1]) * patch)  # (width, height) the model saw
    if image.width >= size[0] and image.height >= size[1]:
        return image
    return image.resize(size, Image.Resampling.NEAREST)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def _times(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.2f}x"


def _spread(r: dict) -> str:
    if r["median"] is None:
        return "n/a"
    return f"{_times(r['median'])} ({_times(r['min'])}-{_times(r['max'])})"


def _spread_text(ratios: dict, post_prefill: bool = False) -> str:
    expected = " [not expected to differ: post-prefill]" if post_prefill else ""
    return (f"prefill {_spread(ratios['prefill'])}{expected}, decode {_spread(ratios['decode_per_token'])} per token, "
            f"prefill+decode {_spread(ratios['total'])}")


def _decode_line(r: dict) -> str:
    if not r["decode_steps"]:
        return f"{_ms(r['decode_ms'])} (no decode step: the prefill produced the only new token)"
    steps = r["decode_steps"]
    return f"{_ms(r['decode_ms'])} for {steps} token{'s' * (steps > 1)} ({_ms(r['decode_ms_per_token'])}/token)"


def format_report(r: dict) -> str:
    """The human-readable report of :func:`run_generate`'s result."""
    if r["adaptive_scale"] is not None:
        budget = f"adaptive_scale={r['adaptive_scale']:g}"
    elif r["keep_tokens"] is not None:
        budget = f"keep_tokens={r['keep_tokens']}"
    elif r["keep_ratio"] == "auto":
        budget = "keep_ratio=auto " + " ".join(f"{k}={r[k]:g}" for k in cli_budget.TARGETS if r.get(k) is not None)
    else:
        budget = f"keep_ratio={r['keep_ratio']:g}"
    budget += f" mode={r['mode']}" + (f" schedule={r['schedule']}" if r["schedule"] else "")
    share = r["visual_tokens_kept"] / r["visual_tokens_total"] if r["visual_tokens_total"] else float("nan")
    timing = r.get("timing")
    if timing is not None:
        timed = f" (median of {timing['repeats']} runs of {timing['new_tokens']} new tokens)"
    else:
        timed = f" (median of {r['repeats']} runs)" if r["repeats"] > 1 else ""
    rows = [
        ("model", f"{r['model']} on {r['device']} ({r['dtype']})"),
        ("image", f"{r['image']} ({r['image_size'][0]}x{r['image_size'][1]})"),
        ("prompt", r["prompt"]),
        ("answer", r["answer"] or "(empty)"),
    ]
    if r["expected_answer"] is not None:
        rows.append(("expected", r["expected_answer"]))
    rows.append(("visual tokens", f"{r['visual_tokens_kept']} kept / {r['visual_tokens_total']} total ({share:.0%}), "
                                  f"scorer={r['scorer']} {budget}"))
    if r.get("schedule_stages"):
        stages = ", ".join(f"{s['visual_tokens']} after layer {s['after_layer']}" for s in r["schedule_stages"])
        rows.append(("schedule", f"visual tokens kept {stages} (--keep-ratio is the share of visual tokens an average decoder layer computes)"))
    if not r["pruned"]:
        rows.append(("pruning", f"none: {r['not_pruned_because']}; a control run, no speed-up is claimed"))
    rows += [("prefill", _ms(r["prefill_ms"]) + timed), ("decode", _decode_line(r))]
    if "unpruned" in r:
        u = r["unpruned"]
        rows += [
            ("unpruned answer", u["answer"] or "(empty)"),
            ("unpruned prefill", _ms(u["prefill_ms"]) + timed),
            ("unpruned decode", _decode_line(u)),
        ]
        pairs = f"median (min-max) of {timing['repeats']} interleaved unpruned/pruned pairs, unpruned time / pruned time"
        if r["speedup"] is not None:
            caveat = "noise-dominated on this small input, see the notes: " if timing["noise_dominated"] else ""
            post = r["mode"] == "post-prefill"
            rows.append(("speed-up", f"{caveat}{_spread_text(r['speedup'], post_prefill=post)}; {pairs}"))
        else:
            rows.append(("speed-up", "none claimed (nothing was pruned)"))
            rows.append(("control ratio", f"{_spread_text(r['control_ratio'])}; {pairs}"))
        rows += [("note", note) for note in r["notes"]]
    if r.get("input_note"):
        rows.append(("note", r["input_note"]))
    for key in ("overlay", "heatmap"):
        if key in r:
            rows.append((key, f"written to {r[key]}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}} : {value}" for name, value in rows)


# --------------------------------------------------------------------------- entry point


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class _Logging:
    """Route library logs to stderr for one ``main`` call (transformers' warnings and progress bars only with
    ``--debug`` or at a terminal), then restore the previous state."""

    def __init__(self, debug: bool):
        self.debug = debug

    def __enter__(self):
        import transformers

        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(name)s: %(message)s"))
        self.package = logging.getLogger("sparse_cache")
        self.old_level = self.package.level
        self.package.addHandler(self.handler)
        self.package.setLevel(logging.DEBUG if self.debug else logging.WARNING)
        self.old_transformers = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity(transformers.logging.INFO if self.debug else transformers.logging.ERROR)
        self.hub_logger = logging.getLogger("huggingface_hub")  # its retry lines: only with --debug
        self.old_hub_level = self.hub_logger.level
        self.hub_logger.setLevel(logging.DEBUG if self.debug else logging.ERROR)
        # Weight-loading bars help at a terminal; in a pipe or a log they are noise around the report.
        self.old_bars = transformers.logging.is_progress_bar_enabled()
        interactive = getattr(sys.stderr, "isatty", lambda: False)()
        if not (self.debug or interactive):
            transformers.logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        import transformers

        self.package.removeHandler(self.handler)
        self.package.setLevel(self.old_level)
        transformers.logging.set_verbosity(self.old_transformers)
        self.hub_logger.setLevel(self.old_hub_level)
        if self.old_bars:
            transformers.logging.enable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sparse-cache`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:  # every other argument is lmms-eval's
        from .eval.cli import main as eval_main

        return eval_main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    debug = args.debug
    try:
        checked = check_arguments(args)  # before torch and transformers are imported: errors at once
        with _Logging(args.debug):
            result = run_generate(args, checked)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CLIError as exc:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # unexpected: still one line unless --debug
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {type(exc).__name__}: {_one_line(exc)} (run with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_report(result))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
