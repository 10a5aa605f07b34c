"""RepViT image encoders of EdgeSAM (RepViT-M1) and RepViT-SAM (RepViT-M2.3), on timm's RepViT.

timm's ``RepVit`` is the same network as the official code's flat list of blocks, regrouped:
the official ``features`` list holds the stem, then every block in order, where a stride-2
block is timm's ``downsample`` (``spatial_downsample`` + ``channel_downsample`` + ``ffn``) and
the block just before it is timm's ``downsample.pre_block``. :func:`official_order` spells out
that order; :meth:`RepViTEncoder.official_key` maps the keys.

- EdgeSAM: RepViT-M1 (legacy RepVGG-DW, 48/96/192/384), all four downsamples at stride 2;
  the stage-3 output (1/16, taken after the last stage's ``pre_block``) and the stage-4 output
  (1/32, upsampled bicubically x2) are each projected to 256 channels and summed before the neck.
- RepViT-SAM: RepViT-M2.3 (80/160/320/640); the last downsample keeps the resolution (stride 1),
  so the body ends at 1/16 and feeds the neck directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.repvit import RepVit
from torch import nn

from uvsam.modeling.common import ImageEncoder, vit_neck

_BODIES = {
    "edgesam": dict(embed_dim=(48, 96, 192, 384), depth=(2, 2, 14, 2), legacy=True),  # timm repvit_m1
    "repvit_sam": dict(embed_dim=(80, 160, 320, 640), depth=(6, 6, 34, 2), legacy=False),  # timm repvit_m2_3
}


def official_order(depth: tuple[int, ...]) -> list[tuple[str, str]]:
    """(timm prefix, kind) of each official ``features.i``, i >= 1; kind is "block" or "down".

    The official list runs stage by stage; before each later stage come the block timm calls
    that stage's ``downsample.pre_block`` and the stride-2 block timm calls ``downsample``.
    """
    order = []
    for s, d in enumerate(depth):
        if s > 0:
            order += [(f"stages.{s}.downsample.pre_block", "block"), (f"stages.{s}.downsample", "down")]
        order += [(f"stages.{s}.blocks.{b}", "block") for b in range(d)]
    return order


# sub-key renames inside one official block (timm -> official), longest prefixes first
_BLOCK_KEYS = [
    ("token_mixer.conv.", "token_mixer.0.conv."),
    ("token_mixer.conv1.", "token_mixer.0.conv1."),
    ("token_mixer.bn.", "token_mixer.0.bn."),
    ("se.", "token_mixer.1."),
    ("channel_mixer.conv1.", "channel_mixer.m.0."),
    ("channel_mixer.conv2.", "channel_mixer.m.2."),
]
_DOWN_KEYS = [
    ("spatial_downsample.", "token_mixer.0."),
    ("channel_downsample.", "token_mixer.2."),
    ("ffn.conv1.", "channel_mixer.m.0."),
    ("ffn.conv2.", "channel_mixer.m.2."),
]


class RepViTEncoder(ImageEncoder):
    """RepViT body + (EdgeSAM's fusion) + SAM neck: (B, 3, 1024, 1024) -> (B, 256, 64, 64)."""

    def __init__(self, variant: str):
        super().__init__()
        cfg = _BODIES[variant]
        self.variant = variant
        self.body = RepVit(num_classes=0, **cfg)
        self.body.head = nn.Identity()
        dims = cfg["embed_dim"]
        self._prefixes = {}
        for i, (prefix, kind) in enumerate(official_order(cfg["depth"]), start=1):
            self._prefixes[prefix] = (f"features.{i}.", kind)
        if variant == "edgesam":
            self.fuse_stage2 = nn.Conv2d(dims[2], 256, kernel_size=1, bias=False)
            self.fuse_stage3 = nn.Conv2d(dims[3], 256, kernel_size=1, bias=False)
            self.neck = vit_neck(256, 256)
        else:
            self.body.stages[3].downsample.spatial_downsample.c.stride = (1, 1)
            self.neck = vit_neck(dims[3], 256)

    def official_key(self, key: str) -> str:
        if key.startswith(("neck.", "fuse_stage2.")):
            return key
        if key.startswith("fuse_stage3."):
            return key.replace("fuse_stage3.", "fuse_stage3.op_list.0.")
        k = key.removeprefix("body.")
        if k.startswith("stem."):
            return k.replace("stem.conv1.", "features.0.0.").replace("stem.conv2.", "features.0.2.")
        prefix, rest = _split_prefix(k, self._prefixes)
        official, kind = self._prefixes[prefix]
        for ours, theirs in _DOWN_KEYS if kind == "down" else _BLOCK_KEYS:
            if rest.startswith(ours):
                return official + theirs + rest[len(ours):]
        raise KeyError(key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        body = self.body
        x = body.stem(x)
        if self.variant != "edgesam":
            return self.neck(body.stages(x))
        x = body.stages[2](body.stages[1](body.stages[0](x)))
        last = body.stages[3]
        s3 = last.downsample.pre_block(x)  # 1/16, the official "stage2" output
        y = last.downsample.channel_downsample(last.downsample.spatial_downsample(s3))
        y = last.blocks(y + last.downsample.ffn(y))  # 1/32
        up = F.interpolate(self.fuse_stage3(y), scale_factor=2, mode="bicubic", align_corners=False)
        return self.neck(self.fuse_stage2(s3) + up)


def _split_prefix(key: str, prefixes: dict[str, tuple[str, str]]) -> tuple[str, str]:
    """The longest known module prefix of ``key`` and the rest."""
    best = max((p for p in prefixes if p and key.startswith(p + ".")), key=len)
    return best, key[len(best) + 1:]
