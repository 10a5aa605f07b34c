"""The tile grid: which windows of a scene the model sees.

Like rasterio's ``Window``, a :class:`Tile` is a small value object. Tiles have one size and
step ``size - overlap`` everywhere, so neighbouring tiles overlap by exactly ``overlap`` pixels;
the last row and column reach past the right and bottom edges instead of being dropped or
shifted (the part outside the scene is read as nodata and marked invalid), so every pixel of
the scene is covered and every overlap is the configured one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

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
    """

    height: int
    width: int
    size: int
    overlap: int = 0
    transform: Affine = Affine.identity()

    def __post_init__(self):
        if self.height < 1 or self.width < 1:
            raise ValueError(f"scene of {self.height} x {self.width} pixels has nothing to tile")
        if self.size < 1:
            raise ValueError(f"tile size must be at least 1 pixel, got {self.size}")
        if not 0 <= self.overlap < self.size:
            raise ValueError(f"overlap must be in [0, tile size {self.size}), got {self.overlap}")

    @property
    def step(self) -> int:
        return self.size - self.overlap

    def _count(self, extent: int) -> int:
        return 1 if extent <= self.size else 1 + math.ceil((extent - self.size) / self.step)

    @property
    def shape(self) -> tuple[int, int]:
        """(tile rows, tile columns)."""
        return self._count(self.height), self._count(self.width)

    def __len__(self) -> int:
        rows, cols = self.shape
        return rows * cols

    def row_start(self, row: int) -> int:
        """First scene row of tile row ``row``."""
        return row * self.step

    def tile(self, row: int, col: int) -> Tile:
        rows, cols = self.shape
        if not (0 <= row < rows and 0 <= col < cols):
            raise IndexError(f"tile ({row}, {col}) outside a {rows} x {cols} grid")
        r0, c0 = row * self.step, col * self.step
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
