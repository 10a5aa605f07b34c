"""Accuracy assessment and area estimation by good practice (Olofsson et al. 2014, Remote Sensing
of Environment 148: 42-57; Stehman 2013): a stratified random sample of points to label, and the
estimators of accuracy and of area with their confidence intervals from the labelled sample.

``uvsam sample`` (:func:`draw_sample`): the strata are the map's classes over the mapped area
(``village`` inside the village polygons, ``not village`` elsewhere; the mapped area is the
predict GeoPackage's tiles that ran, or a polygon layer given); each stratum gets points
uniformly at random, ``n`` shared in proportion to area with at least ``min_per_stratum`` each
(rare classes need enough points for their user's accuracy). The GeoPackage it writes holds the
points (``reference`` empty, for the analyst to fill in QGIS with ``village`` or ``not village``)
and the strata with their mapped areas, which the estimators need.

``uvsam accuracy`` (:func:`assess`): with ``W_i`` the mapped area share of map class ``i`` and
``n_ij`` the points of map class ``i`` labelled ``j``, the error matrix of estimated area
proportions ``p_ij = W_i n_ij / n_i.``; overall accuracy ``sum_j p_jj``; user's accuracy
``n_ii / n_i.``; producer's accuracy ``p_jj / p_.j``; the area of class ``j`` ``A p_.j`` (the
error-adjusted estimate, not the mapped area); standard errors by Olofsson et al.'s eqs. 5-7 and
10-11, confidence intervals ``estimate +- z SE`` (z = 1.96 for 95 %).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely

from uvsam.changes.sources import parse_spec, read_layer
from uvsam.errors import ConfigError, InputError
from uvsam.files import atomic_path, check_writable, read_features
from uvsam.layers import GEOMETRY_COLUMN, category_list, label_with, qml_document, style_row, styles_table
from uvsam.polygons import local_equal_area

VILLAGE, NOT_VILLAGE = "village", "not village"
CLASSES = (VILLAGE, NOT_VILLAGE)
# the change classes between two years' maps (strata of a change sample)
BOTH, LOST, GAINED, NEITHER = "village both years", "village lost", "village gained", "no village either year"
CHANGE_CLASSES = (BOTH, LOST, GAINED, NEITHER)
Z95 = NormalDist().inv_cdf(0.975)  # 1.95996...: a 95 % interval


# -- the estimators ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """A value, its standard error and the half-width of its confidence interval."""

    value: float
    se: float
    ci: float

    @property
    def interval(self) -> tuple[float, float]:
        return self.value - self.ci, self.value + self.ci


@dataclass
class Accuracy:
    """What a labelled stratified sample says of the map (see the module docstring)."""

    classes: list[str]
    counts: np.ndarray  # n_ij: (map class i, reference class j)
    mapped_area: np.ndarray  # A_i, in ``unit``
    proportions: np.ndarray  # p_ij, estimated area proportions
    overall: Estimate
    users: dict[str, Estimate]
    producers: dict[str, Estimate]
    area: dict[str, Estimate]  # error-adjusted area of each reference class, in ``unit``
    z: float = Z95
    unit: str = "m2"
    notes: list[str] = field(default_factory=list)

    def table(self) -> pd.DataFrame:
        """One row per class: mapped area, estimated area with its interval, user's and producer's
        accuracy with theirs, and the sample counts."""
        rows = []
        for k, c in enumerate(self.classes):
            a, u, p = self.area[c], self.users[c], self.producers[c]
            rows.append({"class": c, "points": int(self.counts[k].sum()), f"mapped_{self.unit}": self.mapped_area[k],
                         f"estimated_{self.unit}": a.value, f"estimated_{self.unit}_ci": a.ci,
                         f"estimated_{self.unit}_low": a.interval[0], f"estimated_{self.unit}_high": a.interval[1],
                         "users_accuracy": u.value, "users_accuracy_ci": u.ci,
                         "producers_accuracy": p.value, "producers_accuracy_ci": p.ci})
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        return {"classes": self.classes, "confidence": round(2 * NormalDist().cdf(self.z) - 1, 4), "unit": self.unit,
                "error_matrix_counts": self.counts.astype(int).tolist(),
                "error_matrix_area_proportions": self.proportions.tolist(),
                "overall_accuracy": asdict(self.overall),
                "classes_detail": self.table().to_dict(orient="records"), "notes": self.notes}


def estimate(counts: np.ndarray, mapped_area: np.ndarray, classes: list[str], z: float = Z95,
             unit: str = "m2") -> Accuracy:
    """The estimators of Olofsson et al. (2014) from the sample counts ``counts`` (n_ij: rows the
    map classes = strata, columns the reference classes) and the mapped area of each map class."""
    n = np.asarray(counts, dtype=float)
    area = np.asarray(mapped_area, dtype=float)
    q = len(classes)
    if n.shape != (q, q) or area.shape != (q,):
        raise ConfigError(f"counts must be {q} x {q} and areas {q} long", field="counts")
    rows = n.sum(axis=1)
    present = area > 0  # a class the map never shows has no stratum, no points and weight 0
    if (rows[present] < 2).any():
        short = [classes[i] for i in np.flatnonzero(present & (rows < 2))]
        raise InputError(f"map class(es) {', '.join(short)} have fewer than 2 labelled points: no standard error")
    if (rows[~present] > 0).any():
        raise InputError("points in a map class with no mapped area: the sample does not match its strata")
    total = area.sum()
    w = area / total
    rows = np.where(present, rows, 2.0)  # only divides zeros for the absent classes
    share = n / rows[:, None]  # n_ij / n_i.
    p = w[:, None] * share  # eq. 4
    col = p.sum(axis=0)  # p_.j, eq. 9
    diag = np.diag(share)
    users = np.where(present, diag, np.nan)  # eq. 2; undefined for a class the map never shows
    producers = np.divide(np.diag(p), col, out=np.full(q, np.nan), where=col > 0)  # eq. 3
    overall = float(np.trace(p))  # eq. 1
    v_overall = float(np.sum(w**2 * diag * (1 - diag) / (rows - 1)))  # eq. 5
    v_users = users * (1 - users) / (rows - 1)  # eq. 6
    # eq. 7, with N_i. the mapped area of class i and N_.j its estimated reference total
    big_n = area
    n_col = (big_n[:, None] * share).sum(axis=0)
    v_prod = np.full(q, np.nan)
    for j in range(q):
        if n_col[j] <= 0:
            continue
        others = sum(big_n[i] ** 2 * share[i, j] * (1 - share[i, j]) / (rows[i] - 1) for i in range(q) if i != j)
        v_prod[j] = (big_n[j] ** 2 * (1 - producers[j]) ** 2 * diag[j] * (1 - diag[j]) / (rows[j] - 1)
                     + producers[j] ** 2 * others) / n_col[j] ** 2
    se_col = np.sqrt(np.sum(w[:, None] ** 2 * share * (1 - share) / (rows[:, None] - 1), axis=0))  # eq. 10

    def est(value: float, var: float) -> Estimate:
        se = math.sqrt(var) if var == var else float("nan")
        return Estimate(float(value), se, z * se)

    notes = [f"no sample point was labelled {c}: its producer's accuracy is undefined"
             for c, seen in zip(classes, n.sum(axis=0) > 0, strict=True) if not seen]
    return Accuracy(list(classes), n, area, p, est(overall, v_overall),
                    {c: est(users[k], v_users[k]) for k, c in enumerate(classes)},
                    {c: est(producers[k], v_prod[k]) for k, c in enumerate(classes)},
                    {c: Estimate(float(total * col[k]), float(total * se_col[k]), float(z * total * se_col[k]))
                     for k, c in enumerate(classes)},  # eq. 11
                    z, unit, notes)


# -- the sample -------------------------------------------------------------------------------------
def _marker(name: str, colour: str) -> str:
    options = {"color": colour, "name": "circle", "outline_color": "35,35,35,255", "outline_width": "0.3",
               "size": "2.8", "size_unit": "MM"}
    return (f'   <symbol type="marker" name="{name}" alpha="1" clip_to_extent="1" force_rhr="0">\n'
            '    <layer class="SimpleMarker" enabled="1" locked="0" pass="0">\n     <Option type="Map">\n'
            + "".join(f'      <Option type="QString" name="{k}" value="{v}"/>\n' for k, v in options.items())
            + "     </Option>\n    </layer>\n   </symbol>\n")


CLASS_COLOURS = {VILLAGE: "228,26,28,255", NOT_VILLAGE: "55,126,184,255", BOTH: "228,26,28,255",
                 LOST: "152,78,163,255", GAINED: "255,127,0,255", NEITHER: "55,126,184,255"}


def sample_qml(classes: tuple[str, ...] | list[str]) -> str:
    """The sample's QGIS style: points coloured by their label (grey until labelled), numbered,
    and ``reference`` edited with a drop-down of the ``classes`` (a value map), so a label is
    never misspelt."""
    value_map = "".join(f'        <Option type="Map"><Option type="QString" name="{c}" value="{c}"/></Option>\n'
                        for c in classes)
    markers = [_marker(str(k), CLASS_COLOURS[c]) for k, c in enumerate(classes)]
    return qml_document(
        'type="categorizedSymbol" attr="reference"', markers + [_marker(str(len(classes)), "200,200,200,255")],
        categories=category_list([(c, f"labelled {c}") for c in classes] + [("", "not yet labelled")]),
        labeling=label_with("point_id"),
    ).replace('styleCategories="Symbology|Labeling"', 'styleCategories="Symbology|Labeling|Fields|Forms"').replace(
        "</qgis>\n",
        ' <fieldConfiguration>\n  <field name="reference" configurationFlags="None">\n'
        '   <editWidget type="ValueMap">\n    <config>\n     <Option type="Map">\n'
        '      <Option type="List" name="map">\n'
        + value_map + "      </Option>\n     </Option>\n    </config>\n   </editWidget>\n  </field>\n"
        " </fieldConfiguration>\n</qgis>\n")


SAMPLE_QML = sample_qml(CLASSES)



@dataclass(frozen=True)
class SampleDesign:
    """How many points: ``n`` in all, shared by mapped area, at least ``min_per_stratum`` each;
    ``seed`` makes the draw repeatable."""

    n: int = 300
    min_per_stratum: int = 50
    seed: int = 0

    def __post_init__(self):
        if self.n < 2 or self.min_per_stratum < 2:
            raise ConfigError("a stratum needs at least 2 points (for a standard error)", field="min_per_stratum")


def allocate(areas: dict[str, float], design: SampleDesign) -> dict[str, int]:
    """Points per stratum: proportional to area, raised to the minimum, the rest shared again by area."""
    total = sum(areas.values())
    alloc = {k: max(design.min_per_stratum, round(design.n * a / total)) for k, a in areas.items()}
    over = sum(alloc.values()) - design.n
    big = sorted((k for k in areas if alloc[k] > design.min_per_stratum), key=lambda k: -areas[k])
    for k in big:  # take the excess from the largest strata, never below the minimum
        if over <= 0:
            break
        take = min(over, alloc[k] - design.min_per_stratum)
        alloc[k] -= take
        over -= take
    return alloc


def random_points(geom, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points uniformly at random in ``geom`` (rejection in its bounding box)."""
    if geom.is_empty or n == 0:
        return np.empty(0, dtype=object)
    shapely.prepare(geom)
    x0, y0, x1, y1 = geom.bounds
    out: list = []
    fill = max(geom.area / ((x1 - x0) * (y1 - y0)), 1e-6)
    while len(out) < n:
        m = int(min(1e6, max(64, 1.5 * (n - len(out)) / fill)))
        pts = shapely.points(rng.uniform(x0, x1, m), rng.uniform(y0, y1, m))
        out.extend(pts[shapely.contains(geom, pts)].tolist())
    return np.asarray(out[:n], dtype=object)


