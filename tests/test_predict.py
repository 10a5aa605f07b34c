"""City-scale prediction (in progress, issue 5): polygons, refinement windows, GeoPackage layers,
the same output locally and on Dask, and the mask of a VRT mosaic kept when resampled."""

from __future__ import annotations

import json

import numpy as np
import pyogrio
import pytest
import shapely
from affine import Affine
from rasterio.windows import Window

from tests.conftest import run_cli
from tiles.reader import RasterSource, ReadOptions
from uvsam.polygons import clean, measure, merge, polygonise
from uvsam.predict import plan_windows
from uvsam.train import TrainConfig, train


@pytest.fixture(scope="module")
def model(beijing, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "m.ckpt"
    train(TrainConfig(images=str(beijing / "train/images"), labels=str(beijing / "train/masks"), out=str(out),
                      encoder="efficientvit_sam_l0",
                      gsd_m=3.7, crop=128, batch_size=4, epochs=4, steps_per_epoch=20, sam_epochs=1,
                      views_per_scene=1, warmup_steps=2, lr=2e-3), log=lambda m: None)
    return out


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


def _to_4326(xy):
    from pyproj import Transformer

    return np.column_stack(Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True).transform(xy[:, 0], xy[:, 1]))


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
    assert (v2020["acquired"] == "2020-07-01").all() and v2020["village_id"].is_unique
    assert v2020.crs.to_epsg() == 3857
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
    base = ["predict", beijing / "train/images.vrt", "--model", model, "--format", "geojson", "--no-refine"]
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
    from uvsam.predict import PredictConfig, run_local, run_prediction

    scene = [str(beijing / "train/images.vrt")]
    cfg = PredictConfig(tile=256, overlap=128)  # 4 x 4 tiles in batches of 4, then the refinement windows
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
    assert not any((tmp_path / "v.work/journal").iterdir())  # cleaned up after success
