"""The seeds' evaluation protocol of a prompted generalist, on the user's own objects.

EfficientViT-SAM and EfficientSAM score a SAM-like model per object of a labelled set: the
mask from the object's **box** and from **1, 3 and 5 clicks**, each IoU against the object,
averaged (mIoU) over all objects and over small (< 32^2 px), medium and large (> 96^2 px)
ones (COCO's size classes, in pixels of the image). Every prompt asks for three masks and keeps
the one of highest predicted IoU. The clicks follow the interactive-segmentation rule those
papers use (RITM's clicker): the next click goes to the point farthest from the boundary of the
larger error region (missed object pixels or false alarms, whichever reaches farther from its
edge; the image border counts as an edge), positive on a miss, negative on a false alarm, never
twice on one pixel; all clicks so far are the prompt. The first click is therefore the object's
innermost point.

Objects come from any polygon layer in any CRS (building footprints, villages), rasterised on
each image's grid; an object's box is the bounding box of its pixels.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import shapely
from rasterio.features import rasterize
from scipy.ndimage import distance_transform_edt

from uvsam.checkpoint import load_generalist
from uvsam.datasets import RASTER_EXT, find_files, read_vector, split_layer
from uvsam.devices import select
from uvsam.errors import InputError
from uvsam.generalist import generalist_status
from uvsam.predictor import Predictor
from uvsam.raster import read_rgb

SIZES = (("small", 0.0, 32.0**2), ("medium", 32.0**2, 96.0**2), ("large", 96.0**2, math.inf))
CLICKS = (1, 3, 5)
CHUNK = 16  # objects decoded a call: each holds three full-size masks


def next_click(gt: np.ndarray, pred: np.ndarray, clicked: np.ndarray) -> tuple[int, int, bool]:
    """(row, col, positive) of the next click on an object ``gt`` given the current mask
    ``pred``: the pixel farthest from the boundary of the false-negative or the false-positive
    region, whichever reaches farther (ties: the miss loses, as in RITM's clicker; the first such
    pixel in raster order), outside the ``clicked`` pixels; the image border is a boundary."""
    fn, fp = gt & ~pred, pred & ~gt
    # padded by one background pixel so that a region touching the border is measured to it
    dist_fn = distance_transform_edt(np.pad(fn, 1))[1:-1, 1:-1] * ~clicked
    dist_fp = distance_transform_edt(np.pad(fp, 1))[1:-1, 1:-1] * ~clicked
    positive = bool(dist_fn.max() > dist_fp.max())
    dist = dist_fn if positive else dist_fp
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(r), int(c), positive


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 1.0


def size_class(area_px: float) -> str:
    return next(name for name, lo, hi in SIZES if lo <= area_px < hi)


def object_masks(objects, image_crs, transform, shape: tuple[int, int]) -> tuple[np.ndarray, list[int]]:
    """(label image, object ids) of the polygons of ``objects`` (a GeoDataFrame) on a grid:
    pixel value k + 1 is the k-th listed object; objects that cover no pixel are left out."""
    gdf = objects.to_crs(image_crs)
    h, w = shape
    left, top = transform @ (0, 0)
    right, bottom = transform @ (w, h)
    inside = gdf.intersects(shapely.box(min(left, right), min(top, bottom), max(left, right), max(top, bottom)))
    gdf = gdf[inside & gdf.geometry.geom_type.isin(["Polygon", "MultiPolygon"])]
    if not len(gdf):
        return np.zeros(shape, np.int32), []
    ids = list(gdf.index)
    labels = rasterize(((g, k + 1) for k, g in enumerate(gdf.geometry.values)), out_shape=shape, transform=transform,
                       fill=0, dtype="int32")
    return labels, ids


def _best(pred) -> np.ndarray:
    """Each prompt's mask of highest predicted IoU, (N, H, W) bool."""
    k = pred.iou.argmax(axis=1)
    return pred.masks[np.arange(len(k)), k]


def score_image(predictor: Predictor, gts: list[np.ndarray], valid: np.ndarray, clicks=CLICKS,
                autocast=None) -> list[dict]:
    """Box and click IoUs of each object mask ``gts`` on the image set in ``predictor``."""
    cast = autocast or contextlib.nullcontext
    rows = []
    for start in range(0, len(gts), CHUNK):
        chunk = gts[start:start + CHUNK]
        boxes = []
        for gt in chunk:
            ys, xs = np.nonzero(gt)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        with cast():
            box_masks = _best(predictor.predict(boxes=np.asarray(boxes, np.float32), multimask_output=True)) & valid
        out = [{"box": iou(m, gt)} for m, gt in zip(box_masks, chunk, strict=True)]
        pred = [np.zeros_like(gt) for gt in chunk]
        clicked = [np.zeros_like(gt) for gt in chunk]
        points: list[list[tuple[int, int]]] = [[] for _ in chunk]
        labels: list[list[int]] = [[] for _ in chunk]
        for k in range(1, max(clicks) + 1):
            for i, gt in enumerate(chunk):
                r, c, positive = next_click(gt, pred[i], clicked[i])
                clicked[i][r, c] = True
                points[i].append((c, r))  # prompts are x, y
                labels[i].append(int(positive))
            with cast():
                p = predictor.predict(point_coords=np.asarray(points, np.float32), point_labels=np.asarray(labels),
                                      multimask_output=True)
            pred = list(_best(p) & valid)
            if k in clicks:
                for o, m, gt in zip(out, pred, chunk, strict=True):
                    o[f"{k}_click" + ("s" if k > 1 else "")] = iou(m, gt)
        rows += out
    return rows


