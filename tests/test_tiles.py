"""The tiling engine on real rasters: round trips, mosaics, XYZ import, normalisation, CRS, grid."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from rasterio.windows import Window

from tiles import (
    RasterSource,
    ReadOptions,
    Stitcher,
    TileDataset,
    TileGrid,
    TilesError,
    TilingConfig,
    ground_resolution,
    plan,
)
from tiles.vrt import write_vrt
from tiles.xyz import import_xyz, xyz_transform

from .conftest import DATA, run_cli

RGB = DATA / "rasterio-rgb"


def _roundtrip(path, out, size, overlap, nodata="source", driver="GTiff", offset=0, edges="pad"):
    """Tile ``path``, pass every tile through an identity model, stitch into ``out``."""
    with RasterSource(path) as src:
        grid = TileGrid(src.height, src.width, size, overlap, src.transform, offset, edges)
        nd = src.nodata if nodata == "source" else nodata
        per_band = nd is not None  # a nodata value can hit one band of a pixel and not the others
        with Stitcher(out, grid, len(src.bands), src.dtype, src.crs, nodata=nd, driver=driver,
                      per_band=per_band) as st_:
            for tile in grid:
                data, valid = src.read(tile.window, per_band=per_band)
                st_.add(tile, data, valid)
        full, valid = src.read(Window(0, 0, src.width, src.height))
    with rasterio.open(out) as ds:
        got = ds.read()
        got_valid = (ds.read_masks() > 0).all(axis=0)
        assert ds.crs == src.crs and ds.transform == src.transform
    return full, valid, got, got_valid


@pytest.mark.parametrize("size,overlap,offset,edges", [
    (128, 0, 0, "pad"), (100, 17, 0, "pad"), (256, 64, 0, "pad"), (333, 1, 0, "pad"), (1000, 10, 0, "pad"),
    (256, 128, 128, "pad"), (100, 17, 90, "pad"), (128, 0, 5, "pad"), (256, 128, 0, "inside"),
    (100, 17, 90, "inside"), (1000, 10, 0, "inside"),
])
def test_identity_roundtrip_uint8_with_nodata(tmp_path, size, overlap, offset, edges):
    """Every grid, shifted by ``offset`` or not, edge tiles padded or inside, stitches the scene back exactly."""
    full, valid, got, got_valid = _roundtrip(RGB / "RGB.byte.tif", tmp_path / "out.tif", size, overlap,
                                             offset=offset, edges=edges)
    assert 0 < valid.mean() < 1  # the scene has nodata edges
    np.testing.assert_array_equal(got_valid, valid)
    np.testing.assert_array_equal(got, full)  # nodata pixels carry the nodata value on both sides


@pytest.mark.parametrize("name,size,overlap", [
    ("odd-inputs/landsat_albers_int16.tif", 96, 20),
    ("spacenet-atlanta/atlanta_pan_uint16.tif", 256, 50),
    ("odd-inputs/rotterdam_ms4_float64.tif", 200, 31),
])
def test_identity_roundtrip_other_dtypes(tmp_path, name, size, overlap):
    full, valid, got, got_valid = _roundtrip(DATA / name, tmp_path / "out.tif", size, overlap, nodata=None)
    np.testing.assert_array_equal(got_valid, valid)
    if full.dtype == np.float64:  # weighted means of equal values: within one unit in the last place
        np.testing.assert_array_max_ulp(got[:, valid], full[:, valid], maxulp=1)
    else:
        np.testing.assert_array_equal(got[:, valid], full[:, valid])


def test_cog_output(tmp_path):
    full, valid, got, _ = _roundtrip(RGB / "RGB.byte.tif", tmp_path / "out.tif", 200, 40, driver="COG")
    np.testing.assert_array_equal(got, full)
    with rasterio.open(tmp_path / "out.tif") as ds:
        assert ds.overviews(1)  # a COG carries overviews


def test_quadrant_mosaic_equals_the_whole(tmp_path):
    vrt = write_vrt([RGB / f"rgb{i}.tif" for i in range(1, 5)], tmp_path / "mosaic.vrt")
    with rasterio.open(vrt) as mos, rasterio.open(RGB / "RGB.byte.tif") as whole:
        with rasterio.open(RGB / "rgb1.tif") as quadrant:
            assert mos.crs == quadrant.crs  # (the quadrants carry a datum-less copy of UTM 18N)
        assert mos.res == whole.res
        win = rasterio.windows.from_bounds(*mos.bounds, transform=whole.transform).round_offsets().round_lengths()
        ref = whole.read(window=win)
        got = mos.read()
        assert got.shape == ref.shape and got.shape[1] > 300
        np.testing.assert_array_equal(got, ref)


def test_stitcher_rules(tmp_path):
    grid = TileGrid(300, 300, 128, 28)
    out = tmp_path / "o.tif"
    out.write_bytes(b"the user's earlier file")
    with pytest.raises(ValueError, match="row by row"), Stitcher(out, grid, 1, "float32") as s:
        s.add(grid.tile(1, 0), np.ones((1, 128, 128), np.float32))
        s.add(grid.tile(0, 1), np.ones((1, 128, 128), np.float32))
    assert out.read_bytes() == b"the user's earlier file"  # nothing half-written replaced it
    assert not list(tmp_path.glob(".*part"))

    # tiles of a row may come in any order; a skipped tile row stays nodata
    with Stitcher(out, grid, 1, "float32", nodata=-1) as s:
        for c in (2, 0, 1):
            s.add(grid.tile(0, c), np.full((1, 128, 128), 5, np.float32))
        s.add(grid.tile(2, 1), np.full((1, 128, 128), 7, np.float32))
    with rasterio.open(out) as ds:
        a = ds.read(1)
    assert (a[:128] == 5).all() and (a[128:200] == -1).all() and (a[200:, 100:228] == 7).all()
    assert (a[200:, :100] == -1).all() and (a[200:, 228:] == -1).all()


def test_import_xyz_places_beijing_tiles(tmp_path):
    src = DATA / "beijing-uv"
    res = import_xyz(src / "image/train", 17, tmp_path, masks_dir=src / "mask/train")
    assert len(res.images) == 6 and len(res.masks) == 6
    with rasterio.open(res.images[0]) as ds:  # the README's formula
        y, x = (int(v) for v in res.images[0].stem.split("_"))
        assert ds.crs.to_epsg() == 3857
        assert ds.transform.a == pytest.approx(1.19433, abs=1e-5)
        step = 40075016.686 / 2**17  # 305.748 m, the README's rounding of it is off by 12 m at x = 107866
        assert ds.transform.c == pytest.approx(x * step - 20037508.343, abs=0.01)
        assert ds.transform.f == pytest.approx(20037508.343 - y * step, abs=0.01)
    # every image reads back unchanged through the VRT, so overlapping images agree pixel for pixel
    with rasterio.open(res.images_vrt) as vrt:
        overlaps = 0
        for p in res.images:
            with rasterio.open(p) as ds:
                win = rasterio.windows.from_bounds(*ds.bounds, transform=vrt.transform)
                win = win.round_offsets().round_lengths()
                np.testing.assert_array_equal(vrt.read(window=win), ds.read())
                overlaps += sum(
                    not rasterio.coords.disjoint_bounds(ds.bounds, rasterio.open(q).bounds) for q in res.images
                ) - 1
        assert overlaps > 0
        assert ((vrt.read_masks(1) == 0).mean()) > 0  # the set does not fill its bounding box
    a = xyz_transform(107866, 49566, 17)
    b = xyz_transform(107868, 49566, 17)
    assert (b.c - a.c) / a.a == pytest.approx(512)  # 49566_107868 starts at column 512 of 49566_107866
    with rasterio.open(res.masks_vrt) as m:
        labels = m.read(1)
        assert set(np.unique(labels[m.read_masks(1) > 0])) == {0, 1}


def test_import_xyz_rejects_bad_names(tmp_path, capsys):
    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "tile-7.png").write_bytes(b"x")
    code, _, err = run_cli(["import-xyz", bad, "--zoom", "17", "--out", tmp_path / "out"], capsys)
    assert code == 2 and "tile-7.png" in err and "{y}_{x}" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["spacenet-atlanta/atlanta_pan_uint16.tif", "odd-inputs/rotterdam_ms4_float64.tif"])
def test_every_tile_is_normalised_like_the_scene(name):
    path = DATA / name
    scene = plan(path, TilingConfig(tile_size=192, overlap=40))
    assert scene.stretch.method == "percentile"
    ds = TileDataset(path, scene, keep_raw=True)
    with RasterSource(path) as src:
        full, valid = src.read(Window(0, 0, src.width, src.height))
    whole = scene.stretch.apply(full, valid)
    ranges = set()
    for i in range(len(ds)):
        item = ds[i]
        tile = scene.tiles[i]
        r0, c0, r1, c1 = tile.bounds_px
        h, w = min(r1, full.shape[1]) - r0, min(c1, full.shape[2]) - c0
        np.testing.assert_array_equal(item["image"].numpy()[:, :h, :w], whole[:, r0 : r0 + h, c0 : c0 + w])
        img = item["image"].numpy()[:, item["valid"].numpy()]
        ranges.add(round(float(img.mean()), 2))
    assert len(ranges) > 1  # tiles keep their own brightness: no per-tile rescaling


def test_all_nodata_tiles_are_skipped_and_no_valid_pixel_is_lost():
    path = RGB / "RGB.byte.tif"
    scene = plan(path, TilingConfig(tile_size=64, overlap=8))
    assert len(scene.tiles) < len(scene.grid)
    with RasterSource(path) as src:
        _, valid = src.read(Window(0, 0, src.width, src.height))
        seen = np.zeros_like(valid)
        for t in scene.tiles:
            r0, c0, r1, c1 = t.bounds_px
            seen[r0:r1, c0:c1] = True
        assert not (valid & ~seen).any()
        for t in set(scene.grid) - set(scene.tiles):
            assert not src.read(t.window)[1].any()


def test_ground_resolution_and_metric_tiling():
    # Beijing XYZ imagery: 1.194 m Web Mercator pixels are about 0.92 m on the ground
    t = xyz_transform(107866, 49566, 17)
    gx, gy = ground_resolution("EPSG:3857", t, 1024, 1024)
    assert gx == pytest.approx(0.915, abs=0.01) and gy == pytest.approx(gx, rel=1e-2)  # 3857 is not conformal

    # a scene in degrees (EPSG:4326) tiled in metres
    rio = DATA / "spacenet-rio/image/3band_013022223130_Public_img50.tif"
    scene = plan(rio, TilingConfig(tile_size=100, overlap=10, unit="m"))
    gx, gy = scene.source["ground_res_m"]
    assert 0.3 < gx < 0.6 and 0.3 < gy < 0.6
    assert scene.grid.size == int(100 // max(gx, gy)) and scene.grid.overlap == round(10 / max(gx, gy))

    # resampled to 1 m on the ground, both axes, and tile sizes follow
    scene = plan(rio, TilingConfig(tile_size=100, overlap=10, unit="m", read=ReadOptions(gsd=1.0)))
    assert scene.source["ground_res_m"] == pytest.approx([1.0, 1.0], rel=0.01)
    assert (scene.grid.size, scene.grid.overlap) == (100, 10)
    with rasterio.open(rio) as ds:
        assert scene.grid.width == pytest.approx(ds.width * gx, rel=0.02)

    # reprojected to UTM on the fly
    with RasterSource(rio, ReadOptions(crs="EPSG:32723", gsd=0.5)) as src:
        assert src.crs.to_epsg() == 32723
        assert src.transform.a == pytest.approx(0.5, rel=0.01)
        data, valid = src.read(Window(0, 0, src.width, src.height))
        assert 0.5 < valid.mean() < 1  # the rotated footprint leaves invalid corners


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(TilesError, match="does not exist"):
        RasterSource(tmp_path / "missing.tif")
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff")
    with pytest.raises(TilesError, match=r"junk\.tif: not a raster"):
        RasterSource(junk)
    with pytest.raises(TilesError, match=r"band\(s\) \[5\]"):
        RasterSource(RGB / "RGB.byte.tif", ReadOptions(bands=(1, 5)))


def test_dataloader_workers_match_direct_reads():
    from torch.utils.data import DataLoader

    path = RGB / "RGB.byte.tif"
    scene = plan(path, TilingConfig(tile_size=256, overlap=32))
    ds = TileDataset(path, scene)
    direct = [ds[i]["image"] for i in range(len(ds))]
    batches = list(DataLoader(ds, batch_size=2, num_workers=2))
    got = [img for b in batches for img in b["image"]]
    assert len(got) == len(direct)
    for a, b in zip(got, direct, strict=True):
        assert (a == b).all()


@settings(max_examples=300, deadline=None)
@given(
    height=st.integers(1, 600), width=st.integers(1, 600), size=st.integers(1, 300), data=st.data(),
)
def test_grid_covers_everything_with_exact_overlaps(height, width, size, data):
    overlap = data.draw(st.integers(0, size - 1))
    offset = data.draw(st.integers(0, size - 1))
    edges = data.draw(st.sampled_from(["pad", "inside"]))
    grid = TileGrid(height, width, size, overlap, offset=offset, edges=edges)
    assume(len(grid) <= 4000)  # keep each example fast; tiny tiles on big scenes add nothing new
    rows, cols = grid.shape
    covered = np.zeros((height, width), np.int32)
    for t in grid:
        r0, c0, r1, c1 = t.bounds_px
        assert (r1 - r0, c1 - c0) == (size, size)
        assert r0 < height and c0 < width and r1 > 0 and c1 > 0  # no tile lies wholly outside
        if edges == "pad":
            assert (r0 + offset) % grid.step == 0 and (c0 + offset) % grid.step == 0
        else:  # inside the scene wherever the scene is at least a tile
            assert r0 >= 0 and c0 >= 0 and (r1 <= height or r0 == 0) and (c1 <= width or c0 == 0)
        covered[max(r0, 0) : r1, max(c0, 0) : c1] += 1
    assert (covered >= 1).all()  # no gaps, right and bottom edges included

    def check(a, b):  # overlap between neighbours: exact when padding, at least as asked inside
        assert a - b == overlap if edges == "pad" else a - b >= overlap

    for r in range(rows):
        for c in range(cols):
            if c + 1 < cols:
                check(grid.tile(r, c).bounds_px[3], grid.tile(r, c + 1).bounds_px[1])
            if r + 1 < rows:
                check(grid.tile(r, c).bounds_px[2], grid.tile(r + 1, c).bounds_px[0])
    assert [t.index for t in grid] == list(range(len(grid)))


def test_inside_grid_is_the_same_after_a_shift_by_whole_steps():
    """With edge tiles kept inside, shifting the grid by one step (half a tile at half-tile
    overlap) yields the same tiles: a prediction cannot depend on it."""
    a = TileGrid(1000, 700, 256, 128, edges="inside")
    b = TileGrid(1000, 700, 256, 128, offset=128, edges="inside")
    assert [t.window for t in a] == [t.window for t in b]
    c = TileGrid(1000, 700, 256, 128, offset=64, edges="inside")
    assert [t.window for t in a] != [t.window for t in c]


def test_plan_tiles_cli_writes_a_manifest(tmp_path, capsys):
    import json

    out = tmp_path / "manifest.json"
    code, _, err = run_cli(["plan-tiles", DATA / "spacenet-atlanta/atlanta_pan_uint16.tif", "--tile-size", "100",
                            "--overlap", "10", "--unit", "m", "--out", out], capsys)
    assert code == 0, err
    m = json.loads(out.read_text())
    assert m["source"]["crs"] == "EPSG:32616" and m["source"]["dtype"] == "uint16"
    assert m["grid"]["size"] == 200 and m["grid"]["overlap"] == 20  # 0.5 m pixels
    assert m["stretch"]["method"] == "percentile" and m["stretch"]["low"][0] < m["stretch"]["high"][0]
    code, _, err = run_cli(["plan-tiles", tmp_path / "nope.tif"], capsys)
    assert code == 2 and "nope.tif: file does not exist" in err


def test_dataset_stretch_spans_scenes():
    from tiles import dataset_stretch

    quads = [RGB / f"rgb{i}.tif" for i in range(1, 5)]
    cfg = TilingConfig(normalisation="percentile")
    shared = dataset_stretch(quads, cfg)
    each = [plan(q, cfg).stretch for q in quads]
    lows = [s.low[0] for s in each]
    assert min(lows) <= shared.low[0] <= max(lows) and len(set(lows)) > 1
    scenes = [plan(q, cfg, stretch=shared) for q in quads]
    assert all(s.stretch == shared for s in scenes)
