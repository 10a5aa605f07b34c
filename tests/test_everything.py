"""Everything mode (issue 24): parity with Meta's automatic mask generator, TinySAM's hierarchical
points, and ``uvsam everything`` over a multi-tile scene with objects whole across tile seams."""

from __future__ import annotations

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import torch
from scipy import ndimage

from uvsam.everything import (
    EverythingConfig,
    Objects,
    generate,
    hierarchical_points,
    mask_boxes,
    point_grid,
    remove_small_regions,
    stability_scores,
)

from .conftest import run_cli


@pytest.fixture(scope="module")
def sam_b(tmp_path_factory):
    """Meta's sam_vit_b with random weights (seed 0), the last layers of its mask and IoU heads
    scaled x100: the random decoder's logits otherwise stay inside +-1, every stability score is 0
    and no mask passes any filter, which would make a parity test that cannot fail."""
    from segment_anything import build_sam_vit_b

    torch.manual_seed(0)
    ref = build_sam_vit_b().eval()
    with torch.no_grad():
        for mlp in [*ref.mask_decoder.output_hypernetworks_mlps, ref.mask_decoder.iou_prediction_head]:
            mlp.layers[-1].weight.mul_(100)
    path = tmp_path_factory.mktemp("sam_b") / "sam_vit_b_random.pt"
    torch.save(ref.state_dict(), path)
    return ref, path


@pytest.fixture(scope="module")
def sam_b_on_tile(sam_b, beijing_tile):
    """uvsam's Predictor with that sam_vit_b, the Beijing tile embedded."""
    from uvsam.checkpoint import load_generalist
    from uvsam.predictor import Predictor

    pred = Predictor(load_generalist("sam_vit_b", sam_b[1]))
    pred.set_image(beijing_tile)
    return pred


def test_parity_with_sam_automatic_mask_generator(sam_b, sam_b_on_tile, beijing_tile):
    """Same weights, same settings, a real Beijing tile: the same masks, in the same order."""
    from segment_anything import SamAutomaticMaskGenerator

    ref, _ = sam_b
    # thresholds for this random decoder (its predicted IoUs run to ~10); box NMS at 1.0 because
    # every random mask spans the tile (NMS at 0.7 would keep one); small regions cleaned (cv2 vs scipy)
    settings = dict(points_per_side=8, pred_iou_thresh=0.2, stability_score_thresh=0.7, box_nms_thresh=1.0,
                    min_mask_region_area=200)
    theirs = SamAutomaticMaskGenerator(ref, **settings).generate(beijing_tile)
    ours = generate(sam_b_on_tile, EverythingConfig(**settings))
    assert 20 <= len(theirs) < 192  # the filters kept some of the 8 x 8 x 3 masks, not all
    assert len(ours) == len(theirs) and ours.decoded == 64
    for k, t in enumerate(theirs):
        a, b = ours.masks[k], t["segmentation"]
        assert (a & b).sum() / (a | b).sum() >= 0.99, k
        assert ours.predicted_iou[k] == pytest.approx(t["predicted_iou"], abs=1e-3)
        assert ours.stability[k] == pytest.approx(t["stability_score"], abs=1e-3)
        assert list(ours.points[k]) == pytest.approx(t["point_coords"][0])
        x, y, w, h = t["bbox"]
        assert list(ours.boxes[k]) == [x, y, x + w, y + h]


