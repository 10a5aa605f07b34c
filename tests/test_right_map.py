"""Issue 18: the documented path gives a right map. A generalist without verified weights never
erases villages, refinement never deletes a candidate, predict scores what evaluate scores on any
scene (small ones too), unsuitable scenes are refused before any work, signals exit non-zero."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import torch
from rasterio.features import rasterize
from rasterio.transform import from_origin

from tests.conftest import ROOT, run_cli
from uvsam.generalist import (
    EMPTY,
    INCONSISTENT,
    LOW_IOU,
    REFINED,
    UNVERIFIED,
    RefineRule,
    generalist_status,
    stability_score,
)


def _gpkg_iou(gpkg, layer, mask_path) -> float:
    """IoU of a GeoPackage layer rasterised on a mask's grid, as a GIS user would measure it."""
    g = pyogrio.read_dataframe(gpkg, layer=layer)
    with rasterio.open(mask_path) as ds:
        truth = ds.read(1) > 0
        g = g.to_crs(ds.crs)
        pred = (rasterize(((x, 1) for x in g.geometry), out_shape=truth.shape, transform=ds.transform, fill=0)
                .astype(bool) if len(g) else np.zeros_like(truth))
    return float((pred & truth).sum() / max((pred | truth).sum(), 1))


# -- a safe generalist ----------------------------------------------------------------------------
def test_refinement_is_judged_per_candidate():
    from affine import Affine

    from uvsam.prediction import RefineWindow, judge_candidate
    from uvsam.prediction.refine import mask_record

    rule, grid = RefineRule(), Affine.identity()  # pixel coordinates: pixel (r, c) covers [c, c+1] x [r, r+1]
    cand = shapely.box(0, 0, 100, 100)

    def rec(box, iou=0.95, stab=0.97, at=(0, 0)):
        mask = np.zeros((128, 128), bool)
        if box is not None:
            x0, y0, x1, y1 = box
            mask[y0 - at[1] : y1 - at[1], x0 - at[0] : x1 - at[0]] = True
        return mask_record(mask, RefineWindow(at[0], at[1], 128), iou, stab)

    tighter = (4, 4, 96, 97)
    assert judge_candidate(cand, [rec(tighter)], rule, grid)[1:] == (REFINED, 0.95)
    assert judge_candidate(cand, [rec(tighter)], rule, grid)[0].equals(shapely.box(*tighter))
    # two windows' pieces of one village are joined on the pixel grid (overlapping by half)
    left, right = rec((4, 4, 60, 97), at=(-40, -10)), rec((40, 4, 96, 97), at=(20, -10))
    outline, why, _ = judge_candidate(cand, [left, right], rule, grid)
    assert why == REFINED and outline.equals(shapely.box(*tighter)) and len(outline.geoms) == 1
    for records, reason in (([rec(None)], EMPTY), ([rec(tighter, iou=0.5)], LOW_IOU),
                            ([rec((0, 0, 20, 20))], INCONSISTENT),
                            ([rec(tighter), rec(tighter, stab=0.2)], "unstable mask")):  # the least stable window
        outline, why, _ = judge_candidate(cand, records, rule, grid)
        assert why == reason and outline is cand  # the specialist's outline stays
    logits = np.full((10, 10), -5.0)
    logits[2:8, 2:8] = 5.0
    assert stability_score(logits) == 1.0
    logits[2:8, 2:8] = 0.5  # a mask that exists only near the threshold
    assert stability_score(logits) == 0.0


def test_only_official_weights_are_verified(monkeypatch):
    import uvsam.weights

    assert not generalist_status({"generalist": {"source": "random", "sha256": None}}, "mobile_sam").verified
    monkeypatch.setattr(uvsam.weights, "expected_sha256", lambda spec: "a" * 64)
    ok = generalist_status({"generalist": {"source": "file", "sha256": "a" * 64}}, "mobile_sam")
    other = generalist_status({"generalist": {"source": "file", "sha256": "b" * 64}}, "mobile_sam")
    assert ok.verified and not other.verified and "not the official" in other.note
    monkeypatch.setattr(uvsam.weights, "expected_sha256", lambda spec: None)
    assert not generalist_status({"generalist": {"source": "file", "sha256": "a" * 64}}, "mobile_sam").verified


