"""Rasters as the models read them, through the one reader (:class:`tiles.reader.RasterSource`).

Every command reads imagery through :class:`~tiles.reader.RasterSource`: bands chosen by colour
interpretation (a GeoTIFF stored blue-green-red reaches every model as red-green-blue), the
integrity checks of truncated files, and one validity mask from nodata values, internal masks
and alpha bands. This module adds what is common to the models on top of it: a scene's bands
as RGB (:func:`to_rgb`) and the one-shot read of a whole image for the generalist of
``uvsam segment`` (:func:`read_rgb`): 8-bit imagery as it is, other types with one scene-level
per-band 2-98 percentile stretch over valid pixels (never per tile, never a blind divide by 255).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rasterio.windows import Window

from tiles.radiometry import compute_stretch
from tiles.reader import RasterSource, ReadOptions
from tiles.remote import location
from uvsam.errors import ConfigError, InputError

MAX_PIXELS = 16384 * 16384  # one-shot reads; larger scenes go through the tiling engine


def to_rgb(img: np.ndarray, path: str | Path) -> np.ndarray:
    """(bands, H, W) -> (3, H, W): one band repeated, the first three of more; two are ambiguous."""
    if img.shape[0] == 1:
        return np.repeat(img, 3, axis=0)
    if img.shape[0] == 2:
        raise ConfigError("a 2-band raster is ambiguous: name the three bands to read as red, green, blue", path,
                          field="bands")
    return img[:3]


@dataclass
class RGBImage:
    """pixels: (H, W, 3) float32 0..255; valid: (H, W) bool; profile: crs and transform of the grid."""

    pixels: np.ndarray
    valid: np.ndarray
    profile: dict


def read_rgb(path: str | Path, bands: tuple[int, ...] | None = None) -> RGBImage:
    """The whole image as RGB on the 0..255 scale (invalid pixels 0) with its georeferencing."""
    path = location(path)
    with RasterSource(path, ReadOptions(bands)) as src:  # tiles' errors name the file themselves
        if src.width * src.height > MAX_PIXELS:
            raise InputError(f"raster is {src.width} x {src.height} px, too large to read at once; use `uvsam predict`",
                             path)
        data, valid = src.read(Window(0, 0, src.width, src.height))
        profile = {"crs": src.crs, "transform": src.transform, "width": src.width, "height": src.height}
    if not valid.any():
        raise InputError("raster has no valid pixels (all nodata)", path)
    arr = to_rgb(compute_stretch(data, valid, "auto").apply(data, valid) * 255.0, path)
    return RGBImage(np.moveaxis(arr, 0, -1), valid, profile)
