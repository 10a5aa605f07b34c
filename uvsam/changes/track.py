"""Multi-year change: village layers of several years -> lifecycles, persistent ids, summaries.

Every year's layer is brought to one analysis CRS: by default a Lambert azimuthal equal-area
projection centred on all the layers together, so areas are square metres on the ground
whatever CRS each year came in (a projected ``crs`` may be given instead). Consecutive years
are linked where a village of one year covers at least ``min_overlap`` of the smaller of two
overlapping villages; the links form a graph whose connected components are the events:

=========  ==========================================================
new        no village the year before
demolished no village the year after
stable     one to one, area within +-``stable_pct`` %
expanded   one to one, area grew by more than ``stable_pct`` %
shrunk     one to one, area fell by more than ``stable_pct`` %
split      one village became several (or several became more)
merged     several villages became one (or fewer)
=========  ==========================================================

Each village keeps a persistent id through the years: one-to-one successors and merged
villages inherit the id of the predecessor they overlap most; the other pieces of a split get
that id with a suffix (``V0007.2``); new villages get fresh ids. Ids are deterministic: the
first year's villages are numbered from north-west to south-east.
"""

from __future__ import annotations

from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from pyproj import CRS

from uvsam.changes.sources import YearLayer
from uvsam.config import ChangeConfig
from uvsam.errors import InputError

LIFECYCLES = ("new", "demolished", "stable", "expanded", "shrunk", "split", "merged")
# one colour per lifecycle, the same in the report's maps and the GeoPackage's QGIS style
LIFECYCLE_COLOURS = {"new": "#1a9850", "demolished": "#d73027", "expanded": "#fc8d59", "shrunk": "#74add1",
                     "stable": "#9e9e9e", "split": "#984ea3", "merged": "#4575b4"}


def analysis_crs(layers: list[YearLayer], crs: str | None = None) -> CRS:
    """The given projected CRS, or a Lambert azimuthal equal-area CRS centred on all layers.

    With no village in any year the layers' own CRS is used when they share a projected one.
    """
    if crs is not None:
        return CRS.from_user_input(crs)
    boxes = []
    for ly in layers:
        if len(ly.villages):
            boxes.append(ly.villages.to_crs(4326).total_bounds)
    if not boxes:
        # nothing to place a local CRS on: the layers' own CRS serves if they share a projected one
        own = {ly.villages.crs.to_wkt() for ly in layers}
        if len(own) == 1 and layers[0].villages.crs.is_projected:
            return CRS.from_user_input(layers[0].villages.crs)
        raise InputError("no villages in any year, and the layers share no projected CRS to report in: "
                         "pass --analysis-crs")
    b = np.array(boxes)
    lon, lat = (b[:, 0].min() + b[:, 2].max()) / 2, (b[:, 1].min() + b[:, 3].max()) / 2
    return CRS.from_proj4(f"+proj=laea +lat_0={lat:.6f} +lon_0={lon:.6f} +datum=WGS84 +units=m +no_defs")


# -- linking --------------------------------------------------------------------------------
def links(before: np.ndarray, after: np.ndarray, min_overlap: float) -> list[tuple[int, int, float]]:
    """(i, j, shared area) for villages i of one year and j of the next that overlap enough."""
    if len(before) == 0 or len(after) == 0:
        return []
    tree = shapely.STRtree(after)
    left, right = tree.query(before, predicate="intersects")
    out = []
    for i, j in zip(left, right, strict=True):
        shared = shapely.area(shapely.intersection(before[i], after[j]))
        if shared >= min_overlap * min(shapely.area(before[i]), shapely.area(after[j])) and shared > 0:
            out.append((int(i), int(j), float(shared)))
    return out