def test_default_predict_keeps_every_candidate_with_the_random_generalist(beijing, model, tmp_path, capsys):
    """Acceptance: the random generalist reachable here does not refine by default, and says so once."""
    base = ["predict", beijing / "val/images", "--model", model, "--local"]
    code, _, err = run_cli(base + ["--out", tmp_path / "default.gpkg"], capsys)
    assert code == 0, err
    assert err.count("random weights") == 1 and "--force-refine" in err
    code, _, err = run_cli(base + ["--out", tmp_path / "plain.gpkg", "--no-refine"], capsys)
    assert code == 0, err
    a = pyogrio.read_dataframe(tmp_path / "default.gpkg", layer="villages")
    b = pyogrio.read_dataframe(tmp_path / "plain.gpkg", layer="villages")
    cands = pyogrio.read_dataframe(tmp_path / "default.gpkg", layer="candidates")
    assert len(a) == len(b) > 0 and len(cands) >= len(a)
    assert all(x.equals_exact(y, 1e-9) for x, y in zip(a.geometry, b.geometry, strict=True))
    assert set(a["refine_reason"]) == {UNVERIFIED} and not a["refined"].any() and a["predicted_iou"].isna().all()
    runs = pyogrio.read_dataframe(tmp_path / "default.gpkg", layer="runs")
    assert runs["refinement"][0] == "off: generalist not verified"


def test_a_generalist_that_returns_empty_masks_loses_no_village(beijing, model, tmp_path, monkeypatch):
    from uvsam.modeling.uvsam import UVSAM
    from uvsam.prediction import PredictConfig, model_info, predict_scene

    cascaded = []

    def empty(self, images, boxes, cascade=False):  # confident (predicted IoU 0.99) and empty
        cascaded.append(cascade)
        h, w = images.shape[-2:]
        return [(torch.full((len(b), 1, h, w), -20.0), torch.full((len(b),), 0.99)) for b in boxes]

    info = model_info(model)
    scene = beijing / "train/images.vrt"
    plain = predict_scene(scene, info, PredictConfig(refine=False), tmp_path / "a")
    monkeypatch.setattr(UVSAM, "refine", empty)
    forced = predict_scene(scene, info, PredictConfig(force_refine=True, cascade=True), tmp_path / "b")
    assert cascaded and all(cascaded)  # --cascade reaches every refinement window
    assert forced.refine_on and len(plain.villages) == len(forced.villages) > 0
    assert shapely.union_all(plain.villages).symmetric_difference(shapely.union_all(forced.villages)).area == 0
    assert EMPTY in forced.reasons and not any(forced.refined)


def test_training_skips_the_uvsam_path_without_verified_weights(beijing, tmp_path):
    from uvsam.training import TrainConfig, train

    messages: list[str] = []
    cfg = TrainConfig(images=str(beijing / "train/images"), labels=str(beijing / "train/masks"),
                      out=str(tmp_path / "m.ckpt"), gsd_m=3.7, crop=64, batch_size=2, epochs=2, steps_per_epoch=2,
                      sam_epochs=1, views_per_scene=1, warmup_steps=1)
    last = train(cfg, log=messages.append)
    assert sum("train the specialist alone" in m for m in messages) == 1
    assert last["sam_path"] == 0 and last["embeddings_cached"] == 0


# -- predict = evaluate -----------------------------------------------------------------------------
def test_a_scene_smaller_than_a_tile_gets_a_tile_of_its_own_size():
    from uvsam.prediction import PredictConfig, scene_tiling

    assert scene_tiling(PredictConfig(), 331, 331) == (331, 165, 0)
    assert scene_tiling(PredictConfig(), 200, 900) == (512, 256, 0)
    assert scene_tiling(PredictConfig(tile=128, overlap=64), 331, 331) == (128, 64, 0)


