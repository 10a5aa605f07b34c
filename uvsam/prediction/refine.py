"""Step 3, the generalist: each candidate large enough gets a window centred on it (large
candidates several overlapping windows), its box decoded by the frozen generalist in batched
calls, and its outline judged (:func:`uvsam.generalist.judge`) against the candidate."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import shapely
import torch
from affine import Affine
from rasterio.features import rasterize
from rasterio.windows import Window

from uvsam.config import PredictConfig
from uvsam.generalist import OFF, SMALL, UNVERIFIED, RefineRule, judge, stability_score
from uvsam.polygons import measure, polygonise
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
    """The generalist's mask of each member candidate (:func:`mask_record`: its pixels, the window,
    its ``predicted_iou`` and ``stability`` score).

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
    out = []
    for k, (x0, y0, x1, y1) in enumerate(window.boxes):
        logits = masks[k, 0].numpy()
        keep = np.zeros(logits.shape, bool)
        r0, c0 = max(0, int(y0) - margin), max(0, int(x0) - margin)
        keep[r0 : int(math.ceil(y1)) + margin, c0 : int(math.ceil(x1)) + margin] = True
        out.append(mask_record((logits > 0) & valid & keep, window, float(ious[k]), stability_score(logits[keep])))
    return out


def mask_record(mask: np.ndarray, window: RefineWindow, predicted_iou: float, stability: float) -> dict:
    """One generalist mask as a task returns it and the journal keeps it (JSON): the window
    (``window``: col, row, size in scene pixels), the bounding box of its pixels in the window
    (``box``: col, row, width, height; an empty mask: zero size) and those pixels bit-packed and
    deflated (``bits``, base64), its ``predicted_iou`` and ``stability``. Pixels, not polygons: the
    pieces of several windows are joined on the pixel grid, and only an accepted mask is vectorised."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box, bits = [0, 0, 0, 0], ""
    if len(rows):
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        box = [c0, r0, c1 - c0, r1 - r0]
        bits = base64.b64encode(zlib.compress(np.packbits(mask[r0:r1, c0:c1]).tobytes(), 1)).decode()
    return {"window": [window.col, window.row, window.size], "box": box, "bits": bits,
            "predicted_iou": predicted_iou, "stability": stability}


def record_pixels(record: dict) -> np.ndarray:
    """The (height, width) bool pixels of a :func:`mask_record` within its ``box``."""
    _, _, w, h = record["box"]
    packed = np.frombuffer(zlib.decompress(base64.b64decode(record["bits"])), np.uint8)
    return np.unpackbits(packed, count=w * h).reshape(h, w).astype(bool)


def joined_mask(records: list[dict]) -> tuple[np.ndarray, int, int] | None:
    """The union of the records' masks on the scene's pixel grid: (mask, col, row of its corner),
    or None when every mask is empty. One window's mask stays in its window's frame (vectorised
    there, as the window drew it); several are joined over the bounding box of their pixels. The
    frame is not cosmetic: where polygonising starts a ring depends on it, and simplification on
    that (vectorising one window's mask in its box's frame instead changed 1 of 608 villages)."""
    parts = [r for r in records if r["bits"]]
    if not parts:
        return None
    if len(parts) == 1:
        (col, row, size), (c0, r0, w, h) = parts[0]["window"], parts[0]["box"]
        mask = np.zeros((size, size), bool)
        mask[r0 : r0 + h, c0 : c0 + w] = record_pixels(parts[0])
        return mask, col, row
    at = [(r["window"][0] + r["box"][0], r["window"][1] + r["box"][1], r) for r in parts]
    col, row = min(c for c, _, _ in at), min(rr for _, rr, _ in at)
    width = max(c + r["box"][2] for c, _, r in at) - col
    height = max(rr + r["box"][3] for _, rr, r in at) - row
    mask = np.zeros((height, width), bool)
    for c, rr, r in at:
        mask[rr - row : rr - row + r["box"][3], c - col : c - col + r["box"][2]] |= record_pixels(r)
    return mask, col, row


def judge_candidate(candidate, records: list[dict], rule: RefineRule,
                    transform: Affine) -> tuple[object, str, float | None]:
    """(outline, reason, predicted IoU) of one candidate from its refinement windows' records
    (:func:`mask_record`): the generalist's outline when :func:`uvsam.generalist.judge` accepts
    it, else the candidate. Across windows the least confident one speaks (lowest predicted IoU
    and stability). ``transform``: the scene's pixel grid (the windows' and the candidate's)."""
    predicted_iou = min(float(r["predicted_iou"]) for r in records)
    stability = min(float(r["stability"]) for r in records)
    joined = joined_mask(records)
    overlap = 0.0
    if joined is not None:  # the IoU with the candidate in pixels (both lie on the scene's grid)
        mask, col, row = joined
        grid = transform @ Affine.translation(col, row)
        inside = rasterize([candidate], out_shape=mask.shape, transform=grid, fill=0, default_value=1,
                           dtype="uint8").astype(bool)
        pixel = abs(transform.a * transform.e - transform.b * transform.d)
        shared = float(np.count_nonzero(mask & inside)) * pixel
        union = float(np.count_nonzero(mask)) * pixel + candidate.area - shared
        overlap = shared / union if union > 0 else 0.0
    ok, reason = judge(rule, overlap, predicted_iou, stability, joined is None)
    if not ok:
        return candidate, reason, round(predicted_iou, 4)
    with stage("vectorise"):
        outline = shapely.multipolygons(polygonise(mask, grid))  # 8-connected pieces: they never touch
    return outline, reason, round(predicted_iou, 4)


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
