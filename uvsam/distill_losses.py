"""The pieces of the prompt-level and layer-level distillation recipes of ``uvsam distill``.

There are no labels: every prompt comes from the **teacher's own masks** on the view (EdgeSAM
prompts from ground-truth masks of SA-1B; on a user's imagery the teacher's objects take their
place). :func:`teacher_objects` asks the teacher for the object under random points of the view
and keeps the non-trivial masks: each gives a box prompt (its extent) and a point prompt (a pixel
of it, as EdgeSAM draws points from a mask).

- :func:`error_points`: the point added in the error region between student and teacher masks at
  each later decoder pass, positive where the teacher's mask is and the student's is not, else
  negative. ``uniform`` (EdgeSAM's ``sample_point_in_mask``): any pixel of the disagreement, none
  when fewer than ten pixels disagree; else drawn with probability proportional to the gap of the
  two masks' probabilities (TinySAM's hard prompts: where the two disagree most).
- :func:`hardest`: TinySAM's online hard prompt sampling, the candidates the student gets most wrong.
- :func:`mask_kd` (the student's mask probabilities to the teacher's, binary KL divergence:
  TinySAM's output distillation) and
  :func:`mask_bce_dice` (to the teacher's binary masks, BCE and dice: EdgeSAM's decoder loss).
- :class:`DecoderTokens`: the mask decoder's output tokens (IoU token + mask tokens), TinySAM's
  token-level distillation target.
- :class:`LayerMatch`: SAM-Lightening's dynamic layer-wise distillation between two plain ViT
  encoders (one token grid at 1/16 of the input): student layer i is matched to teacher layer
  ceil((i + 1) L_T / L_S) - 1 (the same layer when the depths match), through a linear projector
  per layer (trained with the student, not part of it); the features are compared after layer
  normalisation (their magnitudes decoupled from their directions). Layer i's weight
  alpha_i(t) rises linearly from 0 at step T_i to 1 at T_i + dt, with T_0 = 0 and T_i = T_{i-1} + dt,
  so the layers are switched on one after another, shallow to deep; focus layers weigh
  ``focus_weight`` times the others.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from uvsam.modeling.sam import Generalist

LOW_RES = 256  # the mask decoder's output grid: a quarter of the prompt frame
PLAIN_VIT_FAMILIES = ("sam_vit", "sam_lightening", "efficient_sam")  # blocks on one 64 x 64 token grid


@dataclass
class Objects:
    """Prompts from the teacher's masks, coordinates in the teacher's prompt frame.

    boxes (K, 4) XYXY; points (K, 2) XY, one pixel of each mask; masks (K, 256, 256) bool."""

    boxes: torch.Tensor
    points: torch.Tensor
    masks: torch.Tensor

    def __len__(self) -> int:
        return len(self.boxes)

    def take(self, idx: torch.Tensor) -> Objects:
        return Objects(self.boxes[idx], self.points[idx], self.masks[idx])


def _pick(weights: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One flat index per row of (N, M) non-negative ``weights`` (rows summing to > 0)."""
    return torch.multinomial(weights.float().cpu(), 1, generator=gen)[:, 0].to(weights.device)


