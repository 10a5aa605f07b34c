"""Masks -> village polygons: valid geometries, measured on the ground whatever the scene CRS.

:func:`polygonise` turns a mask window into polygons in the scene's CRS (pixel edges, 8-connected
villages); :func:`merge` joins the pieces of villages cut by block or window edges (they share
exact pixel edges, so their union is seamless); :func:`clean` simplifies with a tolerance in
metres (topology preserved), drops villages and holes under a minimum area in square metres.
Areas and perimeters come from a local Lambert azimuthal equal-area projection centred on the
data (:func:`local_equal_area`), so they are right in any CRS, including geographic ones.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

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


THREADED_MIN_COORDS = 20_000  # below, a thread costs more than it saves


def threaded(fn, geoms, *args, workers: int | None = None, **kwargs) -> np.ndarray:
    """``fn(geoms, *args, **kwargs)`` for a vectorised shapely function (each geometry on its own),
    computed in contiguous chunks of about equal vertex counts on ``workers`` threads (default:
    one per core): shapely releases the GIL, so the chunks run at once (make_valid of a city's
    candidates ~2x faster on 2 cores) and the result is the same array, element by element."""
    geoms = np.asarray(geoms, dtype=object)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    work = np.cumsum(shapely.get_num_coordinates(geoms))
    n = min(workers, len(geoms), int(work[-1]) // THREADED_MIN_COORDS if len(geoms) else 0)
    if n < 2:
        return fn(geoms, *args, **kwargs)
    cuts = np.searchsorted(work, work[-1] * np.arange(1, n) / n)
    with ThreadPoolExecutor(n, thread_name_prefix="uvsam-shapely") as ex:
        chunks = list(ex.map(lambda g: fn(g, *args, **kwargs), np.split(geoms, cuts)))
    return np.concatenate(chunks)


def nonfinite(geoms) -> np.ndarray:
    """Indices of the geometries with a NaN or infinite coordinate (which no repair can place)."""
    geoms = np.asarray(geoms, dtype=object)
    coords, owner = shapely.get_coordinates(geoms, return_index=True)
    return np.unique(owner[~np.isfinite(coords).all(axis=1)])


def valid_parts(geoms) -> tuple[np.ndarray, np.ndarray]:
    """The polygonal parts of ``geoms``, each made valid on its own, each distinct part of a
    feature once: (parts, index of the feature each belongs to). Bounded work whatever a file
    holds: a MultiPolygon of 20,000 overlapping copies of one ring is one part here, where making
    the whole valid at once unions every copy with every other (gigabytes)."""
    geoms = np.asarray(geoms, dtype=object)
    parts, owner = shapely.get_parts(geoms, return_index=True)
    keep = ~shapely.is_empty(parts)
    pieces, owner = threaded(shapely.make_valid, parts[keep]), owner[keep]  # one part at a time: cheap
    for _ in range(2):  # make_valid's collections (of multipolygons): down to single geometries
        pieces, which = shapely.get_parts(pieces, return_index=True)
        owner = owner[which]
    poly = (shapely.get_type_id(pieces) == 3) & ~shapely.is_empty(pieces)  # polygons; lines and points dropped
    pieces, owner = pieces[poly], owner[poly]
    seen: set[tuple[int, bytes]] = set()
    first = []
    for o, key in zip(owner.tolist(), shapely.to_wkb(shapely.normalize(pieces)), strict=True):
        first.append((o, key) not in seen)
        seen.add((o, key))
    first = np.asarray(first, dtype=bool)
    return pieces[first], owner[first]


def repair(geoms) -> np.ndarray:
    """Each geometry valid and polygonal (None where nothing polygonal is left), its distinct parts
    made valid one by one and united (:func:`valid_parts`): the same shapes as ``make_valid``
    of a sound file, in bounded time and memory for a hostile one."""
    geoms = np.asarray(geoms, dtype=object)
    out = np.array(geoms, dtype=object)
    bad = np.flatnonzero(~shapely.is_valid(geoms) & ~shapely.is_missing(geoms))
    if len(bad):
        parts, owner = valid_parts(geoms[bad])
        for k, i in enumerate(bad):
            mine = parts[owner == k]
            out[i] = shapely.union_all(mine) if len(mine) else None
    return out


def merge(polygons: list) -> list[Polygon]:
    """Union of possibly touching or overlapping pieces, exploded into single polygons."""
    if not polygons:
        return []
    merged = shapely.union_all(shapely.make_valid(np.asarray(polygons, dtype=object)))
    return [p for p in shapely.get_parts(merged) if isinstance(p, Polygon) and not p.is_empty]


def valid_polygons(polygons: list) -> list[Polygon]:
    """``polygons`` with each invalid one made valid (and exploded into its polygons)."""
    fixed = repair(polygons)  # only the invalid ones: repairing is costly on long outlines
    return [p for p in shapely.get_parts(fixed) if isinstance(p, Polygon) and not p.is_empty]


def local_equal_area(polygons: list, crs) -> CRS:
    """A Lambert azimuthal equal-area CRS centred on the polygons' bounding box."""
    crs = CRS.from_user_input(crs)
    x0, y0, x1, y1 = shapely.total_bounds(np.asarray(polygons, dtype=object))
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform((x0 + x1) / 2, (y0 + y1) / 2)
    return CRS.from_proj4(f"+proj=laea +lat_0={lat:.8f} +lon_0={lon:.8f} +datum=WGS84 +units=m +no_defs")