def test_predict_scores_what_evaluate_scores(beijing, model, tmp_path, capsys):
    """Acceptance: on each val tile alone and on the val mosaic, the IoU of predict's GeoPackage
    (default options) equals evaluate's polygons IoU (within 0.005) and is no lower than the
    specialist's minus 0.01; a single XYZ tile is no longer mostly 'village' through predict."""
    from uvsam.evaluation import evaluate
    from uvsam.modelfile import load_model
    from uvsam.prediction import PredictConfig, model_info, predict_scene

    val = beijing / "val"
    cases = [(p, val / "masks" / p.name) for p in sorted((val / "images").glob("*.tif"))]
    cases.append((val / "images.vrt", val / "masks.vrt"))
    for k, (image, mask) in enumerate(cases):
        out = tmp_path / f"v{k}.gpkg"
        code, _, err = run_cli(["predict", image, "--model", model, "--out", out, "--local"], capsys)
        assert code == 0, err
        res = evaluate(model, image, mask, specialist_only=True)
        shipped = _gpkg_iou(out, "villages", mask)
        assert abs(shipped - res["polygons"]["iou"]) <= 0.005, (image.name, shipped, res["polygons"])
        assert res["polygons"]["iou"] >= res["specialist"]["iou"] - 0.01, (image.name, res)
    # the padding regression: predict's village share on one 1024 px tile equals the model's own
    image = cases[0][0]
    info = model_info(model)
    mosaic = predict_scene(image, info, PredictConfig(refine=False), tmp_path / "w").mosaic
    with rasterio.open(mosaic) as ds:
        prob = ds.read(1)
    from uvsam.datasets import LabelledScene, load_scene
    from uvsam.inference import predict_scene as in_memory
    from uvsam.modelfile import ModelFile

    net, meta = load_model(model)
    scene = load_scene(LabelledScene(image, cases[0][1]), ModelFile.read(model).inputs)
    ref = in_memory(net, scene.image, np.ones(scene.shape, bool), full=False).specialist
    assert prob.shape == ref.shape
    assert abs(float((prob >= 0.5).mean()) - float(ref.mean())) < 0.02


# -- suitability ----------------------------------------------------------------------------------------
def _regrid(src_path, dst_path, pixel_m):
    with rasterio.open(src_path) as src:
        data = src.read()
    with rasterio.open(dst_path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=3,
                       dtype="uint8", crs="EPSG:32650", transform=from_origin(450000, 4420000, pixel_m, pixel_m)) as d:
        d.write(data)


def test_unsuitable_scenes_are_refused_before_any_work(beijing, model, data_dir, tmp_path, capsys):
    tile = beijing / "val/images/49554_107968.tif"
    _regrid(tile, tmp_path / "drone.tif", 0.077)
    _regrid(tile, tmp_path / "suburb.tif", 0.3)
    for scene, words in ((data_dir / "rasterio-rgb/RGB.byte.tif", ("300 m", "coarser")),
                         (tmp_path / "drone.tif", ("7.7 cm", "finer", "too small"))):
        out = tmp_path / f"{scene.stem}.gpkg"
        code, stdout, err = run_cli(["predict", scene, "--model", model, "--out", out, "--local"], capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith(f"uvsam: error: {scene}"), err
        assert all(w in err for w in words) and "--force" in err
        assert not out.exists() and not out.with_name(out.stem + ".work").exists()
    code, _, err = run_cli(["predict", tmp_path / "drone.tif", "--model", model, "--out", tmp_path / "forced.gpkg",
                            "--local", "--force"], capsys)
    assert code == 0 and "run with --force despite" in err, err
    out = tmp_path / "suburb.gpkg"  # 3x finer than the training imagery: a warning, recorded
    code, _, err = run_cli(["predict", tmp_path / "suburb.tif", "--model", model, "--out", out, "--local"], capsys)
    assert code == 0 and "warning: suburb.tif: ground resolution 30.0 cm is 3x finer" in err, err
    record = json.loads(pyogrio.read_dataframe(out, layer="runs")["suitability"][0])[0]
    assert record["warnings"] and not record["problems"] and record["training_gsd_m"] == pytest.approx(0.92, abs=0.01)


# -- signals --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("sig", "code", "name"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_a_signal_exits_non_zero_and_says_how_to_resume(beijing, model, tmp_path, sig, code, name):
    out = tmp_path / "v.gpkg"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "uvsam", "predict", str(beijing / "train/images.vrt"), "--model",
                             str(model), "--out", str(out), "--local", "--tile", "64", "--overlap", "32"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    journal = tmp_path / "v.work" / "villages" / "journal"
    deadline = time.monotonic() + 120
    while not (journal.is_dir() and any(journal.rglob("tiles-*"))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"uvsam: interrupted ({name})") and "run the same command again" in last
    assert "Traceback" not in err and not out.exists() and any(journal.rglob("tiles-*"))


def test_import_xyz_creates_missing_parent_folders(data_dir, tmp_path, capsys):
    """The documented commands work on a fresh machine: `--out /tmp/bj/val` with no /tmp/bj yet."""
    out = tmp_path / "fresh" / "bj" / "val"
    code, stdout, err = run_cli(["import-xyz", data_dir / "beijing-uv/image/val", "--zoom", 17, "--out", out,
                                 "--masks", data_dir / "beijing-uv/mask/val"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["images"] == 2 and len(list((out / "masks").glob("*.tif"))) == 2
