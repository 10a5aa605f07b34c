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
    lon, lat = centre_lonlat
    # rings are drawn in an equidistant projection centred on the point: distances are true there
    aeqd = CRS.from_proj4(f"+proj=aeqd +lat_0={lat} +lon_0={lon} +datum=WGS84 +units=m +no_defs")
    v = villages.to_crs(aeqd)
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
