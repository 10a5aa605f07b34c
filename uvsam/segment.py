"""``uvsam segment``: prompted segmentation of one image, written as a georeferenced mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import torch

from uvsam.checkpoint import load_generalist
from uvsam.devices import Device, select
from uvsam.errors import InputError
from uvsam.files import atomic_path, check_writable
from uvsam.predictor import Predictor
from uvsam.quantize import int8_check, quantize_encoder_static
from uvsam.raster import read_rgb


def segment_image(image: str | Path, encoder: str, checkpoint: str | Path, out: str | Path,
                  boxes: list[tuple[float, float, float, float]], points: list[tuple[float, float, int]],
                  multimask: bool = False, device: str = "auto", precision: str = "auto", int8: bool = False) -> dict:
    """Segment ``image`` with box and/or point prompts (pixel coordinates) and write a mask.

    Each box is decoded as its own prompt (together with all points); the written mask is the
    union. Nodata pixels stay 0 in the mask and are flagged as the GeoTIFF's nodata mask.
    ``device``/``precision``: where the generalist runs (:func:`uvsam.devices.select`). ``int8``:
    the encoder in static int8 (CPU), calibrated on the image, used only where it measures faster
    with masks agreeing at IoU >= 0.95 (:func:`uvsam.quantize.int8_check`); the result says which.
    """
    place = select(device, precision)
    if int8 and place != Device():
        raise InputError(f"--int8 is the CPU's fp32 path, not {place.describe()}: give --device cpu --precision fp32")
    if not boxes and not points:
        raise InputError("give at least one --box or --point prompt")
    out = check_writable(out)
    img = read_rgb(image)
    h, w = img.valid.shape
    for b in boxes:
        if not (b[0] < b[2] and b[1] < b[3]):
            raise InputError(f"box {b} is empty: expected X0,Y0,X1,Y1 with X0<X1 and Y0<Y1")
        if b[2] <= 0 or b[3] <= 0 or b[0] >= w or b[1] >= h:
            raise InputError(f"box {b} lies outside the {w} x {h} image", image)
    model = load_generalist(encoder, checkpoint).to(place.torch)
    int8_note = None
    if int8:
        x = model.preprocess(torch.from_numpy(np.ascontiguousarray(img.pixels)).permute(2, 0, 1)[None].float())
        check = int8_check(model, quantized := quantize_encoder_static(model.image_encoder, [x]), [x])
        if check.worth_it:
            model.image_encoder = quantized
        int8_note = ("used: " if check.worth_it else "not used: ") + check.describe()
    pred = Predictor(model)
    with place.autocast():
        pred.set_image(img.pixels)
    pc = pl = None
    if points:
        pts = np.array([[p[0], p[1]] for p in points], dtype=np.float32)
        lab = np.array([p[2] for p in points])
        n = max(len(boxes), 1)
        pc, pl = np.repeat(pts[None], n, 0), np.repeat(lab[None], n, 0)
    with place.autocast():
        result = pred.predict(boxes=np.array(boxes, dtype=np.float32) if boxes else None,
                              point_coords=pc, point_labels=pl, multimask_output=multimask)
    # best of the candidate masks of each prompt, then union over prompts
    best = result.iou.argmax(axis=1)
    masks = result.masks[np.arange(len(best)), best]
    mask = (masks.any(axis=0) & img.valid).astype(np.uint8)

    profile = img.profile
    meta = {
        "driver": "GTiff", "height": h, "width": w, "count": 1, "dtype": "uint8",
        "crs": profile.get("crs"), "transform": profile.get("transform"),
        "compress": "deflate", "tiled": w >= 256 and h >= 256,
    }
    if meta["tiled"]:
        meta.update(blockxsize=256, blockysize=256)
    with atomic_path(out) as tmp, rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        with rasterio.open(tmp, "w", **meta) as dst:
            dst.write(mask, 1)
            dst.write_mask((img.valid * 255).astype(np.uint8))
            dst.update_tags(encoder=encoder, prompts_boxes=str(boxes), prompts_points=str(points))
    return {"out": str(out), "pixels": int(mask.sum()), "iou_pred": result.iou[np.arange(len(best)), best].tolist()} | (
        {"int8": int8_note} if int8 else {})
