"""Segmentation metrics: the UV-SAM paper's pixel IoU, F1, precision and recall; object-level
village precision, recall and F1 (a predicted village matches a labelled one at IoU >= 0.5);
and a boundary measure: how far predicted outlines lie from the true ones, in metres (the
symmetric distances between the two masks' boundary pixels; mean and 95th percentile).

Counts accumulate over images (pooled, not averaged per image); pixels labelled IGNORE count
nowhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from uvsam.labels import IGNORE

_EIGHT = np.ones((3, 3), bool)


@dataclass
class SegmentationCounts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    pred_objects: int = 0
    true_objects: int = 0
    matched_objects: int = 0
    boundary_m: list[np.ndarray] = field(default_factory=list)  # outline-to-outline distances, metres

    def update(self, pred: np.ndarray, labels: np.ndarray, object_iou: float = 0.5,
               pixel_m: tuple[float, float] | None = None) -> None:
        """pred: (H, W) bool; labels: (H, W) 0/1/IGNORE; ``pixel_m``: the pixel's (x, y) size on
        the ground in metres (None: the boundary measure is not taken)."""
        valid = labels != IGNORE
        truth = labels == 1
        p = pred.astype(bool) & valid
        self.tp += int((p & truth).sum())
        self.fp += int((p & ~truth & valid).sum())
        self.fn += int((~p & truth).sum())
        self.tn += int((~p & ~truth & valid).sum())
        n_pred, n_true, matched = match_objects(p, truth, object_iou)
        self.pred_objects += n_pred
        self.true_objects += n_true
        self.matched_objects += matched
        if pixel_m is not None:
            self.boundary_m.append(boundary_distances(p, truth, valid, pixel_m))

    def summary(self) -> dict[str, float]:
        def ratio(a, b):
            return float(a / b) if b else 0.0

        precision = ratio(self.tp, self.tp + self.fp)
        recall = ratio(self.tp, self.tp + self.fn)
        op = ratio(self.matched_objects, self.pred_objects)
        orc = ratio(self.matched_objects, self.true_objects)
        return {
            "iou": ratio(self.tp, self.tp + self.fp + self.fn),
            "f1": ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn),
            "precision": precision,
            "recall": recall,
            "object_f1": ratio(2 * op * orc, op + orc),
            "object_precision": op,
            "object_recall": orc,
            "objects_predicted": self.pred_objects,
            "objects_labelled": self.true_objects,
            "objects_matched": self.matched_objects,
            "pixels": self.tp + self.fp + self.fn + self.tn,
            **self.boundary_summary(),
        }

    def boundary_summary(self) -> dict[str, float | None]:
        """Mean and 95th percentile outline distance (m), None where no outline pair was measured."""
        d = np.concatenate(self.boundary_m) if self.boundary_m else np.zeros(0)
        if d.size == 0:
            return {"boundary_mean_m": None, "boundary_p95_m": None}
        return {"boundary_mean_m": round(float(d.mean()), 2), "boundary_p95_m": round(float(np.percentile(d, 95)), 2)}


def outline(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary pixels (8-connected to outside the mask; the image's edge is not one)."""
    return mask & ~ndimage.binary_erosion(mask, _EIGHT, border_value=1)


def boundary_distances(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray,
                       pixel_m: tuple[float, float]) -> np.ndarray:
    """Ground distances (m) from every predicted outline pixel to the nearest true outline pixel
    and back (symmetric), over valid pixels; empty when either outline is."""
    a, b = outline(pred) & valid, outline(truth) & valid
    if not a.any() or not b.any():
        return np.zeros(0)
    sampling = (float(pixel_m[1]), float(pixel_m[0]))  # rows, columns
    to_b = ndimage.distance_transform_edt(~b, sampling=sampling)
    to_a = ndimage.distance_transform_edt(~a, sampling=sampling)
    return np.concatenate([to_b[a], to_a[b]]).astype(np.float32)


def match_objects(pred: np.ndarray, truth: np.ndarray, min_iou: float = 0.5) -> tuple[int, int, int]:
    """(#predicted, #labelled, #matched) 8-connected villages; one-to-one matches at IoU >= ``min_iou``.

    With ``min_iou`` >= 0.5 a match is unique by construction (two objects cannot both have
    IoU > 0.5 with a third), so greedy matching is exact.
    """
    lp, n_pred = ndimage.label(pred, _EIGHT)
    lt, n_true = ndimage.label(truth, _EIGHT)
    if n_pred == 0 or n_true == 0:
        return n_pred, n_true, 0
    both = (lp > 0) & (lt > 0)
    pairs, inter = np.unique(np.stack([lp[both], lt[both]]), axis=1, return_counts=True)
    area_p = np.bincount(lp.ravel(), minlength=n_pred + 1)
    area_t = np.bincount(lt.ravel(), minlength=n_true + 1)
    iou = inter / (area_p[pairs[0]] + area_t[pairs[1]] - inter)
    order = np.argsort(-iou)
    used_p, used_t, matched = set(), set(), 0
    for i in order:
        if iou[i] < min_iou:
            break
        a, b = int(pairs[0, i]), int(pairs[1, i])
        if a not in used_p and b not in used_t:
            used_p.add(a)
            used_t.add(b)
            matched += 1
    return n_pred, n_true, matched
