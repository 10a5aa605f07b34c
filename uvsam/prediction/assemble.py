"""Step 4, masks to village polygons: refined or kept outlines cleaned, merged and measured;
the per-village and per-tile records of the layers."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import shapely
from affine import Affine
from pyproj import CRS, Transformer
from rasterio.features import geometry_mask
from rasterio.windows import Window

from uvsam.generalist import REFINED
from uvsam.polygons import clean_each, merge


@dataclass
class SceneResult:
    villages: list  # polygons, scene CRS
    refined: list[bool]
    candidates: list
    mean_prob: np.ndarray
    tiles: list[dict]
    crs: str
    mosaic: Path
    journal: Path
    reasons: list[str] = field(default_factory=list)  # per village: why it was or was not refined
    predicted_iou: list[float | None] = field(default_factory=list)  # the generalist's, where it ran
    refine_on: bool = False


def village_id(scene_name: str, polygon, crs) -> str:
    """A stable id: the scene name and the polygon's representative point to 1e-5 degree."""
    pt = polygon.representative_point()
    lon, lat = Transformer.from_crs(CRS.from_user_input(crs), "EPSG:4326", always_xy=True).transform(pt.x, pt.y)
    digest = hashlib.sha1(f"{scene_name}|{lon:.5f}|{lat:.5f}".encode()).hexdigest()[:12]
    return f"{Path(scene_name).stem}-{digest}"


def mean_probability(mosaic: Path, polygons: list) -> np.ndarray:
    out = np.zeros(len(polygons))
    with rasterio.open(mosaic) as ds:
        for i, p in enumerate(polygons):
            x0, y0, x1, y1 = p.bounds
            (ca, ra), (cb, rb) = ~ds.transform @ (x0, y1), ~ds.transform @ (x1, y0)
            c0, r0 = math.floor(min(ca, cb)), math.floor(min(ra, rb))
            win = Window(c0, r0, math.ceil(max(ca, cb)) - c0, math.ceil(max(ra, rb)) - r0)
            win = win.intersection(Window(0, 0, ds.width, ds.height))
            prob = ds.read(1, window=Window(win.col_off, win.row_off, max(1, win.width), max(1, win.height)))
            inside = geometry_mask([p], prob.shape, ds.transform @ Affine.translation(win.col_off, win.row_off),
                                  invert=True, all_touched=True)
            vals = prob[inside & np.isfinite(prob)]
            out[i] = float(vals.mean()) if vals.size else float("nan")
    return out


def assemble(candidates: list, outlines: list, reasons: list[str], scores: list[float | None], crs: str,
             affine: Affine, gsd_m: float, min_area_m2: float, simplify_m: float
             ) -> tuple[list, list[bool], list[str], list[float | None]]:
    """(villages, refined, reason, predicted IoU) from each candidate's outline: cleaned
    (:func:`uvsam.polygons.clean_each`), and merged where refined villages now touch.

    Refinement never deletes a candidate: an accepted outline that cleaning removes falls back
    to the specialist's, which is cleaned the same way.
    """
    reasons = list(reasons)
    cleaned = clean_each(outlines, crs, min_area_m2, simplify_m, (affine, gsd_m))
    lost = [i for i, (g, kept) in enumerate(zip(outlines, cleaned, strict=True)) if not kept and g is not candidates[i]]
    for i, kept in zip(lost, clean_each([candidates[i] for i in lost], crs, min_area_m2, simplify_m,
                                        (affine, gsd_m)), strict=True):
        cleaned[i], reasons[i] = kept, "refined outline too small"
    villages, refined, why, ious = [], [], [], []
    for i, kept in enumerate(cleaned):
        villages += kept
        refined += [reasons[i] == REFINED] * len(kept)
        why += [reasons[i]] * len(kept)
        ious += [scores[i]] * len(kept)
    merged = merge(villages)
    if len(merged) != len(villages):  # refined villages that now touch: one village
        v_idx, m_idx = shapely.STRtree(villages).query(merged, predicate="intersects")[::-1]
        groups = [v_idx[m_idx == j] for j in range(len(merged))]
        refined = [any(refined[k] for k in g) for g in groups]
        why = ["; ".join(sorted({why[k] for k in g})) for g in groups]
        ious = [min((ious[k] for k in g if ious[k] is not None), default=None) for g in groups]
        villages = merged
    return villages, refined, why, ious
