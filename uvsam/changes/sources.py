"""The inputs of a change analysis: each year's village layer (``YEAR=FILE[:LAYER]``) and imagery (``YEAR=RASTER``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import pyogrio

from tiles.errors import first_line
from tiles.reader import RasterSource
from tiles.remote import location
from uvsam.datasets import split_layer
from uvsam.errors import ConfigError, InputError
from uvsam.files import read_features
from uvsam.polygons import nonfinite, repair


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
    path, layer = split_layer(rest)
    if not year.strip():
        raise InputError(f"{spec!r}: the year label is empty")
    return year.strip(), path, layer


def read_named_layer(path: Path, layer: str | None, usable, form: str) -> tuple[str, gpd.GeoDataFrame]:
    """``layer`` of ``path`` (or its one layer ``usable`` accepts) and its features, georeferenced;
    one line naming the file otherwise (``form``: how to name a layer, for the message)."""
    if not path.is_file():
        raise InputError("file does not exist", path)
    try:
        layers = [name for name, _ in pyogrio.list_layers(path)]
    except Exception as e:  # noqa: BLE001 - not a vector file
        raise InputError(f"not a vector file GDAL can read ({first_line(e)})", path) from None
    if layer is None:
        candidates = [n for n in layers if usable(n)]
        if len(candidates) != 1:
            raise InputError(f"holds layers {', '.join(layers)}: name one as {form}", path)
        layer = candidates[0]
    elif layer not in layers:
        raise InputError(f"has no layer {layer!r} (layers: {', '.join(layers)})", path)
    gdf = read_features(path, layer)
    if gdf.crs is None:
        raise InputError(f"layer {layer!r} has no CRS", path)
    return layer, gdf


def read_layer(spec: str) -> YearLayer:
    """The polygons of one ``YEAR=FILE[:LAYER]`` (any OGR polygon layer; one-layer files need no name)."""
    year, path, layer = parse_spec(spec)
    skipped = ("runs", "layer_styles", "candidates", "tiles")
    layer, gdf = read_named_layer(path, layer, lambda n: n not in skipped and not n.endswith(("_candidates", "_tiles")),
                       f"{year}={path}:LAYER")
    kinds = set(gdf.geometry.geom_type.dropna())
    if not kinds <= {"Polygon", "MultiPolygon"}:
        raise InputError(f"layer {layer!r} holds {', '.join(sorted(kinds))}, not polygons", path)
    gdf = gdf[~gdf.geometry.is_empty & gdf.geometry.notna()].copy()
    bad = nonfinite(gdf.geometry.values)
    if len(bad):
        raise InputError(f"layer {layer!r}: {len(bad)} feature(s) have NaN or infinite coordinates; fix or remove "
                         "them", path)
    gdf["geometry"] = repair(gdf.geometry.values)  # bounded, whatever the file holds (uvsam.polygons.valid_parts)
    gdf = gdf[gdf.geometry.notna()].explode(index_parts=False, ignore_index=True)
    gdf = gdf[gdf.geometry.geom_type == "Polygon"].reset_index(drop=True)
    return YearLayer(year, f"{path}:{layer}", gdf)


def read_belts(spec: str) -> gpd.GeoDataFrame:
    """The features of ``FILE[:LAYER]`` that belts are made of: ring roads (lines) or areas (polygons)."""
    path, layer = split_layer(spec)
    layer, gdf = read_named_layer(path, layer, lambda n: n != "layer_styles", f"{path}:LAYER")
    kinds = set(gdf.geometry.geom_type.dropna())
    if not kinds or not kinds <= {"Polygon", "MultiPolygon", "LineString", "MultiLineString", "LinearRing"}:
        raise InputError(f"layer {layer!r} holds {', '.join(sorted(kinds)) or 'no geometry'}, not ring roads "
                         "(lines) or belts (polygons)", path)
    return gdf


def year_specs(specs: list[str], years: list[str], field: str, form: str) -> list[tuple[str, str]]:
    """``YEAR=VALUE`` specs -> (year, value) pairs, each year one of ``years``; ConfigErrors name
    ``field`` and the ``form`` expected (``YEAR=RASTER``)."""
    out = []
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(f"{spec!r}: give {form}", field=field)
        year, value = spec.split("=", 1)
        if year not in years:
            raise ConfigError(f"{spec!r}: year {year!r} is not one of {', '.join(years)}", field=field)
        out.append((year, value))
    return out


def parse_images(specs: list[str], years: list[str]) -> dict[str, Path]:
    """``YEAR=RASTER`` specs -> {year: path}, each year one of ``years`` and each file present."""
    out = {}
    for year, path in year_specs(specs, years, "image", "YEAR=RASTER"):
        path = location(path)  # a file, or a URL / /vsi path GDAL reads by ranges
        if not path.is_file():
            raise InputError("image does not exist", path)
        with RasterSource(path) as src:  # readable, whole and georeferenced, before any work
            if src.crs is None:
                raise InputError("image has no CRS", path)
            if not src.read_overview(250_000)[1].any():
                raise InputError("image has no valid pixels (all nodata or NaN)", path)
        out[year] = path
    return out
