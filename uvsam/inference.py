"""UV-SAM over a scene held in memory: overlapping windows, blended without seams.

Used by validation during training and by ``uvsam evaluate``. (City-scale prediction from
disk, with object-aware refinement, is ``uvsam predict``.) Windows come from the tiles
engine's :class:`~tiles.grid.TileGrid` and are blended with its linear ramps
(:func:`~tiles.stitch.blend_weights`): the specialist's village probability and the UV-SAM
path's final mask are both averaged over overlaps, then thresholded at 0.5. A window reaching
past a scene smaller than it mirrors the scene, as ``uvsam predict`` does. The UV-SAM path takes
a generalist mask only where :func:`uvsam.generalist.judge` accepts it (:func:`combine`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tiles.grid import TileGrid
from tiles.stitch import blend_weights
from uvsam.devices import Device
from uvsam.generalist import RefineRule, judge, stability_score
from uvsam.modeling.uvsam import UVSAMOutput


@dataclass
class ScenePrediction:
    """specialist_prob: (H, W) float32 village probability; specialist / uvsam: (H, W) bool masks
    (uvsam is None when only the specialist ran)."""

    specialist_prob: np.ndarray
    specialist: np.ndarray
    uvsam: np.ndarray | None


def combine(out: UVSAMOutput, rule: RefineRule | None = None) -> torch.Tensor:
    """(B, H, W) bool village masks: the specialist's, with each large village's outline replaced
    by the generalist's mask where ``rule`` accepts it (confident, stable, consistent with the
    village); ``rule=None`` always replaces it (the paper's combination, :meth:`UVSAM.combine`)."""
    spec = out.specialist_logits.argmax(1).bool()
    final = []
    for b, v in enumerate(out.villages):
        m = spec[b].clone()
        for k, vid in enumerate(np.flatnonzero(v.large) + 1):
            logits = v.mask_logits[k, 0]
            mask = logits > 0
            if rule is not None:
                region = torch.from_numpy(v.labels == vid).to(m.device)
                union = int((mask | region).sum())
                overlap = int((mask & region).sum()) / union if union else 0.0
                ok, _ = judge(rule, overlap, float(v.iou_pred[k]), stability_score(logits.cpu().numpy(),
                              rule.stability_offset), not bool(mask.any()))
                if not ok:
                    continue
                m &= ~region
            else:
                m &= ~torch.from_numpy(v.labels == vid).to(m.device)
            m |= mask
        final.append(m)
    return torch.stack(final)


@torch.inference_mode()
def predict_scene(model, image: np.ndarray, valid: np.ndarray, window: int = 512, overlap: int = 64,
                  batch_size: int = 2, full: bool = True, rule: RefineRule | None = None,
                  device: Device | None = None, cascade: bool = False) -> ScenePrediction:
    """Predict a (3, H, W) 0..255 image at the model's GSD; ``full=False`` runs the specialist only.
    ``rule``: when a generalist mask replaces a village's outline (default :class:`RefineRule`);
    ``device``: its precision (autocast); inputs go wherever the model's weights are; ``cascade``:
    PerSAM's cascaded post-refinement of the generalist's masks."""
    rule = rule or RefineRule()
    where = next(model.parameters()).device
    cast = device.autocast() if device is not None else contextlib.nullcontext()
    model.eval()
    h, w = image.shape[1:]
    size = min(window, max(h, w))
    grid = TileGrid(h, w, size, min(overlap, size // 2))
    weights = blend_weights(size, grid.overlap)
    acc = np.zeros((2 if full else 1, h, w), np.float32)
    norm = np.zeros((h, w), np.float32)
    tiles = list(grid)
    for i in range(0, len(tiles), batch_size):
        chunk = tiles[i : i + batch_size]
        batch = np.zeros((len(chunk), 3, size, size), np.float32)
        for j, t in enumerate(chunk):
            r0, c0, r1, c1 = t.bounds_px
            part = image[:, r0:min(r1, h), c0:min(c1, w)]
            batch[j] = np.pad(part, ((0, 0), (0, size - part.shape[1]), (0, size - part.shape[2])), mode="symmetric")
        x = torch.from_numpy(batch).to(where)
        with cast:
            if full:
                out = model(x, cascade=cascade)
                layers = [F.softmax(out.specialist_logits.float(), 1)[:, 1], combine(out, rule).float()]
            else:
                logits, _ = model.run_specialist(x)
                layers = [F.softmax(logits.float(), 1)[:, 1]]
        stacked = torch.stack(layers, 1).cpu().numpy()
        for j, t in enumerate(chunk):
            r0, c0, r1, c1 = t.bounds_px
            rh, cw = min(r1, h) - r0, min(c1, w) - c0
            wt = weights[:rh, :cw]
            acc[:, r0 : r0 + rh, c0 : c0 + cw] += stacked[j, :, :rh, :cw] * wt
            norm[r0 : r0 + rh, c0 : c0 + cw] += wt
    acc /= np.maximum(norm, 1e-12)
    acc[:, ~valid] = 0
    prob = acc[0]
    return ScenePrediction(prob, prob > 0.5, acc[1] > 0.5 if full else None)
