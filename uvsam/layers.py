"""Village layers on disk: a GeoPackage for GIS users (or GeoJSON / GeoParquet / FlatGeobuf).

The GeoPackage holds the villages layer (``--layer``, one per year), its ``candidates`` (the
specialist's villages before refinement) and ``tiles`` (the grid, with status), a ``runs``
table (configuration, versions, weights hashes, normalisation of every run) and a default QGIS
style in ``layer_styles``. A file is never written in place: the new content goes to a copy
that replaces the original only when complete, so other layers (other years) are untouched and
an interrupted run leaves the previous file as it was; runs adding layers to one file at the same
time take turns (:class:`~uvsam.files.OutputLock`), so neither layer is lost.
"""

from __future__ import annotations

import json
import re
import shutil
from datetime import date, datetime, timezone
from pathlib import Path
from xml.sax.saxutils import escape

import geopandas as gpd
import pandas as pd
import pyarrow as pa
import pyogrio

from uvsam.config import FORMATS
from uvsam.errors import ConfigError, InputError
from uvsam.files import OutputLock, atomic_path, read_features


def date_column(value: str | date | None, n: int) -> pd.Series:
    """``n`` copies of a calendar date (``YYYY-MM-DD`` or a date; None: missing) as a column that
    GeoPackage stores as DATE, GeoJSON as a date string and GeoParquet as date32."""
    if isinstance(value, str):
        value = date.fromisoformat(value)
    return pd.Series([value] * n, dtype=pd.ArrowDtype(pa.date32()))


def _arrow(frame: pd.DataFrame) -> bool:
    """Whether ``frame`` holds a column only GDAL's Arrow path writes with its true type (a date)."""
    return any(isinstance(t, pd.ArrowDtype) for t in frame.dtypes)


def write_frame(frame: pd.DataFrame, path: Path, **kwargs) -> None:
    """``pyogrio.write_dataframe``, through Arrow when a column needs it (dates stay dates)."""
    pyogrio.write_dataframe(frame, path, use_arrow=_arrow(frame), **kwargs)


def format_for(out: Path, fmt: str | None = None) -> str:
    """The output's format: ``fmt``, else the one its extension names (:data:`FORMATS`); a format
    that contradicts a known extension (GeoJSON into ``villages.gpkg``) is refused."""
    suffix = Path(out).suffix.lower()
    named = {f.suffix: f.name for f in FORMATS.values()}.get(suffix)
    if fmt is None:
        if named is None:
            raise ConfigError(f"not given, and the extension {suffix or '(none)'} names none of "
                              f"{', '.join(f.suffix for f in FORMATS.values())}", out, field="format")
        return named
    if fmt not in FORMATS:
        raise ConfigError(f"{fmt!r}: use {', '.join(FORMATS)}", out, field="format")
    if named is not None and named != fmt:
        raise ConfigError(f"{fmt!r} but the file name ends in {suffix} ({named}): name the file "
                          f"{Path(out).stem}{FORMATS[fmt].suffix} or leave the format to the extension", out,
                          field="format")
    return fmt


def check_format(fmt: str | None, layer: str, out: Path) -> str:
    """The output's format (:func:`format_for`), and a layer name a GeoPackage can hold, before any work."""
    fmt = format_for(out, fmt)
    problem = layer_problem(layer) if fmt == "gpkg" else None
    if problem:
        raise InputError(problem, out, field="layer")
    return fmt


def fill_symbol(name: str, colour: str, outline: str, style: str = "solid", outline_style: str = "solid",
                width: float = 0.2) -> str:
    """One QGIS fill symbol (colours as "R,G,B,A"; ``style`` of the fill: solid, no, b_diagonal, ...)."""
    options = {"color": colour, "outline_color": outline, "outline_style": outline_style, "outline_width": width,
               "outline_width_unit": "MM", "style": style}
    return (f'   <symbol type="fill" name="{name}" alpha="1" clip_to_extent="1" force_rhr="0">\n'
            '    <layer class="SimpleFill" enabled="1" locked="0" pass="0">\n     <Option type="Map">\n'
            + "".join(f'      <Option type="QString" name="{k}" value="{v}"/>\n' for k, v in options.items())
            + "     </Option>\n    </layer>\n   </symbol>\n")


