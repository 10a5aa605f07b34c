"""City-scale prediction (in progress, issue 5): polygons, refinement windows, GeoPackage layers,
the same output locally and on Dask, and the mask of a VRT mosaic kept when resampled."""

from __future__ import annotations

import json
import shutil
import sqlite3

import numpy as np
import pandas as pd
import pyogrio
import pytest
import shapely
from affine import Affine
from PIL import Image
from rasterio.windows import Window

from tests.conftest import outline_hits, run_cli
from tiles.reader import RasterSource, ReadOptions
from uvsam.pictures import VILLAGE_RGB, Picture
from uvsam.polygons import clean, measure, merge, polygonise
from uvsam.prediction import plan_windows


def test_resampled_vrt_mosaic_keeps_its_gaps_as_nodata(beijing):
    """The train mosaic's gaps (no tile there) stay invalid when read at another GSD."""
    vrt = beijing / "train/images.vrt"
    fractions = []
    for opts in (ReadOptions(), ReadOptions(gsd=3.7)):
        with RasterSource(vrt, opts) as src:
            _, valid = src.read(Window(0, 0, src.width, src.height))
            fractions.append(valid.mean())
    assert 0.5 < fractions[0] < 0.9
    assert fractions[1] == pytest.approx(fractions[0], abs=0.01)


def test_polygons_are_cleaned_in_metres_whatever_the_crs(beijing_mask):
    transform = Affine(1.194, 0, 12942317.6, 0, -1.194, 4882797.4)  # the Beijing grid, EPSG:3857
    pieces = polygonise(beijing_mask[:512] > 0, transform) + polygonise(
        beijing_mask[512:] > 0, transform @ Affine.translation(0, 512))
    whole = merge(pieces)
    assert len(whole) == len(merge(polygonise(beijing_mask > 0, transform)))  # cut at row 512, merged back
    raw_area = measure(whole, "EPSG:3857")[0].sum()
    cleaned = clean(whole, "EPSG:3857", min_area_m2=100.0, simplify_m=2.0)
    area = measure(cleaned, "EPSG:3857")[0].sum()
    ground_px = (1.194 * np.cos(np.radians(40.0))) ** 2  # a Web-Mercator pixel on the ground at Beijing
    assert raw_area == pytest.approx((beijing_mask > 0).sum() * ground_px, rel=0.01)
    assert abs(area - raw_area) / raw_area < 0.01
    geo = [shapely.transform(p, _to_4326) for p in cleaned]
    np.testing.assert_allclose(measure(geo, "EPSG:4326")[0], measure(cleaned, "EPSG:3857")[0], rtol=1e-4)
    ring = shapely.box(0, 0, 100, 100).difference(shapely.box(40, 40, 60, 60))  # a 400 m^2 hole
    assert len(clean([ring], "EPSG:32650", 300.0, 0)[0].interiors) == 1
    assert len(clean([ring], "EPSG:32650", 500.0, 0)[0].interiors) == 0
    from uvsam.polygons import valid_polygons

    bowtie = shapely.Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])  # self-crossing: two triangles once repaired
    fixed = valid_polygons([ring, bowtie])
    assert fixed[0].equals(ring) and len(fixed) == 3 and all(p.is_valid for p in fixed)
    assert sum(p.area for p in fixed[1:]) == pytest.approx(50.0)



def test_a_village_is_cleaned_the_same_alone_or_with_the_whole_scene(beijing_mask):
    """Simplified in the pixels it was traced on, a village's outline does not depend on which
    other villages are cleaned with it (a city cleans thousands at once, a test one)."""
    from uvsam.polygons import clean_each

    ground_m = 1.194 * np.cos(np.radians(40.0))
    transform = Affine(1.194, 0, 12942317.6, 0, -1.194, 4882797.4)
    villages = merge(polygonise(beijing_mask > 0, transform))
    assert len(villages) >= 2
    together = clean_each(villages, "EPSG:3857", 100.0, 2 * ground_m, (transform, ground_m))
    for v, cleaned in zip(villages, together, strict=True):
        alone = clean_each([v], "EPSG:3857", 100.0, 2 * ground_m, (transform, ground_m))[0]
        assert [p.wkb for p in alone] == [p.wkb for p in cleaned]
    kept = [p for ps in together for p in ps]
    raw = measure(villages, "EPSG:3857")[0].sum()
    assert 0 < len(kept) <= len(villages)
    assert measure(kept, "EPSG:3857")[0].sum() == pytest.approx(raw, rel=0.02)  # simplified, not reshaped

