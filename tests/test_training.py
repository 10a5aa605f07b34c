"""Training and evaluation on the real Beijing tiles (imported with `uvsam import-xyz`),
labelled scenes from vector files in other CRSs, metrics and harmonisation."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import rasterio
import torch

from tests.conftest import run_cli
from uvsam.datasets import LabelledScene, load_scene, pair_scenes
from uvsam.errors import InputError
from uvsam.harmonise import histogram_match, measure
from uvsam.labels import IGNORE
from uvsam.metrics import SegmentationCounts, match_objects
from uvsam.modelfile import ModelFile, load_model, read_model_file
from uvsam.preprocess import InputSpec
from uvsam.training import TrainConfig, lr_factor, phase_lr_factor, train

GSD = 3.7  # metres: the 1024 px Beijing tiles become ~256 px, so CPU steps are quick


def _cfg(beijing, out, **kw) -> TrainConfig:
    base = dict(images=str(beijing / "train/images"), labels=str(beijing / "train/masks"), out=str(out),
                encoder="mobile_sam", gsd_m=GSD, crop=64, batch_size=4, epochs=2, steps_per_epoch=4,
                sam_epochs=1, views_per_scene=1, warmup_steps=2, lr=1e-3, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_training_loss_falls(beijing, tmp_path):
    """A few specialist steps on small crops of the real tiles: the loss falls."""
    cfg = _cfg(beijing, tmp_path / "m.ckpt", epochs=1, steps_per_epoch=30, sam_epochs=0, lr=2e-3, warmup_steps=3,
               batch_size=8, val_images=str(beijing / "val/images"), val_labels=str(beijing / "val/masks"))
    messages = []
    last = train(cfg, log=messages.append)
    assert "training on 6 scenes" in messages[0] and "2 validation scenes" in messages[0]
    assert 0 <= last["val_specialist_iou"] <= 1
    with open(tmp_path / "m.steps.csv") as f:
        losses = [float(r["loss_total"]) for r in csv.DictReader(f)]
    assert len(losses) == 30
    assert np.mean(losses[-8:]) < 0.85 * np.mean(losses[:8]), losses


def test_resume_equals_an_uninterrupted_run(beijing, tmp_path, monkeypatch):
    monkeypatch.setenv("UVSAM_CACHE", str(tmp_path / "cache"))
    full = _cfg(beijing, tmp_path / "full.ckpt", force_refine=True)  # the UV-SAM path trains (random generalist)
    train(full, log=lambda m: None)
    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache/embeddings").rglob("*.npy")}
    assert len(cached) == 6  # the fixed pool's embeddings, on disk by content
    part = _cfg(beijing, tmp_path / "part.ckpt", force_refine=True)
    train(part, log=lambda m: None, stop_after=1)  # as if killed after the first epoch
    with pytest.raises(InputError, match="exists"):
        train(part, log=lambda m: None)  # never overwrites an existing model silently
    with pytest.raises(InputError, match="different settings.*lr"):
        train(_cfg(beijing, tmp_path / "part.ckpt", lr=5e-4, force_refine=True), resume=True, log=lambda m: None)
    train(_cfg(beijing, tmp_path / "part.ckpt", force_refine=True), resume=True, log=lambda m: None)
    a, b = read_model_file(tmp_path / "full.ckpt"), read_model_file(tmp_path / "part.ckpt")
    assert a["meta"]["epoch"] == b["meta"]["epoch"] == 2
    for k in a["state"]:
        torch.testing.assert_close(a["state"][k], b["state"][k], msg=k)
    hist = a["training"]["history"]
    assert hist[1]["sam_path"] == 1 and hist[1]["embeddings_cached"] == 6  # the fixed pool, encoded once
    # the second run took the same views' embeddings from disk (nothing encoded or rewritten) and trained the same
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache/embeddings").rglob("*.npy")} == cached


def test_model_file_reproduces_preprocessing_and_evaluate_cli(beijing, tmp_path, capsys):
    out = tmp_path / "m.ckpt"
    code, stdout, err = run_cli(
        ["train", "--images", beijing / "train/images", "--labels", beijing / "train/masks", "--out", out,
         "--val-images", beijing / "val/images", "--val-labels", beijing / "val/masks", "--epochs", 1,
         "--steps", 2, "--sam-epochs", 1, "--crop", 64, "--batch-size", 2, "--gsd", GSD,
         "--views-per-scene", 1, "--photometric", "--force-refine"], capsys)
    assert code == 0, err
    assert "random weights" in err  # the user is told the generalist is not a published one
    model, meta = load_model(out)
    assert model.config.gsd_m == GSD and "gsd_m" not in meta  # stored once, in the config
    assert ModelFile.read(out).gsd_m == GSD and meta["generalist"]["source"] == "random"
    assert meta["train_config"]["crop"] == 64 and len(meta["radiometry"]["quantiles"]) == 3
    assert meta["train_config"]["photometric"] is True  # the opt-in augmentation is recorded
    with open(tmp_path / "m.metrics.csv") as f:
        row = next(csv.DictReader(f))
    assert 0 <= float(row["val_uvsam_iou"]) <= 1
    code, stdout, err = run_cli(["evaluate", "--model", out, "--images", beijing / "val/images",
                                 "--labels", beijing / "val/masks"], capsys)
    assert code == 0, err
    res = json.loads(stdout)
    for path in ("specialist", "uvsam", "polygons"):
        assert set(res[path]) >= {"iou", "f1", "precision", "recall", "object_f1"}
    assert res["refinement"].startswith("off: the mobile_sam generalist has random weights")
    village_share = res["baselines"]["all_village_iou"]
    assert 0.2 < village_share < 0.3  # the val tiles are 24-28 % village
    # a generalist checkpoint is not a model file: one clear line, exit 2
    (tmp_path / "sam.pt").write_bytes(b"")
    code, _, err = run_cli(["evaluate", "--model", tmp_path / "sam.pt", "--images", beijing / "val/images",
                            "--labels", beijing / "val/masks"], capsys)
    assert code == 2 and err.count("\n") == 1 and "sam.pt" in err and "empty" in err


def test_vector_labels_in_another_crs_rasterise_like_the_native_ones(data_dir, tmp_path):
    import geopandas as gpd

    image = data_dir / "spacenet-atlanta/atlanta_pan_uint16.tif"
    native = data_dir / "spacenet-atlanta/atlanta_buildings.geojson"
    gdf = gpd.read_file(native)
    other = tmp_path / "buildings_3857.gpkg"
    gdf.to_crs("EPSG:3857").to_file(other)
    a = load_scene(LabelledScene(image, native), InputSpec(None))
    b = load_scene(LabelledScene(image, other), InputSpec(None))
    assert a.image.shape == (3, 900, 900) and a.image.max() <= 255  # 16-bit panchromatic, stretched
    assert (a.labels == 1).sum() > 1000
    agree = (a.labels == b.labels).mean()
    assert agree > 0.999


def test_labels_without_a_crs_member_are_refused_clearly(data_dir):
    image = data_dir / "odd-inputs/landsat_albers_int16.tif"
    labels = data_dir / "odd-inputs/fields_albers_no_crs_member.geojson"
    with pytest.raises(InputError, match="not longitude/latitude.*--labels-crs"):
        load_scene(LabelledScene(image, labels), InputSpec(None))
    with rasterio.open(image) as src:
        crs = src.crs.to_wkt()
    scene = load_scene(LabelledScene(image, labels), InputSpec(None), labels_crs=crs)
    assert (scene.labels == 1).any()


def test_a_config_recorded_before_a_setting_existed_reads_as_it_ran(tmp_path):
    """Model files written before `photometric` was a setting trained with the augmentation on:
    resuming one must not silently switch it off."""
    cfg = TrainConfig(images="a", labels="b", out=str(tmp_path / "m.ckpt"))
    old = {k: v for k, v in cfg.to_dict().items() if k != "photometric"}
    assert TrainConfig.from_dict(old).photometric is True
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_pairing_by_stem_and_missing_labels(beijing, tmp_path):
    pairs = pair_scenes(beijing / "train/images", beijing / "train/masks")
    assert len(pairs) == 6 and all(p.image.stem == p.labels.stem for p in pairs)
    (tmp_path / "labels").mkdir()
    with pytest.raises(InputError, match="folder holds no label files"):
        pair_scenes(beijing / "train/images", tmp_path / "labels")
    (tmp_path / "labels/49570_107872.tif").write_bytes((beijing / "train/masks/49570_107872.tif").read_bytes())
    with pytest.raises(InputError, match="49566_107866.tif: no labels named 49566_107866"):
        pair_scenes(beijing / "train/images", tmp_path / "labels")
    with pytest.raises(InputError, match="matches no rasters"):
        pair_scenes(str(tmp_path / "*.tif"), beijing / "train/masks")


def test_metrics_pixel_and_object_counts():
    labels = np.zeros((10, 10), np.uint8)
    labels[0:4, 0:4] = 1  # village A (16 px)
    labels[6:10, 6:10] = 1  # village B (16 px)
    labels[:, 5] = IGNORE
    pred = np.zeros((10, 10), bool)
    pred[0:4, 0:3] = True  # 12 px of A: IoU 0.75, matched
    pred[6:7, 6:7] = True  # 1 px of B: IoU 1/16, not matched
    pred[:, 5] = True  # ignored column
    c = SegmentationCounts()
    c.update(pred, labels)
    s = c.summary()
    assert (c.tp, c.fp, c.fn) == (13, 0, 19)
    assert s["iou"] == pytest.approx(13 / 32) and s["precision"] == 1.0
    assert s["object_f1"] == pytest.approx(2 * 0.5 * 0.5 / (0.5 + 0.5))
    assert match_objects(pred & (labels != IGNORE), labels == 1) == (2, 2, 1)


def test_histogram_match_maps_onto_the_reference_and_ignores_nodata():
    rng = np.random.default_rng(0)
    ref_img = rng.normal(120, 30, (4, 200, 200)).clip(0, 255)  # four bands
    src_img = rng.gamma(2.0, 20.0, (4, 200, 200)).clip(0, 255)
    valid = np.ones((200, 200), bool)
    valid[:50] = False
    src_img[:, :50] = 0.0  # nodata rows must not shape the map
    reference = measure([ref_img], [np.ones((200, 200), bool)])
    source = measure([src_img], [valid])
    out = histogram_match(src_img, source, reference, valid)
    for b in range(4):
        got = np.quantile(out[b][valid], [0.1, 0.5, 0.9])
        want = np.quantile(ref_img[b], [0.1, 0.5, 0.9])
        np.testing.assert_allclose(got, want, atol=2.0)
        order = np.argsort(src_img[b][valid])
        assert (np.diff(out[b][valid][order]) >= -1e-4).all()  # monotone
    assert (out[:, :50] == 0).all()


def test_lr_schedule_warms_up_then_decays():
    f = [lr_factor(s, 10, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False)) and f[-1] < 0.01
    g = [phase_lr_factor(s, 10, 100, 40) for s in range(100)]  # the UV-SAM epochs restart the schedule
    assert g[:60] == [lr_factor(s, 10, 60) for s in range(60)] and g[59] < 0.01
    assert max(g[60:]) == pytest.approx(1.0) and g[-1] < 0.01