def bench_prompts(encoder: str, checkpoint: str | Path, images: str, objects: str, objects_crs: str | None = None,
                  clicks: tuple[int, ...] = CLICKS, max_objects: int | None = None, device: str = "auto",
                  precision: str = "auto", log=None) -> dict:
    """Score ``encoder`` with the weights ``checkpoint`` on the ``objects`` (``FILE[:LAYER]``) of
    ``images`` (a raster, a folder or a glob): per object and summarised (see the module)."""
    if not clicks or min(clicks) < 1:
        raise InputError(f"clicks must be positive counts, got {clicks}")
    place = select(device, precision)
    paths = find_files(images, RASTER_EXT, "rasters")
    path, layer = split_layer(objects)
    if not path.is_file():
        raise InputError("objects file does not exist", path)
    gdf = read_vector(path, objects_crs, layer, flag="--objects-crs")
    model = load_generalist(encoder, checkpoint).to(place.torch)
    status = generalist_status({"generalist": {"sha256": model.weights_sha256}}, encoder)
    predictor = Predictor(model)
    rows: list[dict] = []
    for image in paths:
        if max_objects is not None and len(rows) >= max_objects:
            break
        img = read_rgb(image)
        crs, transform = img.profile["crs"], img.profile["transform"]
        if crs is None:
            raise InputError("image has no CRS: objects cannot be placed on it", image)
        labels, ids = object_masks(gdf, crs, transform, img.valid.shape)
        gts, keep = [], []
        for k, fid in enumerate(ids):
            gt = (labels == k + 1) & img.valid
            if gt.any():
                gts.append(gt)
                keep.append(fid)
        if max_objects is not None:
            gts, keep = gts[: max_objects - len(rows)], keep[: max_objects - len(rows)]
        if not gts:
            continue
        with place.autocast():
            predictor.set_image(img.pixels)
        pixel_m2 = abs(transform.a * transform.e - transform.b * transform.d)
        for fid, gt, scores in zip(keep, gts, score_image(predictor, gts, img.valid, clicks, place.autocast),
                                   strict=True):
            area = int(gt.sum())
            rows.append({"image": image.name, "object": int(fid) if isinstance(fid, int | np.integer) else str(fid),
                         "area_px": area, "area_m2": round(area * pixel_m2, 2) if crs.is_projected else None,
                         "size": size_class(area), **{k: round(v, 6) for k, v in scores.items()}})
        if log is not None:
            log(f"{image.name}: {len(gts)} objects")
    if not rows:
        raise InputError(f"none of its {len(gdf)} objects lies on the {len(paths)} image(s)", path)
    prompts = ["box"] + [f"{k}_click" + ("s" if k > 1 else "") for k in clicks]
    summary = {}
    for prompt in prompts:
        summary[prompt] = {"all": _mean([r[prompt] for r in rows])}
        for name, _, _ in SIZES:
            summary[prompt][name] = _mean([r[prompt] for r in rows if r["size"] == name])
    return {"encoder": encoder, "checkpoint": str(checkpoint), "weights": status.note, "verified": status.verified,
            "images": len({r["image"] for r in rows}), "objects": len(rows),
            "objects_by_size": {name: sum(r["size"] == name for r in rows) for name, _, _ in SIZES},
            "miou": summary, "per_object": rows}


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def table(result: dict) -> str:
    """The summary as a Markdown table: prompts by rows, object sizes by columns."""
    sizes = ["all"] + [name for name, _, _ in SIZES]
    n = result["objects_by_size"]
    head = ["prompt", f"all ({result['objects']})"] + [f"{s} ({n[s]})" for s in sizes[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for prompt, row in result["miou"].items():
        cells = ["-" if row[s] is None else f"{row[s]:.3f}" for s in sizes]
        lines.append(f"| {prompt.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return (f"mIoU of {result['encoder']} ({result['weights']}) on {result['objects']} objects of "
            f"{result['images']} image(s):\n\n" + "\n".join(lines) + "\n")
