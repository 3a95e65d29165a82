"""Pixel drawing for the toy world: flat shapes on a black canvas, as uint8 numpy arrays.

Colours are far apart in RGB (an independent checker can classify a pixel by its nearest palette
entry) and each shape is drawn with a small per-shape brightness jitter so a model cannot key on
exact pixel values.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def mask(self, canvas: int = CANVAS) -> np.ndarray:
        yy, xx = np.mgrid[0:canvas, 0:canvas]
        inside_box = (xx >= self.x) & (xx < self.x + self.size)
        inside_box &= (yy >= self.y) & (yy < self.y + self.size)
        if self.kind == "square":
            return inside_box
        r = self.size / 2.0
        cx, cy = self.x + r - 0.5, self.y + r - 0.5
        # The -0.5 always cuts the corner pixels, so even a 3-pixel circle (a plus sign) never
        # fills its box and cannot be mistaken for a square.
        return inside_box & ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r - 0.5)

    def area(self) -> int:
        return int(self.mask().sum())

    def as_dict(self) -> dict:
        return {"kind": self.kind, "colour": self.colour, "x": self.x, "y": self.y,
                "size": self.size, "shade": self.shade}


def rgb(colour: str) -> tuple[int, int, int]:
    return WHITE if colour == "white" else PALETTE[colour]


def render(shapes: list[Shape] | tuple[Shape, ...], canvas: int = CANVAS) -> np.ndarray:
    """[canvas, canvas, 3] uint8 image; later shapes paint over earlier ones."""
    img = np.zeros((canvas, canvas, 3), dtype=np.uint8)
    for s in shapes:
        value = np.clip(np.array(rgb(s.colour), dtype=np.int16) + s.shade, 0, 255)
        img[s.mask(canvas)] = value.astype(np.uint8)
    return img