def category_list(pairs: list[tuple[str, str]]) -> str:
    """The categories of a categorised renderer: (value, label), the k-th drawn with symbol k."""
    rows = "".join(f'   <category value="{v}" symbol="{k}" label="{text}" render="true"/>\n'
                   for k, (v, text) in enumerate(pairs))
    return f"  <categories>\n{rows}  </categories>\n"


def label_with(expression: str) -> str:
    """Labelling that writes a QGIS ``expression`` on every feature (XML-escaped here)."""
    return (' <labeling type="simple">\n  <settings calloutType="simple">\n'
            f'   <text-style fieldName="{escape(expression, {chr(34): "&quot;"})}" isExpression="1" fontSize="8" '
            'textColor="50,50,50,255"/>\n  </settings>\n </labeling>\n')


def qml_document(renderer: str, symbols: list[str], categories: str = "", labeling: str = "") -> str:
    """A QGIS style document: ``renderer`` attributes, its symbols, categories and labeling."""
    return ("<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
            f'<qgis version="3.22.0" styleCategories="Symbology{"|Labeling" if labeling else ""}">\n'
            f' <renderer-v2 {renderer} symbollevels="0" enableorderby="0" forceraster="0">\n{categories}'
            f'  <symbols>\n{"".join(symbols)}  </symbols>\n </renderer-v2>\n{labeling}</qgis>\n')


def hex_rgba(colour: str, alpha: int = 255) -> str:
    """``#rrggbb`` -> the "R,G,B,A" QGIS writes."""
    return ",".join(str(int(colour[k:k + 2], 16)) for k in (1, 3, 5)) + f",{alpha}"


VILLAGE_QML = qml_document('type="singleSymbol"', [fill_symbol("0", "228,26,28,90", "228,26,28,255", width=0.6)],
                           labeling=label_with("round(area_m2 / 10000, 1) || ' ha'"))
CANDIDATE_QML = qml_document('type="singleSymbol"',
                             [fill_symbol("0", "255,127,0,0", "255,127,0,255", "no", "dash", 0.4)])
TILES_QML = qml_document('type="categorizedSymbol" attr="status"',
                         [fill_symbol("0", "0,0,0,0", "120,120,120,160", "no"),
                          fill_symbol("1", "120,120,120,60", "120,120,120,160", "b_diagonal"),
                          fill_symbol("2", "70,130,180,50", "70,130,180,160", "no")],
                         categories=category_list([("done", "tile done"), ("nodata", "tile without data"),
                                                   ("gated", "tile the gate found no village in")]))
OBJECTS_QML = qml_document('type="categorizedSymbol" attr="complete"',
                           [fill_symbol("0", "31,120,180,40", "31,120,180,255", width=0.3),
                            fill_symbol("1", "31,120,180,0", "31,120,180,255", "no", "dash", 0.3)],
                           categories=category_list([("1", "object"), ("0", "object cut by a window edge")]))

GEOMETRY_COLUMN = "geom"  # what the GeoPackage's geometry column is called (and its stored styles name)
STYLES = {  # kind of layer -> (QML, description)
    "villages": (VILLAGE_QML, "uvsam default: villages in red, labelled with their area in hectares"),
    "candidates": (CANDIDATE_QML, "uvsam default: the specialist's candidates, dashed orange outlines"),
    "tiles": (TILES_QML, "uvsam default: the tile grid by status, grey, tiles without data hatched"),
    "objects": (OBJECTS_QML, "uvsam default: everything-mode objects, blue outlines, cut ones dashed"),
}


