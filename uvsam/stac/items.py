"""A prediction's outputs as STAC: an Item per predict run (``OUT.stac.json``, or
``OUT_LAYER.stac.json`` for a named layer) and a Collection of a workflow's years
(``OUT.collection.json``).

The Item covers the scenes' footprint (WGS84), is dated by the imagery (one acquisition date, or
``start_datetime``/``end_datetime`` over several; the run's time when no date is known) and lists
the written outputs as assets with relative hrefs (the folder can move): the village layers, the
probability COGs and the quicklook, each with its size and SHA-256 (file extension, multihash),
and the rasters with their grid (projection extension) and band (raster extension). Source
items read through ``--stac`` are linked as ``derived_from``; the model's SHA-256, the run id
and the uvsam version are properties.

:func:`validate` checks a written file against the STAC schemas offline: pystac ships the core
schemas and ``schemas/`` the three extensions' official ones (Apache-2.0, from stac-extensions).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import geopandas as gpd
import pystac
import shapely
from pyproj import CRS
from pystac.extensions.file import FileExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension

from uvsam.errors import InputError
from uvsam.files import atomic_path, sha256_file
from uvsam.stac.scenes import StacScene

COG = "image/tiff; application=geotiff; profile=cloud-optimized"
SCHEMAS = Path(__file__).with_name("schemas")


def item_path(out: Path, layer: str) -> Path:
    """Where a run's Item goes: ``OUT.stac.json``, or ``OUT_LAYER.stac.json`` for a named layer."""
    return out.with_name(f"{out.stem}.stac.json" if layer == "villages" else f"{out.stem}_{layer}.stac.json")


def collection_path(out: Path) -> Path:
    """Where a workflow's Collection goes: ``OUT.collection.json``."""
    return out.with_name(f"{out.stem}.collection.json")


def footprint(scenes: list[tuple[str, tuple[float, ...], int, int]]) -> shapely.Geometry:
    """The union of the scenes' extents in WGS84, (crs, transform, width, height) each, edges
    densified so that a projected outline stays true in degrees."""
    shapes = []
    for crs, transform, width, height in scenes:
        a, b, c, d, e, f = transform[:6]
        corners = [(0, 0), (width, 0), (width, height), (0, height)]
        ring = shapely.Polygon([(a * x + b * y + c, d * x + e * y + f) for x, y in corners])
        step = max(ring.length / 400, 1e-9)
        shapes.append(gpd.GeoSeries([shapely.segmentize(ring, step)], crs=crs).to_crs(4326).iloc[0])
    return shapely.simplify(shapely.union_all(shapes), 1e-6).normalize()  # collinear points gone (~0.1 m)


def file_fields(asset: pystac.Asset, path: Path) -> None:
    ext = FileExtension.ext(asset, add_if_missing=True)
    ext.size = path.stat().st_size
    ext.checksum = "1220" + sha256_file(path)  # multihash: sha2-256, 32 bytes


def projection_code(crs) -> str | None:
    """``AUTHORITY:CODE`` of a CRS, or None where it has none."""
    auth = CRS.from_user_input(crs).to_authority()
    return f"{auth[0]}:{auth[1]}" if auth else None


def add_raster(item: pystac.Item, key: str, path: Path, title: str, gsd_m: float) -> None:
    """A probability COG as ``item``'s asset ``key``: one float32 band 0-1, NaN nodata, its grid."""
    import rasterio

    asset = pystac.Asset(href=str(path), media_type=COG, roles=["data"], title=title)
    item.add_asset(key, asset)
    with rasterio.open(path) as ds:
        proj = ProjectionExtension.ext(asset, add_if_missing=True)
        proj.code = projection_code(ds.crs)
        if proj.code is None:
            proj.wkt2 = ds.crs.to_wkt()
        proj.shape = [ds.height, ds.width]
        proj.transform = list(ds.transform)[:6]
        proj.bbox = list(ds.bounds)
        RasterExtension.ext(asset, add_if_missing=True).bands = [RasterBand.create(
            data_type=DataType.FLOAT32, nodata="nan", spatial_resolution=gsd_m, unit="probability")]
    file_fields(asset, path)


