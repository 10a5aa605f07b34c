"""`uvsam bench-prompts`: the seeds' click rule on hand-made masks, and the protocol on real
SpaceNet footprints in any CRS."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.features import rasterize

from tests.conftest import run_cli
from uvsam.prompt_bench import next_click, size_class


def _square(shape=(30, 30), r0=5, r1=15, c0=5, c1=15) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


def test_the_first_click_is_the_innermost_point_of_the_object():
    gt = _square()  # rows and columns 5..14: four centre pixels 5 px from the edge, the first in raster order
    none = np.zeros_like(gt)
    assert next_click(gt, none, none) == (9, 9, True)
    clicked = none.copy()
    clicked[9, 9] = True  # never twice on one pixel: the next of the four
    assert next_click(gt, none, clicked) == (9, 10, True)


def test_the_larger_error_region_gets_the_click():
    gt = _square()
    pred = gt.copy()
    pred[20:29, 20:29] = True  # a false alarm 9 px wide, reaching 5 px from its edge
    pred[8:11, 8:11] = False  # a miss 3 px wide, 2 px from its edge
    none = np.zeros_like(gt)
    assert next_click(gt, pred, none) == (24, 24, False)  # negative, at the false alarm's centre
    pred[20:29, 20:29] = False
    assert next_click(gt, pred, none) == (9, 9, True)  # positive, in the hole
    tie = gt.copy()
    tie[9:10, 9:10] = False  # a one-pixel miss and a one-pixel false alarm: a tie goes to the false alarm
    tie[0, 29] = True
    r, c, positive = next_click(gt, tie, none)
    assert (r, c, positive) == (0, 29, False)


def test_the_image_border_is_a_boundary():
    gt = np.zeros((30, 30), bool)
    pred = np.zeros_like(gt)
    pred[:6, :] = True  # a false alarm along the top edge: deepest 3 px in, not at the edge
    r, c, positive = next_click(gt, pred, np.zeros_like(gt))
    assert (r, positive) == (2, False) and c == 2


def test_size_classes_are_coco_s_in_pixels():
    assert [size_class(a) for a in (1, 1023, 1024, 9215, 9216)] == ["small", "small", "medium", "medium", "large"]


@pytest.mark.parametrize("crs", [None, "EPSG:3857"])
def test_real_footprints_in_any_crs_are_scored_per_object(data_dir, mobile_sam_ckpt, tmp_path, capsys, crs):
    """SpaceNet Atlanta: each footprint is placed on the image whatever its layer's CRS (its own,
    UTM 16N, or Web Mercator), its area is its rasterised footprint, and every object has a box and
    a 1- and 2-click IoU; the summary is their mean; a random mobile_sam is named as unverified."""
    image = data_dir / "spacenet-atlanta/atlanta_pan_uint16.tif"
    objects = data_dir / "spacenet-atlanta/atlanta_buildings.geojson"
    if crs is not None:
        moved = tmp_path / "moved.gpkg"
        gpd.read_file(objects).to_crs(crs).to_file(moved)
        objects = moved
    out = tmp_path / "bench.json"
    code, stdout, err = run_cli(["bench-prompts", "--encoder", "mobile_sam", "--checkpoint", mobile_sam_ckpt,
                                 "--images", image, "--objects", objects, "--clicks", "1,2", "--max-objects", "4",
                                 "--out", out], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert json.loads(stdout)["objects"] == result["objects"] == 4 and not result["verified"]
    rows = result["per_object"]
    truth = gpd.read_file(data_dir / "spacenet-atlanta/atlanta_buildings.geojson")
    with rasterio.open(image) as src:
        truth = truth.to_crs(src.crs)
        for row in rows:
            mask = rasterize([truth.geometry.iloc[row["object"]]], out_shape=src.shape, transform=src.transform)
            assert row["area_px"] == int(mask.sum()) and row["size"] == size_class(row["area_px"])
            assert row["area_m2"] == pytest.approx(row["area_px"] * 0.25, rel=1e-3)
    for prompt in ("box", "1_click", "2_clicks"):
        assert all(0.0 <= r[prompt] <= 1.0 for r in rows)
        assert result["miou"][prompt]["all"] == pytest.approx(np.mean([r[prompt] for r in rows]), abs=1e-4)
    assert "| box |" in out.with_suffix(".md").read_text()


def test_bad_prompt_bench_inputs_are_refused_in_one_line(data_dir, mobile_sam_ckpt, tmp_path, capsys):
    image = data_dir / "spacenet-atlanta/atlanta_pan_uint16.tif"
    far = tmp_path / "far.geojson"
    far.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, "geometry": '
                   '{"type": "Polygon", "coordinates": [[[10, 10], [10.001, 10], [10.001, 10.001], [10, 10]]]}}]}')
    base = ["bench-prompts", "--encoder", "mobile_sam", "--checkpoint", mobile_sam_ckpt, "--images", image,
            "--out", tmp_path / "b.json"]
    for args, expected in (([*base, "--objects", far], "none of its 1 objects lies on the 1 image(s)"),
                           ([*base, "--objects", tmp_path / "nope.gpkg"], "objects file does not exist"),
                           ([*base, "--objects", far, "--clicks", "0,2"], "give whole numbers of clicks")):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and expected in err and err.count("\n") == 1, err
        assert not (tmp_path / "b.json").exists()