def style_row(table: str, qml: str, description: str) -> dict:
    """A ``layer_styles`` row: ``qml`` as the default style of ``table``."""
    return {"f_table_catalog": "", "f_table_schema": "", "f_table_name": table, "f_geometry_column": GEOMETRY_COLUMN,
            "styleName": f"{table} (uvsam)", "styleQML": qml, "styleSLD": "", "useAsDefault": True,
            "description": description, "owner": "uvsam", "ui": "",
            "update_time": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def styles_table(rows: list[dict]) -> pd.DataFrame:
    """The ``layer_styles`` table QGIS reads (``style_row`` rows)."""
    return pd.DataFrame(rows)


def _table(path: Path, layer: str) -> pd.DataFrame | None:
    if path.exists() and layer in [row[0] for row in pyogrio.list_layers(path)]:
        return read_features(path, layer, read_geometry=False)
    return None


def check_crs(crs: str | None, field: str = "crs") -> str | None:
    """An output CRS as given, once pyproj knows it (checked before any work, not at the write)."""
    if crs is None:
        return None
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    try:
        CRS.from_user_input(crs)
    except CRSError as e:
        raise ConfigError(f"{crs!r} is not a CRS ({str(e).splitlines()[0][:120]})", field=field) from None
    return crs


def companion(layer: str, kind: str) -> str:
    """Name of the candidates / tiles layer that goes with villages layer ``layer``."""
    return kind if layer == "villages" else f"{layer}_{kind}"


def layer_problem(layer: str) -> str | None:
    """Why ``layer`` cannot name a villages layer, or None if it can."""
    if layer in ("runs", "layer_styles", "candidates", "tiles") or layer.endswith(("_candidates", "_tiles")):
        return f"layer {layer!r} is a reserved name (runs, layer_styles, candidates, tiles, *_candidates, *_tiles)"
    if not re.fullmatch(r"(?!\d)\w{1,63}", layer):  # letters of any script: 年2020 and y2020 alike
        return f"layer {layer!r}: use a letter or _ then letters, digits or _ (at most 63 characters)"
    return None


def _check_gpkg(out: Path) -> None:
    """An existing ``out`` must be a GeoPackage GDAL can open (its other layers are kept)."""
    if out.exists():
        try:
            pyogrio.list_layers(out)
        except Exception as e:  # noqa: BLE001 - not a GeoPackage GDAL can open
            raise InputError(f"exists but is not a readable GeoPackage ({str(e).splitlines()[0][:120]}); "
                             "give another --out", out) from None


def write_geopackage(out: Path, layer: str, villages: gpd.GeoDataFrame, candidates: gpd.GeoDataFrame,
                     tiles: gpd.GeoDataFrame, run: dict) -> None:
    """Write (or replace) ``layer`` and its companions in ``out``; other layers are kept."""
    out = Path(out)
    problem = layer_problem(layer)
    if problem:
        raise InputError(problem, out)
    with OutputLock(out):  # another run adding its layer to the same file waits: no lost update
        _write_geopackage(out, layer, villages, candidates, tiles, run)


def _write_geopackage(out: Path, layer: str, villages: gpd.GeoDataFrame, candidates: gpd.GeoDataFrame,
                      tiles: gpd.GeoDataFrame, run: dict) -> None:
    _check_gpkg(out)
    runs = _table(out, "runs")
    styles = _table(out, "layer_styles")
    run_row = pd.DataFrame([{k: v if isinstance(v, str | int | float | bool) or v is None else json.dumps(v)
                             for k, v in run.items()}])
    runs = run_row if runs is None else pd.concat([runs, run_row], ignore_index=True)
    tables = {layer: "villages", companion(layer, "candidates"): "candidates", companion(layer, "tiles"): "tiles"}
    style = styles_table([style_row(table, *STYLES[kind]) for table, kind in tables.items()])
    if styles is not None:
        styles = styles[~styles["f_table_name"].isin(list(tables))]
        style = pd.concat([styles, style], ignore_index=True)
    with atomic_path(out) as tmp:
        if out.exists():
            shutil.copyfile(out, tmp)
        else:
            tmp.unlink()
        # tiles first: QGIS lists the layers it adds in file order, the last drawn on top
        for frame, table in ((tiles, companion(layer, "tiles")), (candidates, companion(layer, "candidates")),
                             (villages, layer)):
            # GeoPackage 1.2: what the GDAL and QGIS of current LTS distributions read without a warning
            created = {} if tmp.exists() else {"dataset_options": {"VERSION": "1.2"}}
            write_frame(frame, tmp, layer=table, driver="GPKG", layer_options={"GEOMETRY_NAME": GEOMETRY_COLUMN},
                        **created)
        pyogrio.write_dataframe(runs, tmp, layer="runs", driver="GPKG")
        pyogrio.write_dataframe(style, tmp, layer="layer_styles", driver="GPKG")


def write_layer(out: Path, layer: str, frame: gpd.GeoDataFrame, run: dict, kind: str) -> None:
    """Write (or replace) one ``layer`` of style ``kind`` (:data:`STYLES`) in GeoPackage ``out``, its
    run row appended to ``runs``; other layers are kept. Atomic: a reader never sees half a file."""
    out = Path(out)
    with OutputLock(out):
        _write_layer(out, layer, frame, run, kind)


def _write_layer(out: Path, layer: str, frame: gpd.GeoDataFrame, run: dict, kind: str) -> None:
    _check_gpkg(out)
    runs, styles = _table(out, "runs"), _table(out, "layer_styles")
    run_row = pd.DataFrame([{k: v if isinstance(v, str | int | float | bool) or v is None else json.dumps(v)
                             for k, v in run.items()}])
    runs = run_row if runs is None else pd.concat([runs, run_row], ignore_index=True)
    style = styles_table([style_row(layer, *STYLES[kind])])
    if styles is not None:
        style = pd.concat([styles[styles["f_table_name"] != layer], style], ignore_index=True)
    with atomic_path(out) as tmp:
        if out.exists():
            shutil.copyfile(out, tmp)
        else:
            tmp.unlink()
        created = {} if tmp.exists() else {"dataset_options": {"VERSION": "1.2"}}
        write_frame(frame, tmp, layer=layer, driver="GPKG", layer_options={"GEOMETRY_NAME": GEOMETRY_COLUMN},
                    **created)
        pyogrio.write_dataframe(runs, tmp, layer="runs", driver="GPKG")
        pyogrio.write_dataframe(style, tmp, layer="layer_styles", driver="GPKG")


def write_layers(out: Path, fmt: str, layer: str, villages: gpd.GeoDataFrame, candidates: gpd.GeoDataFrame,
                 tiles: gpd.GeoDataFrame, run: dict) -> None:
    """The output in ``fmt`` (:data:`FORMATS`): a GeoPackage gets every layer, the others the villages."""
    if fmt == "gpkg":
        write_geopackage(out, layer, villages, candidates, tiles, run)
    else:
        write_vector(out, fmt, villages)


def write_vector(out: Path, fmt: str, villages: gpd.GeoDataFrame) -> None:
    """The villages alone as GeoJSON (always WGS84), GeoParquet or FlatGeobuf."""
    if fmt not in FORMATS or fmt == "gpkg":
        raise InputError(f"format {fmt!r}: use {', '.join(f for f in FORMATS if f != 'gpkg')}", out, field="format")
    with atomic_path(out) as tmp:
        if fmt == "parquet":
            villages.to_parquet(tmp)
        else:
            data = villages.to_crs("EPSG:4326") if fmt == "geojson" else villages
            tmp.unlink()
            write_frame(data, tmp, driver=FORMATS[fmt].driver)
