"""Small pieces shared by the image encoders."""

from __future__ import annotations

import torch
from segment_anything.modeling.common import LayerNorm2d
from torch import nn


def vit_neck(in_chans: int, out_chans: int = 256) -> nn.Sequential:
    """SAM's neck: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d (keys ``neck.0`` .. ``neck.3``).

    The same layout as Meta's ``ImageEncoderViT.neck`` and MobileSAM's TinyViT neck, so the
    official checkpoints load into it unchanged. (B, in_chans, H, W) -> (B, out_chans, H, W).
    """
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, kernel_size=1, bias=False),
        LayerNorm2d(out_chans),
        nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(out_chans),
    )


def set_norm_eps(model: nn.Module, eps: float) -> None:
    """Set ``eps`` of every LayerNorm, GroupNorm and BatchNorm in ``model``.

    EfficientViT-SAM builds its whole model (decoder included) with eps 1e-6; the published
    weights were trained that way, so uvsam reproduces it.
    """
    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
            m.eps = eps


class ImageEncoder(nn.Module):
    """Base of every uvsam image encoder.

    ``forward`` maps a normalised, padded image batch (B, 3, S, S), S the variant's input size,
    to SAM image embeddings (B, 256, 64, 64). ``official_key`` names, for a key of this module's
    ``state_dict``, the key the family's published checkpoint uses (without ``image_encoder.``).
    """

    def official_key(self, key: str) -> str:
        return key

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
