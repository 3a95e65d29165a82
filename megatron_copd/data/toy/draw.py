"""Pixel drawing for the toy world: flat shapes on a black canvas, as uint8 numpy arrays.

Colours are far apart in RGB (an independent checker can classify a pixel by its nearest palette
entry) and each shape is drawn with a small per-shape brightness jitter so a model cannot key on
exact pixel values.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

CANVAS = 32
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 235),
    "yellow": (230, 210, 40),
}
WHITE = (245, 245, 245)
COLOURS = tuple(PALETTE)
KINDS = ("square", "circle")


@dataclass(frozen=True)
class Shape:
    kind: str  # "square" or "circle"
    colour: str  # a PALETTE key, or "white"
    x: int  # top-left corner of the bounding box
    y: int
    size: int  # side (square) or diameter (circle) in pixels
    shade: int = 0  # brightness jitter added to every channel

    def local_mask(self) -> np.ndarray:
        """[size, size] bool footprint inside the bounding box."""
        return _footprint(self.kind, self.size)

    def mask(self, canvas: int = CANVAS) -> np.ndarray:
        out = np.zeros((canvas, canvas), dtype=bool)
        out[self.y : self.y + self.size, self.x : self.x + self.size] = self.local_mask()
        return out

    def area(self) -> int:
        return int(self.local_mask().sum())

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "colour": self.colour,
            "x": self.x,
            "y": self.y,
            "size": self.size,
            "shade": self.shade,
        }


@cache
def _footprint(kind: str, size: int) -> np.ndarray:
    if kind == "square":
        fp = np.ones((size, size), dtype=bool)
        fp.setflags(write=False)
        return fp
    yy, xx = np.mgrid[0:size, 0:size]
    c = size / 2.0 - 0.5
    # The -0.5 always cuts the corner pixels, so even a 3-pixel circle (a plus sign) never fills
    # its box and cannot be mistaken for a square.
    fp = (xx - c) ** 2 + (yy - c) ** 2 <= (size / 2.0) ** 2 - 0.5
    fp.setflags(write=False)  # shared by every shape of this kind and size
    return fp


def rgb(colour: str) -> tuple[int, int, int]:
    return WHITE if colour == "white" else PALETTE[colour]


def render(shapes: list[Shape] | tuple[Shape, ...], canvas: int = CANVAS) -> np.ndarray:
    """[canvas, canvas, 3] uint8 image; later shapes paint over earlier ones."""
    img = np.zeros((canvas, canvas, 3), dtype=np.uint8)
    for s in shapes:
        value = np.clip(np.array(rgb(s.colour), dtype=np.int16) + s.shade, 0, 255)
        if s.x < 0 or s.y < 0 or s.x + s.size > canvas or s.y + s.size > canvas:
            raise ValueError(f"shape outside the {canvas}x{canvas} canvas: {s}")
        img[s.y : s.y + s.size, s.x : s.x + s.size][s.local_mask()] = value.astype(np.uint8)
    return img
