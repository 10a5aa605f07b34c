"""The tile grid: which windows of a scene the model sees.

Like rasterio's ``Window``, a :class:`Tile` is a small value object. Tiles have one size and
step ``size - overlap`` everywhere, so neighbouring tiles overlap by exactly ``overlap`` pixels;
the last row and column reach past the right and bottom edges instead of being dropped or
shifted (the part outside the scene is read as nodata and marked invalid), so every pixel of
the scene is covered and every overlap is the configured one. ``offset`` moves the whole grid
up and left by that many pixels, which is how a prediction is checked for independence from
where the grid falls.

With ``edges="inside"`` (sliding-window inference, as mmsegmentation does it) tiles that would
reach past the scene are moved back inside it instead, so every tile sees only the scene (a
scene smaller than a tile still gets one padded tile). The overlaps at the edges are then
larger than configured, and a grid shifted by a whole number of steps gives exactly the same
tiles: with half-tile overlap, a half-tile shift changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

from affine import Affine
from rasterio.windows import Window


@dataclass(frozen=True)
class Tile:
    """One tile: its grid position, its window in the scene's pixel grid and its transform."""

    index: int
    row: int
    col: int
    window: Window
    transform: Affine

    @property
    def bounds_px(self) -> tuple[int, int, int, int]:
        """(row_off, col_off, row_end, col_end) in scene pixels; may reach past the scene."""
        w = self.window
        return int(w.row_off), int(w.col_off), int(w.row_off + w.height), int(w.col_off + w.width)


@dataclass(frozen=True)
class TileGrid:
    """A regular grid of ``size`` x ``size`` tiles overlapping by ``overlap`` pixels.

    Arguments:
      height, width: the scene in pixels.
      size: tile side in pixels. overlap: pixels shared by neighbouring tiles, 0 <= overlap < size.
      transform: the scene's affine transform (tiles get theirs from it).
      offset: the first tile starts at scene pixel (-offset, -offset); 0 <= offset < size.
      edges: "pad" (tiles reach past the scene, overlaps exact) or "inside" (edge tiles moved in).
    """

    height: int
    width: int
    size: int
    overlap: int = 0
    transform: Affine = Affine.identity()
    offset: int = 0
    edges: str = "pad"

    def __post_init__(self):
        if self.height < 1 or self.width < 1:
            raise ValueError(f"scene of {self.height} x {self.width} pixels has nothing to tile")
        if self.size < 1:
            raise ValueError(f"tile size must be at least 1 pixel, got {self.size}")
        if not 0 <= self.overlap < self.size:
            raise ValueError(f"overlap must be in [0, tile size {self.size}), got {self.overlap}")
        if not 0 <= self.offset < self.size:
            raise ValueError(f"grid offset must be in [0, tile size {self.size}), got {self.offset}")
        if self.edges not in ("pad", "inside"):
            raise ValueError(f"edges must be 'pad' or 'inside', got {self.edges!r}")

    @property
    def step(self) -> int:
        return self.size - self.overlap

    def _starts(self, extent: int) -> tuple[int, ...]:
        padded = extent + self.offset
        n = 1 if padded <= self.size else 1 + math.ceil((padded - self.size) / self.step)
        starts = [k * self.step - self.offset for k in range(n)]
        if self.edges == "inside":
            last = max(0, extent - self.size)
            starts = sorted({min(max(s, 0), last) for s in starts})
        return tuple(starts)

    @cached_property
    def _rows(self) -> tuple[int, ...]:
        return self._starts(self.height)

    @cached_property
    def _cols(self) -> tuple[int, ...]:
        return self._starts(self.width)

    @property
    def shape(self) -> tuple[int, int]:
        """(tile rows, tile columns)."""
        return len(self._rows), len(self._cols)

    def __len__(self) -> int:
        rows, cols = self.shape
        return rows * cols

    def row_start(self, row: int) -> int:
        """First scene row of tile row ``row`` (negative for the first row of an offset padded grid)."""
        return self._rows[row]

    def tile(self, row: int, col: int) -> Tile:
        rows, cols = self.shape
        if not (0 <= row < rows and 0 <= col < cols):
            raise IndexError(f"tile ({row}, {col}) outside a {rows} x {cols} grid")
        r0, c0 = self._rows[row], self._cols[col]
        window = Window(c0, r0, self.size, self.size)
        return Tile(row * cols + col, row, col, window, self.transform @ Affine.translation(c0, r0))

    def __iter__(self) -> Iterator[Tile]:
        """Tiles in row-major order (the order :class:`tiles.stitch.Stitcher` wants them)."""
        rows, cols = self.shape
        for r in range(rows):
            for c in range(cols):
                yield self.tile(r, c)

    def __getitem__(self, index: int) -> Tile:
        rows, cols = self.shape
        if not 0 <= index < rows * cols:
            raise IndexError(index)
        return self.tile(index // cols, index % cols)
