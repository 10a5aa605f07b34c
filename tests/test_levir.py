"""Real bi-temporal imagery end to end: LEVIR-CD pairs through predict -> change -> report.

LEVIR-CD ships PNGs without georeference. **The test attaches a transform**: the 11 pairs are
laid on a 4-column grid in UTM zone 14N (Texas) at their 0.5 m ground resolution, 32 m apart —
placed for the test, not where the images were taken. Both years of a pair get the same
transform, as co-registered bi-temporal imagery has.

There are no urban villages in these Texas suburbs, and no official generalist weights here.
So the model is a specialist trained in the test on the later year with LEVIR's change labels
(buildings that were built between the years) and it predicts without the generalist. What is
tested: real bi-temporal imagery goes through every stage on the command line, the change found
lies where LEVIR's labels say the buildings appeared, and the report renders.
"""

from __future__ import annotations

import json

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from affine import Affine
from PIL import Image
from rasterio.features import shapes

CRS = "EPSG:32614"
PIXEL = 0.5  # m
GAP = 32.0  # m between pairs


def _origin(k: int) -> tuple[float, float]:
    step = 256 * PIXEL + GAP
    return 620_000.0 + (k % 4) * step, 3_350_000.0 - (k // 4) * step


def _write(arr: np.ndarray, path, k: int) -> None:
    bands = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    x, y = _origin(k)
    with rasterio.open(path, "w", driver="GTiff", width=256, height=256, count=len(bands), dtype="uint8", crs=CRS,
                       transform=Affine(PIXEL, 0, x, 0, -PIXEL, y)) as ds:
        ds.write(bands)


@pytest.fixture(scope="module")
def levir(data_dir, tmp_path_factory):
    """GeoTIFFs of both years (``2016/``, ``2019/``), the change labels as 0/1 masks (``labels/``),
    a VRT per year, and the labels as polygons in the same CRS."""
    from tiles.vrt import write_vrt

    root = tmp_path_factory.mktemp("levir")
    src = data_dir / "levir-cd"
    names = sorted(p.name for p in (src / "A").glob("*.png"))
    polys = []
    for sub in ("2016", "2019", "labels"):
        (root / sub).mkdir()
    for k, name in enumerate(names):
        stem = name.removesuffix(".png")
        _write(np.asarray(Image.open(src / "A" / name).convert("RGB")), root / "2016" / f"{stem}.tif", k)
        _write(np.asarray(Image.open(src / "B" / name).convert("RGB")), root / "2019" / f"{stem}.tif", k)
        label = (np.asarray(Image.open(src / "label" / name)) > 0).astype("uint8")
        _write(label, root / "labels" / f"{stem}.tif", k)
        x, y = _origin(k)
        polys += [shapely.geometry.shape(g) for g, v in
                  shapes(label, mask=label > 0, transform=Affine(PIXEL, 0, x, 0, -PIXEL, y)) if v]
    for year in ("2016", "2019"):
        write_vrt(sorted((root / year).glob("*.tif")), root / f"{year}.vrt")
    return root, shapely.union_all(polys)


@pytest.fixture(scope="module")
def levir_model(levir, tmp_path_factory):
    """A specialist for "buildings that appeared", trained on the 2019 images and LEVIR's labels."""
    from uvsam.training import TrainConfig, train

    root, _ = levir
    out = tmp_path_factory.mktemp("levir_model") / "built.ckpt"
    train(TrainConfig(images=str(root / "2019"), labels=str(root / "labels"), out=str(out),
                      encoder="efficientvit_sam_l0", gsd_m=1.0, crop=128, batch_size=4, epochs=12,
                      steps_per_epoch=30, sam_epochs=0, views_per_scene=2, warmup_steps=5, lr=2e-3,
                      min_area_m2=50.0), log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def levir_run(levir, levir_model, tmp_path_factory):
    """`uvsam predict` on both years into one GeoPackage, then `uvsam change --report` on it."""
    from uvsam.cli import main

    root, _ = levir
    out = tmp_path_factory.mktemp("levir_run")
    villages = out / "built.gpkg"
    for year in ("2016", "2019"):
        assert main(["predict", str(root / year), "--model", str(levir_model), "--out", str(villages),
                     "--layer", f"y{year}", "--no-refine", "--local", "--tile", "128", "--overlap", "64",
                     "--min-village-area", "50", "--acquired", f"{year}-06-01"]) == 0
    assert main(["change", f"2016={villages}:y2016", f"2019={villages}:y2019", "--out", str(out / "changes.gpkg"),
                 "--report", str(out / "report.html"), "--image", f"2016={root / '2016.vrt'}",
                 "--image", f"2019={root / '2019.vrt'}", "--min-overlap", "0.2"]) == 0
    return out


def test_predicted_buildings_appear_in_the_later_year(levir, levir_run):
    """Both years are predicted in the attached CRS; where LEVIR's labels mark the new buildings,
    far more is found in 2019 than in 2016, before they were built."""
    _, label = levir
    before = pyogrio.read_dataframe(levir_run / "built.gpkg", layer="y2016")
    after = pyogrio.read_dataframe(levir_run / "built.gpkg", layer="y2019")
    assert before.crs.to_epsg() == 32614 and after.crs.to_epsg() == 32614
    assert len(after) >= 10
    inside = [shapely.intersection(shapely.union_all(v.geometry.values), label).area for v in (before, after)]
    print("LEVIR inside labels 2016/2019 m2", inside)
    assert inside[1] > 5 * inside[0]
    tiles = pyogrio.read_dataframe(levir_run / "built.gpkg", layer="y2019_tiles")
    assert (tiles["status"] == "done").sum() >= 11


def test_changes_lie_where_levir_says_buildings_appeared(levir, levir_run):
    """The `new` and `expanded` changes overlap LEVIR's change labels: most of their area is
    labelled change and they cover a good part of it (by chance: 0.17 and about 0.12)."""
    _, label = levir
    changes = pyogrio.read_dataframe(levir_run / "changes.gpkg", layer="changes").to_crs(CRS)
    assert {"new"} <= set(changes["lifecycle"])
    grown = shapely.union_all(changes[changes["lifecycle"].isin(["new", "expanded"])].geometry.values)
    precision = shapely.intersection(grown, label).area / grown.area
    recall = shapely.intersection(grown, label).area / label.area
    print("LEVIR new+expanded vs labels: precision, recall", precision, recall)
    assert precision > 0.5 and recall > 0.4, (precision, recall)
    years = pyogrio.read_dataframe(levir_run / "changes.gpkg", layer="years")
    assert list(years["year"]) == ["2016", "2019"]
    runs = pyogrio.read_dataframe(levir_run / "changes.gpkg", layer="runs")
    coreg = json.loads(runs["coregistration"].iloc[-1])
    assert len(coreg) == 1 and coreg[0]["warning"] is False  # the co-registered pairs raise no alarm
    # each village of either year is in exactly one event: per-year totals add up
    for year, col in (("2016", "area_from_m2"), ("2019", "area_to_m2")):
        total = years.loc[years["year"] == year, "area_km2"].item() * 1e6
        assert changes[col].sum() == pytest.approx(total, rel=1e-3, abs=1.0)


def test_real_pairs_on_identical_grids_report_no_shift(levir, tmp_path):
    """LEVIR-CD pairs are co-registered, but many are bare land in one year and houses in the
    other: with so little unchanged ground one phase correlation finds a peak anyway. Every
    pair on its identical grid must come out either measured near zero or not measurable, never
    a misregistration; unrelated real images (one pair's earlier year against another's later)
    are never "measured"; a pair whose transform is moved 3 m east is measured within half a metre."""
    from uvsam.coregister import estimate_shift, shift_between

    root, _ = levir
    earlier = sorted((root / "2016").glob("*.tif"))
    shifts = [estimate_shift(a, root / "2019" / a.name, CRS) for a in earlier]
    print("LEVIR pair shifts (m, psr, agreeing):",
          [(round(s.metres, 2), round(s.psr, 1), f"{s.support}/{s.windows}") for s in shifts])
    assert all(s.metres < 2.0 for s in shifts if s.reliable)  # the threshold is 5 m: no warning
    assert sum(s.reliable for s in shifts) >= 3  # the pairs with enough unchanged ground are measured

    def grey(path):
        with rasterio.open(path) as ds:
            return ds.read().astype(float).mean(axis=0)

    later = [grey(root / "2019" / a.name) for a in earlier]
    ok = np.ones((256, 256), bool)
    unrelated = [shift_between(grey(a), later[j], ok, PIXEL) for i, a in enumerate(earlier)
                 for j in range(len(later)) if j != i]
    assert not any(s.reliable for s in unrelated), [s for s in unrelated if s.reliable]

    best = max(zip(shifts, earlier, strict=True), key=lambda t: t[0].psr)[1]
    moved = tmp_path / "moved.tif"
    with rasterio.open(best) as ds:
        with rasterio.open(moved, "w", **dict(ds.profile, transform=Affine.translation(3, 0) @ ds.transform)) as out:
            out.write(ds.read())
    base, s = estimate_shift(best, best.parent.parent / "2019" / best.name, CRS), estimate_shift(best, moved, CRS)
    assert s.reliable and s.east_m == pytest.approx(3, abs=0.5) and s.north_m == pytest.approx(0, abs=0.5)
    moved_pair = estimate_shift(moved, best.parent.parent / "2019" / best.name, CRS)  # the later year, 3 m west
    assert moved_pair.reliable and moved_pair.east_m - base.east_m == pytest.approx(-3, abs=0.5)


def test_levir_report_renders(levir_run):
    """The report of the real pairs opens in headless Chromium with its maps and thumbnails."""
    from tests.browser import render

    page = render(levir_run / "report.html")
    assert not page.errors, page.errors
    assert page.network == []
    assert len(page.images) >= 2 and all(done and width > 0 for done, width in page.images)
    assert page.screenshot.std() > 20


def test_structure_measure_is_calibrated_on_real_pairs(levir):
    """The consistency check's structure measure (:mod:`uvsam.consistency`) on real imagery of
    two dates: where LEVIR-CD says buildings changed it stays below the threshold in every pair;
    on ground without building change (64 x 64 px blocks clear of the change labels: another
    date, season and sensor, vegetation and yards still changing) it reaches the threshold at
    the median; a colour-only change of the same image is near 1."""
    from scipy import ndimage

    from uvsam.consistency import MIN_STRUCTURE, structure_similarity

    root, _ = levir
    changed, unchanged, recoloured = [], [], []
    for a_path in sorted((root / "2016").glob("*.tif")):
        with rasterio.open(a_path) as ds:
            a = ds.read().astype(float)
        with rasterio.open(root / "2019" / a_path.name) as ds:
            b = ds.read().astype(float)
        with rasterio.open(root / "labels" / a_path.name) as ds:
            label = ds.read(1) > 0
        valid = np.ones(label.shape, bool)
        if label.sum() >= 400:
            changed.append(structure_similarity(a, b, valid, PIXEL, label))
        near = ndimage.binary_dilation(label, iterations=4)
        for y in range(0, 256, 64):
            for x in range(0, 256, 64):
                block = np.zeros_like(label)
                block[y:y + 64, x:x + 64] = True
                if not (block & near).any():
                    unchanged.append(structure_similarity(a, b, valid, PIXEL, block))
        recoloured.append(structure_similarity(a, 255 * (a[[2, 0, 1]] / 255) ** 0.6, valid, PIXEL))
    print("structure on changed pixels:", np.round(changed, 2), "unchanged blocks (quartiles):",
          np.round(np.quantile(unchanged, [0.25, 0.5, 0.75]), 2))
    assert len(changed) >= 8 and max(changed) < MIN_STRUCTURE
    assert len(unchanged) >= 40 and np.median(unchanged) >= MIN_STRUCTURE
    assert min(recoloured) > 0.9
