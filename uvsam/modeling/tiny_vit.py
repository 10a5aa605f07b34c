"""TinyViT-5M image encoder of MobileSAM and TinySAM, on timm's TinyViT body.

timm's ``tiny_vit_5m_224`` is the same network as MobileSAM's ``TinyViT`` with two
differences that this module undoes: MobileSAM's last patch merging keeps the resolution
(stride 1, so the output stays at 1/16 = 64x64 for a 1024 input), and the keys are named
after the original TinyViT code (``layers.i`` holding the downsample that timm puts at the
start of ``stages.i+1``; ``Conv2d_BN.c`` for timm's ``ConvNorm.conv``).
"""

from __future__ import annotations

import re

import torch
from timm.models.tiny_vit import TinyVit

from uvsam.modeling.common import ImageEncoder, vit_neck


class TinyViTEncoder(ImageEncoder):
    """TinyViT-5M + SAM neck: (B, 3, 1024, 1024) -> (B, 256, 64, 64).

    The classifier (``norm_head``, ``head`` in the official file) is kept so the published
    checkpoint loads strictly; it is not used in ``forward``.
    """

    def __init__(self):
        super().__init__()
        # timm's tiny_vit_5m_224 config, built from the class so that other packages that
        # re-register "tiny_vit_5m_224" with timm (MobileSAM's code does) cannot change it.
        self.body = TinyVit(
            embed_dims=(64, 128, 160, 320),
            depths=(2, 2, 6, 2),
            num_heads=(2, 4, 5, 10),
            window_sizes=(7, 7, 14, 7),
            drop_path_rate=0.0,
            num_classes=1000,
        )
        # MobileSAM: the last PatchMerging (out dim 320) has a stride-1 depthwise conv.
        self.body.stages[3].downsample.conv2.conv.stride = (1, 1)
        self.neck = vit_neck(320, 256)

    @staticmethod
    def official_key(key: str) -> str:
        if key.startswith("neck."):
            return key
        k = key.removeprefix("body.")
        k = k.replace("head.norm.", "norm_head.").replace("head.fc.", "head.")
        k = k.replace("patch_embed.conv1.", "patch_embed.seq.0.").replace("patch_embed.conv2.", "patch_embed.seq.2.")
        m = re.match(r"stages\.(\d+)\.downsample\.(.*)", k)
        if m:
            k = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        else:
            k = re.sub(r"^stages\.(\d+)\.", r"layers.\1.", k)
        # timm ConvNorm(conv, bn) <- original Conv2d_BN(c, bn)
        return re.sub(r"\.conv\.(weight)$", r".c.\1", k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body.patch_embed(x)
        x = self.body.stages(x)
        return self.neck(x)
