"""Consistency between years: is a massive change in the villages a change on the ground?

A model that reacts to the season or the sensor rather than to the houses reports every village
"demolished" in a year photographed in summer. Two numbers tell the cases apart, measured on
the two years' imagery over their common footprint (one grid in the analysis CRS):

- **structure**: the correlation of the two images' gradient magnitudes (rank-normalised grey
  levels, so colour and contrast do not count). Houses that stand in both years keep their
  edges: high structure. Demolition and construction change the edges.
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
from scipy import ndimage

from tiles.reader import read_on_grid
from tiles.remote import location
from uvsam.coregister import common_grid

MAX_VILLAGE_IOU = 0.5  # village areas of two years overlapping less than this: a massive disagreement
MIN_STRUCTURE = 0.5  # gradient correlation at or above which the houses are the same
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
                    f"{self.village_iou:.2f}) but the imagery's structure is unchanged (gradient correlation "
                    f"{self.structure:.2f}) while its colours moved by {self.colour:.0f} levels: the "
                    "change is most likely the model reacting to season or sensor, not demolition or "
                    "construction; check the imagery before using these changes")
        if self.structure is None and self.village_iou < MAX_VILLAGE_IOU:
            return (f"{self.before} -> {self.after}: the villages disagree massively (area IoU "
                    f"{self.village_iou:.2f}); give both years' imagery (--image) to check whether the "
                    "imagery changed or only its colours")
        return None

    def to_dict(self) -> dict:
        return {**asdict(self), "note": self.note}


def imagery_change(before: str | Path, after: str | Path, crs, max_px: int = 1024) -> tuple[float, float] | None:
    """(structure, colour) of two images over their common footprint, or None if they share
    too little of it."""
    grid = common_grid(before, after, crs, max_px)
    if grid is None:
        return None
    a, va = read_on_grid(location(before), *grid)
    b, vb = read_on_grid(location(after), *grid)
    valid = va & vb
    if valid.mean() < 0.25 or a.shape[0] != b.shape[0]:
        return None
    return structure_similarity(a, b, valid), colour_distance(a, b, valid)


def _ranked_grey(img: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Grey levels replaced by their rank among the valid pixels (0..1): contrast and brightness gone."""
    grey = img.mean(axis=0)
    out = np.zeros(grey.shape)
    order = np.argsort(grey[valid], kind="stable")
    ranks = np.empty(order.size)
    ranks[order] = np.arange(order.size) / max(1, order.size - 1)
    out[valid] = ranks
    return out


def structure_similarity(a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> float:
    """Correlation of the gradient magnitudes of two (bands, H, W) images on their valid pixels."""
    inner = ndimage.binary_erosion(valid, iterations=2)
    if inner.sum() < 64:
        return float("nan")
    grads = []
    for img in (a, b):
        g = _ranked_grey(img, valid)
        grads.append(np.hypot(ndimage.sobel(g, 0), ndimage.sobel(g, 1))[inner])
    return float(np.corrcoef(grads[0], grads[1])[0, 1])


def colour_distance(a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> float:
    """Mean distance between the per-band quantiles (1..99 %) of two images' valid pixels, on
    the 0..255 scale of 8-bit imagery (other bit depths are scaled by the first image's range)."""
    levels = np.linspace(0.01, 0.99, 99)
    qa = np.quantile(a[:, valid], levels, axis=1)
    qb = np.quantile(b[:, valid], levels, axis=1)
    span = max(float(qa.max() - qa.min()), 1e-9) if a.dtype.kind == "f" and qa.max() > 255 else 255.0
    return float(np.abs(qa - qb).mean() * 255.0 / span)


def assess(years: list[str], village_iou: list[float], imagery: dict[str, Path], crs) -> list[Consistency]:
    """One :class:`Consistency` per pair of consecutive years; ``village_iou[i]`` is that of
    years i and i + 1."""
    out = []
    for (y0, y1), iou in zip(zip(years, years[1:], strict=False), village_iou, strict=True):
        measured = imagery_change(imagery[y0], imagery[y1], crs) if y0 in imagery and y1 in imagery else None
        structure, colour = measured if measured is not None else (None, None)
        flag = (measured is not None and iou < MAX_VILLAGE_IOU and np.isfinite(structure)
                and structure >= MIN_STRUCTURE and colour >= MIN_COLOUR)
        if structure is not None and not np.isfinite(structure):
            structure = colour = None  # too little common ground left after the edges: not measured
        out.append(Consistency(y0, y1, round(float(iou), 4), None if structure is None else round(structure, 3),
                               None if colour is None else round(colour, 2), bool(flag)))
    return out
