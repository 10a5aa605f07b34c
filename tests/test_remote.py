"""Rasters where they live (issue 21, part 1): a COG behind HTTP on 127.0.0.1 (range requests,
ETag, Last-Modified) is predicted as the same file read locally, through transient 503s and
dropped connections, and a replaced object is a new scene for the journal."""

from __future__ import annotations

import json
import os
import time

import pyogrio
import rasterio
import shapely
from rasterio.io import MemoryFile
from rasterio.shutil import copy as raster_copy
from rasterio.windows import Window

from tests.conftest import run_cli
from tests.servers import http_server
from tiles.remote import RemotePath, location
from uvsam.prediction.journal import scene_identity

# 512 x 512 px of the summer val mosaic, three quarters villages (rows 512-1023, columns 256-767)
VILLAGES = Window(256, 512, 512, 512)


def _cog(src, dest, window: Window | None = None):
    """``src`` (or its ``window``) as a deflated Cloud-Optimised GeoTIFF at ``dest``."""
    if window is None:
        raster_copy(str(src), str(dest), driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=256)
        return dest
    with rasterio.open(src) as ds:
        profile = {**ds.profile, "driver": "GTiff", "width": window.width, "height": window.height,
                   "transform": ds.window_transform(window)}
        with MemoryFile() as mem, mem.open(**profile) as crop:
            crop.write(ds.read(window=window))
            raster_copy(crop, str(dest), driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=256)
    return dest


def test_a_cog_over_http_gives_the_villages_of_the_local_file(beijing, model, tmp_path, capsys):
    served = tmp_path / "served"
    served.mkdir()
    cog = _cog(beijing / "val/images.vrt", served / "scene.tif")
    local = tmp_path / "local.gpkg"
    code, _, err = run_cli(["predict", cog, "--model", model, "--out", local, "--local", "--no-quicklook"], capsys)
    assert code == 0, err
    with http_server(served) as server:
        url = f"{server.url}/scene.tif"
        assert isinstance(location(url), RemotePath) and location(url).name == "scene.tif"
        server.faults = ["503", "drop", "503"]  # transient failures first: retried with back-off
        remote = tmp_path / "remote.gpkg"
        code, _, err = run_cli(["predict", url, "--model", model, "--out", remote, "--local", "--no-quicklook"],
                               capsys)
        assert code == 0, err
        assert not server.faults and server.ranges > 0  # the faults were met, and the file read by ranges
        a = pyogrio.read_dataframe(local, layer="villages")
        b = pyogrio.read_dataframe(remote, layer="villages")
        assert len(a) == len(b) > 0 and sorted(a["village_id"]) == sorted(b["village_id"])
        assert shapely.equals_exact(shapely.union_all(a.geometry.values), shapely.union_all(b.geometry.values),
                                    tolerance=1e-6)
        # on Dask, two worker processes read the URL themselves (tasks carry the URL, not pixels);
        # small tiles, one per task, so that the scene is several tasks
        small = ["--tile", "128", "--overlap", "32", "--batch-size", "1", "--no-quicklook"]
        code, _, err = run_cli(["predict", cog, "--model", model, "--out", tmp_path / "small.gpkg", "--local", *small],
                               capsys)
        assert code == 0, err
        ranges, readers = server.ranges, set(server.clients)
        assert readers == {os.getpid()}
        server.faults = ["503", "drop"]
        code, _, err = run_cli(["predict", url, "--model", model, "--out", tmp_path / "dask.gpkg", "--dask",
                                "--workers", "2", *small], capsys)
        assert code == 0, err
        assert not server.faults and server.ranges > ranges
        assert len(server.clients - readers - {None}) == 2  # the two worker processes read it themselves
        a = pyogrio.read_dataframe(tmp_path / "small.gpkg", layer="villages")
        c = pyogrio.read_dataframe(tmp_path / "dask.gpkg", layer="villages")
        assert len(a) > 0 and sorted(a["village_id"]) == sorted(c["village_id"])
        assert shapely.equals_exact(shapely.union_all(a.geometry.values), shapely.union_all(c.geometry.values),
                                    tolerance=1e-6)
        # a replaced object is another scene: its journal is not the old one's
        before = scene_identity(url)
        time.sleep(1.1)
        _cog(beijing / "val/images.vrt", served / "scene.tif", VILLAGES)
        os.utime(served / "scene.tif")
        assert scene_identity(url) != before
        code, _, err = run_cli(["predict", f"{server.url}/missing.tif", "--model", model, "--out",
                                tmp_path / "m.gpkg"], capsys)
        assert code == 2 and err.count("\n") == 1 and "missing.tif" in err


