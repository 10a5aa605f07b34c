"""SAM-PT across years: carry each village's points into the next year's imagery and let the
generalist redraw it there, to confirm or question what the independent detections say.

SAM-PT (Rajič et al., "Segment Anything Meets Point Tracking") tracks query points through a
video and prompts SAM with them frame by frame. Between two years of a city the track is the
imagery's co-registration shift (:mod:`uvsam.coregister`), and the rest is SAM-PT's:

* **query points** from the village's mask: ``positive`` K-medoids points inside (on at most
  1,800 of its pixels, as SAM-PT), ``negative`` points just outside it (a ring ``ring_px`` wide,
  spread by farthest-point sampling), and the positive points of the other villages in view as
  negatives too (SAM-PT's "other objects' points");
* **decoding**: the positive points alone, then all points with that mask as the mask prompt,
  then ``refine_iters`` passes adding the current mask's box (SAM-PT's iterative refinement,
  12 by default); a mask whose predicted IoU stays under ``min_iou`` (0.7) counts as empty;
* **re-initialisation**: along a chain of years the points of year t+2 are drawn again from the
  mask propagated into year t+1 (when there is one), not carried from year t.

The propagated mask is then compared with the independent detection: an event between two
years gets ``propagated_iou`` (for a demolished village: the propagated mask's IoU with where the
village was; otherwise with the villages detected after) and ``confirmed``: a demolition is
confirmed when the generalist no longer finds the village (IoU under ``confirm_iou``), a
persisting village when its propagated mask agrees with its successor (IoU at least ``confirm_iou``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import shapely
import torch
from affine import Affine
from rasterio.features import rasterize
from scipy import ndimage
from shapely import affinity

from tiles.reader import RasterSource, read_on_grid
from tiles.remote import location
from uvsam.errors import InputError
from uvsam.polygons import polygonise
from uvsam.predictor import Predictor


@dataclass(frozen=True)
class PropagateConfig:
    positive_points: int = 16  # SAM-PT's positive_points_per_mask
    negative_points: int = 4  # in the ring just outside the village
    ring_px: int = 12  # width of that ring on the window's grid
    refine_iters: int = 12  # SAM-PT's iterative_refinement_iterations
    min_iou: float = 0.7  # SAM-PT's sam_iou_threshold: below, the mask counts as empty
    confirm_iou: float = 0.5  # propagated vs detected: agreement
    window_px: int = 1024  # the window around a village is read at most this many px across
    seed: int = 0

    def __post_init__(self):
        if self.positive_points < 1 or self.negative_points < 0 or self.refine_iters < 0 or self.ring_px < 1:
            raise InputError("propagation needs >= 1 positive point, >= 0 negative points and refinement passes, "
                             "a ring of >= 1 px")
        for name in ("min_iou", "confirm_iou"):
            if not 0 <= getattr(self, name) <= 1:
                raise InputError(f"{name.replace('_', ' ')} must lie in [0, 1], not {getattr(self, name)}")
        if self.window_px < 64:
            raise InputError(f"the propagation window must be at least 64 px, not {self.window_px}")

    def to_dict(self) -> dict:
        return asdict(self)


# -- query points -------------------------------------------------------------------------------
def kmedoids(points: np.ndarray, k: int, max_iter: int = 300) -> np.ndarray:
    """(k, 2) medoids of (N, 2) points: scikit-learn-extra's ``KMedoids`` (euclidean, the
    "heuristic" start: the k points of least total distance to all; then "alternate": assign to the
    nearest medoid, move each medoid to its cluster's point of least total distance, until stable)."""
    pts = np.asarray(points, float)
    if len(pts) <= k:
        return np.concatenate([pts] * (k // max(len(pts), 1) + 1))[:k] if len(pts) else np.zeros((k, 2))
    d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    medoids = np.argsort(d.sum(1), kind="stable")[:k]
    for _ in range(max_iter):
        labels = d[:, medoids].argmin(1)
        new = medoids.copy()
        for c in range(k):
            members = np.flatnonzero(labels == c)
            if len(members):
                new[c] = members[d[np.ix_(members, members)].sum(1).argmin()]
        if np.array_equal(new, medoids):
            break
        medoids = new
    return pts[medoids]


def positive_points(mask: np.ndarray, k: int, rng: np.random.Generator, subsample: int = 1800) -> np.ndarray:
    """(k, 2) XY: K-medoids of (a random subsample of at most ``subsample``) mask pixels (SAM-PT)."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return np.zeros((0, 2))
    pix = np.stack([xs, ys], 1).astype(float)
    if len(pix) > subsample:
        pix = pix[rng.permutation(len(pix))[:subsample]]
    return kmedoids(pix, k)


def farthest_points(candidates: np.ndarray, k: int, start: np.ndarray) -> np.ndarray:
    """(<= k, 2): farthest-point sampling of ``candidates`` (N, 2): first the candidate farthest
    from ``start`` (2,), then each time the one farthest from all chosen (first of equals)."""
    if not len(candidates) or k < 1:
        return np.zeros((0, 2))
    dist = np.hypot(*(candidates - start).T)
    chosen = [int(dist.argmax())]
    near = np.hypot(*(candidates - candidates[chosen[0]]).T)
    while len(chosen) < min(k, len(candidates)):
        i = int(near.argmax())
        if near[i] == 0:
            break
        chosen.append(i)
        near = np.minimum(near, np.hypot(*(candidates - candidates[i]).T))
    return candidates[chosen]


def negative_points(mask: np.ndarray, k: int, ring_px: int, valid: np.ndarray | None = None) -> np.ndarray:
    """(<= k, 2) XY just outside ``mask``: pixels at most ``ring_px`` from it (8-connected dilation),
    spread by :func:`farthest_points` from the mask's centroid."""
    if k < 1 or not mask.any():
        return np.zeros((0, 2))
    ring = ndimage.binary_dilation(mask, np.ones((3, 3), bool), iterations=ring_px) & ~mask
    if valid is not None:
        ring &= valid
    ys, xs = np.nonzero(ring)
    cy, cx = ndimage.center_of_mass(mask)
    return farthest_points(np.stack([xs, ys], 1).astype(float), k, np.array([cx, cy]))


# -- decoding -----------------------------------------------------------------------------------
def _full_box(pred, low: torch.Tensor) -> torch.Tensor | None:
    h, w = pred.sizes[0]
    m = pred.model.postprocess_masks(low, h, w)[0, 0] > pred.model.mask_threshold
    if int(m.sum()) < 2:
        return None
    ys, xs = torch.nonzero(m, as_tuple=True)
    sx, sy = pred.model.prompt_scale(h, w)
    return torch.stack([xs.min() * sx, ys.min() * sy, xs.max() * sx, ys.max() * sy]).float()[None]


@torch.inference_mode()
def sam_pt_mask(pred, positives: np.ndarray, negatives: np.ndarray, cfg: PropagateConfig
                ) -> tuple[np.ndarray, float]:
    """SAM-PT's mask of one object on the embedded image 0 of ``pred``: (H, W) bool and the
    predicted IoU (an all-False mask where it is under ``cfg.min_iou``)."""
    model = pred.model
    h, w = pred.sizes[0]
    sx, sy = model.prompt_scale(h, w)
    scale = torch.tensor([sx, sy], device=pred.device)
    pts = np.concatenate([positives, negatives]).astype(np.float32)
    labels = np.r_[np.ones(len(positives)), np.zeros(len(negatives))].astype(np.int32)
    c_all = (torch.as_tensor(pts, device=pred.device) * scale)[None]
    l_all = torch.as_tensor(labels, device=pred.device)[None]
    emb = pred.embeddings[:1]
    low, iou = model.decode(emb, points=(c_all[:, : len(positives)], l_all[:, : len(positives)]))
    if len(negatives):
        low, iou = model.decode(emb, points=(c_all, l_all), mask_logits=low)
    for _ in range(cfg.refine_iters):
        box = _full_box(pred, low)
        if box is None:
            break
        low, iou = model.decode(emb, points=(c_all, l_all), boxes=box, mask_logits=low)
    score = float(iou[0, 0])
    mask = (model.postprocess_masks(low, h, w)[0, 0] > model.mask_threshold).cpu().numpy()
    return (mask if score >= cfg.min_iou else np.zeros_like(mask)), score


# -- villages through the years -----------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """A north-up window in the analysis CRS: bounds and size in px."""

    bounds: tuple[float, float, float, float]
    width: int
    height: int

    @property
    def transform(self) -> Affine:
        x0, y0, x1, y1 = self.bounds
        return Affine((x1 - x0) / self.width, 0, x0, 0, -(y1 - y0) / self.height, y1)


def window_around(geom, pixel: float, max_px: int, margin: float = 0.5) -> Grid:
    """A square window around ``geom`` with ``margin`` of its size on each side, at ``pixel``
    (analysis-CRS units) or coarser so it stays within ``max_px``."""
    x0, y0, x1, y1 = geom.bounds
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin) + 64 * pixel
    px = max(pixel, side / max_px)
    n = max(64, int(math.ceil(side / px)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = n * px / 2
    return Grid((cx - half, cy - half, cx + half, cy + half), n, n)


def image_pixel(image: str | Path, crs) -> float:
    """The image's pixel size in the analysis CRS's units (its footprint's width over its columns)."""
    from rasterio.warp import transform_bounds

    with RasterSource(image) as src:
        t = src.transform
        b = transform_bounds(src.crs, crs, t.c, t.f + t.e * src.height, t.c + t.a * src.width, t.f)
        return (b[2] - b[0]) / src.width


def read_window(image: str | Path, crs, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 RGB (each band stretched 2-98 % on the window) and validity of ``image`` on ``grid``."""
    data, valid = read_on_grid(location(image), crs, grid.bounds, grid.width, grid.height)
    x = np.repeat(data, 3, 0) if data.shape[0] == 1 else data[:3]
    out = np.zeros(x.shape, np.float64)
    for b in range(3):
        v = x[b][valid]
        lo, hi = (np.percentile(v, [2, 98]) if v.size else (0.0, 1.0))
        out[b] = np.clip((x[b] - lo) / max(hi - lo, 1e-9), 0, 1) * 255
    out[:, ~valid] = 0
    return np.ascontiguousarray(out.round().astype(np.uint8).transpose(1, 2, 0)), valid


def propagate(pred, geom, others: list, image: str | Path, crs, pixel: float, shift: tuple[float, float],
              cfg: PropagateConfig, rng: np.random.Generator):
    """The village ``geom`` (analysis CRS) carried by ``shift`` (east, north metres) into ``image``
    and redrawn there by SAM-PT: (propagated geometry or None, predicted IoU). ``others``: the
    other villages of the same year (their positive points are negatives here)."""
    moved = affinity.translate(geom, *shift)
    grid = window_around(moved, pixel, cfg.window_px)
    img, valid = read_window(image, crs, grid)
    if not valid.any():
        return None, float("nan")
    shape = (grid.height, grid.width)
    mask = rasterize([(moved, 1)], shape, transform=grid.transform, dtype="uint8").astype(bool)
    if not mask.any():
        mask = rasterize([(moved, 1)], shape, transform=grid.transform, dtype="uint8", all_touched=True).astype(bool)
    pos = positive_points(mask, cfg.positive_points, rng)
    neg = negative_points(mask, cfg.negative_points, cfg.ring_px, valid)
    near = [affinity.translate(o, *shift) for o in others if o.intersects(shapely.box(*grid.bounds))]
    for o in near:  # other villages in view: their positive points are negatives (SAM-PT)
        om = rasterize([(o, 1)], shape, transform=grid.transform, dtype="uint8").astype(bool) & ~mask
        if om.any():
            neg = np.concatenate([neg, positive_points(om, cfg.positive_points, rng)])
    if not len(pos):
        return None, float("nan")
    pred.set_image(img)
    out, score = sam_pt_mask(pred, pos, neg, cfg)
    out &= valid
    if not out.any():
        return None, score
    return shapely.union_all(polygonise(out, grid.transform)), score


def iou(a, b) -> float:
    if a is None or b is None or a.is_empty or b.is_empty:
        return 0.0
    inter = shapely.intersection(a, b).area
    union = a.area + b.area - inter
    return float(inter / union) if union > 0 else 0.0


def propagate_changes(result, images: dict[str, Path], shifts: dict[tuple[str, str], tuple[float, float]],
                      generalist, cfg: PropagateConfig = PropagateConfig(), log=print) -> list[dict]:
    """Every event of ``result`` between two years with imagery of the later one: the earlier
    villages propagated (with re-initialisation along a chain), compared with the detections.
    Adds ``propagated_iou`` and ``confirmed`` to ``result.changes`` (NaN / None where there is no
    imagery or the event is new) and returns one row per propagated village (its uid, years,
    lifecycle, whether the generalist found it, its own ``propagated_iou`` and ``confirmed``)."""
    changes = result.changes
    changes["propagated_iou"] = np.nan
    changes["confirmed"] = pd.array([pd.NA] * len(changes), dtype="boolean")
    vil = result.villages
    pred = Predictor(generalist.load().predictor.model)
    rng = np.random.default_rng(cfg.seed)
    carried: dict[tuple[str, str], object] = {}  # (uid, year) -> propagated geometry (re-initialisation)
    pixels: dict[str, float] = {}
    rows = []
    for k, ev in changes.iterrows():
        y0, y1 = ev["year_from"], ev["year_to"]
        if y1 not in images or ev["lifecycle"] == "new" or not ev["uids_from"]:
            continue
        if y1 not in pixels:
            pixels[y1] = image_pixel(images[y1], result.crs)
        before = vil[vil["year"] == y0]
        uids = ev["uids_from"].split(",")
        shift = shifts.get((y0, y1), (0.0, 0.0))
        props, scores = [], []
        for uid in uids:
            # re-initialisation: the village as propagated into y0, where it was, else as detected
            source = carried.get((uid, y0))
            if source is None:
                source = shapely.union_all(before[before["village_uid"] == uid].geometry.values)
            others = list(before[~before["village_uid"].isin(uids)].geometry.values)
            geom, score = propagate(pred, source, others, images[y1], result.crs, pixels[y1], shift, cfg, rng)
            if geom is not None:
                carried[(uid, y1)] = geom
            props.append(geom)
            scores.append(score)
        demolished = ev["lifecycle"] == "demolished"
        if demolished:  # the generalist should no longer find each village where it was
            targets = {u: affinity.translate(shapely.union_all(before[before["village_uid"] == u].geometry.values),
                                             *shift) for u in uids}
            whole = shapely.union_all(list(targets.values()))
        else:  # ...or should redraw the villages as detected after
            after = vil[(vil["year"] == y1) & vil["village_uid"].isin(ev["uids_to"].split(","))]
            whole = shapely.union_all(after.geometry.values)
            targets = dict.fromkeys(uids, whole)
        for uid, geom, score in zip(uids, props, scores, strict=True):
            value = iou(geom, targets[uid])
            rows.append({"village_uid": uid, "year_from": y0, "year_to": y1, "lifecycle": ev["lifecycle"],
                         "found": geom is not None, "predicted_iou": round(score, 4), "propagated_iou": round(value, 4),
                         "confirmed": bool(value < cfg.confirm_iou if demolished else value >= cfg.confirm_iou)})
        found = [g for g in props if g is not None]
        value = iou(shapely.union_all(found) if found else None, whole)
        confirmed = value < cfg.confirm_iou if demolished else value >= cfg.confirm_iou
        changes.loc[k, "propagated_iou"] = round(value, 4)
        changes.loc[k, "confirmed"] = bool(confirmed)
    n = changes["confirmed"].notna().sum()
    if n:
        log(f"propagation: {int((changes['confirmed'] == True).sum())} of {int(n)} events confirmed by the "  # noqa: E712
            "generalist's propagated masks")
    return rows
