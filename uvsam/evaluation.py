"""``uvsam evaluate``: a trained model on labelled scenes, scored on what ``uvsam predict`` ships.

Each scene goes through predict's own scene pipeline (:func:`uvsam.prediction.predict_scene`:
specialist mosaic -> candidates -> refinement -> polygons, with the same tiling, reading,
normalisation and harmonisation), and three things are scored on the label grid (the image's
own pixels, labels rasterised or resampled onto it):

- ``polygons``: the village polygons predict writes, rasterised;
- ``specialist``: predict's probability mosaic, resampled bilinearly, at predict's threshold;
- ``uvsam``: the model's own in-memory UV-SAM path at its training GSD (training's validation
  path; equal to its specialist when the generalist does not refine).

The JSON also gives the two trivial baselines (all background, all village) on the same pixels.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
from rasterio.features import rasterize
from rasterio.warp import Resampling, reproject

from uvsam.config import RefineRule
from uvsam.datasets import LabelledScene, load_scene, pair_scenes, rasterise_labels, read_validity
from uvsam.errors import ConfigError, InputError
from uvsam.files import check_writable
from uvsam.inference import predict_scene as predict_in_memory
from uvsam.labels import IGNORE
from uvsam.metrics import SegmentationCounts
from uvsam.modelfile import ModelFile
from uvsam.modeling.uvsam import ABLATIONS, SPECIALIST_ONLY
from uvsam.pictures import overlay
from uvsam.prediction import PredictConfig, close_sources, get_model, model_info, predict_scene, prepare_scene, refines
from uvsam.progress import Progress


def evaluate(model_path: str | Path, images: str | Path, labels: str | Path, checkpoint: str | Path | None = None,
             window: int = 512, labels_crs: str | None = None, specialist_only: bool = False,
             predict_config=None, log=None, overlays: str | Path | None = None, ablations: bool = False) -> dict:
    """Scores of a model on labelled scenes (see the module docstring); ``specialist_only``
    skips the in-memory UV-SAM path. ``predict_config``: predict's settings (default: its
    defaults); ``overlays``: a folder for each scene's overlay PNG; ``ablations``: also score
    the UV-SAM path with each prompt and embedding left out (:data:`uvsam.modeling.uvsam.ABLATIONS`)."""
    return evaluate_pairs(model_path, pair_scenes(images, labels), checkpoint, window, labels_crs, specialist_only,
                          predict_config, log, overlays, ablations)


def evaluate_pairs(model_path: str | Path, pairs: list[LabelledScene], checkpoint: str | Path | None = None,
                   window: int = 512, labels_crs: str | None = None, specialist_only: bool = False,
                   predict_config=None, log=None, overlays: str | Path | None = None, ablations: bool = False) -> dict:
    """:func:`evaluate` on scenes already paired with their labels; ``overlays``: a folder for
    one PNG per scene of hits, false alarms and misses of the shipped villages."""
    if ablations and specialist_only:
        raise ConfigError("the ablations score the UV-SAM path: leave out --specialist-only", field="ablations")
    if overlays is not None:
        overlays = check_writable(Path(overlays) / "x.png", folder=True).parent
    cfg = predict_config or PredictConfig()
    info = model_info(model_path, checkpoint, cfg.device, cfg.precision)  # the device is checked first
    model_file = ModelFile.read(model_path)
    model = None if specialist_only else get_model(info)  # the instance predict's steps use too
    refine = refines(cfg, info)
    names = ["specialist", "polygons"] + ([] if specialist_only else ["uvsam"])
    counts = {k: SegmentationCounts() for k in names + ["all_village"]}
    variants = ablation_variants(model.config) if ablations else {}
    paths = {k: SegmentationCounts() for k in variants}
    per_scene = []
    with Progress(len(pairs), "scenes", task="evaluate") as bar:
        for pair in pairs:
            per_scene.append(_score_pair(pair, info, cfg, labels_crs, counts, model, model_file, window, refine,
                                         specialist_only, overlays))
            for name, config in variants.items():  # the UV-SAM path, one prompt left out at a time
                base, model.config = model.config, config
                try:
                    pred, labels, pixel_m = in_memory_uvsam(model, model_file, pair, window, labels_crs, True, cfg,
                                                            info.device, rule=PAPER_RULE)
                finally:
                    model.config = base
                paths[name].update(pred, labels, pixel_m=pixel_m)
            bar.advance()
    if log is not None and cfg.refine and not refine:  # after the inputs were all read: errors come alone
        log(f"note: {info.generalist_note}: villages kept the specialist's outlines (not refined)")
    result = {k: counts[k].summary() for k in names}
    result["baselines"] = {"all_background_iou": 0.0, "all_village_iou": counts["all_village"].summary()["iou"]}
    if ablations:
        result["ablations"] = {**{k: c.summary() for k, c in paths.items()},
                               SPECIALIST_ONLY: result["specialist"]}
        result["ablations_generalist"] = ("official weights" if info.generalist_verified
                                          else f"{info.generalist_note} (scored anyway)")
        result["ablations_rule"] = ("the paper's combination: every non-empty generalist mask replaces its "
                                    "village's outline (predict's acceptance rule off)")
    result["scenes"] = len(pairs)
    result["per_scene"] = per_scene
    result["refinement"] = "on" if refine else ("off" if not cfg.refine else f"off: {info.generalist_note}")
    result["predict_config"] = cfg.to_dict()
    result["model"] = model_file.record()
    return result


PAPER_RULE = RefineRule(0.0, 0.0, 0.0)  # every non-empty generalist mask accepted: the paper's combination


def ablation_variants(config) -> dict:
    """The paper's ablations (:data:`~uvsam.modeling.uvsam.ABLATIONS`) as UVSAMConfigs of a
    trained model's ``config`` (those that switch off something it has on; UV-SAM itself: the
    model as trained)."""
    return {name: replace(config, **switches) for name, switches in ABLATIONS.items()
            if all(getattr(config, k) for k in switches)}


def _score_pair(pair: LabelledScene, info, cfg, labels_crs, counts: dict, model, model_file, window: int,
                refine: bool, specialist_only: bool, overlays: Path | None = None) -> dict:
    """Score one scene into ``counts``; its per-scene row (and its overlay PNG in ``overlays``)."""
    scores = score_scene(pair, info, cfg, labels_crs)
    for k in ("specialist", "polygons", "all_village"):
        counts[k].update(scores[k], scores["labels"], pixel_m=scores["pixel_m"] if k != "all_village" else None)
    row = {"image": pair.image.name, "polygons_iou": _iou(scores["polygons"], scores["labels"]),
           "specialist_iou": _iou(scores["specialist"], scores["labels"]), "villages": scores["villages"]}
    if not specialist_only:
        pred, labels, pixel_m = in_memory_uvsam(model, model_file, pair, window, labels_crs, refine, cfg,
                                                info.device)
        counts["uvsam"].update(pred, labels, pixel_m=pixel_m)
    if overlays is not None:
        png = overlays / f"{pair.image.stem}.overlay.png"
        overlay(png, pair.image, scores["polygons"], scores["labels"] == 1, scores["labels"] != IGNORE,
                scores["crs"], scores["transform"], bands=info.inputs.bands, pixel_m=scores["pixel_m"],
                title=f"{pair.image.name}: IoU {row['polygons_iou']:.3f} of the villages predict ships",
                subtitle=f"{scores['villages']} villages - labels {Path(pair.labels).name} - model "
                         f"{Path(model_file.path).name}")
        row["overlay"] = str(png)
    return row


def _iou(pred: np.ndarray, labels: np.ndarray) -> float:
    c = SegmentationCounts()
    c.update(pred, labels)
    return c.summary()["iou"]


def score_scene(pair: LabelledScene, info, cfg, labels_crs: str | None = None) -> dict:
    """Predict one labelled scene as ``uvsam predict`` does and put its outputs on the label grid.

    Returns ``labels`` (H, W) uint8 (0, 1, IGNORE) on the image's native grid, and boolean
    ``polygons`` (the shipped villages, rasterised), ``specialist`` (the mosaic at the threshold)
    and ``all_village`` on the same grid, with ``villages`` the number of polygons and
    ``pixel_m`` the grid's (x, y) ground resolution.
    """
    valid, src = read_validity(pair.image, info.inputs.bands)  # the labels first: cheap
    labels = rasterise_labels(pair.labels, src, labels_crs)
    labels[~valid] = IGNORE
    if not (labels != IGNORE).any():
        raise InputError("no labelled pixel overlaps the image", pair.labels)
    with tempfile.TemporaryDirectory(prefix="uvsam-evaluate-") as tmp:
        prepared = prepare_scene(pair.image, info, cfg)
        res = predict_scene(pair.image, info, cfg, Path(tmp), prepared=prepared)
        close_sources()
        shape = (src.height, src.width)
        villages = res.villages
        if villages and src.crs is not None and str(src.crs) != str(res.crs):
            villages = list(gpd.GeoSeries(villages, crs=res.crs).to_crs(src.crs))
        polygons = (rasterize(((g, 1) for g in villages), out_shape=shape, transform=src.transform, fill=0,
                              dtype="uint8").astype(bool) if villages else np.zeros(shape, bool))
        prob = np.full(shape, np.nan, np.float32)
        with rasterio.open(res.mosaic) as ds:
            reproject(ds.read(1), prob, src_transform=ds.transform, src_crs=ds.crs, dst_transform=src.transform,
                      dst_crs=src.crs, src_nodata=np.nan, dst_nodata=np.nan, resampling=Resampling.bilinear)
    return {"labels": labels, "polygons": polygons, "specialist": np.nan_to_num(prob, nan=0.0) >= cfg.threshold,
            "all_village": labels != IGNORE, "villages": len(res.villages), "pixel_m": tuple(src.ground_res),
            "crs": src.crs, "transform": src.transform}


def in_memory_uvsam(model, model_file: ModelFile, pair: LabelledScene, window: int, labels_crs: str | None,
                    refine: bool, cfg, device=None, rule=None) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """(prediction, labels, pixel size in metres) of the model's in-memory UV-SAM path at its
    training GSD, the scene read and preprocessed as training and predict read it; ``rule``:
    when a generalist mask replaces a village's outline (default: predict's, ``cfg.rule``)."""
    scene = load_scene(pair, model_file.inputs, labels_crs)
    valid = scene.labels != IGNORE
    pred = predict_in_memory(model, scene.image, valid, window=window, full=refine, rule=rule or cfg.rule,
                             device=device, cascade=cfg.cascade)
    return (pred.uvsam if refine else pred.specialist), scene.labels, (scene.gsd_m, scene.gsd_m)