def test_grid_boxes_stability_and_small_regions_match_sam():
    from segment_anything.utils import amg

    for n in (1, 4, 32):
        np.testing.assert_allclose(point_grid(n), amg.build_point_grid(n))
    g = torch.Generator().manual_seed(0)
    logits = torch.nn.functional.avg_pool2d(torch.randn(6, 1, 64, 80, generator=g), 9, 1, 4)[:, 0] * 12
    logits[5] = -5  # an empty mask
    masks = logits > 0
    assert torch.equal(mask_boxes(masks), amg.batched_mask_to_box(masks))
    ours, theirs = stability_scores(logits, 0.0, 1.0), amg.calculate_stability_score(logits, 0.0, 1.0)
    assert torch.allclose(ours[:5], theirs[:5]) and torch.isnan(ours[5]) == torch.isnan(theirs[5])
    # islands and holes of a hand-made mask, each against SAM's cv2 implementation
    m = np.zeros((60, 60), bool)
    m[5:40, 5:40] = True
    m[10:13, 10:13] = False  # a 9 px hole
    m[50:53, 50:52] = True  # a 6 px island
    m[45:58, 2:14] = True  # a 156 px island
    for area in (5, 10, 100, 200, 2000):
        for mode in ("holes", "islands"):
            a, changed_a = remove_small_regions(m, area, mode)
            b, changed_b = amg.remove_small_regions(m, area, mode)
            assert changed_a == changed_b and np.array_equal(a, b), (area, mode)
    assert remove_small_regions(m, 10, "holes")[0][11, 11]  # the hole filled
    kept = remove_small_regions(m, 2000, "islands")[0]  # every island small: the largest stays
    assert kept.sum() == 35 * 35 - 9


def test_hierarchical_points_follow_tinysam():
    """Around each sparse point the dense neighbours at -1..2 strides (15 of them), none where the
    first pass was confident, only those inside the image."""
    confident = np.zeros((64, 64), bool)
    pts = hierarchical_points(np.array([[24.0, 24.0]]), confident, (8, 8))
    assert len(pts) == 15 and [24.0, 24.0] not in pts.tolist()
    assert {tuple(p) for p in pts} == {(24 + 8 * dx, 24 + 8 * dy) for dx in (-1, 0, 1, 2) for dy in (-1, 0, 1, 2)
                                       } - {(24, 24)}
    confident[:, 30:] = True  # the right half confident: the +1 and +2 columns go
    assert len(hierarchical_points(np.array([[24.0, 24.0]]), confident, (8, 8))) == 7
    edge = hierarchical_points(np.array([[60.0, 60.0]]), np.zeros((64, 64), bool), (8, 8))
    assert {tuple(p) for p in edge} == {(52, 52), (60, 52), (52, 60)}  # the rest lies outside


def test_hierarchical_mode_decodes_fewer_points_where_confident(sam_b_on_tile):
    pred = sam_b_on_tile
    base = dict(points_per_side=8, pred_iou_thresh=0.2, stability_score_thresh=0.7)
    strict = generate(pred, EverythingConfig(**base, hierarchical=True, high_score_thresh=1e9))  # nothing confident
    eager = generate(pred, EverythingConfig(**base, hierarchical=True, high_score_thresh=0.0))
    # 2 x 2 sparse points; the +2 neighbours of the last row and column (4 each of 2 points, one shared) fall outside
    assert strict.passes == [4, 4 * 15 - (2 * 4 + 2 * 4 - 1)]
    assert eager.passes[0] == 4 and eager.passes[1] < strict.passes[1] and eager.decoded == sum(eager.passes)
    assert len(strict) > 0


# -- the scene: seams -------------------------------------------------------------------------
class Components:
    """A test double of the generalist with exact, context-free answers: a point's object is the
    4-connected region of equal pixel value it falls in (value 0: no object), as seen in the
    window. Where the tile grid falls can then change nothing; a whole object is exactly a region
    of the scene."""

    sha256 = "components"

    def load(self):
        return self

    @staticmethod
    def _regions(image):
        values = image[..., 0].astype(int)
        labels = np.zeros(values.shape, int)
        n = 0
        for v in np.unique(values[values > 0]):
            lab, k = ndimage.label(values == v)
            labels[lab > 0] = lab[lab > 0] + n
            n += k
        return labels

    def _masks(self, image, points):
        labels = self._regions(image)
        h, w = labels.shape
        ids = [labels[min(int(y), h - 1), min(int(x), w - 1)] for x, y in points]
        return labels, ids

    def find(self, image, points, cfg, stride):
        labels, ids = self._masks(image, points)
        keep = [k for k, i in enumerate(ids) if i > 0 and i not in ids[:k]]
        masks = np.stack([labels == ids[k] for k in keep]) if keep else np.zeros((0, *labels.shape), bool)
        n = len(keep)
        return Objects(masks, mask_boxes(torch.from_numpy(masks)).numpy(), np.ones(n, np.float32),
                       np.ones(n, np.float32), np.asarray(points)[keep].reshape(-1, 2), np.zeros(n, int), len(points))

    def redecode(self, image, points, which, cfg):
        labels, ids = self._masks(image, points)
        masks = np.stack([(labels == i) & (i > 0) for i in ids])
        return masks, np.ones(len(ids), np.float32), np.ones(len(ids), np.float32)