def components(n_before: int, n_after: int, edges: list[tuple[int, int, float]]) -> list[tuple[list, list]]:
    """Connected components of the link graph: (villages before, villages after), sorted."""
    parent = list(range(n_before + n_after))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j, _ in edges:
        a, b = find(i), find(n_before + j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[int, tuple[list, list]] = {}
    for node in range(n_before + n_after):
        before, after = groups.setdefault(find(node), ([], []))
        (before if node < n_before else after).append(node if node < n_before else node - n_before)
    return sorted(groups.values(), key=lambda g: (g[0][:1] or [n_before + 1], g[1][:1]))


def change_pct(before: float, after: float) -> float:
    """Area change in percent of the area before; a village that appeared (nothing before) is
    +100 (all of its area is new), never undefined."""
    return round(100.0 * (after - before) / before, 2) if before > 0 else 100.0


def lifecycle(n_before: int, n_after: int, area_before: float, area_after: float, stable_pct: float) -> str:
    if n_before == 0:
        return "new"
    if n_after == 0:
        return "demolished"
    if n_before == 1 and n_after == 1:
        pct = 100.0 * (area_after - area_before) / area_before
        return "stable" if abs(pct) <= stable_pct else ("expanded" if pct > 0 else "shrunk")
    return "split" if n_after > n_before else "merged"


# -- tracking -------------------------------------------------------------------------------
@dataclass
class ChangeResult:
    crs: CRS
    villages: gpd.GeoDataFrame  # every year's villages with year, village_uid, area_m2 (analysis CRS)
    changes: gpd.GeoDataFrame  # one row per event between consecutive years
    years: pd.DataFrame  # count and km2 per year


def _reading_order(polys: np.ndarray) -> np.ndarray:
    """Indices from north-west to south-east (rows of 100 m, then west to east)."""
    pts = shapely.point_on_surface(polys)
    x, y = shapely.get_x(pts), shapely.get_y(pts)
    return np.lexsort((x, -np.floor(y / 100.0)))


def track(layers: list[YearLayer], cfg: ChangeConfig = ChangeConfig()) -> ChangeResult:
    """Link the years in the given order; lifecycles, persistent ids and areas in the analysis CRS."""
    if len(layers) < 2:
        raise InputError("change analysis needs at least two years")
    labels = [ly.year for ly in layers]
    if len(set(labels)) != len(labels):
        raise InputError(f"year labels repeat: {', '.join(labels)}")
    crs = analysis_crs(layers, cfg.crs)
    polys = [np.asarray(ly.villages.to_crs(crs).geometry.values, dtype=object) for ly in layers]
    areas = [shapely.area(p) for p in polys]
    counter = 0
    uids: list[list[str]] = []
    first = [""] * len(polys[0])
    for k in _reading_order(polys[0]) if len(polys[0]) else []:
        counter += 1
        first[k] = f"V{counter:04d}"
    uids.append(first)
    rows = []
    for t in range(1, len(layers)):
        before, after = polys[t - 1], polys[t]
        edges = links(before, after, cfg.min_overlap)
        shared = {(i, j): s for i, j, s in edges}
        ids = [""] * len(after)
        # fresh ids for new villages are handed out in reading order, after the inherited ones
        comps = components(len(before), len(after), edges)
        for b_idx, a_idx in comps:
            # each later village inherits from the earlier one it shares most with; the
            # largest heir keeps the plain id, the others get suffixes
            heirs: dict[str, list[int]] = {}
            for j in a_idx:
                if b_idx:
                    i = max(b_idx, key=lambda i, j=j: (shared.get((i, j), 0.0), -i))
                    heirs.setdefault(uids[t - 1][i], []).append(j)
            for uid, js in heirs.items():
                js.sort(key=lambda j: -areas[t][j])
                for n, j in enumerate(js):
                    ids[j] = uid if n == 0 else f"{uid}.{n + 1}"
        for j in _reading_order(after) if len(after) else []:
            if not ids[j]:
                counter += 1
                ids[j] = f"V{counter:04d}"
        uids.append(ids)
        for b_idx, a_idx in comps:
            if max([areas[t - 1][i] for i in b_idx] + [areas[t][j] for j in a_idx]) < cfg.min_area_m2:
                continue  # under the minimum mapping unit: villages at the detection limit flicker
            a0, a1 = float(sum(areas[t - 1][i] for i in b_idx)), float(sum(areas[t][j] for j in a_idx))
            event = lifecycle(len(b_idx), len(a_idx), a0, a1, cfg.stable_pct)
            geom = shapely.union_all([before[i] for i in b_idx] + [after[j] for j in a_idx])
            rows.append({"year_from": labels[t - 1], "year_to": labels[t], "lifecycle": event,
                         "uids_from": ",".join(sorted(uids[t - 1][i] for i in b_idx)),
                         "uids_to": ",".join(sorted(ids[j] for j in a_idx)),
                         "n_from": len(b_idx), "n_to": len(a_idx), "area_from_m2": round(a0, 1),
                         "area_to_m2": round(a1, 1), "change_m2": round(a1 - a0, 1),
                         "change_pct": change_pct(a0, a1), "geometry": geom})
    villages = gpd.GeoDataFrame(
        {"year": [lab for lab, p in zip(labels, polys, strict=True) for _ in p],
         "village_uid": [u for ids in uids for u in ids],
         "area_m2": np.round(np.concatenate(areas), 1) if any(len(a) for a in areas) else [],
         "source": [ly.source for ly, p in zip(layers, polys, strict=True) for _ in p]},
        geometry=[g for p in polys for g in p], crs=crs)
    columns = ["year_from", "year_to", "lifecycle", "uids_from", "uids_to", "n_from", "n_to", "area_from_m2",
               "area_to_m2", "change_m2", "change_pct", "geometry"]
    changes = gpd.GeoDataFrame(pd.DataFrame(rows, columns=columns), geometry="geometry", crs=crs)
    years = pd.DataFrame({"year": labels, "villages": [len(p) for p in polys],
                          "area_km2": [round(float(a.sum()) / 1e6, 6) for a in areas]})
    return ChangeResult(crs, villages, changes, years)
