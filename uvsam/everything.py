"""Everything mode: every object a generalist finds in an image, with no prompt from the user.

Meta's automatic mask generator (``segment_anything.SamAutomaticMaskGenerator``) on any
generalist of the registry: a grid of single-point prompts decoded three masks each, masks
kept where the generalist's predicted IoU and its stability score (IoU of the masks thresholded
at +-offset of the logits) are high enough, duplicates removed by box NMS, small islands and
holes cleaned. :func:`generate` is that, mask for mask (``tests/test_everything.py`` checks
parity on a real tile), with two savings that do not change the result: masks whose predicted
IoU fails are never upsampled, and masks are kept as boxes plus crops.

TinySAM's hierarchical strategy (``hierarchical=True``): a sparse first pass (a quarter of the
points per side), then dense points only around the sparse ones, and only where no first-pass
mask was confident (logits above ``high_score_thresh``); both passes' masks go through the same
NMS. Decoder calls and time against the dense grid are in docs/benchmarks.md.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy import ndimage
from torchvision.ops import batched_nms

from uvsam.errors import InputError
from uvsam.predictor import Predictor


@dataclass(frozen=True)
class EverythingConfig:
    """Settings of everything mode (the defaults are SamAutomaticMaskGenerator's and TinySAM's)."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 0  # px; islands and holes smaller than this are cleaned (0: off)
    hierarchical: bool = False
    high_score_thresh: float = 8.5  # logit above which the first pass counts as confident (TinySAM)

    def __post_init__(self):
        if self.points_per_side < 1 or (self.hierarchical and self.points_per_side < 4):
            raise InputError(f"points per side must be >= {4 if self.hierarchical else 1} "
                             f"(hierarchical mode samples a quarter of them first), not {self.points_per_side}")
        if self.points_per_batch < 1:
            raise InputError(f"points per batch must be >= 1, not {self.points_per_batch}")
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise InputError(f"{name.replace('_', ' ')} must lie in [0, 1], not {v}")
        if not self.stability_score_offset > 0:
            raise InputError(f"stability score offset must be > 0, not {self.stability_score_offset}")
        if self.min_mask_region_area < 0:
            raise InputError(f"minimum mask region area must be >= 0 px, not {self.min_mask_region_area}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Objects:
    """Objects of one image, in the order NMS ranks them (best first).

    masks: (N, H, W) bool; boxes: (N, 4) XYXY pixels, max inclusive (SAM's ``batched_mask_to_box``);
    predicted_iou, stability: (N,); points: (N, 2) XY pixels of the prompt that found each.
    ``decoded``: point prompts decoded; ``seconds``: decoding time (the image embedding excluded).
    """

    masks: np.ndarray
    boxes: np.ndarray
    predicted_iou: np.ndarray
    stability: np.ndarray
    points: np.ndarray
    which: np.ndarray  # (N,) which of the prompt's three masks each is (0..2)
    decoded: int = 0
    seconds: float = 0.0
    passes: list[int] = field(default_factory=list)  # points decoded in each pass

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def areas(self) -> np.ndarray:
        return self.masks.reshape(len(self), -1).sum(1)

    def select(self, keep) -> Objects:
        keep = np.asarray(keep)
        return Objects(self.masks[keep], self.boxes[keep], self.predicted_iou[keep], self.stability[keep],
                       self.points[keep], self.which[keep], self.decoded, self.seconds, list(self.passes))


def point_grid(n: int) -> np.ndarray:
    """(n*n, 2) XY in [0, 1]: cell centres of an n x n grid, x fastest (SAM's ``build_point_grid``)."""
    offset = 1 / (2 * n)
    side = np.linspace(offset, 1 - offset, n)
    return np.stack([np.tile(side[None, :], (n, 1)), np.tile(side[:, None], (1, n))], axis=-1).reshape(-1, 2)


def stability_scores(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """(N,) SAM's stability score of (N, H, W) mask logits: |logits > t+offset| / |logits > t-offset|
    (NaN for a mask empty at both, which no threshold keeps, as in SAM)."""
    high = (logits > threshold + offset).sum((-1, -2), dtype=torch.int32)
    low = (logits > threshold - offset).sum((-1, -2), dtype=torch.int32)
    return high / low


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, 4) XYXY of (N, H, W) bool masks, max inclusive; [0, 0, 0, 0] for an empty mask."""
    if masks.numel() == 0:
        return torch.zeros(masks.shape[0], 4, device=masks.device)
    h, w = masks.shape[-2:]
    rows, cols = masks.any(-1), masks.any(-2)
    iy = torch.arange(h, device=masks.device)[None]
    ix = torch.arange(w, device=masks.device)[None]
    y1 = (rows * iy).amax(-1)
    y0 = (rows * iy + h * ~rows).amin(-1)
    x1 = (cols * ix).amax(-1)
    x0 = (cols * ix + w * ~cols).amin(-1)
    boxes = torch.stack([x0, y0, x1, y1], -1)
    return boxes * (rows.any(-1) & cols.any(-1))[:, None]


def remove_small_regions(mask: np.ndarray, area: int, mode: str) -> tuple[np.ndarray, bool]:
    """(mask, changed): holes (``mode="holes"``) or islands (``"islands"``) under ``area`` px
    removed, 8-connected; at least the largest island stays (SAM's ``remove_small_regions``)."""
    holes = mode == "holes"
    working = ~mask if holes else mask
    labels, n = ndimage.label(working, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    small = [i + 1 for i, s in enumerate(sizes) if s < area]
    if not small:
        return mask, False
    fill = [0, *small]
    if not holes:
        fill = [i for i in range(n + 1) if i not in fill]
        if not fill:  # every island is small: keep the largest
            fill = [int(np.argmax(sizes)) + 1]
    return np.isin(labels, fill), True


def _nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    return batched_nms(boxes.float(), scores.float(), torch.zeros(len(boxes), dtype=torch.long), threshold)


class _Pass:
    """Masks found by one set of point prompts (SAM's ``_process_batch`` over all batches)."""

    def __init__(self):
        self.masks, self.iou, self.stability, self.points, self.boxes, self.which = [], [], [], [], [], []

    def cat(self):
        if not self.masks:
            return None
        return (torch.cat(self.masks), torch.cat(self.iou), torch.cat(self.stability), np.concatenate(self.points),
                torch.cat(self.boxes), np.concatenate(self.which))


def _decode_points(pred: Predictor, index: int, points: np.ndarray, cfg: EverythingConfig,
                   confident: torch.Tensor | None = None) -> _Pass:
    model = pred.model
    h, w = pred.sizes[index]
    sx, sy = model.prompt_scale(h, w)
    scale = torch.tensor([sx, sy], dtype=torch.float32, device=pred.device)
    out = _Pass()
    emb = pred.embeddings[index : index + 1]
    for s in range(0, len(points), cfg.points_per_batch):
        pts = points[s : s + cfg.points_per_batch]
        coords = torch.as_tensor(pts, dtype=torch.float32, device=pred.device)[:, None] * scale
        labels = torch.ones(coords.shape[:2], dtype=torch.int, device=pred.device)
        low, iou = model.decode(emb, points=(coords, labels), multimask_output=True)
        c = low.shape[1]
        low, iou = low.flatten(0, 1).float(), iou.flatten(0, 1).float()
        which = np.repeat(np.arange(len(pts)), c)
        index = np.tile(np.arange(c), len(pts))
        keep = iou > cfg.pred_iou_thresh if cfg.pred_iou_thresh > 0 else torch.ones_like(iou, dtype=torch.bool)
        if not keep.any():
            continue
        # only the masks the predicted IoU keeps are upsampled (SAM upsamples all, then filters)
        logits = model.postprocess_masks(low[keep][:, None], h, w)[:, 0]
        stab = stability_scores(logits, model.mask_threshold, cfg.stability_score_offset)
        k2 = stab >= cfg.stability_score_thresh if cfg.stability_score_thresh > 0 else torch.ones_like(stab,
                                                                                                        dtype=torch.bool)
        logits, stab = logits[k2], stab[k2]
        if confident is not None and len(logits):
            confident |= (logits > cfg.high_score_thresh).any(0)
        masks = logits > model.mask_threshold
        del logits
        out.masks.append(masks.cpu())
        out.iou.append(iou[keep][k2].cpu())
        out.stability.append(stab.cpu())
        kept = np.flatnonzero(keep.cpu().numpy())[k2.cpu().numpy()]
        out.points.append(pts[which[kept]])
        out.which.append(index[kept])
        out.boxes.append(mask_boxes(masks).cpu())
    return out


def hierarchical_points(sparse: np.ndarray, confident: np.ndarray, stride: tuple[float, float]) -> np.ndarray:
    """TinySAM's second-pass points (pixels): around each sparse point (pixels), the dense grid's
    neighbours at offsets -1..2 strides (``stride`` (x, y) px; only those inside the image),
    the sparse point itself excluded, each kept only where ``confident`` (H, W) is False."""
    h, w = confident.shape
    sx, sy = stride
    out = []
    for x, y in sparse:
        for dy in (-1, 0, 1, 2):
            for dx in (-1, 0, 1, 2):
                if dx == dy == 0:
                    continue
                px, py = x + sx * dx, y + sy * dy
                if not (0 <= px < w and 0 <= py < h):  # TinySAM's rule for +2; its grid keeps the rest inside
                    continue
                if confident[int(py), int(px)]:
                    continue
                out.append((px, py))
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


def _empty(h: int, w: int, passes: list[int], seconds: float) -> Objects:
    return Objects(np.zeros((0, h, w), bool), np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                   np.zeros(0, np.float32), np.zeros((0, 2)), np.zeros(0, int), sum(passes), seconds, passes)


@torch.inference_mode()
def generate(pred: Predictor, cfg: EverythingConfig = EverythingConfig(), index: int = 0,
             points: np.ndarray | None = None, stride: tuple[float, float] | None = None) -> Objects:
    """Every object of image ``index`` of ``pred`` (embedded already: :meth:`Predictor.set_images`).

    ``points``: (P, 2) XY pixels to prompt instead of the image's own ``points_per_side`` grid
    (a scene's lattice, :mod:`uvsam.objects`); in hierarchical mode they are the sparse pass, and
    ``stride`` (x, y px) the dense lattice's spacing (default: the image over ``points_per_side``).
    """
    if pred.embeddings is None:
        raise RuntimeError("call set_images() before generate()")
    h, w = pred.sizes[index]
    t0 = time.perf_counter()
    scale = np.array([[w, h]], dtype=np.float64)
    if cfg.hierarchical:
        sparse = point_grid(cfg.points_per_side // 4) * scale if points is None else np.asarray(points, float)
        confident = torch.zeros(h, w, dtype=torch.bool, device=pred.device)
        first = _decode_points(pred, index, sparse, cfg, confident)
        step = stride or (w // cfg.points_per_side, h // cfg.points_per_side)
        dense = hierarchical_points(sparse, confident.cpu().numpy(), step)
        second = _decode_points(pred, index, dense, cfg)
        parts = [p for p in (second.cat(), first.cat()) if p is not None]  # TinySAM: dense pass first
        passes = [len(sparse), len(dense)]
    else:
        grid = point_grid(cfg.points_per_side) * scale if points is None else np.asarray(points, float)
        parts = [p for p in [_decode_points(pred, index, grid, cfg).cat()] if p is not None]
        passes = [len(grid)]
    if not parts:
        return _empty(h, w, passes, time.perf_counter() - t0)
    masks, iou, stab, pts, boxes, which = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                                           torch.cat([p[2] for p in parts]), np.concatenate([p[3] for p in parts]),
                                           torch.cat([p[4] for p in parts]), np.concatenate([p[5] for p in parts]))
    keep = _nms(boxes, iou, cfg.box_nms_thresh)
    masks, iou, stab, boxes = masks[keep].numpy(), iou[keep], stab[keep], boxes[keep]
    pts, which = pts[keep.numpy()], which[keep.numpy()]
    if cfg.min_mask_region_area > 0 and len(masks):
        masks, boxes, order = clean_small_regions(masks, boxes, cfg.min_mask_region_area, cfg.box_nms_thresh)
        iou, stab, pts, which = iou[order], stab[order], pts[order], which[order]
    return Objects(masks, boxes.numpy().astype(np.float32), iou.numpy(), stab.numpy(), pts, which, sum(passes),
                   time.perf_counter() - t0, passes)


def clean_small_regions(masks: np.ndarray, boxes: torch.Tensor, area: int, nms_thresh: float
                        ) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """SAM's ``postprocess_small_regions``: holes then islands under ``area`` px removed from each
    mask, boxes recomputed, and NMS again preferring masks that needed no cleaning.
    Returns (masks, boxes, kept indices), in NMS order."""
    cleaned, scores = [], []
    for m in masks:
        m2, holes = remove_small_regions(m, area, "holes")
        m2, islands = remove_small_regions(m2, area, "islands")
        cleaned.append(m2)
        scores.append(float(not (holes or islands)))
    cleaned = np.stack(cleaned)
    new_boxes = mask_boxes(torch.from_numpy(cleaned))
    keep = _nms(new_boxes, torch.tensor(scores), nms_thresh).numpy()
    # SAM keeps the original mask (and box) of an unchanged one, the cleaned of a changed one
    out_masks = np.stack([cleaned[i] if scores[i] == 0 else masks[i] for i in keep]) if len(keep) else masks[:0]
    out_boxes = torch.stack([new_boxes[i] if scores[i] == 0 else boxes[i] for i in keep]) if len(keep) else boxes[:0]
    return out_masks, out_boxes, keep


@torch.inference_mode()
def decode_points(pred: Predictor, points: np.ndarray, which: np.ndarray, cfg: EverythingConfig = EverythingConfig(),
                  index: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(masks (K, H, W) bool, predicted IoU (K,), stability (K,)): point ``k`` decoded again, mask
    ``which[k]`` of its three (an object seen cut by a tile edge, redrawn in a window around it)."""
    h, w = pred.sizes[index]
    sx, sy = pred.model.prompt_scale(h, w)
    masks, ious, stabs = [], [], []
    for s in range(0, len(points), cfg.points_per_batch):
        pts = np.asarray(points[s : s + cfg.points_per_batch], np.float32)
        coords = torch.as_tensor(pts, device=pred.device)[:, None] * torch.tensor([sx, sy], device=pred.device)
        labels = torch.ones(coords.shape[:2], dtype=torch.int, device=pred.device)
        low, iou = pred.model.decode(pred.embeddings[index : index + 1], points=(coords, labels),
                                     multimask_output=True)
        pick = torch.as_tensor(np.asarray(which[s : s + cfg.points_per_batch]), device=pred.device)
        rows = torch.arange(len(pts), device=pred.device)
        logits = pred.model.postprocess_masks(low[rows, pick][:, None].float(), h, w)[:, 0]
        stabs.append(stability_scores(logits, pred.model.mask_threshold, cfg.stability_score_offset).cpu())
        masks.append((logits > pred.model.mask_threshold).cpu())
        ious.append(iou[rows, pick].float().cpu())
    if not masks:
        return np.zeros((0, h, w), bool), np.zeros(0, np.float32), np.zeros(0, np.float32)
    return torch.cat(masks).numpy(), torch.cat(ious).numpy(), torch.cat(stabs).numpy()
