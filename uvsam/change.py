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

from dataclasses import asdict, dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from pyproj import CRS

from tiles.reader import RasterSource
from uvsam.errors import InputError

LIFECYCLES = ("new", "demolished", "stable", "expanded", "shrunk", "split", "merged")


@dataclass(frozen=True)
class ChangeConfig:
    """How villages are linked across years and what counts as a change."""

    min_overlap: float = 0.1  # share of the smaller village's area two villages must share to be linked
    stable_pct: float = 10.0  # one-to-one changes of area within +-this many percent are "stable"
    crs: str | None = None  # analysis CRS (projected); None: local equal-area on the data
    min_area_m2: float = 0.0  # minimum mapping unit: events whose villages are all smaller are not reported

    def __post_init__(self):
        if not 0 < self.min_overlap <= 1:
            raise InputError(f"min_overlap must be in (0, 1], got {self.min_overlap}")
        if self.stable_pct < 0:
            raise InputError(f"stable_pct cannot be negative, got {self.stable_pct}")
        if self.min_area_m2 < 0:
            raise InputError(f"minimum mapping unit cannot be negative, got {self.min_area_m2} m2")
        if self.crs is not None:
            try:
                crs = CRS.from_user_input(self.crs)
            except Exception as e:  # noqa: BLE001 - pyproj's many error types
                raise InputError(f"--crs {self.crs!r} is not a CRS ({e})") from None
            if not crs.is_projected:
                raise InputError(f"--crs {self.crs!r} is geographic: areas need a projected CRS")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class YearLayer:
    """One year's villages: a label (``2020``), where they came from, and the polygons."""

    year: str
    source: str
    villages: gpd.GeoDataFrame


def parse_spec(spec: str) -> tuple[str, Path, str | None]:
    """``YEAR=FILE[:LAYER]`` -> (year, file, layer or None)."""
    if "=" not in spec:
        raise InputError(f"{spec!r}: give YEAR=FILE or YEAR=FILE:LAYER (e.g. 2020=villages.gpkg:y2020)")
    year, rest = spec.split("=", 1)
    path, layer = Path(rest), None
    if not path.exists() and ":" in rest:
        head, tail = rest.rsplit(":", 1)
        path, layer = Path(head), tail or None
    if not year.strip():
        raise InputError(f"{spec!r}: the year label is empty")
    return year.strip(), path, layer


def read_layer(spec: str) -> YearLayer:
    """The polygons of one ``YEAR=FILE[:LAYER]`` (any OGR polygon layer; one-layer files need no name)."""
    import pyogrio

    year, path, layer = parse_spec(spec)
    if not path.is_file():
        raise InputError("file does not exist", path)
    try:
        layers = [name for name, _ in pyogrio.list_layers(path)]
    except Exception as e:  # noqa: BLE001 - not a vector file
        raise InputError(f"not a vector file GDAL can read ({str(e).splitlines()[0][:120]})", path) from None
    if layer is None:
        candidates = [n for n in layers if n not in ("runs", "layer_styles") and not n.endswith(("_candidates",
                                                                                                 "_tiles"))]
        candidates = [n for n in candidates if n not in ("candidates", "tiles")]
        if len(candidates) != 1:
            raise InputError(f"holds layers {', '.join(layers)}: name one as {year}={path}:LAYER", path)
        layer = candidates[0]
    elif layer not in layers:
        raise InputError(f"has no layer {layer!r} (layers: {', '.join(layers)})", path)
    gdf = pyogrio.read_dataframe(path, layer=layer)
    if gdf.crs is None:
        raise InputError(f"layer {layer!r} has no CRS", path)
    kinds = set(gdf.geometry.geom_type.dropna())
    if not kinds <= {"Polygon", "MultiPolygon"}:
        raise InputError(f"layer {layer!r} holds {', '.join(sorted(kinds))}, not polygons", path)
    gdf = gdf[~gdf.geometry.is_empty & gdf.geometry.notna()].copy()
    gdf["geometry"] = shapely.make_valid(gdf.geometry.values)
    gdf = gdf.explode(index_parts=False, ignore_index=True)
    gdf = gdf[gdf.geometry.geom_type == "Polygon"].reset_index(drop=True)
    return YearLayer(year, f"{path}:{layer}", gdf)


