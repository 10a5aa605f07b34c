"""Masks -> village polygons: valid geometries, measured on the ground whatever the scene CRS.

:func:`polygonise` turns a mask window into polygons in the scene's CRS (pixel edges, 8-connected
villages); :func:`merge` joins the pieces of villages cut by block or window edges (they share
exact pixel edges, so their union is seamless); :func:`clean` simplifies with a tolerance in
metres (topology preserved), drops villages and holes under a minimum area in square metres.
Areas and perimeters come from a local Lambert azimuthal equal-area projection centred on the
data (:func:`local_equal_area`), so they are right in any CRS, including geographic ones.
"""

from __future__ import annotations

import numpy as np
import shapely
from affine import Affine
from pyproj import CRS, Transformer
from rasterio.features import shapes
from shapely.geometry import Polygon, shape


def polygonise(mask: np.ndarray, transform: Affine) -> list[Polygon]:
    """Polygons of the True pixels of a (H, W) mask, in the coordinates of ``transform``."""
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    if not m.any():
        return []
    return [shape(geom) for geom, value in shapes(m, mask=m.astype(bool), transform=transform, connectivity=8)
            if value == 1]


def merge(polygons: list) -> list[Polygon]:
    """Union of possibly touching or overlapping pieces, exploded into single polygons."""
    if not polygons:
        return []
    merged = shapely.union_all(shapely.make_valid(np.asarray(polygons, dtype=object)))
    return [p for p in shapely.get_parts(merged) if isinstance(p, Polygon) and not p.is_empty]


def local_equal_area(polygons: list, crs) -> CRS:
    """A Lambert azimuthal equal-area CRS centred on the polygons' bounding box."""
    crs = CRS.from_user_input(crs)
    x0, y0, x1, y1 = shapely.total_bounds(np.asarray(polygons, dtype=object))
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform((x0 + x1) / 2, (y0 + y1) / 2)
    return CRS.from_proj4(f"+proj=laea +lat_0={lat:.8f} +lon_0={lon:.8f} +datum=WGS84 +units=m +no_defs")


def _projector(src, dst):
    t = Transformer.from_crs(src, dst, always_xy=True)

    def project(geom):
        return shapely.transform(geom, lambda xy: np.column_stack(t.transform(xy[:, 0], xy[:, 1])))

    return project


def clean(polygons: list, crs, min_area_m2: float, simplify_m: float) -> list[Polygon]:
    """Simplify (metres, topology preserved), drop polygons and holes under ``min_area_m2``.

    Returns polygons in ``crs``. Work is done in a local equal-area CRS.
    """
    polygons = merge(polygons)
    if not polygons:
        return []
    laea = local_equal_area(polygons, crs)
    to_m, back = _projector(crs, laea), _projector(laea, crs)
    out = []
    for p in polygons:
        q = to_m(p)
        if simplify_m > 0:
            q = q.simplify(simplify_m, preserve_topology=True)
        holes = [h for h in q.interiors if Polygon(h).area >= min_area_m2]
        q = Polygon(q.exterior, holes)
        if not q.is_valid:
            q = shapely.make_valid(q)
        for part in shapely.get_parts(q):
            if isinstance(part, Polygon) and part.area >= min_area_m2:
                out.append(back(part))
    return out


def measure(polygons: list, crs) -> tuple[np.ndarray, np.ndarray]:
    """(area m^2, perimeter m) of each polygon, in a local equal-area projection; the perimeter
    includes the boundaries of holes (as shapely's and QGIS's do)."""
    if not polygons:
        return np.zeros(0), np.zeros(0)
    to_m = _projector(crs, local_equal_area(polygons, crs))
    metric = [to_m(p) for p in polygons]
    return np.array([g.area for g in metric]), np.array([g.length for g in metric])
