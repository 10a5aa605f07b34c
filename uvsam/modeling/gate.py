"""The pre-classification gate of UV-SAM's city-wide analyses: does a tile hold an urban village?

A timm image classifier (ResNet-50 in the paper; any timm backbone here) with one logit. The
input is what the specialist sees, (B, 3, H, W) on the 0..255 scale, turned inside into the
specialist's own input representation (``rgb``: ImageNet normalisation; ``lcn`` / ``lcn_rgb``:
local contrast normalisation, blind to the colours that change with season and sensor), so the
network travels with its preprocessing.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from uvsam.modeling.specialist import specialist_input

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TileGate(nn.Module):
    """(B, 3, H, W) 0..255 tiles -> (B,) logits of "holds an urban village"."""

    def __init__(self, backbone: str = "resnet50", input_mode: str = "rgb", lcn_sigma_px: float = 4.0):
        super().__init__()
        self.backbone_name, self.input_mode, self.lcn_sigma_px = backbone, input_mode, lcn_sigma_px
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=1, in_chans=3)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(specialist_input(x, self.input_mode, self.mean, self.std, self.lcn_sigma_px))[:, 0]

    def load_backbone(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Load pretrained backbone weights (timm's or torchvision's layout for the same
        architecture; the classifier head is left out, its class count differs). Returns the
        backbone keys the state did not hold; raises ValueError when no key fits."""
        head = {id(p) for p in self.backbone.get_classifier().parameters()}
        head_keys = {k for k, p in self.backbone.named_parameters() if id(p) in head}
        own = {k: v for k, v in self.backbone.state_dict().items() if k not in head_keys}
        fits = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        if not fits:
            raise ValueError(f"none of its {len(state)} tensors fits {self.backbone_name}")
        self.backbone.load_state_dict(fits, strict=False)
        return sorted(set(own) - set(fits))

    @torch.inference_mode()
    def tile_scores(self, x: torch.Tensor, crop: int) -> torch.Tensor:
        """(B,) probability that each (B, 3, H, W) tile holds a village anywhere: the highest of
        its half-overlapping ``crop`` windows (one window when the tile is no larger)."""
        b, _, h, w = x.shape
        if h <= crop and w <= crop:
            return torch.sigmoid(self(x).float())
        step = max(1, crop // 2)
        rows = sorted({*range(0, max(1, h - crop + 1), step), max(0, h - crop)})
        cols = sorted({*range(0, max(1, w - crop + 1), step), max(0, w - crop)})
        windows = torch.stack([x[:, :, r:r + crop, c:c + crop] for r in rows for c in cols], 1)
        logits = self(windows.flatten(0, 1)).float().view(b, -1)
        return torch.sigmoid(logits.max(1).values)
