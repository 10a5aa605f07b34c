"""Consistency between years: is a massive change in the villages a change on the ground?

A model that reacts to the season or the sensor rather than to the houses reports every village
"demolished" in a year photographed in summer. Two numbers tell the cases apart, measured on
the two years' imagery over their common footprint (one grid in the analysis CRS):

- **structure**: where the villages disagree, how alike the two images' local patterns are:
  the median local normalised cross-correlation of the grey levels (rank-normalised, so colour
  and contrast do not count; smoothed over 1 m and correlated in 4 m Gaussian windows, so
  sub-metre misregistration and relief do not count). Houses that stand in both years keep
  their pattern: high structure. Demolition and construction change it.
- **colour**: how far the per-band distributions moved (the mean distance between their
  quantiles, 0..255 levels). Season, sensor and processing move the colours.

:func:`assess` flags a pair of years when the villages disagree massively (their areas
overlap by less than ``MAX_VILLAGE_IOU``) while the structure of the imagery is unchanged and
its colours moved: the change is then radiometric, and the report says so instead of
reporting mass demolition.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from affine import Affine
from rasterio.features import rasterize
from scipy import ndimage

from tiles.reader import read_on_grid
from tiles.remote import location
from uvsam.coregister import common_grid

MAX_VILLAGE_IOU = 0.5  # village areas of two years overlapping less than this: a massive disagreement
MIN_STRUCTURE = 0.3  # local correlation at or above which the houses are the same. Calibrated on
# the 11 real LEVIR-CD pairs (tests/test_levir.py): on the pixels whose buildings changed the median
# is at most 0.24 in every pair; on 64 x 64 px blocks without building change (another date,
# season and sensor) the quartiles are 0.11 / 0.34 / 0.69. (Pixel-wise gradient correlation, used
# before, was 0.01-0.37 on unchanged ground and could not tell the cases apart.)
SMOOTH_M = 1.0  # grey levels smoothed over this (Gaussian sigma, metres)
WINDOW_M = 4.0  # local correlation window (Gaussian sigma, metres)
MIN_COLOUR = 5.0  # mean quantile distance (0..255) at or above which the colours moved (winter vs
# summer Beijing tiles: 10.5)


@dataclass(frozen=True)
class Consistency:
    """One pair of consecutive years."""

    before: str
    after: str
    village_iou: float  # of the two years' village areas
    structure: float | None  # None: no imagery for one of the years, or too little common ground
    colour: float | None
    radiometric: bool  # the flag: massive disagreement, same structure, moved colours

    @property
    def note(self) -> str | None:
        if self.radiometric:
            return (f"{self.before} -> {self.after}: the villages disagree massively (area IoU "
                    f"{self.village_iou:.2f}) but where they disagree the imagery's structure is unchanged "
                    f"(local correlation {self.structure:.2f}) while its colours moved by {self.colour:.0f} levels: "
                    "the change is most likely the model reacting to season or sensor, not demolition or "
                    "construction; check the imagery before using these changes")
        if self.structure is None and self.village_iou < MAX_VILLAGE_IOU:
            return (f"{self.before} -> {self.after}: the villages disagree massively (area IoU "
                    f"{self.village_iou:.2f}); give both years' imagery (--image) to check whether the "
                    "imagery changed or only its colours")
        return None

    def to_dict(self) -> dict:
        return {**asdict(self), "note": self.note}


def imagery_change(before: str | Path, after: str | Path, crs, region=None,
                   max_px: int = 1024) -> tuple[float, float] | None:
    """(structure, colour) of two images over their common footprint, or None if they share
    too little of it. ``region`` (a shapely geometry in ``crs``, e.g. where the villages
    disagree) restricts the structure to it when it covers at least 256 pixels of the grid."""
    grid = common_grid(before, after, crs, max_px)
    if grid is None:
        return None
    a, va = read_on_grid(location(before), *grid)
    b, vb = read_on_grid(location(after), *grid)
    valid = va & vb
    if valid.mean() < 0.25 or a.shape[0] != b.shape[0]:
        return None
    _, (x0, y0, x1, y1), w, h = grid
    where = valid
    if region is not None and not region.is_empty:
        inside = rasterize([region], out_shape=(h, w), transform=Affine((x1 - x0) / w, 0, x0, 0, -(y1 - y0) / h, y1),
                           fill=0, default_value=1, dtype="uint8").astype(bool)
        if (inside & valid).sum() >= 256:
            where = inside & valid
    return structure_similarity(a, b, valid, (x1 - x0) / w, where), colour_distance(a, b, valid)


def _ranked_grey(img: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Grey levels replaced by their rank among the valid pixels (0..1): contrast and brightness gone."""
    grey = img.mean(axis=0)
    out = np.zeros(grey.shape)
    order = np.argsort(grey[valid], kind="stable")
    ranks = np.empty(order.size)
    ranks[order] = np.arange(order.size) / max(1, order.size - 1)
    out[valid] = ranks
    return out