def _to_4326(xy):
    from pyproj import Transformer

    return np.column_stack(Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True).transform(xy[:, 0], xy[:, 1]))


def test_candidates_are_the_same_from_any_block_size_and_lose_only_specks(beijing_mask, tmp_path):
    """The mosaic is vectorised in square blocks (memory bounded on wide scenes): pieces cut by
    block edges merge back, and only specks away from any edge are dropped before polygonising."""
    import rasterio

    from uvsam.prediction import candidates_from_mosaic, drop_specks

    prob = np.where(beijing_mask > 0, 0.9, 0.1).astype(np.float32)
    clear = [(r, c) for r in range(40, 1000, 97) for c in range(40, 1000, 89)
             if not beijing_mask[r - 20 : r + 20, c - 20 : c + 20].any()]
    specks = clear[:: max(1, len(clear) // 4)][:4]  # 3 x 3 px specks away from the villages
    assert len(specks) == 4
    for r, c in specks:
        prob[r : r + 3, c : c + 3] = 0.8
    prob[-2:, :4] = np.nan  # no data never counts as village
    path = tmp_path / "prob.tif"
    with rasterio.open(path, "w", driver="GTiff", width=1024, height=1024, count=1, dtype="float32", crs="EPSG:3857",
                       transform=Affine(1.194, 0, 12942317.6, 0, -1.194, 4882797.4), nodata=float("nan")) as ds:
        ds.write(prob, 1)
    whole = candidates_from_mosaic(path, 0.5, 2048)
    blocks = candidates_from_mosaic(path, 0.5, 300)  # 4 x 4 blocks, villages cut across them
    assert len(blocks) == len(whole) == len(merge(polygonise(beijing_mask > 0, Affine.identity()))) + len(specks)
    ua, ub = shapely.union_all(blocks), shapely.union_all(whole)
    assert ua.symmetric_difference(ub).area < 1e-9 * ub.area  # the same up to rounding
    # in one order (top to bottom, left to right), however they were found: what follows depends on it
    tops = [-p.bounds[3] for p in whole]
    assert tops == sorted(tops) and np.allclose([p.bounds for p in blocks], [p.bounds for p in whole])
    kept = candidates_from_mosaic(path, 0.5, 2048, min_pixels=20)
    assert len(kept) == len(whole) - len(specks)
    assert shapely.union_all(kept).area == pytest.approx(shapely.union_all(whole).area - len(specks) * 9 * 1.194**2)
    edge = np.zeros((50, 50), bool)
    edge[0:2, 10:12] = edge[20:22, 20:22] = True
    assert drop_specks(edge, 5).sum() == 4  # the one on the edge may go on in the next block: kept


def test_execution_runs_in_process_unless_dask_pays_off(monkeypatch):
    from uvsam.prediction import runs_in_process

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert runs_in_process(None) and not runs_in_process(False) and runs_in_process(True, "tcp://h:1")
    assert not runs_in_process(None, workers=2) and not runs_in_process(None, scheduler="tcp://h:1")
    monkeypatch.setattr("os.cpu_count", lambda: 32)
    assert not runs_in_process(None) and runs_in_process(True)


def test_refinement_windows_hold_their_candidates():
    boxes = np.array([[10, 10, 60, 60], [70, 20, 120, 90], [1000, 1000, 1900, 1300]], np.float32)
    windows = plan_windows(boxes, size=256, margin=16)
    small = [w for w in windows if 0 in w.members]
    assert len(small) == 1 and 1 in small[0].members  # neighbours share one window
    big = [w for w in windows if 2 in w.members]
    assert len(big) >= 4  # a large candidate gets overlapping windows covering its box
    covered = shapely.union_all([shapely.box(w.col, w.row, w.col + w.size, w.row + w.size) for w in big])
    assert covered.contains(shapely.box(*boxes[2]))


def test_predict_writes_geopackage_layers_and_keeps_other_years(beijing, model, tmp_path, capsys):
    out = tmp_path / "villages.gpkg"
    args = ["predict", beijing / "train/images.vrt", "--model", model, "--out", out, "--local"]
    code, stdout, err = run_cli(args + ["--layer", "y2020", "--acquired", "2020-07-01"], capsys)
    assert code == 0, err
    layers = {name for name, _ in pyogrio.list_layers(out)}
    assert {"y2020", "y2020_candidates", "y2020_tiles", "runs", "layer_styles"} <= layers
    v2020 = pyogrio.read_dataframe(out, layer="y2020")
    assert set(v2020.columns) >= {"village_id", "area_m2", "perimeter_m", "mean_prob", "refined", "scene",
                                  "acquired", "model_sha256", "run_id", "geometry"}
    assert len(v2020) > 0 and (v2020["area_m2"] >= 2500).all() and v2020.geometry.is_valid.all()
    assert (v2020["acquired"] == pd.Timestamp("2020-07-01")).all() and v2020["village_id"].is_unique
    with sqlite3.connect(out) as db:  # a GeoPackage DATE, not text
        assert dict((r[1], r[2]) for r in db.execute("PRAGMA table_info(y2020)"))["acquired"] == "DATE"
    assert v2020.crs.to_epsg() == 3857
    # the quicklook beside it: the scene with the villages outlined in their layer colour
    png = tmp_path / "villages_y2020.png"
    image = np.asarray(Image.open(png).convert("RGB"))
    assert Picture.read(png).size == image.shape[1::-1] and image.std() > 20  # not blank
    assert outline_hits(png, v2020.geometry, VILLAGE_RGB) > 0.9
    tiles = pyogrio.read_dataframe(out, layer="y2020_tiles")
    assert set(tiles["status"]) <= {"done", "nodata"} and (tiles["status"] == "done").any()
    done = tiles[tiles["status"] == "done"]
    assert (done["seconds"] > 0).all() and done["valid_fraction"].between(0, 1).all()
    code, stdout, err = run_cli(args + ["--layer", "y2021", "--crs", "EPSG:4326", "--no-refine"], capsys)
    assert code == 0, err
    again = pyogrio.read_dataframe(out, layer="y2020")
    assert again.equals(v2020)  # the other year is untouched
    runs = pyogrio.read_dataframe(out, layer="runs")
    assert list(runs["layer"]) == ["y2020", "y2021"] and json.loads(runs["config"][0])["tile"] == 512
    assert pyogrio.read_dataframe(out, layer="y2021").crs.to_epsg() == 4326
    assert "QGIS" not in err and pyogrio.read_dataframe(out, layer="layer_styles")["styleQML"].str.contains(
        "SimpleFill").all()


def test_predict_on_dask_equals_the_local_run(beijing, model, tmp_path, capsys):
    base = ["predict", beijing / "train/images.vrt", "--model", model, "--no-refine"]  # GeoJSON by the extension
    code, _, err = run_cli(base + ["--out", tmp_path / "local.geojson", "--local"], capsys)
    assert code == 0, err
    code, _, err = run_cli(base + ["--out", tmp_path / "dask.geojson", "--workers", 1], capsys)
    assert code == 0, err
    a = pyogrio.read_dataframe(tmp_path / "local.geojson")
    b = pyogrio.read_dataframe(tmp_path / "dask.geojson")
    assert a.crs.to_epsg() == 4326 and len(a) == len(b) > 0
    assert sorted(a["village_id"]) == sorted(b["village_id"])


def test_predict_refuses_a_non_raster_without_writing(beijing, model, tmp_path, capsys):
    bad = tmp_path / "scene.tif"
    bad.write_text("not a raster")
    out = tmp_path / "v.gpkg"
    code, _, err = run_cli(["predict", bad, "--model", model, "--out", out, "--local"], capsys)
    assert code == 2 and err.count("\n") == 1 and "scene.tif" in err
    assert not out.exists()


def test_interrupted_prediction_resumes_to_the_same_layers(beijing, model, tmp_path):
    from uvsam.prediction import PredictConfig, run_local, run_prediction

    scene = [str(beijing / "train/images.vrt")]
    # 4 x 4 tiles in batches of 4, then the windows (forced: the test model's generalist is random)
    cfg = PredictConfig(tile=256, overlap=128, batch_size=4, force_refine=True)
    quiet = lambda m: None  # noqa: E731
    def counting(into: list):
        def run(fn, arg_list):
            for result in run_local(fn, arg_list):
                into.append(fn.__name__)
                yield result
        return run

    ref = tmp_path / "ref.gpkg"
    everything: list[str] = []
    run_prediction(scene, model, ref, cfg, runner=counting(everything), log=quiet)
    assert everything.count("specialist_batch") == 4 and "refine_window" in everything  # 16 tiles, 4 a batch
    executed = []

    def dying(fn, arg_list):
        for args in arg_list:
            if len(executed) == 5:
                raise KeyboardInterrupt  # as if killed after five tasks
            executed.append(fn.__name__)
            yield fn(*args)

    out = tmp_path / "v.gpkg"
    with pytest.raises(KeyboardInterrupt):
        run_prediction(scene, model, out, cfg, runner=dying, log=quiet)
    assert not out.exists()  # nothing half-written
    resumed: list[str] = []
    run_prediction(scene, model, out, cfg, runner=counting(resumed), log=quiet)
    assert len(resumed) == len(everything) - 5  # the five finished tasks were not run again
    a, b = pyogrio.read_dataframe(ref, layer="villages"), pyogrio.read_dataframe(out, layer="villages")
    assert len(a) > 0 and a.drop(columns="geometry").equals(b.drop(columns="geometry"))
    assert all(x.equals_exact(y, 1e-9) for x, y in zip(a.geometry, b.geometry, strict=True))
    assert not (tmp_path / "v.work").exists()  # cleaned up after success


def test_polygons_do_not_depend_on_where_the_tile_grid_falls(beijing, model, tmp_path):
    """Issue 5 acceptance: the import-xyz mosaic predicted with the grid shifted by half a tile
    gives the same villages (union IoU >= 0.99), none duplicated or split along tile seams."""
    from dataclasses import replace

    from uvsam.prediction import PredictConfig, model_info, predict_scene, run_local

    scene = beijing / "train/images.vrt"
    info = model_info(model)
    cfg = PredictConfig(tile=128, overlap=64, force_refine=True)  # tiles of 474 m; the random generalist runs
    tasks: list[str] = []

    def counting(fn, arg_list):
        for result in run_local(fn, arg_list):
            tasks.append(fn.__name__)
            yield result

    runs = {off: predict_scene(scene, info, replace(cfg, grid_offset=off), tmp_path / f"w{off}", counting)
            for off in (0, 64)}
    a, b = runs[0], runs[64]
    assert len(a.tiles) >= 16 and len(a.villages) > 0  # a multi-tile mosaic...
    assert tasks.count("refine_window") >= 2  # ...whose candidates went through the generalist
    ua, ub = shapely.union_all(a.villages), shapely.union_all(b.villages)
    assert ua.intersection(ub).area / ua.union(ub).area >= 0.99
    assert len(a.villages) == len(b.villages)
    edges = shapely.union_all([t["geometry"].boundary for t in a.tiles])
    assert sum(c.intersects(edges) for c in a.villages) >= 2  # villages cross tile edges (the seams)...
    for polys in (a.villages, a.candidates, b.villages):  # ...and every one is one polygon, sharing no edge
        tree = shapely.STRtree(polys)  # with another (corners may touch: pixels meeting diagonally)
        left, right = tree.query(polys, predicate="intersects")
        for i, j in zip(left, right, strict=True):
            if i < j:
                shared = polys[i].intersection(polys[j])
                assert shared.area == 0 and shapely.length(shapely.line_merge(shapely.boundary(polys[i])
                                                                             .intersection(polys[j]))) == 0


def _layers_equal(a_path, b_path, layer="villages", b_layer=None):
    a, b = pyogrio.read_dataframe(a_path, layer=layer), pyogrio.read_dataframe(b_path, layer=b_layer or layer)
    a, b = a.drop(columns=["run_id"], errors="ignore"), b.drop(columns=["run_id"], errors="ignore")
    assert len(a) > 0 and a.drop(columns="geometry").equals(b.drop(columns="geometry"))
    assert all(x.equals_exact(y, 1e-9) for x, y in zip(a.geometry, b.geometry, strict=True))


KILL_ARGS = ["--local", "--tile", "128", "--overlap", "64"]  # 36 tiles in 18 batches, then the windows


@pytest.fixture(scope="module")
def reference(beijing, model, tmp_path_factory):
    """An undisturbed run of the settings the interruption tests use."""
    from uvsam.cli import main

    out = tmp_path_factory.mktemp("reference") / "ref.gpkg"
    assert main([str(a) for a in ["predict", beijing / "train/images.vrt", "--model", model, "--out", out,
                                  *KILL_ARGS]]) == 0
    return out


def _journaled(journal, kind: str) -> int:
    return sum(len(list(d.glob(f"{kind}-*"))) for d in journal.iterdir()) if journal.is_dir() else 0


KILL_POINTS = {  # when to SIGKILL, by what the run has left on disk (then a random 0-0.3 s more)
    "reading": lambda out, journal: journal.is_dir(),  # the first batch is being read
    "model": lambda out, journal: _journaled(journal, "tiles") >= 3,  # specialist batches under way
    "vectorising": lambda out, journal: _journaled(journal, "tiles") >= 9,  # all tiles in: candidates,
    # generalist windows and polygons
    "writing": lambda out, journal: any(out.parent.glob(f".{out.stem}.*.part.gpkg")),  # the new file being written
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_prediction_resumes_to_the_same_polygons(beijing, model, reference, point, tmp_path, capsys):
    """SIGKILL (no chance to clean up) at a random moment of each stage, into an output file that
    already holds another year's layer; then run the same command again. The existing file is
    never left corrupt or changed by the killed run, and the re-run writes the same polygons as
    an undisturbed run, with the other layer untouched."""
    import hashlib
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    rng = random.Random(f"kill-{point}")
    out = tmp_path / "v.gpkg"
    shutil.copyfile(reference, out)  # a file the user has: the reference layers plus another year's
    pyogrio.write_dataframe(pyogrio.read_dataframe(reference, layer="villages"), out, layer="y2018", driver="GPKG")
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    args = ["predict", beijing / "train/images.vrt", "--model", model, *KILL_ARGS, "--layer", "y2020"]
    proc = subprocess.Popen([sys.executable, "-m", "uvsam", *map(str, args), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = tmp_path / "v.work/y2020/journal"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not KILL_POINTS[point](out, journal):
        time.sleep(0.005)
    if point != "writing":
        time.sleep(rng.uniform(0, 0.3))
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before  # the existing file, byte for byte
    assert {"villages", "y2018"} <= {n for n, _ in pyogrio.list_layers(out)}
    code, _, err = run_cli(args + ["--out", out], capsys)
    assert code == 0, err
    _layers_equal(reference, out, "villages", "y2020")
    _layers_equal(reference, out, "villages", "villages")
    _layers_equal(reference, out, "villages", "y2018")


def test_a_killed_dask_worker_loses_nothing(beijing, model, reference, tmp_path):
    """One of two workers is killed after the first results arrive; the run still completes,
    with exactly the polygons of an undisturbed run."""
    import os
    import signal

    from uvsam.prediction import PredictConfig, model_info, run_prediction
    from uvsam.prediction.distributed import dask_runner, make_client, register_model

    scene = [str(beijing / "train/images.vrt")]
    cfg = PredictConfig(tile=128, overlap=64)  # as KILL_ARGS
    with make_client(workers=2, threads=1) as client:
        register_model(client, model_info(model))
        pids = client.run(os.getpid)
        runner = dask_runner(client)
        killed = []

        def killing(fn, arg_list):
            for i, result in enumerate(runner(fn, arg_list)):
                if i == 1 and not killed:  # the next tasks are already on both workers
                    victim = sorted(pids)[0]
                    os.kill(pids[victim], signal.SIGKILL)
                    killed.append(victim)
                yield result

        run_prediction(scene, model, tmp_path / "dask.gpkg", cfg, runner=killing, log=lambda m: None)
        assert killed and pids[killed[0]] not in client.run(os.getpid).values()  # it really died
    _layers_equal(reference, tmp_path / "dask.gpkg")


def _geodesic(gdf):
    """Area (m2) and perimeter (m, holes' boundaries included) of each polygon on the WGS84
    ellipsoid: an independent measure."""
    from pyproj import Geod

    geod = Geod(ellps="WGS84")
    polys = list(gdf.to_crs(4326).geometry)
    area = np.abs([geod.geometry_area_perimeter(g)[0] for g in polys])
    return area, np.array([geod.geometry_length(g.boundary) for g in polys])


def _check_gpkg(path, layer, epsg):
    """The file as GDAL (ogrinfo, and pyogrio) and SQLite see it: a GeoPackage with the layer's CRS and schema."""
    import shutil
    import sqlite3
    import subprocess

    ogrinfo = shutil.which("ogrinfo")
    assert ogrinfo, "ogrinfo not found: install GDAL's tools (Debian: apt-get install gdal-bin); the README's test " \
        "command does this"
    text = subprocess.run([ogrinfo, "-so", "-ro", str(path), layer], capture_output=True, text=True, check=True).stdout
    assert "Driver: GPKG" in text or "using driver `GPKG'" in text
    assert f'ID["EPSG",{epsg}]' in text
    for field in ("village_id: String", "area_m2: Real", "perimeter_m: Real", "mean_prob: Real", "refined: Integer"):
        assert field in text, text

    info = pyogrio.read_info(path, layer=layer)
    assert info["driver"] == "GPKG" and info["geometry_type"] in ("Polygon", "MultiPolygon", "Unknown")
    fields = dict(zip(info["fields"], info["dtypes"], strict=True))
    assert {"village_id": "object", "area_m2": "float64", "perimeter_m": "float64", "mean_prob": "float64",
            "refined": "bool", "scene": "object", "model_sha256": "object",
            "run_id": "object"}.items() <= fields.items()
    assert info["crs"] == f"EPSG:{epsg}"
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA application_id").fetchone()[0] == 0x47504B47  # 'GPKG'
        srs = db.execute("SELECT srs_id FROM gpkg_contents WHERE table_name = ?", (layer,)).fetchone()[0]
        assert db.execute("SELECT organization_coordsys_id FROM gpkg_spatial_ref_sys WHERE srs_id = ?",
                          (srs,)).fetchone()[0] == epsg


def test_areas_are_square_metres_in_degrees_and_in_web_mercator(beijing, model, data_dir, tmp_path, capsys):
    """Scenes in EPSG:4326 (SpaceNet Rio chips) and in EPSG:3857 (Beijing): each village's
    area_m2 and perimeter_m agree with geodesic measures on the ellipsoid."""
    rio = str(data_dir / "spacenet-rio/image/*img5[0-7].tif")  # a glob: 8 chips, 8 scenes
    # the chips are ~200 m across, under the suitability check's 64 px at 3.7 m: forced
    for scene, epsg, extra in ((rio, 4326, ["--threshold", "0.3", "--min-village-area", "100", "--force"]),
                               (beijing / "val/images.vrt", 3857, [])):
        out = tmp_path / f"{epsg}.gpkg"
        code, _, err = run_cli(["predict", scene, "--model", model, "--out", out, "--local", "--no-refine", *extra],
                               capsys)
        assert code == 0, err
        _check_gpkg(out, "villages", epsg)
        v = pyogrio.read_dataframe(out, layer="villages")
        assert len(v) > 0 and v.crs.to_epsg() == epsg
        area, perimeter = _geodesic(v)
        np.testing.assert_allclose(v["area_m2"], area, rtol=0.005)
        np.testing.assert_allclose(v["perimeter_m"], perimeter, rtol=0.005)
        if epsg == 3857:  # Web Mercator "metres" are 1/cos(40 deg) too long at Beijing: not what is stored
            assert (v.geometry.area / v["area_m2"]).between(1.6, 1.8).all()


def test_probabilities_are_an_output_on_the_exact_grid_of_the_model_gsd(beijing, model, tmp_path, capsys):
    """``--probabilities``: a COG whose pixel spans the model's GSD on the ground (the working
    mosaic may be within 1 % of it), 0..1, high inside the villages the layer holds."""
    import rasterio
    from rasterio.features import geometry_mask

    from tiles.reader import ground_resolution
    from uvsam.modelfile import ModelFile

    out, prob = tmp_path / "v.gpkg", tmp_path / "p.tif"
    code, _, err = run_cli(["predict", beijing / "val/images.vrt", "--model", model, "--out", out, "--local",
                            "--probabilities", prob, "--no-refine"], capsys)
    assert code == 0, err
    gsd = ModelFile.read(model).gsd_m
    villages = pyogrio.read_dataframe(out, layer="villages")
    with rasterio.open(prob) as ds:
        assert ds.profile["driver"] == "GTiff" and ds.dtypes[0] == "float32" and ds.profile["tiled"]
        np.testing.assert_allclose(ground_resolution(ds.crs, ds.transform, ds.width, ds.height), gsd, rtol=1e-6)
        p = ds.read(1)
        inside = ~geometry_mask(villages.to_crs(ds.crs).geometry, p.shape, ds.transform)
    assert np.nanmin(p) >= 0 and np.nanmax(p) <= 1 and np.isfinite(p).mean() > 0.9
    assert len(villages) > 0 and np.nanmean(p[inside]) > 0.5 > np.nanmean(p[~inside])
    code, _, err = run_cli(["predict", beijing / "val/images.vrt", "--model", model, "--out", tmp_path / "w.gpkg",
                            "--probabilities", tmp_path / "p.png"], capsys)
    assert code == 2 and "--probabilities" in err and err.count("\n") == 1 and not (tmp_path / "w.gpkg").exists()


def test_the_python_api_gives_what_the_command_line_gives(beijing, model, tmp_path, capsys):
    """``uvsam.predict`` (options as keywords) returns the layer the same command writes; ``import
    uvsam`` alone loads no torch."""
    import subprocess
    import sys

    import uvsam

    light = subprocess.run([sys.executable, "-c", "import sys, uvsam; print('torch' in sys.modules, uvsam.__all__)"],
                           capture_output=True, text=True, check=True).stdout
    assert light.startswith("False") and "predict" in light
    scene = beijing / "val/images.vrt"
    code, _, err = run_cli(["predict", scene, "--model", model, "--out", tmp_path / "cli.gpkg", "--local",
                            "--threshold", "0.4", "--no-refine"], capsys)
    assert code == 0, err
    frame = uvsam.predict(scene, model, tmp_path / "api.gpkg", threshold=0.4, refine=False, quicklook=False)
    cli = pyogrio.read_dataframe(tmp_path / "cli.gpkg", layer="villages")
    assert len(frame) == len(cli) > 0 and frame.attrs["villages"] == len(cli)
    assert shapely.equals_exact(shapely.union_all(frame.geometry.values), shapely.union_all(cli.geometry.values),
                                tolerance=1e-6)
    assert frame.attrs["quicklook"] is None and not (tmp_path / "api.png").exists()


def test_dry_run_estimates_what_will_run(beijing, model, tmp_path):
    """The generalist is measured only when it will refine (not with the test model's random
    weights), the estimate includes the preparation a run spends too, and nothing is written."""
    from uvsam.prediction import PredictConfig, dry_run

    est = dry_run([str(beijing / "train/images.vrt")], model)
    assert est["generalist_s_per_window"] == 0.0 and "refinement off" in est["estimate_note"]
    assert est["tiles"] > 1 and est["specialist_s_per_tile"] > 0
    assert est["estimated_s"] >= est["preparation_s"] + est["tiles"] * est["specialist_s_per_tile"] - 0.1
    forced = dry_run([str(beijing / "train/images.vrt")], model, PredictConfig(force_refine=True))
    assert forced["generalist_s_per_window"] > 0
    assert not list(tmp_path.iterdir())


def test_shapely_work_split_over_threads_gives_the_same_geometries(beijing_mask):
    """Candidates traced with 8-connected pixels have rings that touch themselves; making them
    valid (and simplifying) in chunks on several threads gives the very same geometries, in order."""
    import threading

    from uvsam.polygons import THREADED_MIN_COORDS, threaded

    mask = (beijing_mask > 0) & (np.random.default_rng(0).random(beijing_mask.shape) > 0.03)  # a noisy mosaic
    mask[::64], mask[:, ::64] = False, False  # cut into blocks: many pieces
    transform = Affine(1.194, 0, 12942317.6, 0, -1.194, 4882797.4)
    polys = np.array(polygonise(mask, transform), dtype=object)
    assert (~shapely.is_valid(polys)).sum() >= 3 and len(polys) >= 100
    assert shapely.get_num_coordinates(polys).sum() > 2 * THREADED_MIN_COORDS
    seen = set()

    def make_valid(g):
        seen.add(threading.current_thread().name)
        return shapely.make_valid(g)

    together = threaded(make_valid, polys, workers=2)
    assert len(seen) == 2 and all(name.startswith("uvsam-shapely") for name in seen)
    alone = shapely.make_valid(polys)
    assert len(together) == len(alone) and all(shapely.equals_exact(together, alone, 0))
    assert shapely.is_valid(together).all()
    simplified = threaded(shapely.simplify, polys, 2.0, workers=2, preserve_topology=True)
    assert all(shapely.equals_exact(simplified, shapely.simplify(polys, 2.0, preserve_topology=True), 0))
    seen.clear()
    assert threaded(make_valid, polys[:2], workers=4).tolist() == shapely.make_valid(polys[:2]).tolist()
    assert seen == {threading.current_thread().name}  # a few outlines: no thread started
    assert len(threaded(shapely.make_valid, np.array([], dtype=object))) == 0
