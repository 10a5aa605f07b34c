"""STAC in and out (issue 21, parts 2 and 3): a static catalogue written here and served over HTTP
on 127.0.0.1, a STAC API answering searches, and the Items and Collection uvsam writes, validated
against the STAC schemas offline."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import pyogrio
import pystac
import pytest
import rasterio
import shapely
from rasterio.shutil import copy as raster_copy
from rasterio.warp import transform_bounds

from tests.conftest import run_cli
from tests.servers import http_server, stac_api_server
from uvsam.errors import ConfigError, InputError
from uvsam.stac.items import validate
from uvsam.stac.scenes import StacQuery, find_stac_scenes, interval

DATES = ["2019-05-20", "2021-06-03"]


@pytest.fixture(scope="module")
def catalogue(beijing, tmp_path_factory) -> Path:
    """Two val tiles as COGs, each an item of its own date (a visual asset and a thumbnail), in a
    self-contained static catalogue: ``ROOT/catalog.json``."""
    root = tmp_path_factory.mktemp("stac")
    cat = pystac.Catalog(id="beijing", description="Beijing val tiles, two dates")
    for date, tile in zip(DATES, sorted((beijing / "val/images").glob("*.tif")), strict=False):
        with rasterio.open(tile) as ds:
            bbox = list(transform_bounds(ds.crs, "EPSG:4326", *ds.bounds))
        item = pystac.Item(id=tile.stem, bbox=bbox, properties={},
                           geometry={"type": "Polygon", "coordinates": [[(bbox[0], bbox[1]), (bbox[2], bbox[1]),
                                                                         (bbox[2], bbox[3]), (bbox[0], bbox[3]),
                                                                         (bbox[0], bbox[1])]]},
                           datetime=datetime.fromisoformat(date).replace(hour=3, tzinfo=timezone.utc))
        folder = root / tile.stem
        folder.mkdir()
        raster_copy(str(tile), str(folder / "visual.tif"), driver="COG", COMPRESS="DEFLATE")
        item.add_asset("visual", pystac.Asset("./visual.tif", media_type=pystac.MediaType.COG, roles=["visual"]))
        item.add_asset("thumbnail", pystac.Asset("./thumb.png", media_type=pystac.MediaType.PNG, roles=["thumbnail"]))
        cat.add_item(item)
    cat.normalize_hrefs(str(root))
    cat.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    return root


def test_predict_over_a_served_catalogue_dates_villages_by_their_items(catalogue, model, tmp_path, capsys):
    with http_server(catalogue) as server:
        out = tmp_path / "v.gpkg"
        code, stdout, err = run_cli(["predict", "--stac", f"{server.url}/catalog.json", "--model", model, "--out", out,
                                     "--probabilities", tmp_path / "p.tif", "--local"], capsys)
        assert code == 0, err
        assert server.ranges > 0  # the assets were read by ranges over HTTP
    villages = pyogrio.read_dataframe(out, layer="villages")
    assert len(villages) > 0
    by_scene = {s: sorted({str(d)[:10] for d in g["acquired"]}) for s, g in villages.groupby("scene")}
    assert sorted(tuple(v) for v in by_scene.values()) == [(DATES[0],), (DATES[1],)]  # each scene its item's
    runs = pyogrio.read_dataframe(out, layer="runs")
    assert [s["item_id"] for s in json.loads(runs["stac_items"].iloc[-1])] == sorted(
        p.name for p in catalogue.iterdir() if p.is_dir())

    item_file = Path(json.loads(stdout)["stac_item"])
    assert item_file == tmp_path / "v.stac.json"
    checked = validate(item_file)  # core + projection, raster and file extensions, offline
    assert any("projection" in s for s in checked) and any("raster" in s for s in checked)
    assert any("/file/" in s for s in checked)
    item = pystac.Item.from_file(str(item_file))
    assert item.datetime is None and item.common_metadata.start_datetime.date().isoformat() == DATES[0]
    assert item.common_metadata.end_datetime.date().isoformat() == DATES[1]
    assert len(item.get_links("derived_from")) == 2
    assert item.properties["uvsam:model_sha256"] == hashlib.sha256(Path(model).read_bytes()).hexdigest()
    assert {"villages", "quicklook"} <= set(item.assets), err
    assert sum(k.startswith("probabilities") for k in item.assets) == 2
    for asset in item.assets.values():  # relative hrefs to the files written, with their checksums
        assert not Path(asset.href).is_absolute()
        path = Path(asset.get_absolute_href())
        assert asset.extra_fields["file:checksum"] == "1220" + hashlib.sha256(path.read_bytes()).hexdigest()
    prob = next(a for k, a in item.assets.items() if k.startswith("probabilities"))
    with rasterio.open(prob.get_absolute_href()) as ds:
        assert prob.extra_fields["proj:shape"] == [ds.height, ds.width]
        assert prob.extra_fields["proj:transform"] == pytest.approx(list(ds.transform)[:6])
    # the footprint covers every village
    area = shapely.geometry.shape(item.geometry).buffer(1e-6)
    assert area.contains(shapely.union_all(villages.to_crs(4326).geometry.values))
    # the Python API takes the same sources
    import uvsam

    later = uvsam.predict(None, model, tmp_path / "api.gpkg", stac=str(catalogue / "catalog.json"), datetime="2021")
    assert len(later) > 0 and {str(d)[:10] for d in later["acquired"]} == {DATES[1]}
    assert later.attrs["stac_item"] == str(tmp_path / "api.stac.json")


def test_stac_selection_and_its_errors(catalogue, tmp_path, capsys):
    cat = str(catalogue / "catalog.json")
    both = find_stac_scenes(StacQuery(cat))
    assert [s.acquired for s in both] == DATES and all(s.asset == "visual" for s in both)
    assert Path(both[0].href).is_file() and Path(both[0].href).is_absolute()
    later = find_stac_scenes(StacQuery(cat, datetime="2020-01-01/.."))
    assert [s.acquired for s in later] == [DATES[1]]
    assert [s.acquired for s in find_stac_scenes(StacQuery(cat, datetime="2019"))] == [DATES[0]]
    # a single Item file and an ItemCollection are sources too
    item_file = next(catalogue.glob("*/*.json"))
    assert len(find_stac_scenes(StacQuery(str(item_file)))) == 1
    collection = tmp_path / "items.json"
    items = [pystac.Item.from_file(str(p)) for p in sorted(catalogue.glob("*/*.json"))]
    for it in items:
        it.make_asset_hrefs_absolute()
    collection.write_text(json.dumps(pystac.ItemCollection(items).to_dict()))
    assert [s.acquired for s in find_stac_scenes(StacQuery(str(collection)))] == DATES
    with pytest.raises(InputError, match="no STAC item matches bbox"):
        find_stac_scenes(StacQuery(cat, bbox=(10.0, 50.0, 11.0, 51.0)))
    with pytest.raises(InputError, match="has no asset 'nir'.*visual, thumbnail"):
        find_stac_scenes(StacQuery(cat, asset="nir"))
    with pytest.raises(ConfigError):
        interval("2021/2019")
    assert interval("2019-06")[1] == datetime(2019, 6, 30, 23, 59, 59, 999999, tzinfo=timezone.utc)
    # on the command line: one line, exit 2, nothing written
    for args, words in [(["--stac", cat, "--bbox", "10,50,11"], "--bbox"),
                        (["--stac", cat, "--datetime", "June"], "--datetime"),
                        (["--stac", cat, "--acquired", "2019-01-01"], "--acquired is not for STAC items"),
                        (["--bbox", "10,50,11,51"], "--bbox is the area"),
                        ([], "give the scenes"),
                        (["--stac", str(tmp_path / "none.json")], "STAC source does not exist")]:
        out = tmp_path / "x.gpkg"
        code, _, err = run_cli(["predict", *args, "--model", tmp_path / "m.ckpt", "--out", out], capsys)
        assert code == 2 and err.count("\n") == 1 and words in err, (args, err)
        assert not out.exists()


def test_a_stac_api_is_searched(catalogue):
    """A URL whose landing page conforms to item-search is searched with pystac-client."""
    items = []
    for p in sorted(catalogue.glob("*/*.json")):
        it = pystac.Item.from_file(str(p))
        it.make_asset_hrefs_absolute()
        items.append(it.to_dict())
    with stac_api_server(items) as api:
        scenes = find_stac_scenes(StacQuery(api.url, datetime="2021"))
        assert [s.acquired for s in scenes] == [DATES[1]] and Path(scenes[0].href).is_file()
        assert api.searches and "2021" in str(api.searches[-1].get("datetime"))


def test_a_workflow_reads_each_year_from_stac_and_writes_a_collection(catalogue, model, tmp_path, capsys):
    wf = tmp_path / "city.yaml"
    wf.write_text(f"name: city\nmodel: {model}\nout: out/villages.gpkg\nexecution: {{local: true}}\nyears:\n"
                  f"  - layer: y2019\n    stac: {{source: {catalogue / 'catalog.json'}, datetime: '2019'}}\n"
                  f"  - layer: y2021\n    stac: {{source: {catalogue / 'catalog.json'}, datetime: '2021'}}\n")
    code, stdout, err = run_cli(["run", wf], capsys)
    assert code == 0, err
    summaries = json.loads(stdout)
    collection = Path(summaries[0]["stac_collection"])
    assert collection == tmp_path / "out/villages.collection.json"
    checked = validate(collection)  # the collection and both items
    assert not [link for link in json.loads(collection.read_text())["links"] if link["href"].startswith("/")]
    assert sum(s.endswith("item.json") for s in checked) == 2
    for layer, date in zip(("y2019", "y2021"), DATES, strict=True):
        v = pyogrio.read_dataframe(tmp_path / "out/villages.gpkg", layer=layer)
        assert {str(d)[:10] for d in v["acquired"]} == {date}
        item = pystac.Item.from_file(str(tmp_path / f"out/villages_{layer}.stac.json"))
        assert item.datetime.date().isoformat() == date
        gpkg = item.assets["villages"]  # the checksum of the GeoPackage as the workflow left it
        assert gpkg.extra_fields["file:checksum"] == "1220" + hashlib.sha256(
            (tmp_path / "out/villages.gpkg").read_bytes()).hexdigest()
