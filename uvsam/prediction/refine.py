"""Step 3, the generalist: each candidate large enough gets a window centred on it (large
candidates several overlapping windows), its box decoded by the frozen generalist in batched
calls, and its outline judged (:func:`uvsam.generalist.judge`) against the candidate."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import shapely
import torch
from affine import Affine
from rasterio.windows import Window

from uvsam.config import PredictConfig
from uvsam.generalist import OFF, SMALL, UNVERIFIED, RefineRule, judge, stability_score
from uvsam.polygons import measure, polygonise, union_on_grid
from uvsam.prediction.execution import Runner, run_journaled
from uvsam.prediction.journal import Journal
from uvsam.prediction.model import ModelInfo, get_model, refines
from uvsam.prediction.scene import ScenePrep, open_source, read_tile
from uvsam.progress import stage


@dataclass
class RefineWindow:
    """A square window (col, row, size) in scene pixels and the candidates decoded in it, with
    each candidate's box clipped to the window (window pixels, XYXY)."""

    col: int
    row: int
    size: int
    members: list[int] = field(default_factory=list)
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)


def plan_windows(boxes_px: np.ndarray, size: int, margin: int) -> list[RefineWindow]:
    """Windows centred on candidates; candidates inside a window's interior share it.

    A candidate whose box exceeds ``size - 2 * margin`` gets a grid of windows overlapping by
    half, covering the box. Placement depends only on the candidates, never on the tile grid.
    """
    inner = size - 2 * margin
    windows: list[RefineWindow] = []
    order = np.argsort(-(boxes_px[:, 2] - boxes_px[:, 0]) * (boxes_px[:, 3] - boxes_px[:, 1]), kind="stable")
    for i in order:
        x0, y0, x1, y1 = (float(v) for v in boxes_px[i])
        if x1 - x0 <= inner and y1 - y0 <= inner:
            host = next((w for w in windows if w.col + margin <= x0 and x1 <= w.col + size - margin
                         and w.row + margin <= y0 and y1 <= w.row + size - margin), None)
            if host is None:
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                host = RefineWindow(int(math.floor(cx - size / 2)), int(math.floor(cy - size / 2)), size)
                windows.append(host)
            host.members.append(int(i))
            host.boxes.append((x0 - host.col, y0 - host.row, x1 - host.col, y1 - host.row))
            continue
        step = size // 2
        nx = max(1, math.ceil((x1 - x0 - size) / step) + 1)
        ny = max(1, math.ceil((y1 - y0 - size) / step) + 1)
        cx0 = (x0 + x1) / 2 - ((nx - 1) * step + size) / 2
        cy0 = (y0 + y1) / 2 - ((ny - 1) * step + size) / 2
        for a in range(ny):
            for b in range(nx):
                w = RefineWindow(int(math.floor(cx0 + b * step)), int(math.floor(cy0 + a * step)), size)
                clip = (max(x0 - w.col, 0), max(y0 - w.row, 0), min(x1 - w.col, size), min(y1 - w.row, size))
                w.members.append(int(i))
                w.boxes.append(clip)
                windows.append(w)
    return windows


def refine_window(prep: ScenePrep, info: ModelInfo, window: RefineWindow, margin: int,
                  cascade: bool = False) -> list[dict]:
    """The generalist's mask of each member candidate: ``wkb`` (hex WKB multipolygon, scene CRS;
    empty when the mask is empty), its ``predicted_iou`` and ``stability`` score.

    A candidate's piece is kept within its box grown by ``margin`` pixels (the generalist
    draws the boundary, it does not annex the neighbourhood); pieces from several windows are
    merged, and judged against the candidate, by the caller. ``cascade``: PerSAM's cascaded
    post-refinement of each mask (:meth:`uvsam.modeling.uvsam.UVSAM.cascade`).
    """
    model = get_model(info)
    win = Window(window.col, window.row, window.size, window.size)
    img, valid = read_tile(prep, info, win, open_source(prep))
    with torch.inference_mode(), info.device.autocast():
        (masks, ious), = model.refine(torch.from_numpy(img)[None].to(info.device.torch),
                                      [np.asarray(window.boxes, np.float32)], cascade)
    masks, ious = masks.float().cpu(), ious.float().cpu()
    transform = prep.affine @ Affine.translation(window.col, window.row)
    out = []
    for k, (x0, y0, x1, y1) in enumerate(window.boxes):
        logits = masks[k, 0].numpy()
        mask = (logits > 0) & valid
        keep = np.zeros_like(mask)
        r0, c0 = max(0, int(y0) - margin), max(0, int(x0) - margin)
        keep[r0 : int(math.ceil(y1)) + margin, c0 : int(math.ceil(x1)) + margin] = True
        with stage("vectorise"):
            polys = polygonise(mask & keep, transform)  # 8-connected pieces: they never touch
        out.append({"wkb": shapely.to_wkb(shapely.multipolygons(polys), hex=True) if polys else "",
                    "predicted_iou": float(ious[k]), "stability": stability_score(logits[keep])})
    return out