def _frame_xy(flat: torch.Tensor, frame: int) -> torch.Tensor:
    """(N,) flat indices of the 256 x 256 grid -> (N, 2) XY at the pixel centres in a ``frame`` frame."""
    scale = frame / LOW_RES
    return torch.stack([(flat % LOW_RES).float() + 0.5, (flat // LOW_RES).float() + 0.5], 1) * scale


@torch.no_grad()
def teacher_objects(teacher: Generalist, embedding: torch.Tensor, n: int, gen: torch.Generator,
                    min_px: int = 16) -> Objects:
    """Up to ``n`` objects the teacher segments in a square view.

    Points drawn uniformly over the view (twice as many as wanted) are decoded by the teacher
    (three masks each, the best by predicted IoU); masks of at least ``min_px`` pixels of the
    256 x 256 grid and at most 90 % of it (not the whole view) are kept.
    """
    frame = teacher.spec.prompt_frame
    device = embedding.device
    pts = torch.rand((2 * n, 1, 2), generator=gen).to(device) * frame
    logits, iou = teacher.decode(embedding, points=(pts, torch.ones(2 * n, 1, device=device)),
                                 multimask_output=True)
    masks = logits[torch.arange(2 * n, device=device), iou.argmax(1)].float() > teacher.mask_threshold
    area = masks.flatten(1).sum(1)
    keep = torch.nonzero((area >= min_px) & (area <= 0.9 * LOW_RES * LOW_RES))[:, 0][:n]
    masks = masks[keep]
    if not len(masks):
        empty = torch.zeros((0, 4), device=device)
        return Objects(empty, empty[:, :2], masks)
    rows, cols = masks.any(2), masks.any(1)
    idx = torch.arange(LOW_RES, device=device)
    y0 = torch.where(rows, idx, LOW_RES).amin(1)
    y1 = torch.where(rows, idx, -1).amax(1) + 1
    x0 = torch.where(cols, idx, LOW_RES).amin(1)
    x1 = torch.where(cols, idx, -1).amax(1) + 1
    boxes = torch.stack([x0, y0, x1, y1], 1).float() * (frame / LOW_RES)
    points = _frame_xy(_pick(masks.flatten(1), gen), frame)
    return Objects(boxes, points, masks)


@torch.no_grad()
def error_points(student_logits: torch.Tensor, teacher_logits: torch.Tensor, gen: torch.Generator, frame: int,
                 uniform: bool = True, min_px: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """One corrective click per prompt from (N, 256, 256) mask logits of the same output.

    Returns ((N, 1, 2) XY in a ``frame`` frame, (N, 1) labels): 1 where the teacher's mask is
    and the student's is not, 0 for the reverse, -1 (no point: SAM's padding) where fewer than
    ``min_px`` pixels disagree.
    """
    s, t = student_logits.float() > 0, teacher_logits.float() > 0
    wrong = (s != t).flatten(1)
    ok = wrong.sum(1) >= min_px
    weights = wrong.float() if uniform else (torch.sigmoid(student_logits.float()) -
                                             torch.sigmoid(teacher_logits.float())).abs().flatten(1) * wrong
    weights = torch.where(ok[:, None], weights, torch.ones_like(weights))
    flat = _pick(weights, gen)
    labels = t.flatten(1).gather(1, flat[:, None]).float()
    labels = torch.where(ok[:, None], labels, torch.full_like(labels, -1.0))
    xy = torch.where(ok[:, None], _frame_xy(flat, frame), torch.zeros(len(flat), 2, device=flat.device))
    return xy[:, None], labels


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) IoU of (N, H, W) logits thresholded at 0 (1 where both are empty)."""
    a, b = (a.float() > 0).flatten(1), (b.float() > 0).flatten(1)
    inter, union = (a & b).sum(1).float(), (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def hardest(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` prompts whose (N, 256, 256) student masks agree least with the teacher's."""
    return mask_iou(student_logits, teacher_logits).argsort()[:k]


def _dice(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    inter = (prob * target).flatten(-2).sum(-1)
    return (1 - (2 * inter + 1) / (prob.flatten(-2).sum(-1) + target.flatten(-2).sum(-1) + 1)).mean()


def mask_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Soft mask distillation: the mean per-pixel binary KL divergence of the student's mask
    probabilities from the teacher's (BCE to the teacher's probabilities less their entropy: 0 when
    the two agree)."""
    s, t = student_logits.float(), teacher_logits.float()
    target = torch.sigmoid(t)
    return F.binary_cross_entropy_with_logits(s, target) - F.binary_cross_entropy_with_logits(t, target)


def mask_bce_dice(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE, dice) of the student's logits to the teacher's binary masks (EdgeSAM's decoder loss)."""
    target = (teacher_logits.float() > 0).float()
    s = student_logits.float()
    return F.binary_cross_entropy_with_logits(s, target), _dice(torch.sigmoid(s), target)


class DecoderTokens:
    """Captures the mask decoder's output tokens: ``with DecoderTokens(model) as tok: model.decode(...)``,
    then ``tok.tokens`` is (N, 1 + M, 256), the IoU token and the M mask tokens after the two-way
    transformer."""

    def __init__(self, model: Generalist):
        self.decoder = model.mask_decoder
        self.tokens: torch.Tensor | None = None

    def __enter__(self) -> DecoderTokens:
        n = 1 + self.decoder.num_mask_tokens

        def hook(_module, _inputs, output):
            self.tokens = output[0][:, :n]

        self._handle = self.decoder.transformer.register_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def layer_tokens(output: torch.Tensor) -> torch.Tensor:
    """A plain ViT block's output, (B, H, W, C) or (B, N, C), as (B, N, C) tokens."""
    return output.flatten(1, 2) if output.dim() == 4 else output


@contextmanager
def block_outputs(encoder: nn.Module):
    """``with block_outputs(encoder) as feats: encoder(x)``: ``feats`` lists each block's output."""
    feats: list[torch.Tensor] = []
    handles = [blk.register_forward_hook(lambda _m, _i, out: feats.append(layer_tokens(out)))
               for blk in encoder.blocks]
    try:
        yield feats
    finally:
        for h in handles:
            h.remove()


def width(encoder: nn.Module) -> int:
    """The token width of a plain ViT encoder."""
    return encoder.patch_embed.proj.out_channels


class LayerMatch(nn.Module):
    """SAM-Lightening's layer-wise feature distillation between two plain ViT encoders.

    Arguments:
      student_depth, teacher_depth, student_width, teacher_width: of the two encoders' blocks.
      dt: steps between one layer's switching on and the next's (and the length of each ramp).
      focus: student layers (negative counts from the last) weighing ``focus_weight``.
    """

    def __init__(self, student_depth: int, teacher_depth: int, student_width: int, teacher_width: int, dt: int,
                 focus: tuple[int, ...] = (-1,), focus_weight: float = 2.0):
        super().__init__()
        self.pairs = [(i, math.ceil((i + 1) * teacher_depth / student_depth) - 1) for i in range(student_depth)]
        self.proj = nn.ModuleList(nn.Linear(student_width, teacher_width) for _ in range(student_depth))
        if student_width == teacher_width:
            for p in self.proj:
                nn.init.eye_(p.weight)
                nn.init.zeros_(p.bias)
        self.dt = max(1, int(dt))
        focus_set = {f % student_depth for f in focus}
        self.weights = [focus_weight if i in focus_set else 1.0 for i in range(student_depth)]

    def alpha(self, step: int) -> list[float]:
        """alpha_i(t): 0 before T_i = i dt, rising linearly to 1 at T_i + dt."""
        return [min(1.0, max(0.0, (step - i * self.dt) / self.dt)) for i in range(len(self.pairs))]

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor], step: int) -> torch.Tensor:
        """L_P: the weighted mean over the switched-on layers of the normalised feature MSE."""
        total = student[0].new_zeros(())
        for (i, j), a, w in zip(self.pairs, self.alpha(step), self.weights, strict=True):
            if a > 0:
                s = F.layer_norm(self.proj[i](student[i].float()), (teacher[j].shape[-1],))
                t = F.layer_norm(teacher[j].float(), (teacher[j].shape[-1],))
                total = total + a * w * F.mse_loss(s, t)
        return total / sum(self.weights)


__all__ = ["LOW_RES", "PLAIN_VIT_FAMILIES", "DecoderTokens", "LayerMatch", "Objects", "block_outputs",
           "error_points", "hardest", "mask_bce_dice", "mask_iou", "mask_kd", "teacher_objects", "width"]
