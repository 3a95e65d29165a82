"""Image domain of the toy world: counting and comparing flat shapes on a 32x32 canvas.

Shapes sit in distinct cells of a 4x4 grid of 8x8 cells, one cell per ViT patch at the default
``patch_size`` 8, with at least two background pixels between neighbours, so every shape is one
connected blob an independent checker can find. Question types (``meta.task``), from a single
glance to counting over the whole grid:

- ``colour``: one shape; "What colour is the shape?" -> a colour
- ``kind``: one shape; "Is the shape a square or a circle?" -> square / circle
- ``count``: "How many shapes?" -> 1..6
- ``count_colour``: "How many red shapes?" -> 0..4
- ``count_kind``: "How many circles?" -> 0..4
- ``majority``: "Which colour is most common?" -> a colour (unique maximum)
- ``biggest``: "What colour is the biggest shape?" -> a colour (area margin >= 25 %)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_copd.data.toy.draw import COLOURS, KINDS, Shape, render

GRID = 4
CELL = 8
TASKS = ("colour", "kind", "count", "count_colour", "count_kind", "majority", "biggest")


@dataclass(frozen=True)
class VisualProblem:
    prompt: str
    answer: str
    reward: str  # verifier name: "numeric" or "exact"
    frames: tuple[np.ndarray, ...]  # one image, or the frames of a video
    meta: dict


def _shape_in_cell(
    rng: np.random.Generator, cell: int, kind: str, colour: str, size: int | None = None
) -> Shape:
    size = int(rng.integers(3, 7)) if size is None else size
    cy, cx = divmod(cell, GRID)
    # Keep one pixel of margin inside the cell: neighbours are >= 2 pixels apart.
    ox, oy = (int(v) for v in rng.integers(1, CELL - size, size=2))
    return Shape(
        kind=kind,
        colour=colour,
        x=cx * CELL + ox,
        y=cy * CELL + oy,
        size=size,
        shade=int(rng.integers(-20, 21)),
    )


def _cells(rng: np.random.Generator, n: int) -> list[int]:
    return [int(c) for c in rng.choice(GRID * GRID, size=n, replace=False)]


def _random_shapes(
    rng: np.random.Generator, colours: list[str], kinds: list[str] | None = None
) -> list[Shape]:
    kinds = kinds or [str(rng.choice(KINDS)) for _ in colours]
    return [
        _shape_in_cell(rng, c, k, col)
        for c, k, col in zip(_cells(rng, len(colours)), kinds, colours)
    ]


def _problem(prompt: str, answer: str | int, task: str, shapes: list[Shape]) -> VisualProblem:
    reward = "numeric" if isinstance(answer, int) else "exact"
    return VisualProblem(
        prompt=prompt,
        answer=str(answer),
        reward=reward,
        frames=(render(shapes),),
        meta={"task": task, "shapes": [s.as_dict() for s in shapes]},
    )


def generate(rng: np.random.Generator, tasks: tuple[str, ...] = TASKS) -> VisualProblem:
    task = str(rng.choice(tasks))
    if task in ("colour", "kind"):
        # Size >= 4: a 3-pixel circle is hard to tell from a square even for a checker.
        kind, colour = str(rng.choice(KINDS)), str(rng.choice(COLOURS))
        shape = _shape_in_cell(rng, _cells(rng, 1)[0], kind, colour, int(rng.integers(4, 7)))
        if task == "colour":
            return _problem("What colour is the shape?", colour, task, [shape])
        return _problem("Is the shape a square or a circle?", kind, task, [shape])
    if task == "count":
        n = int(rng.integers(1, 7))
        shapes = _random_shapes(rng, [str(c) for c in rng.choice(COLOURS, size=n)])
        return _problem("How many shapes?", n, task, shapes)
    if task in ("count_colour", "count_kind"):
        # Draw the answer first so 0..4 are equally likely, then fill with other shapes.
        k = int(rng.integers(0, 5))
        n = int(rng.integers(max(k, 1), 7))
        if task == "count_colour":
            target = str(rng.choice(COLOURS))
            others = [c for c in COLOURS if c != target]
            colours = [target] * k + [str(rng.choice(others)) for _ in range(n - k)]
            order = rng.permutation(n)
            shapes = _random_shapes(rng, [colours[i] for i in order])
            return _problem(f"How many {target} shapes?", k, task, shapes)
        target = str(rng.choice(KINDS))
        other = next(k_ for k_ in KINDS if k_ != target)
        kinds = [target] * k + [other] * (n - k)
        order = rng.permutation(n)
        colours = [str(c) for c in rng.choice(COLOURS, size=n)]
        shapes = _random_shapes(rng, colours, [kinds[i] for i in order])
        return _problem(f"How many {target}s?", k, task, shapes)
    if task == "majority":
        while True:
            counts = rng.multinomial(int(rng.integers(3, 8)), [0.25] * 4)
            if (counts == counts.max()).sum() == 1:
                break
        colours = [c for c, m in zip(COLOURS, counts) for _ in range(int(m))]
        colours = [colours[i] for i in rng.permutation(len(colours))]
        shapes = _random_shapes(rng, colours)
        return _problem("Which colour is most common?", COLOURS[int(counts.argmax())], task, shapes)
    # biggest: distinct colours, one shape clearly larger in area than every other.
    n = int(rng.integers(2, 5))
    while True:
        colours = [str(c) for c in rng.choice(COLOURS, size=n, replace=False)]
        cells = _cells(rng, n)
        kinds = [str(rng.choice(KINDS)) for _ in range(n)]
        sizes = [int(s) for s in rng.integers(3, 7, size=n)]
        shapes = [
            _shape_in_cell(rng, c, k, col, s) for c, k, col, s in zip(cells, kinds, colours, sizes)
        ]
        areas = sorted((s.area(), s.colour) for s in shapes)
        if areas[-1][0] >= 1.25 * areas[-2][0]:
            return _problem("What colour is the biggest shape?", areas[-1][1], task, shapes)
