"""Stitching: per-tile outputs blended into one scene mosaic, written to disk as it completes.

Each tile's output is weighted by a window that ramps linearly across the overlap (the
weights of neighbouring tiles sum to one there, so there is no seam) and is zero where the
tile's input was invalid. A :class:`Stitcher` keeps one band of ``tile size`` scene rows in
memory: tiles arrive row by row (in any order within a row), and every scene row that no
later tile can touch is normalised and written out. Memory is ``tile size x scene width x
(channels + 1)`` accumulators, whatever the scene's height. Pixels no valid input reached stay
nodata (the nodata value, or an internal mask when the output has none). The file appears
under its name only when complete (written to a temporary name, then renamed).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window

from tiles.grid import Tile, TileGrid
from tiles.reader import bound_gdal_cache

FLUSH_ROWS = 128


def blend_weights(size: int, overlap: int) -> np.ndarray:
    """(size, size) float32 window: 1 inside, linear ramps over ``overlap`` pixels at each side.

    Across an overlap the ramps of two neighbours sum to exactly 1.
    """
    if overlap == 0:
        return np.ones((size, size), np.float32)
    i = np.arange(size, dtype=np.float64) + 0.5
    ramp = np.clip(np.minimum(i, size - i) / overlap, 0.0, 1.0)
    return np.outer(ramp, ramp).astype(np.float32)


class Stitcher:
    """Write a mosaic of per-tile outputs (a context manager: the file appears on clean exit).

    Arguments:
      path: output GeoTIFF (``driver="COG"`` converts it to a cloud-optimised GeoTIFF at the end).
      grid: the :class:`TileGrid` the tiles come from (its transform is the output's).
      channels, dtype: of the per-tile outputs and of the file (integers are rounded and clipped).
      crs: the output CRS. nodata: the output's nodata value; None writes an internal mask instead.
      per_band: validity comes per channel (``valid`` of shape (channels, size, size)), as when
        stitching raw multi-band imagery whose nodata differs between bands; costs one weight
        accumulator per channel instead of one in all.
    """

    def __init__(self, path: str | Path, grid: TileGrid, channels: int, dtype="float32", crs=None,
                 nodata: float | None = None, driver: str = "GTiff", blend: bool = True, block: int = 256,
                 per_band: bool = False):
        self.path = Path(path)
        self.grid = grid
        self.channels = channels
        self.dtype = np.dtype(dtype)
        self.nodata = nodata
        self.driver = driver
        self._weights = blend_weights(grid.size, grid.overlap if blend else 0)
        # float64 where float32 could not hold the output exactly (32/64-bit types)
        self._acc = np.float64 if self.dtype.itemsize >= 4 else np.float32
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.part")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        profile = dict(
            driver="GTiff", width=grid.width, height=grid.height, count=channels, dtype=self.dtype.name,
            crs=crs, transform=grid.transform, nodata=nodata, tiled=True, blockxsize=block, blockysize=block,
            compress="deflate", BIGTIFF="IF_SAFER",
        )
        bound_gdal_cache()
        self._dst = rasterio.open(self._tmp, "w", **profile)
        t = grid.size
        self._sum = np.zeros((channels, t, grid.width), self._acc)
        self._wsum = np.zeros((channels if per_band else 1, t, grid.width), self._acc)
        self._block = block
        self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []  # finished rows not yet written
        self._pending_rows = 0
        self._written = 0  # scene rows already in the file
        self._row: int | None = None  # tile row being filled
        self._top = 0  # scene row of the buffer's first row
        self._done = False

    # -- adding tiles ----------------------------------------------------------------------
    def add(self, tile: Tile, data: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Blend one tile's output (channels, size, size); ``valid`` (size, size) marks usable pixels."""
        if data.shape != (self.channels, self.grid.size, self.grid.size):
            raise ValueError(f"tile output {data.shape} != {(self.channels, self.grid.size, self.grid.size)}")
        if self._row is None:
            self._row, self._top = tile.row, self.grid.row_start(tile.row)
        elif tile.row < self._row:
            raise ValueError(f"tile row {tile.row} arrived after row {self._row}: add tiles row by row")
        elif tile.row > self._row:
            self._advance(tile.row)
        w = self._weights[None] if valid is None else self._weights * (valid if valid.ndim == 3 else valid[None])
        if w.shape[0] == 1 < self._wsum.shape[0]:  # one mask for all channels of a per-band stitcher
            w = np.repeat(w, self._wsum.shape[0], axis=0)
        if w.shape[0] != self._wsum.shape[0]:
            raise ValueError(f"validity of shape {valid.shape} for a stitcher with per_band={self._wsum.shape[0] > 1}")
        r0, c0, _, _ = tile.bounds_px
        top = r0 - self._top
        cs = max(0, -c0)  # tile columns left of the scene (an offset grid's first column)
        cw = min(self.grid.size, self.grid.width - c0) - cs
        rows = min(self.grid.size, self._sum.shape[1] - top)
        d = data[:, :rows, cs : cs + cw].astype(self._acc)
        ww = w[:, :rows, cs : cs + cw]
        if np.issubdtype(data.dtype, np.floating):  # NaN/inf outputs count as invalid
            finite = np.isfinite(d)
            if not finite.all():
                d[~finite] = 0
                ww = ww * (finite if ww.shape[0] > 1 else finite.all(axis=0, keepdims=True))
        d *= ww
        self._sum[:, top : top + rows, c0 + cs : c0 + cs + cw] += d
        self._wsum[:, top : top + rows, c0 + cs : c0 + cs + cw] += ww

    def _advance(self, row: int) -> None:
        new_top = self.grid.row_start(row)
        n = min(new_top - self._top, self.grid.size)
        self._flush(n)
        self._top += n
        while self._top < min(new_top, self.grid.height):  # whole rows of tiles skipped: nodata
            k = min(new_top - self._top, self.grid.size)
            self._write_empty(k)
            self._top += k
        self._top = new_top
        self._row = row

    def _flush(self, n: int) -> None:
        """Write the buffer's first ``n`` rows and shift the rest up.

        Normalised ``FLUSH_ROWS`` rows at a time, so the temporaries stay small on wide scenes.
        """
        rows = min(n, self.grid.height - self._top)
        for k in range(max(0, -self._top), max(rows, 0), FLUSH_ROWS):  # rows above the scene are dropped
            part = slice(k, min(k + FLUSH_ROWS, rows))
            wsum = self._wsum[:, part]
            covered = np.broadcast_to(wsum > 0, self._sum[:, part].shape)
            out = np.divide(self._sum[:, part], wsum, out=np.zeros_like(self._sum[:, part]), where=covered)
            self._write(out, covered, part.stop - part.start)
        keep = self.grid.size - n
        if keep > 0:  # shift in place: only the overlap rows are copied
            self._sum[:, :keep] = self._sum[:, n:]
            self._wsum[:, :keep] = self._wsum[:, n:]
        self._sum[:, keep:] = 0
        self._wsum[:, keep:] = 0

    def _write_empty(self, rows: int) -> None:
        """Queue ``rows`` rows no tile reached (nodata), a block row at a time."""
        rows = min(rows, self.grid.height - self._top)
        for k in range(max(0, -self._top), max(rows, 0), self._block):
            shape = (self.channels, min(self._block, rows - k), self.grid.width)
            self._write(np.zeros(shape, self._acc), np.zeros(shape, bool), shape[1])

    def _write(self, out: np.ndarray, covered: np.ndarray, rows: int) -> None:
        """Queue the next ``rows`` finished scene rows; they reach the file in whole block rows."""
        if np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            out = np.clip(np.rint(out), info.min, info.max)
        out = out.astype(self.dtype)
        if self.nodata is not None:
            out[~covered] = self.nodata
        mask = None if self.nodata is not None else covered.any(axis=0).astype(np.uint8) * 255
        self._pending.append((out, mask))
        self._pending_rows += rows
        self._drain(final=False)

    def _drain(self, final: bool) -> None:
        """Write queued rows in multiples of the block height (all of them when ``final``).

        A compressed GeoTIFF block written twice is stored twice: writing whole block rows
        keeps the file as small as a block-by-block copy of the same data.
        """
        n = self._pending_rows if final else self._pending_rows // self._block * self._block
        if n == 0:
            return
        data = np.concatenate([d for d, _ in self._pending], axis=1)
        window = Window(0, self._written, self.grid.width, n)
        self._dst.write(data[:, :n], window=window)
        if self.nodata is None:  # one mask for the dataset: valid where any channel is
            mask = np.concatenate([m for _, m in self._pending], axis=0)
            self._dst.write_mask(mask[:n], window=window)
            self._pending = [(data[:, n:], mask[n:])]
        else:
            self._pending = [(data[:, n:], None)]
        self._written += n
        self._pending_rows -= n

    # -- finishing ---------------------------------------------------------------------------
    def close(self) -> Path:
        """Write what is left and move the file into place; returns its path."""
        if self._done:
            return self.path
        if self._row is None:
            self._top = 0
        else:
            self._flush(self.grid.size)
            self._top += self.grid.size
        while self._top < self.grid.height:
            self._write_empty(self.grid.size)
            self._top += self.grid.size
        self._drain(final=True)
        self._dst.close()
        if self.driver.upper() == "COG":
            cog = self._tmp.with_suffix(".cog.part")
            rasterio.shutil.copy(self._tmp, cog, driver="COG", compress="deflate")
            self._tmp.unlink()
            self._tmp = cog
        os.replace(self._tmp, self.path)
        self._done = True
        return self.path

    def abort(self) -> None:
        """Drop the partial file; whatever was at ``path`` before stays untouched."""
        if not self._done:
            self._dst.close()
            self._tmp.unlink(missing_ok=True)
            self._done = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