def local_correlation(a: np.ndarray, b: np.ndarray, valid: np.ndarray, pixel_m: float) -> np.ndarray:
    """(H, W) local normalised cross-correlation (-1..1) of two (bands, H, W) images on a grid
    of ``pixel_m`` metres: rank-normalised grey levels smoothed over :data:`SMOOTH_M`,
    correlated in Gaussian windows of :data:`WINDOW_M`."""
    smooth, window = max(0.5, SMOOTH_M / pixel_m), max(1.5, WINDOW_M / pixel_m)
    ga, gb = (ndimage.gaussian_filter(_ranked_grey(x, valid), smooth) for x in (a, b))

    def mean(x):
        return ndimage.gaussian_filter(x, window)

    ma, mb = mean(ga), mean(gb)
    va, vb = mean(ga * ga) - ma * ma, mean(gb * gb) - mb * mb
    return (mean(ga * gb) - ma * mb) / np.sqrt(np.maximum(va * vb, 1e-12))


def structure_similarity(a: np.ndarray, b: np.ndarray, valid: np.ndarray, pixel_m: float,
                         where: np.ndarray | None = None) -> float:
    """Median :func:`local_correlation` of two (bands, H, W) images over ``where`` (default:
    ``valid``) away from the edges of the valid data; NaN with fewer than 64 such pixels."""
    inner = ndimage.binary_erosion(valid, iterations=max(2, int(np.ceil(2 * WINDOW_M / pixel_m))))
    inner &= valid if where is None else where
    if inner.sum() < 64:
        return float("nan")
    return float(np.median(local_correlation(a, b, valid, pixel_m)[inner]))


def colour_distance(a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> float:
    """Mean distance between the per-band quantiles (1..99 %) of two images' valid pixels, on
    the 0..255 scale of 8-bit imagery (other bit depths are scaled by the first image's range)."""
    levels = np.linspace(0.01, 0.99, 99)
    qa = np.quantile(a[:, valid], levels, axis=1)
    qb = np.quantile(b[:, valid], levels, axis=1)
    span = max(float(qa.max() - qa.min()), 1e-9) if a.dtype.kind == "f" and qa.max() > 255 else 255.0
    return float(np.abs(qa - qb).mean() * 255.0 / span)


def assess(years: list[str], village_iou: list[float], imagery: dict[str, Path], crs,
           regions: list | None = None) -> list[Consistency]:
    """One :class:`Consistency` per pair of consecutive years; ``village_iou[i]`` is that of
    years i and i + 1, ``regions[i]`` (optional) where their villages disagree."""
    out = []
    regions = regions or [None] * len(village_iou)
    for (y0, y1), iou, region in zip(zip(years, years[1:], strict=False), village_iou, regions, strict=True):
        measured = (imagery_change(imagery[y0], imagery[y1], crs, region)
                    if y0 in imagery and y1 in imagery else None)
        structure, colour = measured if measured is not None else (None, None)
        flag = (measured is not None and iou < MAX_VILLAGE_IOU and np.isfinite(structure)
                and structure >= MIN_STRUCTURE and colour >= MIN_COLOUR)
        if structure is not None and not np.isfinite(structure):
            structure = colour = None  # too little common ground left after the edges: not measured
        out.append(Consistency(y0, y1, round(float(iou), 4), None if structure is None else round(structure, 3),
                               None if colour is None else round(colour, 2), bool(flag)))
    return out