def parse_images(specs: list[str], years: list[str]) -> dict[str, Path]:
    """``YEAR=RASTER`` specs -> {year: path}, each year one of ``years`` and each file present."""
    out = {}
    for spec in specs:
        if "=" not in spec:
            raise InputError(f"--image {spec!r}: give YEAR=RASTER")
        year, path = spec.split("=", 1)
        if year not in years:
            raise InputError(f"--image {spec!r}: year {year!r} is not one of {', '.join(years)}")
        if not Path(path).is_file():
            raise InputError("image does not exist", path)
        with RasterSource(path) as src:  # readable, whole and georeferenced, before any work
            if src.crs is None:
                raise InputError("image has no CRS", path)
            if not src.read_overview(250_000)[1].any():
                raise InputError("image has no valid pixels (all nodata or NaN)", path)
        out[year] = Path(path)
    return out


def coregistration(images: dict[str, Path], years: list[str], crs, max_shift_m: float, log=print) -> list[dict]:
    """The imagery shift between consecutive years that both have imagery; warns above ``max_shift_m``."""
    from uvsam.coregister import MIN_PSR, estimate_shift

    rows = []
    for y0, y1 in zip(years, years[1:], strict=False):
        if y0 not in images or y1 not in images:
            continue
        shift = estimate_shift(images[y0], images[y1], crs)
        if shift is None:
            rows.append({"from": y0, "to": y1, "shift_m": None, "note": "images share too little ground"})
            continue
        row = {"from": y0, "to": y1, "east_m": round(shift.east_m, 2), "north_m": round(shift.north_m, 2),
               "shift_m": round(shift.metres, 2), "grid_m": round(shift.pixel_m, 2), "peak": round(shift.peak, 3),
               "psr": round(shift.psr, 1), "reliable": shift.reliable,
               "warning": shift.reliable and shift.metres > max_shift_m}
        if not shift.reliable:
            row["note"] = "not measurable: too little unchanged structure between the images"
            log(f"note: the shift of the {y1} imagery against {y0} is not measurable (correlation peak "
                f"{shift.psr:.1f} sigma, needs {MIN_PSR:.0f}): too little ground looks alike in both")
        if row["warning"]:
            log(f"warning: the {y1} imagery is shifted {shift.metres:.1f} m against {y0} ({shift.east_m:+.1f} m east, "
                f"{shift.north_m:+.1f} m north): village edges will show change that is misregistration")
        rows.append(row)
    return rows


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
                         "change_pct": round(100.0 * (a1 - a0) / a0, 2) if a0 > 0 else None, "geometry": geom})
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


# -- aggregations ---------------------------------------------------------------------------
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


# -- outputs --------------------------------------------------------------------------------
def write_outputs(out: str | Path, result: ChangeResult, tables: dict[str, pd.DataFrame], run: dict,
                  crs: str | None = None) -> list[Path]:
    """The GeoPackage (``changes``, ``villages_tracked``, one table per summary, ``runs``) and a
    CSV per summary beside it (``OUT_years.csv``, ...); every file replaced atomically.

    Layers are written in ``crs`` (default: the analysis CRS); areas stay ground square metres.
    """
    import json

    import pyogrio

    from uvsam.files import atomic_path

    out = Path(out)
    if not out.parent.is_dir():
        raise InputError("output folder does not exist", out.parent)
    target = CRS.from_user_input(crs) if crs else result.crs
    tables = {"years": result.years, **tables}
    run_row = pd.DataFrame([{k: v if isinstance(v, str | int | float | bool) or v is None else json.dumps(v)
                             for k, v in run.items()}])
    with atomic_path(out) as tmp:
        tmp.unlink()
        pyogrio.write_dataframe(result.changes.to_crs(target), tmp, layer="changes", driver="GPKG")
        pyogrio.write_dataframe(result.villages.to_crs(target), tmp, layer="villages_tracked", driver="GPKG")
        for name, table in tables.items():
            pyogrio.write_dataframe(table, tmp, layer=name, driver="GPKG")
        pyogrio.write_dataframe(run_row, tmp, layer="runs", driver="GPKG")
    written = [out]
    for name, table in tables.items():
        csv = out.with_name(f"{out.stem}_{name}.csv")
        with atomic_path(csv) as tmp:
            table.to_csv(tmp, index=False)
        written.append(csv)
    changes_csv = out.with_name(f"{out.stem}_changes.csv")
    with atomic_path(changes_csv) as tmp:
        result.changes.drop(columns="geometry").to_csv(tmp, index=False)
    return [*written, changes_csv]


