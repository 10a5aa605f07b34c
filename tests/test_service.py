"""Tile services as input (issue 21, part 4): an XYZ server on 127.0.0.1 serving the Beijing val
tiles as standard 256 px tiles gives the villages of the GeoTIFF mosaic `uvsam import-xyz`
builds; tiles are fetched politely (rate, retries), cached, and a missing tile is no data."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from rasterio.warp import transform_bounds

from tests.conftest import run_cli
from tests.servers import http_server, xyz_pyramid
from tiles.errors import TilesError
from tiles.service import TileService, service_raster, tiles_covering, zoom_for


@pytest.fixture(scope="module")
def served(beijing, tmp_path_factory):
    """The val mosaic as z17 XYZ tiles (``ROOT/17/x/y.png``), its bbox in degrees and tile count."""
    root = tmp_path_factory.mktemp("xyz")
    n = xyz_pyramid(beijing / "val/images.vrt", 17, root)
    with rasterio.open(beijing / "val/images.vrt") as ds:
        bbox = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
    return root, bbox, n


def test_an_xyz_service_gives_the_villages_of_the_imported_mosaic(beijing, model, served, tmp_path, capsys):
    root, bbox, n = served
    area = ",".join(f"{v:.10f}" for v in bbox)
    code, _, err = run_cli(["predict", beijing / "val/images.vrt", "--model", model, "--out", tmp_path / "mosaic.gpkg",
                            "--local", "--no-quicklook"], capsys)
    assert code == 0, err
    with http_server(root) as server:
        server.faults = ["503", "drop", "429"]  # transient: retried with back-off
        t = time.perf_counter()
        code, stdout, err = run_cli(["predict", "--tiles", server.url + "/{z}/{x}/{y}.png", "--zoom", "17", "--bbox",
                                     area, "--tile-cache", tmp_path / "cache", "--requests-per-second", "20",
                                     "--model", model, "--out", tmp_path / "xyz.gpkg", "--local", "--no-quicklook"],
                               capsys)
        seconds = time.perf_counter() - t
        assert code == 0, err
        assert not server.faults and server.gets == n + 3 and server.max_in_flight <= 2
        assert seconds >= (n - 1) / 20  # the rate limit held
        a = pyogrio.read_dataframe(tmp_path / "mosaic.gpkg", layer="villages")
        b = pyogrio.read_dataframe(tmp_path / "xyz.gpkg", layer="villages")
        ua, ub = shapely.union_all(a.geometry.values), shapely.union_all(b.geometry.values)
        assert len(a) > 0 and ua.intersection(ub).area / ua.union(ub).area >= 0.99
        # a second run over the same area reads the cache: not one request
        code, _, err = run_cli(["predict", "--tiles", server.url + "/{z}/{x}/{y}.png", "--zoom", "17", "--bbox", area,
                                "--tile-cache", tmp_path / "cache", "--model", model, "--out", tmp_path / "again.gpkg",
                                "--local", "--no-quicklook"], capsys)
        assert code == 0, err
        assert server.gets == n + 3
        # a server that refuses: one line naming the tile, exit 2
        server.faults = ["403"]
        code, _, err = run_cli(["predict", "--tiles", server.url + "/{z}/{x}/{y}.png", "--zoom", "16", "--bbox", area,
                                "--tile-cache", tmp_path / "cache", "--model", model, "--out", tmp_path / "x.gpkg"],
                               capsys)
        assert code == 2 and err.count("\n") == 1 and "HTTP 403" in err and "/16/" in err, err
        assert not (tmp_path / "x.gpkg").exists()


def test_tms_rows_missing_tiles_and_the_zoom(served, tmp_path):
    """``{-y}`` counts rows from the south (TMS); a tile the server lacks (404) reads as no data,
    not black; the zoom follows the model's GSD when none is given."""
    root, bbox, n = served
    tms = tmp_path / "tms"
    for tile in root.glob("17/*/*.png"):  # the same tiles under TMS row numbers
        target = tms / "17" / tile.parent.name / f"{2**17 - 1 - int(tile.stem)}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tile, target)
    w, s, e, north = bbox
    wider = (w - (e - w) / 4, s, e, north)  # a quarter more to the west, where no tile is served
    with http_server(root) as xyz, http_server(tms) as flipped:
        a = service_raster(TileService(xyz.url + "/{z}/{x}/{y}.png", wider, 17, tmp_path / "c1", rate=100))
        b = service_raster(TileService(flipped.url + "/{z}/{x}/{-y}.png", wider, 17, tmp_path / "c2", rate=100))
        assert xyz.gets == flipped.gets == len(tiles_covering(wider, 17)) > n
    with rasterio.open(a) as da, rasterio.open(b) as db:
        pa, pb = da.read(), db.read()
        assert np.array_equal(pa, pb) and da.transform == db.transform
        alpha = pa[3]
        left = int(round((bbox[0] - wider[0]) / (e - wider[0]) * da.width)) - 2
        assert alpha[:, :left].max() == 0 and alpha[:, left + 8:].min() == 255  # unserved: no data
        assert pa[:3, :, left + 8:].std() > 10  # served: the imagery
        assert da.overviews(1)  # lower zooms, for a coarser model
    assert zoom_for(3.7, 40.0) == 15 and zoom_for(0.92, 40.0) == 17  # the coarsest as fine as the GSD
    assert zoom_for(0.9, 40.0) == 18
    with pytest.raises(TilesError, match="no {s}"):
        service_raster(TileService("https://{s}.tile.example/{z}/{x}/{y}.png", bbox, 17, tmp_path))
    with pytest.raises(TilesError, match="at most"):
        tiles_covering((100.0, 20.0, 120.0, 45.0), 17)


def test_dry_run_over_a_tile_service(served, model, tmp_path, capsys):
    root, bbox, n = served
    with http_server(root) as server:
        code, stdout, err = run_cli(["predict", "--tiles", server.url + "/{z}/{x}/{y}.png", "--zoom", "17", "--bbox",
                                     ",".join(map(str, bbox)), "--tile-cache", tmp_path, "--model", model, "--out",
                                     tmp_path / "v.gpkg", "--dry-run"], capsys)
    assert code == 0, err
    plan = json.loads(stdout)
    assert plan["tiles"] >= 1 and plan["km2"] > 1.0