def draw_sample(map_spec: str, out: str | Path, design: SampleDesign = SampleDesign(),
                area: str | None = None, later: str | None = None) -> dict:
    """Draw the stratified sample of ``map_spec`` (``FILE[:LAYER]`` of village polygons) into the
    GeoPackage ``out`` (layers ``sample`` and ``strata``); returns a summary. ``area``: a polygon
    file of the mapped area (default: the map GeoPackage's tiles layer, status done; with
    ``later``, where both maps ran). ``later``: a later year's map: the strata are then the
    change classes (:data:`CHANGE_CLASSES`: village both years, lost, gained, neither)."""
    out = check_writable(out)
    villages = read_layer(f"map={map_spec}").villages
    crs = villages.crs
    mapped = _mapped_area(map_spec, area, crs)
    if later is not None and area is None:
        mapped = shapely.intersection(mapped, _mapped_area(later, None, crs))
    eq = local_equal_area([mapped], crs)
    to_eq = gpd.GeoSeries([mapped], crs=crs).to_crs(eq).iloc[0]

    def cover(gdf) -> object:
        return shapely.union_all(gdf.to_crs(eq).geometry.values) if len(gdf) else shapely.Polygon()

    first = cover(villages)
    if later is None:
        classes = CLASSES
        strata = {VILLAGE: shapely.intersection(first, to_eq), NOT_VILLAGE: shapely.difference(to_eq, first)}
    else:
        classes = CHANGE_CLASSES
        second = cover(read_layer(f"later={later}").villages)
        strata = {BOTH: shapely.intersection(shapely.intersection(first, second), to_eq),
                  LOST: shapely.intersection(shapely.difference(first, second), to_eq),
                  GAINED: shapely.intersection(shapely.difference(second, first), to_eq),
                  NEITHER: shapely.difference(to_eq, shapely.union(first, second))}
    areas = {k: float(g.area) for k, g in strata.items()}
    if later is None and areas[VILLAGE] <= 0:
        raise InputError("the map has no village inside the mapped area: nothing to stratify by", map_spec)
    if later is not None and areas[LOST] + areas[GAINED] <= 0:
        raise InputError(f"the two maps agree everywhere inside the mapped area ({later}): no change to stratify by",
                         map_spec)
    areas = {k: a for k, a in areas.items() if a > 0}  # a class the map never shows has no stratum
    alloc = allocate(areas, design)
    rng = np.random.default_rng(design.seed)
    frames = []
    for k in areas:
        pts = random_points(strata[k], alloc[k], rng)
        frames.append(gpd.GeoDataFrame({"stratum": k, "map_class": k}, index=range(len(pts)),
                                       geometry=gpd.GeoSeries(pts, crs=eq)))
    sample = pd.concat(frames, ignore_index=True)
    sample = gpd.GeoDataFrame(sample, geometry="geometry", crs=eq).sample(frac=1.0, random_state=design.seed)
    sample = sample.reset_index(drop=True).to_crs(crs)
    sample.insert(0, "point_id", np.arange(1, len(sample) + 1))
    sample["reference"] = pd.array([None] * len(sample), dtype=object)  # the analyst's label
    table = pd.DataFrame({"stratum": list(areas), "area_m2": list(areas.values()),
                          "points": [alloc[k] for k in areas]})
    meta = {"map": map_spec, "later": later, "design": asdict(design),
            "area": area or ("tiles layers (done in both)" if later else "tiles layer (done)"),
            "equal_area_crs": eq.srs, "classes": list(classes)}
    table["design"] = json.dumps(meta)
    style = styles_table([style_row("sample", sample_qml(classes),
                                    "uvsam: sample points by label; reference is a drop-down")])
    with atomic_path(out) as tmp:
        tmp.unlink(missing_ok=True)
        pyogrio.write_dataframe(sample, tmp, layer="sample", driver="GPKG", dataset_options={"VERSION": "1.2"},
                                layer_options={"GEOMETRY_NAME": GEOMETRY_COLUMN})
        pyogrio.write_dataframe(table, tmp, layer="strata", driver="GPKG")
        pyogrio.write_dataframe(style, tmp, layer="layer_styles", driver="GPKG")
    return {"out": str(out), "points": len(sample), "classes": list(classes),
            "strata": {k: {"area_m2": round(areas[k], 1), "points": alloc[k]} for k in areas}}


