"""The change analysis on disk: a GeoPackage of events, tracked villages and summaries, and a CSV per table.

The layers are written in a CRS QGIS knows by its authority code (the years' own CRS when they
share one, else the UTM zone of the area), with stored default styles: ``changes`` coloured by
lifecycle as in the report, ``villages_tracked`` outlined by year and labelled with their ids.
Areas are ground square metres from the equal-area analysis CRS whatever the output CRS.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyogrio
from pyproj import CRS

from uvsam.changes.track import LIFECYCLE_COLOURS, LIFECYCLES, ChangeResult
from uvsam.errors import ConfigError, InputError
from uvsam.files import atomic_path
from uvsam.layers import (
    GEOMETRY_COLUMN,
    category_list,
    fill_symbol,
    hex_rgba,
    label_with,
    qml_document,
    style_row,
    styles_table,
    write_frame,
)

YEAR_PALETTE = ("#ffd700", "#00e5ff", "#ff4081", "#76ff03", "#ff9100", "#d500f9", "#ffffff", "#2979ff")


def parse_crs(crs: str | CRS) -> CRS:
    """The output CRS ``crs`` as a pyproj CRS, or a ConfigError naming it (field ``output_crs``)."""
    try:
        return CRS.from_user_input(crs)
    except Exception as e:  # noqa: BLE001 - pyproj's CRSError
        raise ConfigError(f"{crs!r} is not a CRS ({str(e).splitlines()[0][:100]})", field="output_crs") from None


def output_crs(result: ChangeResult, sources: list[CRS], crs: str | CRS | None = None) -> CRS:
    """The CRS the layers are written in: ``crs``; else the years' own CRS when they share one
    with an authority code; else the WGS 84 UTM zone of the villages' centre."""
    if crs:
        return parse_crs(crs)
    shared = {c.to_wkt() for c in sources}
    if len(shared) == 1 and sources[0].to_authority() is not None:
        return CRS.from_user_input(sources[0])
    if result.crs.to_authority() is not None:
        return result.crs
    if not len(result.villages):  # nothing to place a zone on: the analysis CRS, whatever it is
        return result.crs
    return result.villages.estimate_utm_crs("WGS 84")


def changes_qml() -> str:
    """Events categorised by lifecycle, in the report's colours."""
    return qml_document('type="categorizedSymbol" attr="lifecycle"',
                        [fill_symbol(str(k), hex_rgba(LIFECYCLE_COLOURS[c], 190), hex_rgba(LIFECYCLE_COLOURS[c]))
                         for k, c in enumerate(LIFECYCLES)],
                        categories=category_list([(c, c) for c in LIFECYCLES]))


def tracked_qml(years: list[str]) -> str:
    """Every year's villages outlined in that year's colour, labelled with the persistent id."""
    return qml_document('type="categorizedSymbol" attr="year"',
                        [fill_symbol(str(k), "0,0,0,0", hex_rgba(YEAR_PALETTE[k % len(YEAR_PALETTE)]), "no",
                                     width=0.5) for k in range(len(years))],
                        categories=category_list([(y, y) for y in years]), labeling=label_with("village_uid"))


def write_outputs(out: str | Path, result: ChangeResult, tables: dict[str, pd.DataFrame], run: dict,
                  crs: str | CRS | None = None, sources: list[CRS] | None = None) -> list[Path]:
    """The GeoPackage (``villages_tracked``, ``changes``, one table per summary, ``runs``,
    ``layer_styles``) and a CSV per summary beside it (``OUT_years.csv``, ...); every file
    replaced atomically.

    Layers are written in ``crs`` (default: :func:`output_crs` of the years' CRS ``sources``);
    areas stay ground square metres.
    """
    out = Path(out)
    if not out.parent.is_dir():
        raise InputError("output folder does not exist", out.parent)
    target = output_crs(result, sources or [], crs)
    tables = {"years": result.years, **tables}
    run = {**run, "crs": target.to_string()}
    run_row = pd.DataFrame([{k: v if isinstance(v, str | int | float | bool) or v is None else json.dumps(v)
                             for k, v in run.items()}])
    years = list(result.years["year"])
    styles = styles_table([
        style_row("villages_tracked", tracked_qml(years), "uvsam default: villages of every year outlined in the "
                  "year's colour, labelled with their persistent id"),
        style_row("changes", changes_qml(), "uvsam default: changes coloured by lifecycle, as in the report")])
    with atomic_path(out) as tmp:
        tmp.unlink()
        # villages first, changes on top (QGIS adds a file's layers in order); GeoPackage 1.2
        created = {"dataset_options": {"VERSION": "1.2"}}
        for name, frame in (("villages_tracked", result.villages), ("changes", result.changes)):
            write_frame(frame.to_crs(target), tmp, layer=name, driver="GPKG",
                        layer_options={"GEOMETRY_NAME": GEOMETRY_COLUMN}, **created)
            created = {}
        for name, table in tables.items():
            pyogrio.write_dataframe(table, tmp, layer=name, driver="GPKG")
        pyogrio.write_dataframe(run_row, tmp, layer="runs", driver="GPKG")
        pyogrio.write_dataframe(styles, tmp, layer="layer_styles", driver="GPKG")
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