def build_item(out: Path, fmt, layer: str, run: dict, scenes: list[tuple[str, tuple[float, ...], int, int]],
               dates: list[str | None], out_crs, probabilities: list[Path], quicklook: Path | None,
               sources: list[StacScene], gsd_m: float) -> pystac.Item:
    """The Item of one predict run (see the module docstring); ``run`` is its runs-table row,
    ``scenes`` (crs, transform, width, height) of each scene, ``dates`` their acquisition dates."""
    shape = footprint(scenes)
    finished = datetime.fromisoformat(run["finished"])
    known = sorted({d for d in dates if d})
    when = {"datetime": finished}
    if len(known) == 1:
        when = {"datetime": datetime.fromisoformat(known[0]).replace(tzinfo=timezone.utc)}
    elif known:
        when = {"datetime": None, "start_datetime": datetime.fromisoformat(known[0]).replace(tzinfo=timezone.utc),
                "end_datetime": datetime.fromisoformat(known[-1]).replace(tzinfo=timezone.utc)}
    props = {"created": run["finished"], "title": f"uvsam villages: {layer}",
             "uvsam:layer": layer, "uvsam:run_id": run["run_id"], "uvsam:model_sha256": run["model_sha256"],
             "uvsam:model": Path(run["model"]).name, "uvsam:model_gsd_m": gsd_m, "uvsam:version": run["uvsam_version"],
             "uvsam:refinement": run["refinement"], "uvsam:acquired": dates,
             "uvsam:scenes": json.loads(run["scenes"])}
    item = pystac.Item(id=f"uvsam-{layer}-{run['run_id']}", geometry=shapely.geometry.mapping(shape),
                       bbox=list(shape.bounds), properties=props, **when)
    if when["datetime"] is None:
        item.common_metadata.start_datetime = when["start_datetime"]
        item.common_metadata.end_datetime = when["end_datetime"]
    layers = pystac.Asset(href=str(out), media_type=fmt.media_type, roles=["data"],
                          title=f"village polygons (layer {layer})" if fmt.name == "gpkg" else "village polygons")
    item.add_asset("villages", layers)
    ProjectionExtension.ext(layers, add_if_missing=True).code = projection_code(out_crs)
    file_fields(layers, out)
    for path in probabilities:  # one per scene: OUT_SCENE.tif, keyed by the scene
        key = "probabilities" if len(probabilities) == 1 else f"probabilities_{path.stem.split('_', 1)[-1]}"
        add_raster(item, key, path, f"village probability 0-1 at {gsd_m:g} m", gsd_m)
    if quicklook is not None:
        picture = pystac.Asset(href=str(quicklook), media_type=pystac.MediaType.PNG, roles=["overview"],
                               title="quicklook: scenes with the villages outlined")
        item.add_asset("quicklook", picture)
        file_fields(picture, quicklook)
    for source in sources:
        if source.item_href:
            item.add_link(pystac.Link("derived_from", source.item_href, pystac.MediaType.JSON,
                                      title=f"{source.item_id} ({source.asset})"))
    return item


def write_item(item: pystac.Item, path: Path) -> Path:
    """``item`` as JSON at ``path`` (atomically), its asset hrefs relative to it."""
    item.set_self_href(str(path.resolve()))
    item.make_asset_hrefs_relative()
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(item.to_dict(include_self_link=False), indent=1) + "\n")
    return path


def refresh_files(item_file: Path) -> None:
    """Re-measure the size and SHA-256 of an Item's assets (a GeoPackage a later year's layer was
    written into has changed since its Item was) and rewrite the Item."""
    item = pystac.Item.from_file(str(item_file.resolve()))
    for asset in item.assets.values():
        file_fields(asset, Path(asset.get_absolute_href()))
    write_item(item, item_file)


def write_collection(path: Path, name: str, item_files: list[Path], description: str) -> Path:
    """A Collection of a workflow's Items (one per year), linked by relative hrefs; the Items'
    checksums re-measured first (the years share one GeoPackage)."""
    for p in item_files:
        refresh_files(p)
    items = [pystac.Item.from_file(str(p.resolve())) for p in item_files]
    extent = pystac.Extent(
        pystac.SpatialExtent([list(shapely.union_all([shapely.box(*i.bbox) for i in items]).bounds)]),
        pystac.TemporalExtent([[min(_times(i)[0] for i in items), max(_times(i)[1] for i in items)]]))
    collection = pystac.Collection(id=f"uvsam-{name}", description=description, extent=extent, license="other",
                                   title=f"uvsam villages: {name}")
    collection.set_self_href(str(path.resolve()))
    for p in item_files:  # relative, so that the folder can move
        collection.add_link(pystac.Link("item", "./" + os.path.relpath(p.resolve(), path.resolve().parent),
                                        pystac.MediaType.GEOJSON))
    record = collection.to_dict(include_self_link=False)
    for link in record["links"]:  # the root is the collection itself: relative too
        if link["rel"] == "root":
            link["href"] = f"./{path.name}"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    return path


def _times(item: pystac.Item) -> tuple[datetime, datetime]:
    if item.datetime is not None:
        return item.datetime, item.datetime
    return item.common_metadata.start_datetime, item.common_metadata.end_datetime


def validator() -> pystac.validation.JsonSchemaSTACValidator:
    """pystac's JSON-schema validator with the shipped extension schemas in its cache (offline)."""
    from pystac.validation import JsonSchemaSTACValidator

    v = JsonSchemaSTACValidator()
    for f in sorted(SCHEMAS.glob("*.json")):
        schema = json.loads(f.read_text())
        v.schema_cache[schema["$id"].rstrip("#")] = schema
    return v


def validate(path: str | Path) -> list[str]:
    """Validate a written STAC Item or Collection (and the items a collection links) against the
    schemas; returns the schema URIs checked. InputError naming the file where one fails."""
    from pystac.errors import STACValidationError

    path = Path(path)
    obj = pystac.read_file(str(path.resolve()))
    checked = []
    v = validator()
    for o in [obj, *(obj.get_items() if isinstance(obj, pystac.Collection) else [])]:
        try:
            checked += pystac.validation.validate(o, validator=v)
        except STACValidationError as e:
            raise InputError(f"not valid STAC ({str(e).splitlines()[0][:200]})", o.get_self_href() or path) from None
    return checked