def _projector(src, dst):
    """A function projecting a geometry or an array of geometries from ``src`` to ``dst`` (one
    PROJ transformer for all: building one costs tens of milliseconds, a city has thousands)."""
    t = Transformer.from_crs(src, dst, always_xy=True)

    def project(geoms):
        return shapely.transform(geoms, lambda xy: np.column_stack(t.transform(xy[:, 0], xy[:, 1])))

    return project


def clean(polygons: list, crs, min_area_m2: float, simplify_m: float) -> list[Polygon]:
    """Simplify (metres, topology preserved), drop polygons and holes under ``min_area_m2``.

    Returns polygons in ``crs``. Work is done in a local equal-area CRS.
    """
    return [p for parts in clean_each(merge(polygons), crs, min_area_m2, simplify_m) for p in parts]


def clean_each(geometries: list, crs, min_area_m2: float, simplify_m: float,
               pixels: tuple[Affine, float] | None = None) -> list[list[Polygon]]:
    """:func:`clean` of each geometry on its own (its parts merged), all projected at once.

    ``pixels``: (transform, metres per pixel) of the pixel grid the polygons were traced on.
    Simplification then happens in that grid's pixels, where the vertices are whole numbers:
    the result is the same whichever other polygons are cleaned with them (in metres, a
    vertex exactly one tolerance away could go either way with the projection's centre).
    Returns, per input geometry, the polygons it leaves (none when all are too small).
    """
    owner, parts = [], []
    for i, g in enumerate(geometries):
        for p in merge([g]) if g is not None and not g.is_empty else []:
            owner.append(i)
            parts.append(p)
    out: list[list[Polygon]] = [[] for _ in geometries]
    if not parts:
        return out
    if simplify_m > 0 and pixels is not None:
        transform, metres = pixels
        in_px = _affine(np.asarray(parts, dtype=object), ~transform)
        parts = list(_affine(threaded(shapely.simplify, in_px, simplify_m / metres, preserve_topology=True), transform))
        simplify_m = 0.0
    laea = local_equal_area(parts, crs)
    to_m = _projector(crs, laea)
    metric = to_m(np.asarray(parts, dtype=object))
    if simplify_m > 0:
        metric = threaded(shapely.simplify, metric, simplify_m, preserve_topology=True)
        parts = list(_projector(laea, crs)(metric))
    # measured in metres, built from the geometry in ``crs`` (a projection round trip would
    # move every vertex by a few nanometres)
    for i, g, q in zip(owner, parts, metric, strict=True):
        if q.is_empty or Polygon(q.exterior).area < min_area_m2:
            continue  # the outline bounds the area whatever holes are filled
        holes = [k for k, h in enumerate(q.interiors) if Polygon(h).area >= min_area_m2]
        g = Polygon(g.exterior, [g.interiors[k] for k in holes])
        if g.is_valid:
            if Polygon(q.exterior, [q.interiors[k] for k in holes]).area >= min_area_m2:
                out[i].append(g)
            continue
        for part in shapely.get_parts(shapely.make_valid(g)):
            if isinstance(part, Polygon) and to_m(part).area >= min_area_m2:
                out[i].append(part)
    return out


def _affine(geoms: np.ndarray, t: Affine) -> np.ndarray:
    m = np.array([[t.a, t.b], [t.d, t.e]])
    return shapely.transform(geoms, lambda xy: xy @ m.T + (t.c, t.f))


def measure(polygons: list, crs) -> tuple[np.ndarray, np.ndarray]:
    """(area m^2, perimeter m) of each polygon, in a local equal-area projection; the perimeter
    includes the boundaries of holes (as shapely's and QGIS's do)."""
    if not polygons:
        return np.zeros(0), np.zeros(0)
    metric = _projector(crs, local_equal_area(polygons, crs))(np.asarray(polygons, dtype=object))
    return shapely.area(metric), shapely.length(metric)
