"""Video domain of the toy world: four 32x32 frames with one thing that changes.

Question types (``meta.task``):

- ``colour``: one square moves; "What colour is the square?" -> a colour (any frame tells)
- ``direction``: a coloured square moves 3..6 px per frame; "Which way does the red square
  move?" -> left / right / up / down (static distractor shapes of other colours may be present)
- ``flashes``: a white light is on in some frames; "In how many frames is the light on?" -> 0..4
- ``mover``: two squares, one moves and one stays; "What colour is the moving square?" -> colour

Shapes never touch in any frame (>= 2 px apart), so an independent checker can track each colour.
"""

from __future__ import annotations

import numpy as np

from megatron_copd.data.toy.draw import CANVAS, COLOURS, KINDS, Shape, render
from megatron_copd.data.toy.image_tasks import VisualProblem

N_FRAMES = 4
TASKS = ("colour", "direction", "flashes", "mover")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def _apart(a: Shape, b: Shape, gap: int = 2) -> bool:
    return (
        a.x + a.size + gap <= b.x
        or b.x + b.size + gap <= a.x
        or a.y + a.size + gap <= b.y
        or b.y + b.size + gap <= a.y
    )


def _moving(rng: np.random.Generator, colour: str, direction: str) -> list[Shape]:
    """The frames of one square moving at constant speed, fully inside the canvas."""
    size = int(rng.integers(4, 7))
    speed = int(rng.integers(3, 7))
    dx, dy = DIRECTIONS[direction]
    travel = speed * (N_FRAMES - 1)
    lo_x, hi_x = (travel if dx < 0 else 0), CANVAS - size - (travel if dx > 0 else 0)
    lo_y, hi_y = (travel if dy < 0 else 0), CANVAS - size - (travel if dy > 0 else 0)
    x0, y0 = int(rng.integers(lo_x, hi_x + 1)), int(rng.integers(lo_y, hi_y + 1))
    shade = int(rng.integers(-20, 21))
    return [
        Shape("square", colour, x0 + dx * speed * t, y0 + dy * speed * t, size, shade)
        for t in range(N_FRAMES)
    ]


def _static(rng: np.random.Generator, colour: str, kind: str | None = None) -> Shape:
    size = int(rng.integers(3, 7))
    x, y = (int(v) for v in rng.integers(0, CANVAS - size + 1, size=2))
    return Shape(kind or str(rng.choice(KINDS)), colour, x, y, size, int(rng.integers(-20, 21)))


def _place_statics(
    rng: np.random.Generator, tracks: list[list[Shape]], colours: list[str], kind: str | None = None
) -> list[list[Shape]] | None:
    """Add a static shape per colour that stays clear of every track in every frame."""
    for colour in colours:
        for _ in range(50):
            s = _static(rng, colour, kind)
            if all(_apart(s, t[f]) for t in tracks for f in range(N_FRAMES)):
                tracks = tracks + [[s] * N_FRAMES]
                break
        else:
            return None
    return tracks


def _problem(
    prompt: str,
    answer: str | int,
    task: str,
    tracks: list[list[Shape]],
    visible: list[list[bool]] | None = None,
) -> VisualProblem:
    frames, meta_frames = [], []
    for f in range(N_FRAMES):
        shapes = [t[f] for i, t in enumerate(tracks) if visible is None or visible[i][f]]
        frames.append(render(shapes))
        meta_frames.append([s.as_dict() for s in shapes])
    reward = "numeric" if isinstance(answer, int) else "exact"
    return VisualProblem(
        prompt=prompt,
        answer=str(answer),
        reward=reward,
        frames=tuple(frames),
        meta={"task": task, "frames": meta_frames},
    )


def generate(rng: np.random.Generator, tasks: tuple[str, ...] = TASKS) -> VisualProblem:
    task = str(rng.choice(tasks))
    while True:
        if task == "colour":
            colour = str(rng.choice(COLOURS))
            direction = str(rng.choice(list(DIRECTIONS)))
            return _problem(
                "What colour is the square?", colour, task, [_moving(rng, colour, direction)]
            )
        if task == "direction":
            colour = str(rng.choice(COLOURS))
            direction = str(rng.choice(list(DIRECTIONS)))
            others = [c for c in COLOURS if c != colour]
            n_static = int(rng.integers(0, 3))
            distractors = [str(c) for c in rng.choice(others, size=n_static, replace=False)]
            tracks = _place_statics(rng, [_moving(rng, colour, direction)], distractors)
            if tracks is not None:
                return _problem(
                    f"Which way does the {colour} square move?", direction, task, tracks
                )
        elif task == "flashes":
            light = _static(rng, "white", "square")
            k = int(rng.integers(0, N_FRAMES + 1))
            on = np.zeros(N_FRAMES, dtype=bool)
            on[rng.choice(N_FRAMES, size=k, replace=False)] = True
            n_static = int(rng.integers(1, 3))
            distractors = [str(c) for c in rng.choice(COLOURS, size=n_static, replace=False)]
            tracks = _place_statics(rng, [[light] * N_FRAMES], distractors)
            if tracks is not None:
                visible = [on.tolist()] + [[True] * N_FRAMES] * n_static
                return _problem("In how many frames is the light on?", k, task, tracks, visible)
        else:
            moving, still = (str(c) for c in rng.choice(COLOURS, size=2, replace=False))
            direction = str(rng.choice(list(DIRECTIONS)))
            tracks = _place_statics(rng, [_moving(rng, moving, direction)], [still], "square")
            if tracks is not None:
                return _problem("What colour is the moving square?", moving, task, tracks)