def test_a_cog_in_s3_gives_the_villages_of_the_local_file(beijing, model, tmp_path, capsys, monkeypatch):
    """An S3-compatible server on 127.0.0.1 (moto's): ``s3://bucket/scene.tif`` read by GDAL with
    the usual AWS variables; its ETag keys the journal."""
    import boto3
    from moto.server import ThreadedMotoServer

    cog = _cog(beijing / "val/images.vrt", tmp_path / "scene.tif", VILLAGES)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
                           "AWS_S3_ENDPOINT": f"{host}:{port}", "AWS_HTTPS": "NO",
                           "AWS_VIRTUAL_HOSTING": "FALSE"}.items():
            monkeypatch.setenv(key, value)
        s3 = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1")
        s3.create_bucket(Bucket="city")
        s3.upload_file(str(cog), "city", "2019/scene.tif")
        url = "s3://city/2019/scene.tif"
        assert location(url).gdal == "/vsis3/city/2019/scene.tif"
        before = scene_identity(url)
        assert s3.head_object(Bucket="city", Key="2019/scene.tif")["ETag"] in before
        code, _, err = run_cli(["predict", url, "--model", model, "--out", tmp_path / "s3.gpkg", "--local",
                                "--no-quicklook"], capsys)
        assert code == 0, err
        code, _, err = run_cli(["predict", cog, "--model", model, "--out", tmp_path / "local.gpkg", "--local",
                                "--no-quicklook"], capsys)
        assert code == 0, err
        a = pyogrio.read_dataframe(tmp_path / "local.gpkg", layer="villages")
        b = pyogrio.read_dataframe(tmp_path / "s3.gpkg", layer="villages")
        assert len(a) == len(b) > 0
        assert shapely.equals_exact(shapely.union_all(a.geometry.values), shapely.union_all(b.geometry.values),
                                    tolerance=1e-6)
        s3.put_object(Bucket="city", Key="2019/scene.tif", Body=cog.read_bytes() + b"\0")  # replaced
        assert scene_identity(url) != before
    finally:
        server.stop()


def test_every_command_reads_rasters_where_they_live(beijing, model, mobile_sam_ckpt, data_dir, villages, tmp_path,
                                                     capsys):
    """segment, evaluate (the training loader), change --image and a workflow take URLs, and
    read the same pixels as from the files."""
    import numpy as np
    import rasterio
    from affine import Affine

    from tests.test_change import _write_years

    served = tmp_path / "served"
    served.mkdir()
    rgb = _cog(data_dir / "rasterio-rgb" / "RGB.byte.tif", served / "rgb.tif")
    tile = beijing / "train/images/49566_107866.tif"
    _cog(tile, served / "2018.tif")
    with rasterio.open(tile) as ds:  # the 2020 imagery shifted 6 m east, 4 m south
        k = 1 / np.cos(np.radians(39.95))
        with rasterio.open(served / "2020.tif", "w", **dict(ds.profile, transform=Affine.translation(6 * k, -4 * k)
                                                                                @ ds.transform)) as out:
            out.write(ds.read())
    name = sorted(p.name for p in (beijing / "val/images").glob("*.tif"))[0]
    val = _cog(beijing / "val/images" / name, served / name)
    with http_server(served) as server:
        masks = []
        for src in (rgb, f"{server.url}/rgb.tif"):
            out = tmp_path / f"mask{len(masks)}.tif"
            code, _, err = run_cli(["segment", src, "--encoder", "mobile_sam", "--checkpoint", mobile_sam_ckpt,
                                    "--box", "200,150,600,550", "--out", out], capsys)
            assert code == 0, err
            with rasterio.open(out) as m:
                masks.append(m.read(1))
        assert masks[0].any() and np.array_equal(*masks)

        scores = []
        for src in (val, f"{server.url}/{name}"):
            code, stdout, err = run_cli(["evaluate", "--model", model, "--images", src, "--labels",
                                         beijing / "val/masks" / name, "--specialist-only"], capsys)
            assert code == 0, err
            scores.append(json.loads(stdout))
        assert scores[0] == scores[1]

        years = _write_years(villages, tmp_path / "years.gpkg", 2)
        code, stdout, err = run_cli(["change", f"2018={years}:villages_2018", f"2020={years}:villages_2020", "--out",
                                     tmp_path / "c.gpkg", "--image", f"2018={server.url}/2018.tif", "--image",
                                     f"2020={server.url}/2020.tif"], capsys)
        assert code == 0, err
        assert "warning: the 2020 imagery is shifted 7." in err  # measured on the pixels read over HTTP

        workflow = tmp_path / "wf" / "city.yaml"
        workflow.parent.mkdir()
        workflow.write_text(f"name: city\nmodel: {model}\nout: out.gpkg\nyears:\n"
                            f"  - layer: y2019\n    scenes: [{server.url}/{name}]\n")
        code, stdout, err = run_cli(["run", workflow, "--dry-run"], capsys)
        assert code == 0, err
        assert json.loads(stdout)[0]["scenes"][0]["scene"] == f"{server.url}/{name}"


def test_a_store_without_versions_is_keyed_by_the_raster_itself(beijing, tmp_path):
    """``/vsizip/`` (and gs://, az://, servers without ETag): the journal's key is read from the
    raster's header and smallest overview; a re-encoded scene is a new key, an untouched one not."""
    import zipfile

    import rasterio

    cog = _cog(beijing / "val/images.vrt", tmp_path / "a.tif")
    archive = tmp_path / "scenes.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(cog, "scene.tif")
    path = location(f"/vsizip/{archive}/scene.tif")
    assert isinstance(path, RemotePath) and path.name == "scene.tif"
    first = scene_identity(path)
    assert scene_identity(path) == first
    with rasterio.open(cog) as ds:
        profile, pixels = ds.profile, ds.read()
    pixels[:, 500:508, 700:708] = 0  # 8 x 8 pixels edited
    with rasterio.open(tmp_path / "b.tif", "w", **dict(profile, driver="GTiff")) as out:
        out.write(pixels)
    with zipfile.ZipFile(archive, "w") as z:
        z.write(_cog(tmp_path / "b.tif", tmp_path / "b.cog.tif"), "scene.tif")
    assert scene_identity(path) != first
