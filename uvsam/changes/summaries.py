"""Summaries of tracked villages: per district, per distance ring, and how much two years agree."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from pyproj import CRS

from uvsam.errors import InputError


def by_district(villages: gpd.GeoDataFrame, districts: gpd.GeoDataFrame, name_field: str | None = None) -> pd.DataFrame:
    """Village count and km2 per district and year (areas split exactly at district borders)."""
    d = districts.to_crs(villages.crs)
    if name_field is not None and name_field not in d.columns:
        raise InputError(f"districts have no field {name_field!r} (fields: {', '.join(map(str, d.columns))})")
    field = name_field or next((c for c in d.columns if c != "geometry" and pd.api.types.is_string_dtype(d[c])),
                               None)
    names = d[field].astype(str).tolist() if field else [f"district {i + 1}" for i in range(len(d))]
    rows = []
    for year, group in villages.groupby("year", sort=False):
        geoms = np.asarray(group.geometry.values, dtype=object)
        for name, shape in zip(names, d.geometry.values, strict=True):
            inter = shapely.intersection(geoms, shape)
            area = shapely.area(inter)
            rows.append({"year": year, "district": name, "villages": int((area > 0).sum()),
                         "area_km2": round(float(area.sum()) / 1e6, 6)})
    return pd.DataFrame(rows)


def by_ring(villages: gpd.GeoDataFrame, centre_lonlat: tuple[float, float], ring_km: float) -> pd.DataFrame:
    """Village km2 per year and distance ring around a centre (areas split exactly at ring edges)."""
    if ring_km <= 0:
        raise InputError(f"ring width must be positive, got {ring_km} km")
    v = villages.to_crs(equidistant_crs(centre_lonlat))  # rings drawn where distances from the centre are true
    reach = float(np.hypot(*np.abs(v.total_bounds.reshape(2, 2)).max(axis=0))) if len(v) else 0.0
    n = max(1, int(np.ceil(reach / (ring_km * 1000))))
    discs = [shapely.Point(0, 0).buffer(k * ring_km * 1000, 256) for k in range(n + 1)]  # drawn once
    rows = []
    for year, group in v.groupby("year", sort=False):
        geoms = np.asarray(group.geometry.values, dtype=object)
        for k in range(n):
            ring = discs[k + 1].difference(discs[k]) if k else discs[1]
            area = shapely.area(shapely.intersection(geoms, ring))
            rows.append({"year": year, "ring_from_km": k * ring_km, "ring_to_km": (k + 1) * ring_km,
                         "villages": int((area > 0).sum()), "area_km2": round(float(area.sum()) / 1e6, 6)})
    return pd.DataFrame(rows)


def village_area_iou(villages: gpd.GeoDataFrame, before: str, after: str) -> float:
    """IoU of the areas two years' villages cover (1.0 when neither has any)."""
    a, b = _covers(villages, before, after)
    union = shapely.area(shapely.union(a, b))
    return 1.0 if union == 0 else float(shapely.area(shapely.intersection(a, b)) / union)


def disagreement(villages: gpd.GeoDataFrame, before: str, after: str):
    """Where exactly one of two years has a village (shapely geometry in the villages' CRS)."""
    return shapely.symmetric_difference(*_covers(villages, before, after))


def _covers(villages: gpd.GeoDataFrame, *years: str) -> list:
    return [shapely.union_all(np.asarray(villages.geometry[villages["year"] == y].values, dtype=object))
            for y in years]


def equidistant_crs(centre_lonlat: tuple[float, float]) -> CRS:
    """The azimuthal equidistant projection centred on a point: distances from it are true."""
    lon, lat = centre_lonlat
    return CRS.from_proj4(f"+proj=aeqd +lat_0={lat} +lon_0={lon} +datum=WGS84 +units=m +no_defs")


def by_distance(villages: gpd.GeoDataFrame, centre_lonlat: tuple[float, float], step_km: float) -> pd.DataFrame:
    """Cumulative village count and km2 per year within each distance of a centre, every
    ``step_km`` out to the farthest village (the UV-SAM paper's curves).

    A village is counted once its centroid lies within the distance; its area is counted as far
    as it lies within it (split exactly at the circle), so the last row of a year is its total.
    ``villages_pct`` and ``area_pct`` are shares of that year's total.
    """
    if step_km <= 0:
        raise InputError(f"distance step must be positive, got {step_km} km")
    v = villages.to_crs(equidistant_crs(centre_lonlat))
    geoms = np.asarray(v.geometry.values, dtype=object)
    origin = shapely.Point(0, 0)
    near = shapely.distance(origin, geoms) if len(geoms) else np.zeros(0)
    far = np.array([float(np.hypot(*np.asarray(g.exterior.coords).T).max()) if g.geom_type == "Polygon"
                    else max(float(np.hypot(*np.asarray(p.exterior.coords).T).max()) for p in g.geoms)
                    for g in geoms]) if len(geoms) else np.zeros(0)
    centroid = shapely.distance(origin, shapely.centroid(geoms)) if len(geoms) else np.zeros(0)
    area = shapely.area(geoms) if len(geoms) else np.zeros(0)
    step = step_km * 1000
    n = max(1, int(np.ceil((far.max() if len(far) else 0.0) / step - 1e-9)))
    years = v["year"].to_numpy()
    rows = []
    for year in pd.unique(years):
        mine = years == year
        total_n, total_a = int(mine.sum()), float(area[mine].sum())
        for k in range(1, n + 1):
            d = k * step
            inside = mine & (far <= d)
            cut = mine & (near < d) & (far > d)  # only villages the circle crosses are intersected
            within = float(area[inside].sum())
            if cut.any():
                within += float(shapely.area(shapely.intersection(geoms[cut], origin.buffer(d, 256))).sum())
            count = int((mine & (centroid <= d)).sum())
            rows.append({"year": year, "distance_km": round(k * step_km, 6), "villages": count,
                         "area_km2": round(within / 1e6, 6),
                         "villages_pct": round(100 * count / total_n, 3) if total_n else 0.0,
                         "area_pct": round(100 * within / total_a, 3) if total_a else 0.0})
    return pd.DataFrame(rows)


