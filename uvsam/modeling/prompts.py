"""Prompts from the specialist: what UV-SAM feeds the frozen generalist.

As in the UV-SAM paper and its official code, the specialist's output becomes four prompts:

- boxes: one box per predicted village (8-connected component of the village mask, the
  bounding rectangle OpenCV's external contours would give);
- a dense mask prompt: the village log-odds average-pooled to SAM's 256 x 256 mask-input grid;
- two semantic prompts: the L2-normalised global-average-pooled generalist image embedding and
  the L2-normalised pooled fused specialist feature (256 each).

Villages whose box is smaller than a minimum area are not decoded by the generalist; they keep
the specialist's own mask (the official code drops them at inference and, in training, reuses
the previous village's mask for their loss — both defects are not reproduced). The minimum is
in square metres; its default is the official 100 x 100 px at the official data's resolution
(:data:`OFFICIAL_GSD_M`), so it means the same ground area whatever GSD a model is trained at.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

MASK_PROMPT_SIZE = 256  # SAM's low-resolution mask grid
OFFICIAL_MIN_SIDE_PX = 100
# The official data: Beijing at XYZ zoom 17, 1.194 m Web-Mercator pixels, 0.916 m on the ground at
# 39.9 deg N. The official limit of 100 x 100 px is therefore 8,390 m^2 of ground.
OFFICIAL_GSD_M = 0.916


def min_area_m2(gsd_m: float, side_px: int = OFFICIAL_MIN_SIDE_PX) -> float:
    """The official size limit (``side_px`` x ``side_px`` pixels) in square metres at ``gsd_m``."""
    return float(side_px * gsd_m) ** 2


@dataclass(frozen=True)
class VillageBoxes:
    """The villages of one predicted mask.

    boxes: (N, 4) XYXY pixel boxes (x1, y1 exclusive); labels: (H, W) component ids 1..N (0 is
    background); large: (N,) which villages the generalist decodes, the others keep the
    specialist's mask.
    """

    boxes: np.ndarray
    labels: np.ndarray
    large: np.ndarray

    def __len__(self) -> int:
        return len(self.boxes)


def village_boxes(mask: np.ndarray, gsd_m: float, min_area: float | None = None) -> VillageBoxes:
    """Boxes of the 8-connected villages of a (H, W) bool mask at ``gsd_m`` metres per pixel.

    ``min_area`` (m^2; default :func:`min_area_m2`) applies to the box area, as the official
    code's limit does to OpenCV's bounding rectangle.
    """
    if mask.ndim != 2:
        raise ValueError(f"village mask must be (H, W), got {mask.shape}")
    labels, n = ndimage.label(mask.astype(bool), structure=np.ones((3, 3), bool))
    boxes = np.zeros((n, 4), np.float32)
    for i, sl in enumerate(ndimage.find_objects(labels)):
        boxes[i] = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
    limit = min_area_m2(gsd_m) if min_area is None else min_area
    box_area_m2 = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) * gsd_m**2
    return VillageBoxes(boxes, labels.astype(np.int32), box_area_m2 >= limit)


def village_log_odds(logits: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) background/village logits -> (B, 1, H, W) village log-odds; (B, 1, H, W) as is."""
    if logits.shape[1] == 2:
        return logits[:, 1:2] - logits[:, 0:1]
    if logits.shape[1] == 1:
        return logits
    raise ValueError(f"specialist logits must have 1 or 2 channels, got {logits.shape[1]}")


def mask_prompt(logits: torch.Tensor) -> torch.Tensor:
    """The dense prompt: village log-odds average-pooled to (B, 1, 256, 256)."""
    return F.adaptive_avg_pool2d(village_log_odds(logits), MASK_PROMPT_SIZE)


def semantic_prompts(image_embedding: torch.Tensor, specialist_feature: torch.Tensor) -> torch.Tensor:
    """(B, 256, 64, 64) generalist embedding, (B, 256, h, w) fused specialist feature -> (B, 2, 256).

    Each is global-average-pooled and L2-normalised.
    """
    if image_embedding.shape[1] != specialist_feature.shape[1]:
        raise ValueError(f"embedding has {image_embedding.shape[1]} channels, specialist feature "
                         f"{specialist_feature.shape[1]}")
    pooled = [F.normalize(x.mean(dim=(2, 3)), dim=1) for x in (image_embedding, specialist_feature)]
    return torch.stack(pooled, dim=1)
