"""FastSAM's selection rules over objects (issue 24): points, boxes, text."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import shapely

from uvsam.errors import InputError
from uvsam.selection import box_iou, by_boxes, by_points, by_text

from .conftest import run_cli


@pytest.fixture()
def squares():
    """A big square holding a small one, and a third apart (metres, EPSG:3857)."""
    geoms = [shapely.box(0, 0, 100, 100), shapely.box(10, 10, 30, 30), shapely.box(200, 0, 250, 50)]
    return gpd.GeoDataFrame({"object_id": ["big", "small", "apart"]}, geometry=geoms, crs="EPSG:3857")


def test_points_select_and_cut_like_fastsam(squares):
    # a point in the small square lies in the big one too: both are selected (FastSAM sets their pixels)
    got = by_points(squares, [(20, 20)])
    assert got["object_id"].tolist() == ["big", "small"]
    # an exclude point in the small square drops it and cuts it out of the big one
    got = by_points(squares, [(50, 50)], [(20, 20)])
    assert got["object_id"].tolist() == ["big"] and got.geometry.iloc[0].area == pytest.approx(100 * 100 - 20 * 20)
    assert by_points(squares, [(150, 150)]).empty  # nothing under the point
    with pytest.raises(InputError):
        by_points(squares, [], [(20, 20)])


def test_boxes_pick_fastsam_iou(squares):
    iou = box_iou(squares, (5, 5, 35, 35))
    # |object ∩ box| / (|box| + |object| - |object ∩ box|)
    assert iou == pytest.approx([900 / (900 + 10000 - 900), 400 / 900, 0.0])
    got = by_boxes(squares, [(5, 5, 35, 35), (190, -10, 260, 60), (500, 500, 600, 600)])
    assert got["object_id"].tolist() == ["small", "apart"]  # the third box meets nothing
    assert got["box_iou"].tolist() == pytest.approx([0.4444, 2500 / 4900], abs=1e-4)
    with pytest.raises(InputError):
        by_boxes(squares, [(10, 10, 5, 20)])


def test_text_keeps_the_top_scores(squares):
    got = by_text(squares, np.array([0.1, np.nan, 0.3]), top=2)
    assert got["object_id"].tolist() == ["apart", "big"] and got["clip_score"].tolist() == [0.3, 0.1]
    with pytest.raises(InputError):
        by_text(squares, np.zeros(3), top=0)


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory):
    """open_clip's ViT-S-32-alt with random weights, saved as open_clip saves its published files."""
    import open_clip
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "vit_s_32_alt.pt"
    torch.save(open_clip.create_model("ViT-S-32-alt").state_dict(), path)
    return path


def test_select_command_by_text_point_and_box(beijing, clip_weights, tmp_path, capsys):
    """`uvsam select` over objects on a real Beijing tile: text with a random CLIP (mechanics
    only: which objects score highest means nothing), points and boxes in lon/lat; no weights, or
    weights of another model, refused in one line with nothing written."""
    scene = beijing / "val/images/49554_107968.tif"
    with rasterio.open(scene) as src:
        t = src.transform
    # objects: three squares of the tile (pixel boxes), in the tile's CRS
    px = [(100, 100, 300, 260), (400, 500, 700, 800), (800, 50, 1000, 200)]
    geoms = [shapely.box(*(t @ (x0, y1)), *(t @ (x1, y0))) for x0, y0, x1, y1 in px]
    objects = tmp_path / "objects.gpkg"
    gpd.GeoDataFrame({"object_id": ["a", "b", "c"]}, geometry=geoms, crs="EPSG:3857").to_file(
        objects, layer="objects", driver="GPKG")
    out = tmp_path / "picked.gpkg"
    code, stdout, err = run_cli(["select", str(objects), "--text", "dense low-rise settlement", "--image", str(scene),
                                 "--clip-model", "ViT-S-32-alt", "--clip-weights", str(clip_weights), "--top", "2",
                                 "--out", str(out)], capsys)
    assert code == 0, err
    got = pyogrio.read_dataframe(out, layer="selected")
    assert len(got) == 2 and got["clip_score"].between(-1, 1).all() and got["clip_score"].is_monotonic_decreasing
    lon, lat = gpd.GeoSeries([geoms[1].centroid], crs="EPSG:3857").to_crs("EPSG:4326").iloc[0].coords[0]
    lonlat_box = gpd.GeoSeries([geoms[2].buffer(5)], crs="EPSG:3857").to_crs("EPSG:4326").total_bounds
    code, _, err = run_cli(["select", f"{objects}:objects", "--point", f"{lon},{lat}", "--prompt-crs", "EPSG:4326",
                            "--box", ",".join(map(str, lonlat_box)), "--layer", "clicked",
                            "--out", str(out)], capsys)
    assert code == 0, err
    assert pyogrio.read_dataframe(out, layer="clicked")["object_id"].tolist() == ["b", "c"]
    assert {"selected", "clicked", "runs"} <= {n for n, _ in pyogrio.list_layers(out)}  # the first layer kept
    bad = tmp_path / "bad.gpkg"
    for extra, says in ((["--clip-weights", str(tmp_path / "none.pt")], "not found"),
                        ([], "--clip-weights"),
                        (["--clip-model", "RN50", "--clip-weights", str(clip_weights)], "RN50")):
        code, _, err = run_cli(["select", str(objects), "--text", "village", "--image", str(scene), *extra,
                                "--out", str(bad)], capsys)
        assert code == 2 and says in err and "Traceback" not in err and not bad.exists(), err