def judge_candidate(candidate, records: list[dict], rule: RefineRule,
                    transform: Affine | None = None) -> tuple[object, str, float | None]:
    """(outline, reason, predicted IoU) of one candidate from its refinement windows' records:
    the generalist's outline when :func:`uvsam.generalist.judge` accepts it, else the candidate.
    Across windows the least confident one speaks (lowest predicted IoU and stability).
    ``transform``: the scene's pixel grid, on which the windows' pieces are dissolved."""
    pieces = [shapely.from_wkb(r["wkb"]) for r in records if r["wkb"]]
    # one window's pieces are disjoint already (8-connected, they never touch): only the pieces of
    # several windows, which overlap, need dissolving (the costly operation on pixel outlines)
    if len(pieces) > 1:
        outline = union_on_grid(pieces, transform) if transform is not None else shapely.union_all(pieces)
    else:
        outline = pieces[0] if pieces else None
    predicted_iou = min(float(r["predicted_iou"]) for r in records)
    stability = min(float(r["stability"]) for r in records)
    empty = outline is None or outline.is_empty
    overlap = 0.0
    if not empty:
        shared = shapely.intersection(outline, candidate).area
        union = outline.area + candidate.area - shared
        overlap = shared / union if union > 0 else 0.0
    ok, reason = judge(rule, overlap, predicted_iou, stability, empty)
    return (outline if ok else candidate), reason, round(predicted_iou, 4)


def refine_candidates(candidates: list, prep: ScenePrep, info: ModelInfo, cfg: PredictConfig, runner: Runner,
                      journal: Journal, progress: Callable[[str, int], None] | None = None
                      ) -> tuple[list, list[str], list[float | None]]:
    """(outline, reason, predicted IoU) of every candidate: the generalist's outline where it
    refines and :func:`judge_candidate` accepts it, else the candidate itself. Windows run as
    journaled tasks through ``runner``; ``progress("windows", 1)`` as each finishes."""
    n = len(candidates)
    reasons = [OFF if not cfg.refine else UNVERIFIED] * n
    scores: list[float | None] = [None] * n
    records: list[list[dict]] = [[] for _ in candidates]
    if refines(cfg, info) and candidates:
        inv = ~prep.affine
        boxes = []
        for c in candidates:
            x0, y0, x1, y1 = c.bounds
            (ca, ra), (cb, rb) = inv @ (x0, y1), inv @ (x1, y0)
            boxes.append((min(ca, cb), min(ra, rb), max(ca, cb), max(ra, rb)))
        boxes_px = np.asarray(boxes, np.float32)
        areas, _ = measure(candidates, prep.crs)
        large = np.flatnonzero(areas >= info.min_area_m2)
        reasons = [SMALL] * n
        windows = plan_windows(boxes_px[large], cfg.window, cfg.window_margin)
        for w in windows:
            w.members = [int(large[m]) for m in w.members]
        keys = [hashlib.sha1(json.dumps([w.col, w.row, w.size, w.boxes]).encode()).hexdigest()[:16] for w in windows]
        results = run_journaled(runner, refine_window, [(prep, info, w, cfg.window_margin, cfg.cascade)
                                                        for w in windows], keys,
                                journal.has_blobs, journal.load_blobs, journal.save_blobs)
        for w, out in zip(windows, results, strict=True):
            if progress is not None:
                progress("windows", 1)
            for m, record in zip(w.members, out, strict=True):
                records[m].append(record)
    geoms = list(candidates)
    for i, recs in enumerate(records):
        if recs:
            geoms[i], reasons[i], scores[i] = judge_candidate(candidates[i], recs, cfg.rule, prep.affine)
    return geoms, reasons, scores
