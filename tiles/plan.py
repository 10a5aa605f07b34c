"""The scene plan: everything the tiles of one scene share, fixed once before any tile is read.

:func:`plan` fixes the grid (tile size and overlap in pixels or metres), the scene-level
:class:`~tiles.radiometry.Stretch` (or a dataset-level one from :func:`dataset_stretch`), and
which tiles hold any valid pixel (all-nodata tiles are skipped). :meth:`ScenePlan.manifest` is
what gets written next to every output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tiles.errors import TilesError
from tiles.grid import Tile, TileGrid
from tiles.radiometry import Stretch, compute_stretch
from tiles.reader import RasterSource, ReadOptions


@dataclass(frozen=True)
class TilingConfig:
    """Tile geometry and normalisation. Sizes in pixels, or in metres on the ground with ``unit="m"``."""

    tile_size: float = 1024
    overlap: float = 128
    unit: str = "px"
    normalisation: str = "auto"
    percentiles: tuple[float, float] = (2.0, 98.0)
    read: ReadOptions = field(default_factory=ReadOptions)
    offset: float = 0  # the grid starts this far up and left of the scene's corner (same unit)
    edges: str = "pad"  # or "inside": edge tiles moved back inside the scene (see TileGrid)

    def pixels(self, ground_res: tuple[float, float] | None) -> tuple[int, int, int]:
        """(tile size, overlap, offset) in pixels of the scene as read."""
        if self.unit == "px":
            return int(self.tile_size), int(self.overlap), int(self.offset)
        if self.unit != "m":
            raise TilesError(f"tile unit must be 'px' or 'm', got {self.unit!r}")
        if ground_res is None:
            raise TilesError("tile sizes in metres need a georeferenced raster")
        res = max(ground_res)  # the coarser axis decides, so a tile never spans more than asked
        return max(1, math.floor(self.tile_size / res)), max(0, round(self.overlap / res)), round(self.offset / res)


@dataclass(frozen=True)
class ScenePlan:
    """Everything the tiles of one scene share; ``tiles`` holds the non-empty ones."""

    source: dict
    read: ReadOptions
    grid: TileGrid
    stretch: Stretch
    tiles: tuple[Tile, ...]
    valid_fraction: float = 1.0  # of the scene's pixels, measured on the overview

    def manifest(self) -> dict:
        g = self.grid
        return {"source": self.source, "grid": {"height": g.height, "width": g.width, "size": g.size,
                "overlap": g.overlap, "tiles": len(g), "non_empty": len(self.tiles)},
                "stretch": self.stretch.to_dict()}


def plan(path: str | Path, config: TilingConfig | None = None, stretch: Stretch | None = None,
         max_overview_pixels: int = 1_000_000, overview: tuple[np.ndarray, np.ndarray] | None = None) -> ScenePlan:
    """Plan the tiling of one scene. Pass ``stretch`` to share a dataset-level normalisation,
    ``overview`` when the caller has already read :meth:`RasterSource.read_overview` with the same
    read options (reading it costs a pass over the whole scene where it has no overviews)."""
    config = config or TilingConfig()
    with RasterSource(path, config.read) as src:
        size, overlap, offset = config.pixels(src.ground_res)
        try:
            grid = TileGrid(src.height, src.width, size, min(overlap, size - 1), src.transform, offset,
                            config.edges)
        except ValueError as e:
            raise TilesError(str(e), path) from None
        data, valid = overview if overview is not None else src.read_overview(max_overview_pixels)
        if not valid.any():
            raise TilesError("raster has no valid pixels (all nodata or NaN)", path)
        if stretch is None:
            stretch = compute_stretch(data, valid, config.normalisation, config.percentiles)
        tiles = tuple(t for t in grid if _may_hold_valid(t, grid, valid))
        return ScenePlan(src.describe(), config.read, grid, stretch, tiles, float(valid.mean()))


def dataset_stretch(paths: list[str | Path], config: TilingConfig | None = None,
                    max_overview_pixels: int = 1_000_000) -> Stretch:
    """One normalisation for a whole dataset (several scenes, e.g. one city over the years).

    Each scene contributes its decimated valid pixels equally; pass the result to :func:`plan`.
    """
    config = config or TilingConfig()
    samples, masks = [], []
    for p in paths:
        with RasterSource(p, config.read) as src:
            data, valid = src.read_overview(max_overview_pixels)
        if samples and data.shape[0] != samples[0].shape[0]:
            raise TilesError(f"{data.shape[0]} bands, but {paths[0]} has {samples[0].shape[0]}", p)
        samples.append(data.reshape(data.shape[0], -1))
        masks.append(valid.reshape(-1))
    if len({s.dtype for s in samples}) > 1:  # mixed bit depths: compare values as floats
        samples = [s.astype(np.float64) for s in samples]
    data = np.concatenate(samples, axis=1)[:, :, None]
    return compute_stretch(data, np.concatenate(masks)[:, None], config.normalisation, config.percentiles)


def _may_hold_valid(tile: Tile, grid: TileGrid, valid: np.ndarray) -> bool:
    """Whether the decimated validity mask has a valid pixel in (or next to) the tile's footprint."""
    fy, fx = valid.shape[0] / grid.height, valid.shape[1] / grid.width
    r0, c0, r1, c1 = tile.bounds_px
    y0, x0 = max(0, math.floor(r0 * fy) - 1), max(0, math.floor(c0 * fx) - 1)
    y1, x1 = math.ceil(min(r1, grid.height) * fy) + 1, math.ceil(min(c1, grid.width) * fx) + 1
    return bool(valid[y0:y1, x0:x1].any())
