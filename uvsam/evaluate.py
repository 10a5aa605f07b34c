"""``uvsam evaluate``: a trained model on labelled scenes, the specialist and the UV-SAM path side by side.

Scenes go through the default inference path: read at the model's GSD with its normalisation,
harmonised to its training radiometry, predicted in overlapping windows. The JSON also gives
the two trivial baselines (all background, all village) on the same pixels.
"""

from __future__ import annotations

from pathlib import Path

from uvsam.datasets import load_scene, pair_scenes
from uvsam.harmonise import Radiometry
from uvsam.inference import predict_scene
from uvsam.losses import IGNORE
from uvsam.metrics import SegmentationCounts
from uvsam.modelfile import load_model
from uvsam.train import harmonise_scene


def evaluate(model_path: str | Path, images: str | Path, labels: str | Path, checkpoint: str | Path | None = None,
             window: int = 512, labels_crs: str | None = None, specialist_only: bool = False) -> dict:
    model, meta = load_model(model_path, checkpoint)
    bands = tuple(meta["bands"]) if meta.get("bands") else None
    reference = Radiometry.from_dict(meta["radiometry"])
    names = ["specialist"] + ([] if specialist_only else ["uvsam"])
    counts = {k: SegmentationCounts() for k in names + ["all_village"]}
    pairs = pair_scenes(images, labels)
    for pair in pairs:
        scene = load_scene(pair, meta["gsd_m"], bands, meta["normalisation"], labels_crs)
        if meta.get("harmonise"):
            harmonise_scene(scene, reference)
        valid = scene.labels != IGNORE
        pred = predict_scene(model, scene.image, valid, window=window, full=not specialist_only)
        counts["specialist"].update(pred.specialist, scene.labels)
        if not specialist_only:
            counts["uvsam"].update(pred.uvsam, scene.labels)
        counts["all_village"].update(valid, scene.labels)
    result = {k: counts[k].summary() for k in names}
    result["baselines"] = {"all_background_iou": 0.0, "all_village_iou": counts["all_village"].summary()["iou"]}
    result["scenes"] = len(pairs)
    result["model"] = {"file": str(model_path), "encoder": model.config.encoder, "specialist": model.config.specialist,
                       "gsd_m": meta["gsd_m"], "generalist": meta["generalist"], "epoch": meta.get("epoch")}
    return result
