"""The pictures a user looks at first, each looked at here: evaluate's overlay (hits, false alarms
and misses where the labels and the shipped villages say) and train's curves (the losses and
validation IoU of the metrics CSV). Predict's quicklook is checked in test_predict."""

from __future__ import annotations

import csv

import numpy as np
import rasterio
from PIL import Image
from scipy import ndimage

from uvsam.pictures import OUTCOME_RGB, Picture, map_grid


def test_evaluate_overlay_shows_hits_false_alarms_and_misses_where_they_are(beijing, model, tmp_path):
    from uvsam.evaluation import evaluate
    from uvsam.labels import IGNORE

    val = beijing / "val"
    res = evaluate(model, val / "images.vrt", val / "masks.vrt", specialist_only=True, overlays=tmp_path / "ov")
    png = tmp_path / "ov" / "images.overlay.png"
    assert res["per_scene"][0]["overlay"] == str(png)
    pic = Picture.read(png)
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert pic.size == rgb.shape[1::-1] and rgb.std() > 20
    # where each outcome is, from the evaluation's own rasters: labels and the shipped villages
    from uvsam.evaluation import score_scene
    from uvsam.prediction import PredictConfig, model_info

    scores = score_scene(next(iter(__import__("uvsam.datasets", fromlist=["pair_scenes"]).pair_scenes(
        val / "images.vrt", val / "masks.vrt"))), model_info(model), PredictConfig())
    truth, known, pred = scores["labels"] == 1, scores["labels"] != IGNORE, scores["polygons"]
    outcomes = {"hit": pred & truth, "false alarm": pred & ~truth, "miss": ~pred & truth}
    rng = np.random.default_rng(0)
    checked = 0
    for name, where in outcomes.items():
        rows, cols = np.nonzero(ndimage.binary_erosion(where & known, iterations=6))
        if len(rows) < 50:
            continue
        channel = int(np.argmax(OUTCOME_RGB[name]))  # hits green, false alarms red, misses blue
        pick = rng.choice(len(rows), 200)
        xs, ys = rasterio.transform.xy(scores["transform"], rows[pick], cols[pick])
        right = [np.argmax(rgb[r, c]) == channel for c, r in (pic.pixel(x, y) for x, y in zip(xs, ys, strict=True))]
        assert np.mean(right) > 0.8, (name, np.mean(right))
        checked += 1
    assert checked >= 2  # at least two of the outcomes cover enough ground to be looked at


def test_train_curves_plot_the_metrics_csv(model):
    png, metrics = model.with_suffix(".curves.png"), model.with_suffix(".metrics.csv")
    rows = list(csv.DictReader(open(metrics)))
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert rgb.shape[:2] == (400, 1000) and rgb.std() > 10
    loss_red = (np.abs(rgb - [214, 39, 40]).sum(axis=-1) < 30)  # the training loss line, left panel
    assert loss_red[:, :500].sum() > 20 * len(rows) and loss_red[:, 500:].sum() == 0
    if "val_specialist_iou" in rows[0]:
        iou_blue = (np.abs(rgb - [31, 119, 180]).sum(axis=-1) < 30)
        assert iou_blue[:, 500:].sum() > 20 * len(rows)


def test_a_picture_reads_its_scene_by_decimation_as_the_warper_would(beijing_tile, tmp_path):
    """Under a picture in the scene's own CRS the scene is averaged by GDAL's decimating read: the
    same image and validity as the warper's (a ragged no-data edge included); a grid in another
    CRS is still warped."""
    from affine import Affine
    from rasterio.transform import array_bounds, from_origin
    from rasterio.warp import transform_bounds

    from tiles.reader import RasterSource

    img = np.repeat(np.repeat(beijing_tile.transpose(2, 0, 1), 2, axis=1), 2, axis=2)  # 2048 px at 0.6 m
    img[:, :, :400][:, np.arange(2048)[:, None] > 5 * np.arange(400)[None, :]] = 0  # a slanted no-data edge
    path = tmp_path / "scene.tif"
    with rasterio.open(path, "w", driver="GTiff", width=2048, height=2048, count=3, dtype="uint8", nodata=0,
                       crs="EPSG:3857", transform=from_origin(12942317.6, 4882797.4, 0.597, 0.597), tiled=True,
                       compress="deflate") as ds:
        ds.write(img)
    with RasterSource(path) as src:
        transform, w, h = map_grid(array_bounds(src.height, src.width, src.transform))
        for grid in ((transform, w, h), (transform * Affine.translation(3.3, -7.6), w - 10, h + 4)):
            (a, va), (b, vb) = src.read_picture(src.crs, *grid), src.read_on_grid(src.crs, *grid)
            assert a.shape == b.shape == (3, grid[2], grid[1]) and 0.3 < va.mean() < 0.99
            assert (va != vb).mean() < 0.01 and np.abs(a - b)[:, va & vb].mean() < 0.5
        x0, y0, x1, y1 = transform_bounds(src.crs, "EPSG:4326", *array_bounds(src.height, src.width, src.transform))
        other = ("EPSG:4326", Affine((x1 - x0) / 100, 0, x0, 0, -(y1 - y0) / 80, y1), 100, 80)
        (a, va), (b, vb) = src.read_picture(*other), src.read_on_grid(*other)
        assert va.any() and (va == vb).all() and (a == b).all()


def test_pictures_are_written_as_rgb_with_the_colours_matplotlib_draws(tmp_path):
    """An opaque figure goes to an RGB PNG (no alpha channel to deflate), its pixels those of
    matplotlib's own PNG, its placement in the text chunk."""
    import io

    from affine import Affine

    from uvsam.pictures import _map_figure, _save

    fig, ax, box = _map_figure(300, 200, "a title", "a subtitle")
    ax.imshow(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8), extent=(0, 300, 200, 0))
    ax.plot([10, 290], [20, 180], color="red", lw=2)
    transform = Affine(10, 0, 500000, 0, -10, 4400000)
    size = _save(fig, tmp_path / "m.png", box, transform, "EPSG:32650")
    with Image.open(tmp_path / "m.png") as im:
        assert im.mode == "RGB" and im.size == size and round(im.info["dpi"][0]) == 100
        ours = np.asarray(im)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, facecolor="white")
    theirs = np.asarray(Image.open(buf))
    assert theirs.shape[2] == 4 and (theirs[..., 3] == 255).all()
    np.testing.assert_array_equal(ours, theirs[..., :3])
    pic = Picture.read(tmp_path / "m.png")
    assert pic.map_box == box and pic.transform == transform and pic.size == size
