"""The toy task: "is there a <colour> cell ?" about a grid of coloured cells.

An image is a ``grid x grid`` board of 28-px cells on a gray background; a few cells are filled with
colours of :data:`PALETTE`. One cell is exactly one merged Qwen2.5-VL visual token (2x2 patches of
14 px), so the ``k``-th image token of an ``8 x 8`` board (224 x 224 px, 64 tokens) is cell ``k`` in
row-major order, and "which visual tokens does the question need" has an exact answer: the cells of the
queried colour.

Answers are balanced yes/no; when the queried colour is present it fills 1 or 2 cells, so pruning that
drops them turns a "yes" into a "no". The other coloured cells never use a queried colour.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "PALETTE",
    "COLOURS",
    "BACKGROUND",
    "BACKGROUND_WORD",
    "CELL_PX",
    "GRID",
    "ANSWERS",
    "QUESTION_TEMPLATE",
    "Scene",
    "ToySample",
    "ToyConversation",
    "question_for",
    "make_scene",
    "make_sample",
    "make_followup",
    "make_rng",
]

#: Colour words and their RGB values; every word is a single token of the toy tokenizer.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 230),
    "yellow": (240, 225, 30),
    "cyan": (40, 220, 230),
    "purple": (130, 40, 180),
    "orange": (250, 140, 0),
    "pink": (250, 150, 200),
    "brown": (120, 70, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "teal": (0, 120, 120),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
BACKGROUND = (128, 128, 128)
#: Word the image tokens of background cells are trained to predict (auxiliary loss only).
BACKGROUND_WORD = "gray"
CELL_PX = 28  # 2 x 2 patches of 14 px = one merged visual token
GRID = 8  # default board: 8 x 8 cells, 224 x 224 px, 64 visual tokens
ANSWERS = ("yes", "no")
QUESTION_TEMPLATE = "is there a {colour} cell ?"
_JITTER = 12  # per-cell colour jitter (+-), so that colours are ranges, not exact values


def make_rng(rng: int | np.random.Generator | None) -> np.random.Generator:
    """A ``numpy`` generator from a seed (int), an existing generator, or ``None`` (seed 0)."""
    if rng is None:
        return np.random.default_rng(0)
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng: expected an int seed or a numpy.random.Generator, got {type(rng).__name__} {rng!r}")


def question_for(colour: str) -> str:
    """The question text about ``colour`` ("is there a red cell ?")."""
    _check_colour(colour)
    return QUESTION_TEMPLATE.format(colour=colour)


def _check_colour(colour: str) -> None:
    if colour not in PALETTE:
        raise ValueError(f"colour: unknown colour {colour!r}; valid colours are {list(COLOURS)}")


@dataclass(frozen=True)
class Scene:
    """A board: ``cells[r, c]`` is a palette index (into :data:`COLOURS`) or -1 for background."""

    cells: np.ndarray
    jitter: np.ndarray  # (grid, grid, 3) int offsets added to each cell's colour

    @property
    def grid(self) -> int:
        return int(self.cells.shape[0])

    @property
    def size(self) -> int:
        """Side of the image in pixels."""
        return self.grid * CELL_PX

    def cells_of(self, colour: str) -> tuple[int, ...]:
        """Row-major indices of the cells of ``colour`` (= indices of the image's visual tokens)."""
        _check_colour(colour)
        return tuple(int(i) for i in np.flatnonzero(self.cells.ravel() == COLOURS.index(colour)))

    def answer(self, colour: str) -> str:
        return ANSWERS[0] if self.cells_of(colour) else ANSWERS[1]

    def colour_words(self) -> list[str]:
        """Per cell (row-major), its colour word or :data:`BACKGROUND_WORD`."""
        return [COLOURS[i] if i >= 0 else BACKGROUND_WORD for i in self.cells.ravel()]

    def pixels(self) -> np.ndarray:
        """``(size, size, 3)`` uint8 RGB array."""
        palette = np.array([PALETTE[c] for c in COLOURS] + [BACKGROUND], dtype=np.int64)
        rgb = palette[self.cells]  # -1 -> BACKGROUND (last row)
        rgb = np.where(self.cells[..., None] >= 0, rgb + self.jitter, rgb)
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
        return np.repeat(np.repeat(rgb, CELL_PX, axis=0), CELL_PX, axis=1)

    def image(self) -> Image.Image:
        return Image.fromarray(self.pixels(), mode="RGB")


class ToySample(NamedTuple):
    """One question about one image."""

    image: Image.Image
    question: str
    answer: str  # "yes" or "no"
    queried_cells: tuple[int, ...]  # row-major cells of the queried colour (empty when the answer is "no")


class ToyConversation(NamedTuple):
    """One image and several questions about it, asked in successive turns."""

    image: Image.Image
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    queried_cells: tuple[tuple[int, ...], ...]
    colours: tuple[str, ...]
    scene: Scene


def make_scene(
    rng: int | np.random.Generator | None = None,
    queries: Sequence[tuple[str, bool]] = (),
    grid: int = GRID,
    num_coloured: int | None = None,
) -> Scene:
    """Draw a board on which each ``(colour, present)`` of ``queries`` is present (1-2 cells) or absent.

    Args:
        rng: seed or generator.
        queries: the colours that will be asked about and whether each must be present. Other coloured
            cells never use them.
        grid: cells per side (8 -> 224 px, 64 visual tokens; 4 -> 112 px, 16 tokens).
        num_coloured: coloured cells in all; default uniform in 8..12 for an 8x8 board, scaled by area
            otherwise (3..4 for 4x4).
    """
    rng = make_rng(rng)
    if isinstance(grid, bool) or not isinstance(grid, numbers.Integral) or grid < 2:
        raise ValueError(f"grid: expected an int >= 2, got {grid!r}")
    n_cells = grid * grid
    queried = [c for c, _ in queries]
    for c in queried:
        _check_colour(c)
    if len(set(queried)) != len(queried):
        raise ValueError(f"queries: colours must be distinct, got {queried}")
    fill_colours = [i for i, c in enumerate(COLOURS) if c not in queried]
    if not fill_colours:
        raise ValueError("queries: at least one palette colour must remain unqueried")
    if num_coloured is None:
        low, high = max(2, round(8 * n_cells / 64)), max(3, round(12 * n_cells / 64))
        num_coloured = int(rng.integers(low, high + 1))
    present_counts = [int(rng.integers(1, 3)) if present else 0 for _, present in queries]
    num_coloured = max(num_coloured, sum(present_counts))
    if num_coloured > n_cells:
        raise ValueError(f"num_coloured: {num_coloured} cells do not fit on a {grid}x{grid} board")
    positions = rng.permutation(n_cells)[:num_coloured]
    cells = np.full(n_cells, -1, dtype=np.int64)
    start = 0
    for (colour, _), count in zip(queries, present_counts):
        cells[positions[start : start + count]] = COLOURS.index(colour)
        start += count
    rest = positions[start:]
    cells[rest] = rng.choice(fill_colours, size=rest.size)
    jitter = rng.integers(-_JITTER, _JITTER + 1, size=(grid, grid, 3))
    return Scene(cells=cells.reshape(grid, grid), jitter=jitter)


def make_sample(
    rng: int | np.random.Generator | None = None,
    grid: int = GRID,
    colour: str | None = None,
    present: bool | None = None,
) -> ToySample:
    """One balanced sample: ``(image, question, answer, queried_cells)``.

    ``colour`` (default: uniform over :data:`COLOURS`) is asked about; ``present`` (default: a fair coin)
    says whether it is on the board. ``queried_cells`` are the row-major cells of that colour, which are
    the indices of the visual tokens that carry the answer.
    """
    rng = make_rng(rng)
    if colour is None:
        colour = COLOURS[int(rng.integers(len(COLOURS)))]
    _check_colour(colour)
    if present is None:
        present = bool(rng.integers(2))
    scene = make_scene(rng, [(colour, bool(present))], grid=grid)
    return ToySample(scene.image(), question_for(colour), scene.answer(colour), scene.cells_of(colour))


def make_followup(
    rng: int | np.random.Generator | None = None,
    same: bool = False,
    grid: int = GRID,
) -> ToyConversation:
    """A two-turn conversation: colour X, then X again (``same``) or a different colour Y.

    Each queried colour is present with probability 1/2, independently.
    """
    rng = make_rng(rng)
    first = int(rng.integers(len(COLOURS)))
    if same:
        colours = (COLOURS[first],)
    else:
        second = (first + 1 + int(rng.integers(len(COLOURS) - 1))) % len(COLOURS)
        colours = (COLOURS[first], COLOURS[second])
    queries = [(c, bool(rng.integers(2))) for c in colours]
    scene = make_scene(rng, queries, grid=grid)
    asked = (colours[0], colours[0]) if same else colours
    return ToyConversation(
        image=scene.image(),
        questions=tuple(question_for(c) for c in asked),
        answers=tuple(scene.answer(c) for c in asked),
        queried_cells=tuple(scene.cells_of(c) for c in asked),
        colours=asked,
        scene=scene,
    )
