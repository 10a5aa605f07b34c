"""Prompted segmentation on top of a generalist: embed images once, decode many prompts.

Like ``segment_anything.SamPredictor``, but for a batch of images and for every variant of
the registry (each with its own input size and resizing), with prompts given in pixel
coordinates of the original images and decoded in one batched call per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from uvsam.modeling.sam import Generalist


@dataclass
class Prediction:
    """Masks for N prompts on one image.

    masks: (N, C, H, W) bool (or float logits with ``return_logits``); iou: (N, C) predicted
    IoU; low_res_logits: (N, C, 256, 256), usable as the next call's ``mask_logits``.
    """

    masks: np.ndarray
    iou: np.ndarray
    low_res_logits: np.ndarray


class Predictor:
    """Embed a batch of images once, then decode box / point / mask prompts against them.

    ``embedder`` may be an :class:`uvsam.embedding_cache.EmbeddingCache`, so a frozen encoder
    never runs twice on the same input.
    """

    def __init__(self, model: Generalist, embedder=None, batch_size: int = 4):
        self.model = model.eval()
        self.embedder = embedder
        self.batch_size = batch_size
        self.embeddings: torch.Tensor | None = None
        self.sizes: list[tuple[int, int]] = []

    @property
    def device(self) -> torch.device:
        return self.model.pixel_mean.device

    @torch.inference_mode()
    def set_images(self, images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
        """Embed RGB images (each (H, W, 3), 0..255, uint8 or float). Returns (B, 256, 64, 64)."""
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]
        self.sizes = [tuple(t.shape[-2:]) for t in tensors]
        out = []
        i = 0
        while i < len(tensors):
            # group consecutive images of the same size into one encoder batch
            j = i + 1
            while j < len(tensors) and j - i < self.batch_size and tensors[j].shape == tensors[i].shape:
                j += 1
            batch = torch.stack(tensors[i:j]).to(self.device)
            if self.embedder is not None:
                out.append(self.embedder.embed(self.model, batch))
            else:
                out.append(self.model.encode(batch))
            i = j
        self.embeddings = torch.cat(out)
        return self.embeddings

    def set_image(self, image: np.ndarray) -> torch.Tensor:
        return self.set_images([image])

    @torch.inference_mode()
    def predict(
        self,
        index: int = 0,
        boxes: np.ndarray | None = None,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        mask_logits: np.ndarray | None = None,
        multimask_output: bool = False,
        return_logits: bool = False,
    ) -> Prediction:
        """Decode N prompts on image ``index`` in one call.

        boxes: (N, 4) XYXY pixels; point_coords: (N, P, 2) XY pixels with point_labels (N, P),
        1 foreground / 0 background; mask_logits: (N, 1, 256, 256) from an earlier call.
        """
        if self.embeddings is None:
            raise RuntimeError("call set_images() before predict()")
        h, w = self.sizes[index]
        sx, sy = self.model.prompt_scale(h, w)
        scale = torch.tensor([sx, sy], device=self.device)
        tb = tp = tm = None
        if boxes is not None:
            tb = torch.as_tensor(np.asarray(boxes, dtype=np.float32), device=self.device).reshape(-1, 2, 2)
            tb = (tb * scale).reshape(-1, 4)
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be given with point_coords")
            c = torch.as_tensor(np.asarray(point_coords, dtype=np.float32), device=self.device)
            if c.ndim == 2:
                c = c[None]
            lab = torch.as_tensor(np.asarray(point_labels), dtype=torch.int, device=self.device).reshape(c.shape[:2])
            tp = (c * scale, lab)
        if mask_logits is not None:
            tm = torch.as_tensor(np.asarray(mask_logits, dtype=np.float32), device=self.device)
        low, iou = self.model.decode(
            self.embeddings[index : index + 1], boxes=tb, points=tp, mask_logits=tm,
            multimask_output=multimask_output,
        )
        masks = self.model.postprocess_masks(low, h, w)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        masks = masks if masks.dtype == torch.bool else masks.float()  # logits of a reduced-precision run: fp32
        return Prediction(masks.cpu().numpy(), iou.float().cpu().numpy(), low.float().cpu().numpy())