@pytest.fixture(scope="module")
def regions_scene(beijing, tmp_path_factory):
    """The Beijing train mosaic quantised to 6 grey levels, with only the regions (4-connected,
    one level) of 30 px or more and at most 100 px across kept: a real multi-tile scene whose
    objects are known exactly. Returns (GeoTIFF, the kept regions' label raster)."""
    from rasterio.windows import Window

    with rasterio.open(beijing / "train/images.vrt") as src:  # 800 x 640 px of it: 4 x 3 tiles of 256
        win = Window(256, 256, 800, 640)
        rgb, profile = src.read(window=win), src.profile
        profile.update(width=800, height=640, transform=src.window_transform(win))
    grey = (rgb.astype(float).mean(0) // 43).astype(int)  # 0..5
    labels = np.zeros(grey.shape, int)
    n = 0
    for v in range(6):
        lab, k = ndimage.label(grey == v)
        for i, sl in enumerate(ndimage.find_objects(lab), 1):
            region = lab[sl] == i
            if region.sum() >= 30 and max(region.shape) <= 100:
                n += 1
                labels[sl][region] = n
    value = np.where(labels > 0, 60 + 30 * grey, 0).astype(np.uint8)
    out = tmp_path_factory.mktemp("regions") / "regions.tif"
    profile.update(driver="GTiff", count=3, dtype="uint8", nodata=None)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(np.stack([value] * 3))
    return out, labels


def test_objects_do_not_depend_on_where_the_tile_grid_falls(regions_scene, tmp_path):
    """The grid-shift test of predict, applied to objects: a grid shifted by half a tile finds the
    same objects, each whole (none split along a seam, none twice), exactly the scene's regions
    under the lattice points."""
    from dataclasses import replace

    from uvsam.objects import ObjectsConfig, lattice, scene_objects
    from uvsam.polygons import polygonise

    path, labels = regions_scene
    cfg = ObjectsConfig(EverythingConfig(points_per_side=8), tile=256, overlap=64, margin=16)
    runs = {off: scene_objects(path, Components(), replace(cfg, grid_offset=off), tmp_path / str(off))[0]
            for off in (0, 128)}
    with rasterio.open(path) as src:
        transform, (h, w) = src.transform, (src.height, src.width)
    assert (h, w) == (640, 800)  # 12 tiles
    pts = lattice(w, h, cfg.spacing)
    expected = {int(labels[int(y), int(x)]) for x, y in pts} - {0}
    truth = {i: shapely.multipolygons(polygonise(labels == i, transform)) for i in expected}
    seams = shapely.union_all([shapely.LineString([transform @ (c, 0), transform @ (c, h)])
                               for c in range(192, w, 192)])
    def key(g):  # a polygon's outline to 1 cm (the windows' transforms round differently)
        return shapely.normalize(shapely.set_precision(g, 0.01)).wkt

    wkt = {i: key(g) for i, g in truth.items()}
    found = {}
    for off, objs in runs.items():
        assert all(o["complete"] == 1 for o in objs)
        found[off] = sorted(key(o["geometry"]) for o in objs)
        assert len(set(found[off])) == len(objs) and set(found[off]) <= set(wkt.values()), off  # whole, once
    assert found[0] == found[128]
    # a region under a lattice point is missing only where box NMS dropped it for an overlapping one
    kept = [i for i in expected if wkt[i] in set(found[0])]
    assert len(kept) >= 0.95 * len(expected)
    boxes = {i: shapely.box(*truth[i].bounds) for i in expected}
    for i in set(expected) - set(kept):
        assert max(boxes[i].intersection(boxes[j]).area / boxes[i].union(boxes[j]).area for j in kept) > 0.6
    crossing = sum(truth[i].intersects(seams) for i in kept)
    assert crossing >= 10  # objects the tile edges cut, made whole
    # run again over the same work folder (an interrupted run resumed): every window comes from the
    # journal, nothing is computed again, and the objects are the same
    computed = []

    def counting(fn, arg_list):
        for args in arg_list:
            computed.append(fn.__name__)
            yield fn(*args)

    again = scene_objects(path, Components(), cfg, tmp_path / "0", counting)[0]
    assert computed == [] and sorted(key(o["geometry"]) for o in again) == found[0]


def test_everything_command_writes_objects(mobile_sam_ckpt, beijing, tmp_path, capsys):
    """`uvsam everything` over a four-window scene with a random mobile_sam: a GeoPackage layer
    with each object's predicted IoU and stability (random generalist: mechanics only), the same
    on a local Dask cluster as in process; bad settings refused in one line before any work."""
    scene = beijing / "val/images/49554_107968.tif"
    args = ["everything", str(scene), "--encoder", "mobile_sam", "--checkpoint", str(mobile_sam_ckpt),
            "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-thresh", "0", "--gsd", "2.4",
            "--tile", "320", "--overlap", "64", "--device", "cpu", "--precision", "fp32"]  # 512 px: 4 windows
    out = tmp_path / "objects.gpkg"
    code, stdout, _ = run_cli([*args, "--out", str(out), "--local"], capsys)
    assert code == 0, stdout
    frame = pyogrio.read_dataframe(out, layer="objects")
    assert len(frame) > 0 and {"predicted_iou", "stability", "complete", "area_m2"} <= set(frame.columns)
    assert frame.crs.to_epsg() == 3857 and frame.geometry.is_valid.all()
    # areas on the ground, not Web Mercator's (cos^2 of Beijing's 40 degrees north: 0.59 of them)
    assert np.allclose(frame["area_m2"] / frame.geometry.area, 0.587, atol=0.01)
    runs = pyogrio.read_dataframe(out, layer="runs")
    assert runs["command"].tolist() == ["everything"] and "points_per_side" in runs["config"][0]
    assert not (tmp_path / "objects.work").exists()
    dask_out = tmp_path / "dask.gpkg"
    code, _, _ = run_cli([*args, "--out", str(dask_out), "--workers", "1"], capsys)
    assert code == 0
    other = pyogrio.read_dataframe(dask_out, layer="objects")
    assert len(other) == len(frame) and all(a.equals(b) for a, b in zip(frame.geometry, other.geometry, strict=True))
    # TinySAM's hierarchical points over the scene's lattice: a sparse pass, then dense points
    code, _, err = run_cli([*args, "--hierarchical", "--tile", "512", "--layer", "sparse_first", "--out", str(out),
                            "--local"], capsys)
    assert code == 0, err
    assert len(pyogrio.read_dataframe(out, layer="sparse_first")) > 0
    assert {"objects", "sparse_first"} <= {n for n, _ in pyogrio.list_layers(out)}  # the first layer kept
    for bad, says in ((["--overlap", "320"], "overlap"), (["--pred-iou-thresh", "1.5"], "pred iou thresh"),
                      (["--points-per-side", "2", "--hierarchical"], "points per side")):
        code, _, err = run_cli([*args, *bad, "--out", str(tmp_path / "bad.gpkg"), "--local"], capsys)
        assert code == 2 and says in err and "Traceback" not in err and not (tmp_path / "bad.gpkg").exists()
