"""Rasters where they live (issue 21, part 1): a COG behind HTTP on 127.0.0.1 (range requests,
ETag, Last-Modified) is predicted as the same file read locally, through transient 503s and
dropped connections, and a replaced object is a new scene for the journal."""

from __future__ import annotations

import os
import time

import pyogrio
import shapely
from rasterio.shutil import copy as raster_copy

from tests.conftest import run_cli
from tests.servers import http_server
from tiles.remote import RemotePath, location
from uvsam.prediction.journal import scene_identity


def _cog(src, dest):
    raster_copy(str(src), str(dest), driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=256)
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
        # a replaced object is another scene: its journal is not the old one's
        before = scene_identity(url)
        time.sleep(1.1)
        _cog(beijing / "val/images.vrt", served / "scene.tif")
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

    cog = _cog(beijing / "val/images.vrt", tmp_path / "scene.tif")
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
