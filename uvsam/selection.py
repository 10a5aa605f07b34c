"""FastSAM's selection over everything-mode objects: by points, by boxes, by text.

FastSAM segments everything first, then picks what the prompt means; uvsam does the same over an
``objects`` layer (:mod:`uvsam.objects`), on polygons instead of pixel masks:

* **points** (FastSAM's ``point_prompt``): an object containing an include point is selected; one
  containing only exclude points is dropped and its area cut out of the selected ones (FastSAM
  clears its pixels). FastSAM paints masks largest first, each point in turn, so there an exclude
  point that also falls in a large selected mask clears all of it, depending on the points'
  order; here an object holding an include point stays, and only the smaller excluded objects
  inside it are cut out (a hole clicked inside a village);
* **boxes** (``box_prompt``): for each box the object of highest IoU with it, FastSAM's
  ``|object ∩ box| / (|box| + |object| - |object ∩ box|)``;
* **text** (``text_prompt``): each object cut out of the image at its bounding box, pixels outside
  it white, embedded by a CLIP image tower (open_clip, weights the user gives), scored by cosine
  similarity to the phrase's embedding, the ``top`` best kept (FastSAM keeps one).

FastSAM's own YOLOv8-seg segmenter is AGPL (ultralytics) and is not used: the objects come from
any generalist of the registry (``uvsam everything``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import shapely

from tiles.radiometry import compute_stretch
from tiles.reader import RasterSource
from uvsam import __version__
from uvsam.changes.sources import read_named_layer
from uvsam.datasets import split_layer
from uvsam.errors import InputError
from uvsam.files import check_writable
from uvsam.layers import layer_problem, write_layer


def by_points(objects: gpd.GeoDataFrame, include: list[tuple[float, float]],
              exclude: list[tuple[float, float]] = ()) -> gpd.GeoDataFrame:
    """The objects an include point falls in, largest first, with the objects holding only
    exclude points cut out of them; column ``selected_by`` = "point"."""
    if not include:
        raise InputError("give at least one include point (X,Y or X,Y,1)")
    order = np.argsort(-objects.geometry.area.to_numpy(), kind="stable")
    inc = shapely.points(np.asarray(include, float).reshape(-1, 2))
    exc = shapely.points(np.asarray(exclude, float).reshape(-1, 2)) if len(exclude) else []
    chosen, cut = [], []
    for i in order:
        g = objects.geometry.iloc[i]
        has_inc, has_exc = any(shapely.covers(g, p) for p in inc), any(shapely.covers(g, p) for p in exc)
        if has_inc:
            chosen.append(i)
        elif has_exc:
            cut.append(g)
    out = objects.iloc[chosen].copy()
    if cut and len(out):
        hole = shapely.union_all(cut)
        out["geometry"] = [shapely.difference(g, hole) for g in out.geometry]
        out = out[~out.geometry.is_empty]
    out["selected_by"] = "point"
    return out


def box_iou(objects: gpd.GeoDataFrame, box: tuple[float, float, float, float]) -> np.ndarray:
    """FastSAM's IoU of each object with ``box`` (X0, Y0, X1, Y1 in the layer's CRS)."""
    b = shapely.box(*box)
    inter = objects.geometry.intersection(b).area.to_numpy()
    return inter / np.maximum(b.area + objects.geometry.area.to_numpy() - inter, 1e-12)


def by_boxes(objects: gpd.GeoDataFrame, boxes: list[tuple[float, float, float, float]]) -> gpd.GeoDataFrame:
    """For each box the object of highest IoU with it (none where no object meets the box);
    columns ``selected_by`` = "box" and ``box_iou``."""
    rows, ious = [], []
    for box in boxes:
        if not (box[0] < box[2] and box[1] < box[3]):
            raise InputError(f"box {box} is empty: expected X0,Y0,X1,Y1 with X0<X1 and Y0<Y1")
        if not len(objects):
            continue
        iou = box_iou(objects, box)
        k = int(iou.argmax())
        if iou[k] > 0 and k not in rows:
            rows.append(k)
            ious.append(round(float(iou[k]), 4))
    out = objects.iloc[rows].copy()
    out["selected_by"] = "box"
    out["box_iou"] = ious
    return out


@dataclass(frozen=True)
class ClipModel:
    """A CLIP model as open_clip builds it: a config name and the weights file the user gives."""

    name: str
    weights: str | None

    def load(self):
        try:
            import open_clip
        except ImportError:
            raise InputError("text prompts need open_clip: pip install 'uvsam[text]'") from None
        if not self.weights:
            raise InputError(f"text prompts need CLIP weights for {self.name}: give --clip-weights FILE "
                             "(open_clip's published file of that model; none can be downloaded by uvsam)")
        path = Path(self.weights)
        if not path.is_file():
            raise InputError("CLIP weights file not found", path)
        if self.name not in open_clip.list_models():
            raise InputError(f"unknown CLIP model {self.name!r} (open_clip knows e.g. ViT-B-32, ViT-L-14, RN50)")
        try:
            model, _, transform = open_clip.create_model_and_transforms(self.name, pretrained=str(path))
        except (RuntimeError, KeyError, ValueError, TypeError, AssertionError) as e:  # open_clip asserts shapes
            raise InputError(f"not {self.name} weights open_clip can load ({str(e).splitlines()[0][:160]})",
                             path) from None
        return model.eval(), transform, open_clip.get_tokenizer(self.name)


def object_crops(objects: gpd.GeoDataFrame, image: str | Path, max_side: int = 512) -> list[np.ndarray | None]:
    """Each object's bounding box cut out of ``image`` ((h, w, 3) uint8), pixels outside the
    object white (FastSAM's crops); None where the object lies outside the image. Read at most
    ``max_side`` px on the longer side."""
    import rasterio
    from rasterio.features import geometry_mask
    from rasterio.windows import from_bounds

    crops: list[np.ndarray | None] = []
    with RasterSource(image) as src:
        data, valid = src.read_overview(1_000_000)
        stretch = compute_stretch(data, valid)
        frame = objects.to_crs(src.crs) if objects.crs != src.crs else objects
        for geom in frame.geometry:
            win = from_bounds(*geom.bounds, transform=src.transform).round_offsets().round_lengths()
            if win.width < 1 or win.height < 1 or win.col_off >= src.width or win.row_off >= src.height \
                    or win.col_off + win.width <= 0 or win.row_off + win.height <= 0:
                crops.append(None)
                continue
            block, ok = src.read(win)
            x = stretch.apply(block, ok)
            x = (np.repeat(x, 3, 0) if x.shape[0] == 1 else x[:3]) * 255
            transform = rasterio.windows.transform(win, src.transform)
            inside = geometry_mask([geom], (int(win.height), int(win.width)), transform, invert=True, all_touched=True)
            x[:, ~(inside & ok)] = 255
            step = max(1, math.ceil(max(x.shape[1:]) / max_side))
            crops.append(np.ascontiguousarray(x[:, ::step, ::step].transpose(1, 2, 0).round().astype(np.uint8)))
    return crops


def clip_scores(objects: gpd.GeoDataFrame, image: str | Path, phrase: str, clip: ClipModel,
                batch: int = 32) -> np.ndarray:
    """(N,) cosine similarity of each object's crop to ``phrase`` under ``clip`` (NaN: no crop)."""
    import torch
    from PIL import Image

    if not phrase.strip():
        raise InputError("the text prompt is empty")
    model, transform, tokenizer = clip.load()
    crops = object_crops(objects, image)
    scores = np.full(len(crops), np.nan)
    with torch.inference_mode():
        text = model.encode_text(tokenizer([phrase]))
        text = text / text.norm(dim=-1, keepdim=True)
        idx = [i for i, c in enumerate(crops) if c is not None]
        for s in range(0, len(idx), batch):
            part = idx[s : s + batch]
            x = torch.stack([transform(Image.fromarray(crops[i])) for i in part])
            f = model.encode_image(x)
            f = f / f.norm(dim=-1, keepdim=True)
            scores[part] = (f @ text.T)[:, 0].numpy()
    return scores


def by_text(objects: gpd.GeoDataFrame, scores: np.ndarray, top: int = 1) -> gpd.GeoDataFrame:
    """The ``top`` objects most similar to the phrase; columns ``selected_by`` = "text", ``clip_score``."""
    if top < 1:
        raise InputError(f"--top must be at least 1, not {top}")
    order = [i for i in np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable") if np.isfinite(scores[i])]
    out = objects.iloc[order[:top]].copy()
    out["selected_by"] = "text"
    out["clip_score"] = [round(float(scores[i]), 4) for i in order[:top]]
    return out


def read_objects(spec: str) -> tuple[str, gpd.GeoDataFrame]:
    """(``FILE:LAYER``, the polygons) of an objects layer ``FILE[:LAYER]`` (a file of one layer
    besides ``runs`` and ``layer_styles`` needs no name)."""
    path, layer = split_layer(spec)
    layer, frame = read_named_layer(path, layer, lambda n: n not in ("runs", "layer_styles"), f"{path}:LAYER")
    if not set(frame.geometry.geom_type.dropna()) <= {"Polygon", "MultiPolygon"}:
        raise InputError(f"layer {layer!r} does not hold polygons", path)
    return f"{path}:{layer}", frame


def run_select(spec: str, out: str | Path, layer: str = "selected", points: list[tuple[float, float, int]] = (),
               boxes: list[tuple[float, float, float, float]] = (), text: str | None = None,
               image: str | Path | None = None, clip: ClipModel | None = None, top: int = 1,
               prompt_crs: str | None = None) -> dict:
    """``uvsam select``: objects chosen by points, boxes and/or a phrase, written as ``layer`` of
    GeoPackage ``out`` (other layers kept). Prompt coordinates are in the objects' CRS unless
    ``prompt_crs`` names another. Several kinds of prompt: the union of their selections."""
    import json
    from datetime import datetime, timezone

    import pandas as pd
    from pyproj import CRS, Transformer
    from pyproj.exceptions import CRSError

    out = check_writable(out)
    if out.suffix.lower() != ".gpkg":
        raise InputError("the selection is written to a GeoPackage: give --out NAME.gpkg", out)
    if problem := layer_problem(layer):
        raise InputError(problem, out)
    if not points and not boxes and not text:
        raise InputError("give a prompt: --point, --box or --text")
    if text is not None:  # everything a text prompt needs, checked before any work
        if image is None:
            raise InputError("--text needs --image: the raster the objects were found in")
        if clip is None or not clip.weights:
            raise InputError("text prompts need CLIP weights: give --clip-weights FILE (and --clip-model NAME)")
    source, objects = read_objects(spec)
    if prompt_crs is not None:
        try:
            to_layer = Transformer.from_crs(CRS.from_user_input(prompt_crs), objects.crs, always_xy=True)
        except CRSError:
            raise InputError(f"--prompt-crs {prompt_crs!r} is not a CRS pyproj knows") from None
        points = [(*to_layer.transform(x, y), lab) for x, y, lab in points]
        boxes = [(*to_layer.transform(b[0], b[1]), *to_layer.transform(b[2], b[3])) for b in boxes]
        coords = [v for p in points for v in p[:2]] + [v for b in boxes for v in b]
        if not np.isfinite(np.asarray(coords, float)).all():
            raise InputError(f"a --point or --box lies outside where --prompt-crs {prompt_crs} maps to the "
                             f"objects' CRS ({objects.crs.to_string()})")
    parts = []
    if points:
        inc = [(x, y) for x, y, lab in points if lab == 1]
        exc = [(x, y) for x, y, lab in points if lab == 0]
        parts.append(by_points(objects, inc, exc))
    if boxes:
        parts.append(by_boxes(objects, list(boxes)))
    if text:
        parts.append(by_text(objects, clip_scores(objects, image, text, clip), top))
    chosen = gpd.GeoDataFrame(pd.concat(parts, ignore_index=True), geometry="geometry", crs=objects.crs)
    key = "object_id" if "object_id" in chosen.columns else None
    if key:
        chosen = chosen.drop_duplicates(subset=key, keep="first").reset_index(drop=True)
    run = {"layer": layer, "command": "select", "objects": source,
           "prompts": json.dumps({"points": [list(p) for p in points], "boxes": [list(b) for b in boxes],
                                  "text": text, "top": top, "prompt_crs": prompt_crs,
                                  "clip": {"model": clip.name, "weights": clip.weights} if text and clip else None}),
           "uvsam_version": __version__, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    # objects of `uvsam everything` keep their style (by `complete`); any other polygons get outlines
    write_layer(out, layer, chosen, run, "objects" if "complete" in chosen.columns else "candidates")
    return {"out": str(out), "layer": layer, "selected": len(chosen), "of": len(objects)}
