"""Spatial validation: folds that never split overlapping or adjacent scenes, and a leakage check.

Scenes of one place share pixels (XYZ tiles overlap by half; a mosaic's neighbouring chips
touch), and neighbouring ground is alike: a validation scene that overlaps or touches a
training scene is partly a training score. Scenes are therefore grouped by footprint (two
scenes whose footprints intersect or touch, or lie closer than ``buffer_m``, are in one group,
transitively), and folds are made of whole groups, as spatial cross-validation does it
(Roberts et al. 2017, "block" cross-validation with a buffer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from pyproj import CRS, Transformer
from shapely.geometry import box

from tiles.reader import RasterSource
from uvsam.errors import ConfigError, InputError

EQUAL_AREA = "ESRI:54009"  # Mollweide: footprints of any CRS compared in metres


@dataclass(frozen=True)
class Footprint:
    """A scene's outline on the ground (``EQUAL_AREA`` metres) and its area in square metres."""

    path: Path
    outline: object

    @property
    def area(self) -> float:
        return float(self.outline.area)


def footprint(path: str | Path) -> Footprint:
    """The scene's bounds as a polygon in metres (densified, so a reprojected edge stays an edge)."""
    with RasterSource(path) as src:
        if src.crs is None:
            raise InputError("raster has no CRS: its footprint on the ground is unknown", path)
        (xa, ya), (xb, yb) = src.transform @ (0, 0), src.transform @ (src.width, src.height)
        crs = src.crs
    outline = shapely.segmentize(box(min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)),
                                 max(abs(xb - xa), abs(yb - ya)) / 16)
    to_m = Transformer.from_crs(CRS.from_user_input(crs), CRS.from_user_input(EQUAL_AREA), always_xy=True)
    return Footprint(Path(path), shapely.transform(outline, lambda xy: np.column_stack(to_m.transform(*xy.T))))


def group_scenes(paths: list[Path], buffer_m: float = 0.0, prints: list[Footprint] | None = None) -> list[list[int]]:
    """Indices of ``paths`` in spatially separate groups (overlapping, touching or within
    ``buffer_m`` of each other, transitively), largest group first, then by first index.
    ``prints``: their footprints, when the caller has them."""
    prints = prints if prints is not None else [footprint(p) for p in paths]
    parent = list(range(len(paths)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    tolerance = max(buffer_m, 0.0) + 1e-6 * max((np.sqrt(f.area) for f in prints), default=0.0)
    tree = shapely.STRtree([f.outline for f in prints])
    for i, f in enumerate(prints):
        for j in tree.query(f.outline, predicate="dwithin", distance=tolerance):
            a, b = find(i), find(int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(len(paths)):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]))


def make_folds(paths: list[Path], k: int, buffer_m: float = 0.0) -> list[list[int]]:
    """``k`` folds of scene indices, each a union of whole groups, balanced by ground area
    (greedy: the largest group goes to the fold with the least area so far)."""
    prints = [footprint(p) for p in paths]
    groups = group_scenes(paths, buffer_m, prints)
    if k < 2:
        raise ConfigError(f"{k}: cross-validation needs at least 2 folds", field="folds")
    if k > len(groups):
        names = "; ".join(", ".join(paths[i].name for i in g) for g in groups)
        raise ConfigError(f"{k}: the {len(paths)} scenes form only {len(groups)} spatially separate "
                          f"group(s) (overlapping or touching scenes stay together: {names}); use "
                          f"{len(groups)} folds or fewer" if len(groups) >= 2 else
                          f"{k}: all {len(paths)} scenes overlap or touch one another ({names}); "
                          "no fold could be validated without leakage", field="folds")
    areas = [f.area for f in prints]
    weight = sorted(((sum(areas[i] for i in g), g) for g in groups), key=lambda t: -t[0])
    folds: list[list[int]] = [[] for _ in range(k)]
    load = [0.0] * k
    for w, g in weight:
        f = int(np.argmin(load))
        folds[f] += g
        load[f] += w
    return [sorted(f) for f in folds]


def check_leakage(train: list[Path], val: list[Path], buffer_m: float = 0.0) -> None:
    """Refuse validation scenes that overlap, touch or lie within ``buffer_m`` of a training scene."""
    train_prints = [footprint(p) for p in train]
    tree = shapely.STRtree([f.outline for f in train_prints])
    for v in val:
        fv = footprint(v)
        hits = tree.query(fv.outline, predicate="dwithin", distance=max(buffer_m, 0.0) + 1e-6 * np.sqrt(fv.area))
        if len(hits):
            t = train_prints[int(hits[0])]
            shared = fv.outline.intersection(t.outline).area / max(fv.area, 1e-9)
            how = f"shares {100 * shared:.0f} % of its ground with" if shared > 1e-6 else "touches"
            raise InputError(f"validation scene {how} training scene {t.path.name}: its score would be partly a "
                             "training score; validate on ground away from the training scenes (or use --folds, "
                             "which groups overlapping scenes)", v)