def _mapped_area(map_spec: str, area: str | None, crs):
    """The area the map covers: a given polygon layer, else the predict GeoPackage's tiles that ran."""
    if area is not None:
        gdf = read_layer(f"area={area}").villages
    else:
        _, path, name = parse_spec(f"map={map_spec}")
        name = name or "villages"
        layers = {n for n, _ in pyogrio.list_layers(path)} if path.suffix.lower() == ".gpkg" else set()
        tiles = "tiles" if name == "villages" else f"{name}_tiles"
        if tiles not in layers:
            raise InputError("no tiles layer to tell the mapped area: give it as a polygon file (--area)", path)
        gdf = read_features(path, tiles)
        if "status" in gdf:
            gdf = gdf[gdf["status"] == "done"]
    if not len(gdf):
        raise InputError("the mapped area is empty", area or map_spec)
    return shapely.union_all(gdf.to_crs(crs).geometry.values)


def assess(sample_file: str | Path, z: float = Z95) -> Accuracy:
    """The estimators from a labelled sample GeoPackage written by :func:`draw_sample`."""
    path = Path(sample_file)
    if not path.is_file():
        raise InputError("file does not exist", path)
    try:
        sample = read_features(path, "sample", read_geometry=False)
        strata = read_features(path, "strata", read_geometry=False)
    except Exception as e:  # noqa: BLE001 - not a sample GeoPackage
        raise InputError(f"not a sample written by `uvsam sample` ({str(e).splitlines()[0][:120]})", path) from None
    classes = list(json.loads(strata["design"].iloc[0]).get("classes", CLASSES)) if "design" in strata else list(
        CLASSES)
    labels = sample["reference"].astype("string").str.strip().str.lower()
    missing = labels.isna() | (labels == "")
    if missing.any():
        raise InputError(f"{int(missing.sum())} of {len(sample)} points have no reference label: label them "
                         f"(field reference: {' or '.join(classes)})", path)
    bad = sorted(set(labels) - set(classes))
    if bad:
        raise InputError(f"reference labels {bad} are not {' or '.join(classes)}", path)
    # a class the map never shows has no stratum (mapped area 0) but may still be the truth somewhere
    mapped = strata.set_index("stratum")["area_m2"]
    counts = np.zeros((len(classes), len(classes)))
    for m, r in zip(sample["map_class"], labels, strict=True):
        counts[classes.index(m), classes.index(r)] += 1
    areas = np.array([float(mapped.get(c, 0.0)) for c in classes])
    return estimate(counts, areas, classes, z)
