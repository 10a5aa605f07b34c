"""Co-registration between years: how far one year's imagery is shifted against another's.

Village outlines of two years are compared in map coordinates; if the imagery itself is
misregistered by several metres, every village seems to move and grow or shrink at its edges.
:func:`estimate_shift` measures the shift by phase correlation of the two images over their
common footprint, resampled to one grid in the analysis CRS (grey levels, Hann-windowed,
sub-pixel peak). ``uvsam change`` reports it for each pair of consecutive years that has
imagery and warns above a threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pyproj import CRS
from rasterio.warp import transform_bounds
from scipy.ndimage import gaussian_filter

from tiles.reader import RasterSource, read_on_grid
from tiles.remote import location
from uvsam.errors import InputError

MIN_PSR = 8.0  # noise alone peaks near 5 sigma on a 256 x 256 surface


@dataclass(frozen=True)
class Shift:
    """Where the later image's content lies relative to the earlier one's, in metres (east, north)."""

    east_m: float
    north_m: float
    pixel_m: float  # the grid the estimate was made on
    peak: float  # phase-correlation peak height (0..1)
    psr: float = float("inf")  # peak-to-sidelobe ratio: how far the peak stands above the rest of the surface

    @property
    def reliable(self) -> bool:
        """Whether the peak stands clear of the correlation noise (PSR >= MIN_PSR). Between
        years with little unchanged structure (bare land built over) there is no true peak and
        the argmax lands anywhere: such an estimate is reported as not measurable."""
        return self.psr >= MIN_PSR

    @property
    def metres(self) -> float:
        return float(np.hypot(self.east_m, self.north_m))


def common_grid(before: str | Path, after: str | Path, crs, max_px: int = 1024):
    """``(crs, bounds, width, height)`` of a grid over the two images' common footprint, at the
    coarser image's resolution and at most ``max_px`` across; None if they share less than
    64 x 64 px of it."""
    crs = CRS.from_user_input(crs)
    boxes, natives = [], []
    for p in (before, after):
        with RasterSource(p) as ds:  # the one reader: integrity checked, bands by colour interpretation
            if ds.crs is None:
                raise InputError("image has no CRS", p)
            t = ds.transform
            box = transform_bounds(ds.crs, crs, *_bounds(t, ds.width, ds.height))
            boxes.append(box)
            natives.append((box[2] - box[0]) / ds.width)  # pixel size in the analysis CRS
    x0, y0 = max(boxes[0][0], boxes[1][0]), max(boxes[0][1], boxes[1][1])
    x1, y1 = min(boxes[0][2], boxes[1][2]), min(boxes[0][3], boxes[1][3])
    if x1 <= x0 or y1 <= y0:
        return None
    pixel = max(*natives, (x1 - x0) / max_px, (y1 - y0) / max_px)  # the coarser image, at most max_px across
    w, h = int((x1 - x0) / pixel), int((y1 - y0) / pixel)
    if w < 64 or h < 64:
        return None
    return crs, (x0, y0, x1, y1), w, h


def estimate_shift(before: str | Path, after: str | Path, crs, max_px: int = 1024) -> Shift | None:
    """The shift of ``after`` against ``before`` over their common footprint, or None if they
    share less than 64 x 64 px of it."""
    grid = common_grid(before, after, crs, max_px)
    if grid is None:
        return None
    _, (x0, _, x1, _), w, h = grid
    pixel = (x1 - x0) / w
    a, va = read_on_grid(location(before), *grid)
    b, vb = read_on_grid(location(after), *grid)
    a, b = a.mean(axis=0), b.mean(axis=0)  # grey levels
    valid = va & vb
    if valid.mean() < 0.25:
        return None
    # the same tapered window on both: edges of nodata (mosaic gaps) must not correlate by themselves
    win = np.outer(np.hanning(h), np.hanning(w)) * gaussian_filter(valid.astype(np.float64), 3) * valid
    fa = np.fft.fft2((a - a[valid].mean()) * win)
    fb = np.fft.fft2((b - b[valid].mean()) * win)
    cross = fb * np.conj(fa)
    r = np.fft.ifft2(cross / np.maximum(np.abs(cross), 1e-12)).real
    py, px = np.unravel_index(np.argmax(r), r.shape)

    def sub(c: int, n: int, values) -> float:  # parabola through the peak and its neighbours
        lo, mid, hi = values(c - 1), values(c), values((c + 1) % n)
        d = lo - 2 * mid + hi
        off = 0.5 * (lo - hi) / d if d != 0 else 0.0
        v = c + off
        return v - n if v > n / 2 else v

    dx = sub(px, w, lambda i: r[py, i % w])
    dy = sub(py, h, lambda i: r[i % h, px])
    return Shift(east_m=float(dx * pixel), north_m=float(-dy * pixel), pixel_m=float(pixel), peak=float(r.max()),
                 psr=_psr(r, py, px))


def _bounds(t, width: int, height: int) -> tuple[float, float, float, float]:
    (xa, ya), (xb, yb) = t @ (0, 0), t @ (width, height)
    return min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)


def _psr(r: np.ndarray, py: int, px: int, guard: int = 3) -> float:
    """Peak-to-sidelobe ratio of a correlation surface: (peak - mean) / std outside a guard zone."""
    keep = np.ones(r.shape, bool)
    rows = np.arange(py - guard, py + guard + 1) % r.shape[0]
    cols = np.arange(px - guard, px + guard + 1) % r.shape[1]
    keep[np.ix_(rows, cols)] = False
    side = r[keep]
    return float((r[py, px] - side.mean()) / max(side.std(), 1e-12))
