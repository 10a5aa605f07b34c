"""Reading rasters for the generalist: RGB on the 0..255 scale, with the georeferencing kept.

8-bit imagery is used as it is. Other types get one scene-level per-band 2-98 percentile
stretch computed over valid pixels only (never per tile, never a blind divide by 255).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import RasterioIOError

from tiles.radiometry import compute_stretch
from uvsam.errors import InputError

MAX_PIXELS = 16384 * 16384  # one-shot reads; larger scenes go through the tiling engine


@dataclass
class RGBImage:
    """pixels: (H, W, 3) float32 0..255; valid: (H, W) bool; profile: the source's rasterio profile."""

    pixels: np.ndarray
    valid: np.ndarray
    profile: dict


def read_rgb(path: str | Path, bands: tuple[int, ...] | None = None) -> RGBImage:
    path = Path(path)
    if not path.exists():
        raise InputError("file does not exist", path)
    try:
        with rasterio.open(path) as src:
            if src.width * src.height > MAX_PIXELS:
                raise InputError(
                    f"raster is {src.width} x {src.height} px, too large to read at once; use `uvsam predict`",
                    path,
                )
            if bands is None:
                bands = (1, 2, 3) if src.count >= 3 else (1,) * 3
            for b in bands:
                if not 1 <= b <= src.count:
                    raise InputError(f"band {b} does not exist (the raster has {src.count})", path)
            data = src.read(list(bands), masked=True)
            profile = dict(src.profile)
    except RasterioIOError as e:
        raise InputError(f"not a readable raster ({str(e).splitlines()[0][:160]})", path) from None
    valid = ~np.ma.getmaskarray(data).any(axis=0)
    arr = np.ma.getdata(data).astype(np.float32)
    valid &= np.isfinite(arr).all(axis=0)
    if not valid.any():
        raise InputError("raster has no valid pixels (all nodata)", path)
    if data.dtype != np.uint8:
        arr = compute_stretch(arr, valid, "percentile").apply(arr) * 255
    arr[:, ~valid] = 0
    return RGBImage(np.moveaxis(arr, 0, -1), valid, profile)
