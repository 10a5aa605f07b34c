"""Segmentation metrics: the UV-SAM paper's pixel IoU, F1, precision and recall, and an
object-level village F1 (a predicted village matches a labelled one at IoU >= 0.5).

Counts accumulate over images (pooled, not averaged per image); pixels labelled IGNORE count
nowhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from uvsam.losses import IGNORE

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

    def update(self, pred: np.ndarray, labels: np.ndarray, object_iou: float = 0.5) -> None:
        """pred: (H, W) bool; labels: (H, W) 0/1/IGNORE."""
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
            "objects_predicted": self.pred_objects,
            "objects_labelled": self.true_objects,
            "objects_matched": self.matched_objects,
            "pixels": self.tp + self.fp + self.fn + self.tn,
        }


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