def belts_from(layer: gpd.GeoDataFrame, name_field: str | None = None, source: str | None = None) -> gpd.GeoDataFrame:
    """Polygon belts (``name``, outer ``ring``, ``geometry``) from a layer of ring roads or any areas.

    Features sharing a name (``name_field``, default the first text field) are one ring: its
    polygons as they are, its lines (a ring road's segments) closed into the area they enclose.
    Rings that nest (each inside the next larger one, up to 1 % of its area) become belts between
    consecutive rings, named ``within A``, ``A - B``, ...; other areas (zones, districts, belts
    drawn as rings already) are belts as they are. A ring whose lines enclose nothing is refused
    (``InputError``) naming it and the ``source`` file.
    """
    if name_field is not None and name_field not in layer.columns:
        raise InputError(f"belts have no field {name_field!r} (fields: {', '.join(map(str, layer.columns))})",
                         source)
    field = name_field or next((c for c in layer.columns if c != "geometry"
                                and pd.api.types.is_string_dtype(layer[c])), None)
    layer = layer[layer.geometry.notna() & ~layer.geometry.is_empty]
    keys = layer[field].astype(str) if field else pd.Series([f"ring {i + 1}" for i in range(len(layer))],
                                                          index=layer.index)
    rings = []
    for name, group in layer.groupby(keys, sort=False):
        geoms = np.asarray(shapely.make_valid(group.geometry.values), dtype=object)
        parts = shapely.get_parts(geoms)
        polys = [p for p in parts if p.geom_type == "Polygon"]
        lines = [p for p in parts if p.geom_type in ("LineString", "LinearRing")]
        if lines:  # noded first: segments that cross or meet close a ring
            faces = shapely.union_all(shapely.polygonize(shapely.get_parts(shapely.union_all(lines))))
            if faces.is_empty:
                raise InputError(f"belt {name!r}: its lines enclose no area (a ring road must close on itself)",
                                 source)
            # faces between a ring road's two carriageways leave gaps: the ring is all it encloses
            polys += [shapely.Polygon(p.exterior) for p in shapely.get_parts(faces)]
        area = shapely.union_all(polys) if polys else shapely.Polygon()
        if area.is_empty or area.area == 0:
            raise InputError(f"belt {name!r}: no polygon or closed line to make a belt of", source)
        rings.append((str(name), area))
    rings.sort(key=lambda r: r[1].area)
    nested = all(shapely.area(shapely.difference(a, b)) <= 0.01 * a.area
                 for (_, a), (_, b) in zip(rings, rings[1:], strict=False))
    if nested and len(rings) > 1:
        belts = [(f"within {rings[0][0]}", rings[0][0], rings[0][1])]
        belts += [(f"{a} - {b}", b, shapely.difference(gb, ga))
                  for (a, ga), (b, gb) in zip(rings, rings[1:], strict=False)]
    else:
        belts = [(n, None, g) for n, g in rings]
    return gpd.GeoDataFrame({"name": [b[0] for b in belts], "ring": [b[1] for b in belts]},
                            geometry=[b[2] for b in belts], crs=layer.crs)


def by_belt(villages: gpd.GeoDataFrame, belts: gpd.GeoDataFrame) -> pd.DataFrame:
    """Village count and km2 per year and belt (:func:`belts_from`), and beyond the outermost.

    Areas are split exactly at belt edges; a village is counted in the one belt holding its
    representative point (so a year's counts and areas both add up to its totals where belts do not
    overlap; where given areas overlap, their common area counts in each). Areas are measured in
    the villages' CRS (the change analysis's equal-area one).
    """
    b = belts.to_crs(villages.crs)
    outer = b["ring"].iloc[-1] if len(b) and "ring" in b and b["ring"].notna().all() else None
    names = [*b["name"], f"beyond {outer}" if outer else "outside the belts"]
    shapes = list(b.geometry.values)
    outside = shapely.difference(shapely.box(*villages.total_bounds).buffer(1.0), shapely.union_all(shapes)) \
        if len(villages) else shapely.Polygon()
    shapes.append(outside)
    rows = []
    for year, group in villages.groupby("year", sort=False):
        geoms = np.asarray(group.geometry.values, dtype=object)
        points = shapely.point_on_surface(geoms)
        assigned = np.zeros(len(geoms), bool)
        for name, shape in zip(names, shapes, strict=True):
            area = shapely.area(shapely.intersection(geoms, shape))
            hit = shapely.covers(shape, points) & ~assigned
            assigned |= hit
            rows.append({"year": year, "belt": name, "villages": int(hit.sum()),
                         "area_km2": round(float(area.sum()) / 1e6, 6)})
    return pd.DataFrame(rows)