def run_change(specs: list[str], out: str | Path, cfg: ChangeConfig = ChangeConfig(),
               districts: str | Path | None = None, district_field: str | None = None,
               centre: tuple[float, float] | None = None, ring_km: float = 2.0, crs: str | None = None,
               report: str | Path | None = None, images: list[str] | None = None, max_shift_m: float = 5.0,
               log=print) -> dict:
    """``uvsam change``: read the years, track, aggregate, write (and report); returns a summary.

    ``images``: ``YEAR=RASTER`` specs: their co-registration is checked for consecutive years
    (a warning through ``log`` above ``max_shift_m``) and the report's thumbnails show them.
    """
    from datetime import datetime, timezone

    from uvsam import __version__
    from uvsam.files import check_writable

    layers = [read_layer(s) for s in specs]
    pictures = parse_images(images or [], [ly.year for ly in layers])
    check_writable(out)
    if report is not None:
        check_writable(report)
    result = track(layers, cfg)
    tables: dict[str, pd.DataFrame] = {}
    if districts is not None:
        import pyogrio

        if not Path(districts).is_file():
            raise InputError("districts file does not exist", districts)
        tables["districts"] = by_district(result.villages, pyogrio.read_dataframe(districts), district_field)
    if centre is not None:
        tables["rings"] = by_ring(result.villages, centre, ring_km)
    coreg = coregistration(pictures, [ly.year for ly in layers], result.crs, max_shift_m, log)
    consistency = check_consistency(result, pictures, log)
    counts = result.changes["lifecycle"].value_counts().to_dict() if len(result.changes) else {}
    run = {"years": [ly.year for ly in layers], "sources": [ly.source for ly in layers], "config": cfg.to_dict(),
           "analysis_crs": result.crs.to_wkt(), "districts": str(districts) if districts else None,
           "centre": list(centre) if centre else None, "ring_km": ring_km if centre else None,
           "images": {y: str(p) for y, p in pictures.items()}, "coregistration": coreg, "consistency": consistency,
           "uvsam_version": __version__, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    files = write_outputs(out, result, tables, run, crs)
    if report is not None:
        from uvsam.report import write_report

        files.append(write_report(report, result, tables, run, pictures))
    return {"out": str(out), "files": [str(f) for f in files], "years": run["years"], "coregistration": coreg,
            "consistency": consistency, "lifecycles": {k: int(counts.get(k, 0)) for k in LIFECYCLES}}


def village_area_iou(villages: gpd.GeoDataFrame, before: str, after: str) -> float:
    """IoU of the areas two years' villages cover (1.0 when neither has any)."""
    a, b = (shapely.union_all(np.asarray(villages.geometry[villages["year"] == y].values, dtype=object))
            for y in (before, after))
    union = shapely.area(shapely.union(a, b))
    return 1.0 if union == 0 else float(shapely.area(shapely.intersection(a, b)) / union)


def check_consistency(result: ChangeResult, images: dict[str, Path], log=print) -> list[dict]:
    """Per pair of consecutive years: do the villages disagree massively while the imagery
    changed only in colour? (:mod:`uvsam.consistency`); flagged pairs are logged as warnings."""
    from uvsam.consistency import assess

    years = list(result.years["year"])
    ious = [village_area_iou(result.villages, y0, y1) for y0, y1 in zip(years, years[1:], strict=False)]
    checks = assess(years, ious, images, result.crs)
    for c in checks:
        if c.note:
            log(f"warning: {c.note}")
    return [c.to_dict() for c in checks]
