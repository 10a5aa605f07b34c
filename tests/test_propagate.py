"""SAM-PT propagation across years (issue 24): query points, the SAM-PT decoding loop, and
`uvsam change --propagate` on a real LEVIR-CD pair."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
from affine import Affine
from PIL import Image
from scipy import ndimage

from uvsam.changes.propagate import (
    PropagateConfig,
    farthest_points,
    kmedoids,
    negative_points,
    positive_points,
)
from uvsam.errors import InputError

from .conftest import run_cli


def test_kmedoids_is_the_exhaustive_optimum_on_small_sets():
    """Two clusters, k = 2: the medoids are the points of least total distance within each
    cluster, which an exhaustive search over every pair confirms."""
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.normal((10, 10), 2, (20, 2)), rng.normal((60, 40), 3, (25, 2))])
    got = kmedoids(pts, 2)
    d = np.hypot(*(pts[:, None] - pts[None]).transpose(2, 0, 1))
    best = min(((i, j) for i in range(len(pts)) for j in range(i + 1, len(pts))),
               key=lambda ij: d[:, list(ij)].min(1).sum())
    assert sorted(map(tuple, got)) == sorted(map(tuple, pts[list(best)]))
    assert kmedoids(pts[:1], 3).shape == (3, 2)  # fewer points than k: repeated, as SAM-PT


def test_positive_points_spread_over_the_mask():
    mask = np.zeros((100, 100), bool)
    mask[10:30, 10:30] = True
    mask[60:90, 50:95] = True
    pts = positive_points(mask, 4, np.random.default_rng(0))
    assert pts.shape == (4, 2) and mask[pts[:, 1].astype(int), pts[:, 0].astype(int)].all()
    labels, _ = ndimage.label(mask)
    assert set(labels[pts[:, 1].astype(int), pts[:, 0].astype(int)]) == {1, 2}  # both parts get points
    assert positive_points(np.zeros((5, 5), bool), 4, np.random.default_rng(0)).shape == (0, 2)


def test_farthest_point_rules():
    cand = np.array([[0, 0], [10, 0], [0, 10], [10, 10], [5, 5]], float)
    # first the candidate farthest from the start, then each time the farthest from all chosen
    assert farthest_points(cand, 3, np.array([1.0, 1.0])).tolist() == [[10, 10], [0, 0], [10, 0]]
    assert len(farthest_points(cand, 10, np.array([0.0, 0.0]))) == 5
    # negatives: in the ring just outside the mask, never in it, spread round it
    mask = np.zeros((60, 60), bool)
    mask[20:40, 20:40] = True
    neg = negative_points(mask, 4, 5)
    r = neg.astype(int)
    assert len(neg) == 4 and not mask[r[:, 1], r[:, 0]].any()
    dist = ndimage.distance_transform_edt(~mask)
    assert (dist[r[:, 1], r[:, 0]] <= 5 * np.sqrt(2)).all()
    assert (neg[:, 0] < 30).any() and (neg[:, 0] > 30).any() and (neg[:, 1] < 30).any() and (neg[:, 1] > 30).any()


def test_propagation_settings_are_checked():
    for bad in ({"positive_points": 0}, {"min_iou": 1.5}, {"window_px": 10}):
        with pytest.raises(InputError):
            PropagateConfig(**bad)


def test_change_propagate_on_a_levir_pair(data_dir, mobile_sam_ckpt, tmp_path, capsys):
    """A real LEVIR-CD pair georeferenced (0.5 m, the dataset's resolution; its origin made up) and
    two years of "villages": the buildings of the change mask, all in the later year, one of them
    in the earlier. Every event gets a propagated IoU and a verdict, the report says what they
    mean. A random mobile_sam: the mechanics only, not the verdicts."""
    name = "test_2_0000_0000.png"
    t = Affine(0.5, 0, 500000, 0, -0.5, 3300000)
    images = {}
    for year, folder in (("2016", "A"), ("2018", "B")):
        rgb = np.asarray(Image.open(data_dir / "levir-cd" / folder / name).convert("RGB"))
        path = tmp_path / f"{year}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=256, height=256, count=3, dtype="uint8",
                           crs="EPSG:32614", transform=t) as dst:
            dst.write(rgb.transpose(2, 0, 1))
        images[year] = path
    label = np.asarray(Image.open(data_dir / "levir-cd/label" / name)) > 0
    from uvsam.polygons import polygonise

    parts = sorted(polygonise(label, t), key=lambda p: -p.area)[:3]
    assert len(parts) == 3
    layers = tmp_path / "villages.gpkg"
    gpd.GeoDataFrame(geometry=parts[:2], crs="EPSG:32614").to_file(layers, layer="y2016", driver="GPKG")
    gpd.GeoDataFrame(geometry=[parts[0], parts[2]], crs="EPSG:32614").to_file(layers, layer="y2018", driver="GPKG")
    out, report = tmp_path / "change.gpkg", tmp_path / "report.html"
    args = ["change", f"2016={layers}:y2016", f"2018={layers}:y2018", "--out", out, "--report", report,
            "--image", f"2016={images['2016']}", "--image", f"2018={images['2018']}", "--propagate",
            "--encoder", "mobile_sam", "--checkpoint", mobile_sam_ckpt, "--device", "cpu", "--precision", "fp32"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    changes = pyogrio.read_dataframe(out, layer="changes")
    assert {"propagated_iou", "confirmed"} <= set(changes.columns)
    old = changes[changes["lifecycle"] != "new"]
    assert set(old["lifecycle"]) >= {"demolished"} and old["propagated_iou"].between(0, 1).all()
    assert old["confirmed"].notna().all() and changes[changes["lifecycle"] == "new"]["confirmed"].isna().all()
    demolished = old[old["lifecycle"] == "demolished"].iloc[0]
    assert bool(demolished["confirmed"]) == (demolished["propagated_iou"] < 0.5)
    per_village = pyogrio.read_dataframe(out, layer="propagation")  # one row per village propagated
    assert len(per_village) == 2 and set(per_village["village_uid"]) == set(
        ",".join(old["uids_from"]).split(",")) and per_village["propagated_iou"].between(0, 1).all()
    html = report.read_text()
    assert "Propagation check" in html and "not its official ones" in html
    code, _, err = run_cli(args[: args.index("--encoder")] + ["--device", "cpu"], capsys)
    assert code == 2 and "--encoder" in err and "Traceback" not in err
