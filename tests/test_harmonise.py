"""Radiometric harmonisation of whole scenes (issue 9): 16-bit and multi-band scenes, nodata
ignored, the same map for every tile of a scene."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.enums import ColorInterp
from rasterio.transform import from_origin
from rasterio.windows import Window

from tiles.reader import RasterSource
from uvsam.harmonise import Radiometry, measure
from uvsam.prediction import ModelInfo, PredictConfig, prepare_scene, read_tile
from uvsam.preprocess import InputSpec

TRANSFORM = from_origin(12942317.6, 4882797.4, 1.194, 1.194)  # the Beijing grid, EPSG:3857


@pytest.fixture(scope="module")
def summer(data_dir) -> np.ndarray:
    """A real summer val tile (3, 1024, 1024) uint8 and a nodata region (a scene's ragged edge)."""
    img = np.asarray(Image.open(data_dir / "beijing-uv/image/val/49554_107968.png").convert("RGB"))
    return np.ascontiguousarray(img.transpose(2, 0, 1))


@pytest.fixture(scope="module")
def winter_radiometry(beijing_tile) -> dict:
    """The training radiometry a model would carry (a winter train tile)."""
    img = beijing_tile.transpose(2, 0, 1).astype(np.float32)
    return measure([img], [np.ones(img.shape[1:], bool)]).to_dict()


def _edge(shape) -> np.ndarray:
    valid = np.ones(shape, bool)
    rows = np.arange(shape[0])[:, None]
    valid[:, :] &= np.arange(shape[1])[None, :] > 300 - rows // 3  # a slanted no-data edge on the left
    return valid


def _write(path, bands: np.ndarray, dtype: str, nodata, colorinterp=None):
    with rasterio.open(path, "w", driver="GTiff", width=bands.shape[2], height=bands.shape[1], count=bands.shape[0],
                       dtype=dtype, crs="EPSG:3857", transform=TRANSFORM, nodata=nodata,
                       photometric="MINISBLACK" if bands.shape[0] != 3 else "RGB") as ds:
        ds.write(bands.astype(dtype))
        if colorinterp:
            ds.colorinterp = colorinterp
    return path


def _info(radiometry: dict) -> ModelInfo:
    return ModelInfo("m.ckpt", None, "0" * 64, InputSpec(3.7, None, "auto", True, Radiometry.from_dict(radiometry)),
                     8390.0)


def _harmonised(path, info, window=Window(0, 0, 256, 256)):
    scene, prep = prepare_scene(path, info, PredictConfig())
    with RasterSource(prep.path, prep.read) as src:
        return (*read_tile(prep, info, window, src), prep)


def test_16_bit_multiband_scene_harmonises_like_its_8_bit_rgb(summer, winter_radiometry, tmp_path):
    """A 4-band 16-bit scene (blue, green, red, near-infrared; each band its own gain and offset,
    nodata 0 along a ragged edge) reaches the model as the same harmonised RGB as the 8-bit
    RGB original: bands found by colour interpretation, nodata kept out of every statistic."""
    valid = _edge(summer.shape[1:])
    rgb8 = np.where(valid, summer, 0)
    path8 = _write(tmp_path / "rgb8.tif", rgb8, "uint8", 0)
    gains, offsets = (41.0, 37.0, 29.0), (900.0, 1400.0, 600.0)
    red, green, blue = (summer[b] * g + o for b, g, o in zip(range(3), gains, offsets, strict=True))
    nir = 3000.0 + 20.0 * summer[1] - 10.0 * summer[0]
    bgrn = np.where(valid, np.stack([blue, green, red, nir]), 0)
    path16 = _write(tmp_path / "bgrn16.tif", bgrn, "uint16", 0,
                    [ColorInterp.blue, ColorInterp.green, ColorInterp.red, ColorInterp.undefined])
    info = _info(winter_radiometry)
    a, valid_a, prep_a = _harmonised(path8, info)
    b, valid_b, prep_b = _harmonised(path16, info)
    assert valid_a.mean() < 0.9 and (valid_a == valid_b).all()
    assert prep_b.read.bands is None  # chosen by the reader: red, green, blue = bands 3, 2, 1
    # measured on valid pixels only: with the 13 % of zeros along the edge counted, the 10 % quantile would be 0
    for prep in (prep_a, prep_b):
        assert np.asarray(Radiometry.from_dict(prep.source_radiometry).quantiles)[:, 10].min() > 5.0
    # the 16-bit scene is stretched (2-98 %) and the 8-bit one is not, so their measured radiometries
    # differ; histogram matching is blind to such monotone maps: the model sees the same image
    diff = np.abs(a - b)[:, valid_a]
    assert diff.mean() < 1.5 and np.percentile(diff, 95) < 4.0  # the 2 % tails the 16-bit stretch clips differ
    # harmonised onto the winter radiometry: the summer scene's band medians move to the winter ones
    winter_median = np.asarray(Radiometry.from_dict(winter_radiometry).quantiles)[:, 50]
    for img in (a, b):
        assert np.abs(np.median(img[:, valid_a], axis=1) - winter_median).max() < 6.0


def test_nodata_never_shapes_the_harmonisation(summer, winter_radiometry, tmp_path):
    """The same scene with a much larger no-data area keeps the map of its valid pixels (the
    map is measured on valid samples, not on the fill value)."""
    valid = _edge(summer.shape[1:])
    wide = valid.copy()
    wide[:, :700] = False  # two thirds of the scene are nodata
    info = _info(winter_radiometry)
    maps = []
    for name, mask in (("edge", valid), ("wide", wide)):
        path = _write(tmp_path / f"{name}.tif", np.where(mask, summer, 0), "uint8", 0)
        img, ok, prep = _harmonised(path, info, Window(180, 60, 64, 64))  # right third, at the model's 3.7 m
        assert ok.all()
        maps.append(img)
        assert prep.source_radiometry is not None
    # the wide-nodata scene's statistics come from another third of the image, so they differ a
    # little; filling the nodata with zeros would shift every quantile by 2/3 of the range
    assert np.abs(maps[0] - maps[1]).mean() < 12.0
    assert np.abs(maps[0].mean() - maps[1].mean()) < 8.0


def test_every_tile_of_a_scene_gets_the_same_map(summer, winter_radiometry, tmp_path):
    """The map is fixed per scene: a pixel read in two overlapping tiles comes out the same."""
    path = _write(tmp_path / "s.tif", summer, "uint8", None)
    info = _info(winter_radiometry)
    scene, prep = prepare_scene(path, info, PredictConfig())
    with RasterSource(prep.path, prep.read) as src:
        a, _ = read_tile(prep, info, Window(0, 0, 160, 160), src)  # the scene is 253 px at 3.7 m
        b, _ = read_tile(prep, info, Window(80, 80, 160, 160), src)
    np.testing.assert_array_equal(a[:, 80:, 80:], b[:, :80, :80])


def test_pif_normalisation_ignores_what_changed_between_the_years(summer, winter_radiometry, beijing_tile, tmp_path):
    """A scene whose left 40 % was rebuilt since the reference year and whose radiometry differs
    by a known per-band gain and offset: the map fitted on pseudo-invariant pixels recovers the
    gain and offset, so unchanged ground matches the reference year; whole-scene histogram
    matching, pulled by the rebuilt part, does worse there. The map is in the run record."""
    from uvsam.harmonise import histogram_match as match

    reference = _write(tmp_path / "ref.tif", summer, "uint8", None)
    gains, offsets = np.array([1.25, 0.9, 1.1]), np.array([-30.0, 12.0, -5.0])  # reference = gain * scene + offset
    scene = (summer.astype(np.float64) - offsets[:, None, None]) / gains[:, None, None]
    rebuilt = beijing_tile.transpose(2, 0, 1)[:, :, :410].astype(np.float64)  # another place, another season
    scene[:, :, :410] = rebuilt * 0.8 + 20
    scene = scene.round().clip(0, 255)
    path = _write(tmp_path / "scene.tif", scene, "uint8", None)
    info = _info(winter_radiometry)
    _, prep = prepare_scene(path, info, PredictConfig(pif_reference=str(reference)))
    fitted = prep.pif
    assert fitted["reference"] == str(reference) and fitted["pixels"] > 10_000
    np.testing.assert_allclose(fitted["gains"], gains, rtol=0.05)
    np.testing.assert_allclose(fitted["offsets"], offsets, atol=6.0)
    unchanged = np.s_[:, :, 500:]
    pif_mapped = (scene * np.asarray(fitted["gains"])[:, None, None] + np.asarray(fitted["offsets"])[:, None, None])
    pif_error = np.abs(pif_mapped.clip(0, 255)[unchanged] - summer[unchanged]).mean()
    everything = np.ones(scene.shape[1:], bool)
    whole_scene, reference_year = measure([scene], [everything]), measure([summer.astype(float)], [everything])
    hist = match(scene.astype(np.float32), whole_scene, reference_year)
    hist_error = np.abs(hist[unchanged] - summer[unchanged]).mean()
    assert pif_error < 3.0 and pif_error < 0.6 * hist_error, (pif_error, hist_error)
    from uvsam.prediction import harmonisation_record

    record = harmonisation_record(prep)
    assert record["mode"] == "pif" and record["pif"]["gains"] == fitted["gains"]


def test_raw_levels_looked_up_equal_the_steps_computed_pixel_by_pixel(summer, winter_radiometry):
    """8- and 16-bit pixels reach the model through a table of what the preprocessing gives each
    raw level: the same float32 values as the steps computed pixel by pixel, for RGB, one-band and
    four-band data, with histogram matching, a PIF map, a fill colour and a no-data edge."""
    from tiles.radiometry import compute_stretch
    from uvsam.harmonise import LinearMap
    from uvsam.preprocess import Preprocessing

    valid = _edge(summer.shape[1:])
    reference = Radiometry.from_dict(winter_radiometry)
    source = measure([summer.astype(np.float32)], [valid])
    wide = (summer.astype(np.uint16) * 211 + np.arange(summer.shape[2], dtype=np.uint16) % 200).astype(np.uint16)
    cases = 0
    for data in (summer, summer[1:2], wide, np.concatenate([wide, wide[:1] // 2])):
        stretch = compute_stretch(data, valid, "auto")
        pif = LinearMap(tuple(np.linspace(0.9, 1.2, len(data))), tuple(np.linspace(-20, 15, len(data))), 1000, 2.0)
        for prep in (Preprocessing(stretch, None, None, source, reference, (120.0, 110.0, 100.0)),
                     Preprocessing(stretch, pif, "ref.tif"),
                     Preprocessing(stretch, fill=(1.0, 2.0, 3.0))):
            for mask in (valid, np.ones_like(valid)):
                looked_up = prep.apply(data, mask)
                assert looked_up.dtype == np.float32 and looked_up.shape == (3, *summer.shape[1:])
                np.testing.assert_array_equal(looked_up, prep._compute(data, mask))
                cases += 1
        assert len(prep._tables) == 1  # built once for the scene's dtype and bands
    assert cases == 24
