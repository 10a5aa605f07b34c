"""Training losses: cross-entropy for the specialist; focal + dice + IoU-prediction MSE for the
generalist path (SAM's recipe, focal:dice = 20:1 as in the SAM and UV-SAM papers).

Label value ``IGNORE`` (255) marks pixels without a label (nodata); they count in no loss.
The SAM-path loss is averaged over the villages actually decoded (the official code divides by
all contours, small ones included).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from uvsam.labels import IGNORE
from uvsam.modeling.uvsam import UVSAMOutput


@dataclass(frozen=True)
class LossWeights:
    sam: float = 1.0  # weight of the generalist path relative to the specialist's cross-entropy
    focal: float = 20.0
    dice: float = 1.0
    iou: float = 1.0


def focal_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, alpha: float = 0.25,
               gamma: float = 2.0) -> torch.Tensor:
    """Mean sigmoid focal loss over valid pixels of each mask: (N, H, W) -> (N,)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma * (alpha * target + (1 - alpha) * (1 - target))
    return (loss * valid).sum((1, 2)) / valid.sum((1, 2)).clamp_min(1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Soft dice loss over valid pixels: (N, H, W) -> (N,)."""
    p = torch.sigmoid(logits) * valid
    t = target * valid
    return 1 - (2 * (p * t).sum((1, 2)) + 1) / (p.sum((1, 2)) + t.sum((1, 2)) + 1)


def village_targets(labels: torch.Tensor, boxes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The target of each decoded box: the labelled village pixels inside it.

    labels: (H, W) uint8 0/1/IGNORE; boxes: (M, 4) XYXY. Returns targets (M, H, W) float and
    valid (M, H, W) float (labelled pixels).
    """
    h, w = labels.shape
    inside = torch.zeros((len(boxes), h, w), dtype=torch.bool, device=labels.device)
    for i, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        inside[i, y0:y1, x0:x1] = True
    valid = (labels != IGNORE).expand_as(inside)
    target = inside & (labels == 1)
    return target.float(), valid.float()


def uvsam_loss(out: UVSAMOutput, labels: torch.Tensor, w: LossWeights = LossWeights()) -> dict[str, torch.Tensor]:
    """labels: (B, H, W) uint8 0/1/IGNORE. Returns ``total`` and its parts (for logging)."""
    ce = F.cross_entropy(out.specialist_logits, labels.long(), ignore_index=IGNORE)
    if not torch.isfinite(ce):  # a batch without any labelled pixel
        ce = out.specialist_logits.sum() * 0
    parts = {"ce": ce}
    focal, dice, iou_mse, n = [], [], [], 0
    if w.sam > 0:
        for b, v in enumerate(out.villages):
            m = len(v.decoded_boxes)
            if m == 0:
                continue
            target, valid = village_targets(labels[b], v.decoded_boxes)
            logits = v.mask_logits[:, 0]
            focal.append(focal_loss(logits, target, valid).sum())
            dice.append(dice_loss(logits, target, valid).sum())
            with torch.no_grad():
                pred = (logits > 0).float() * valid
                inter, union = (pred * target).sum((1, 2)), ((pred + target) > 0).float().mul(valid).sum((1, 2))
                true_iou = inter / union.clamp_min(1)
            iou_mse.append(F.mse_loss(v.iou_pred, true_iou, reduction="sum"))
            n += m
    zero = ce * 0
    if n:
        parts["focal"] = torch.stack(focal).sum() / n
        parts["dice"] = torch.stack(dice).sum() / n
        parts["iou"] = torch.stack(iou_mse).sum() / n
        sam = w.focal * parts["focal"] + w.dice * parts["dice"] + w.iou * parts["iou"]
    else:
        parts["focal"] = parts["dice"] = parts["iou"] = sam = zero
    parts["sam"] = sam
    parts["total"] = ce + w.sam * sam
    parts["villages"] = torch.tensor(float(n))
    return parts
