"""EfficientViT-SAM image encoders (L0/L1/L2 and XL0/XL1) on timm's EfficientViT.

L-series bodies are timm's ``EfficientVitLarge`` as they are. The XL bodies have a sixth
stage and multi-scale attention with 3x3 aggregation, which timm's large model does not
offer, so they are assembled here from timm's EfficientViT blocks. The SAM neck (three
feature levels projected, resized to 64x64, summed, refined by fused MBConvs) is written here.
Key names follow the official ``efficientvit`` code (``backbone.stages.i.op_list.j``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from timm.layers import GELUTanh
from timm.models.efficientvit_mit import (
    ConvNormAct,
    EfficientVitBlock,
    EfficientVitLarge,
    FusedMBConv,
    LiteMLA,
    ResidualBlock,
    Stem,
    build_local_block,
)
from torch import nn

from uvsam.modeling.common import ImageEncoder

OFFICIAL_LITE_MLA_EPS = 1e-15  # official LiteMLA; timm defaults to 1e-5


@dataclass(frozen=True)
class EfficientViTSamConfig:
    widths: tuple[int, ...]
    depths: tuple[int, ...]
    neck_levels: tuple[int, ...]  # official stage ids fed to the neck, coarsest first
    neck_depth: int
    neck_expand: float
    xl: bool = False


CONFIGS = {
    "l0": EfficientViTSamConfig((32, 64, 128, 256, 512), (1, 1, 1, 4, 4), (4, 3, 2), 4, 1),
    "l1": EfficientViTSamConfig((32, 64, 128, 256, 512), (1, 1, 1, 6, 6), (4, 3, 2), 8, 1),
    "l2": EfficientViTSamConfig((32, 64, 128, 256, 512), (1, 2, 2, 8, 8), (4, 3, 2), 12, 1),
    "xl0": EfficientViTSamConfig((32, 64, 128, 256, 512, 1024), (0, 1, 1, 2, 3, 3), (5, 4, 3), 6, 4, xl=True),
    "xl1": EfficientViTSamConfig((32, 64, 128, 256, 512, 1024), (1, 2, 2, 4, 6, 6), (5, 4, 3), 12, 4, xl=True),
}


class _Stage(nn.Module):
    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class EfficientViTXLBackbone(nn.Module):
    """EfficientViT-XL: stem, three fused-MBConv stages, two attention stages (3x3 aggregation).

    Same layout as timm's ``EfficientVitLarge`` (``stem``, ``stages.i.blocks.j``), so the
    key mapping to the official file is shared with the L-series.
    """

    def __init__(self, widths: tuple[int, ...], depths: tuple[int, ...], head_dim: int = 32):
        super().__init__()
        norm = nn.BatchNorm2d
        act = GELUTanh
        self.stem = Stem(3, widths[0], depths[0], norm, act, block_type="large")
        expands = (1, 4, 4, 4, 4, 6)
        stages = []
        in_chs = widths[0]
        for i in range(1, len(widths)):
            attention = i >= 4
            w = widths[i]
            blocks: list[nn.Module] = [
                ResidualBlock(
                    build_local_block(
                        in_chs, w, stride=2, expand_ratio=expands[i] * 4, norm_layer=norm, act_layer=act,
                        fewer_norm=attention, block_type="default" if attention else "fused",
                    ),
                    None,
                )
            ]
            for _ in range(depths[i]):
                if attention:
                    block = EfficientVitBlock(w, head_dim=head_dim, expand_ratio=expands[i], norm_layer=norm,
                                              act_layer=act)
                    block.context_module.main = LiteMLA(w, w, dim=head_dim, norm_layer=(None, norm), scales=(3,))
                else:
                    block = ResidualBlock(
                        FusedMBConv(w, w, expand_ratio=expands[i], norm_layer=norm, act_layer=(act, None)),
                        nn.Identity(),
                    )
                blocks.append(block)
            stages.append(_Stage(blocks))
            in_chs = w
        self.stages = nn.Sequential(*stages)


class EfficientViTSamNeck(nn.Module):
    """Project three feature levels to ``width``, resize to 64x64 (bicubic), sum, refine.

    inputs: list of (B, C_i, H_i, W_i), coarsest first -> (B, 256, 64, 64) before the final norm.
    """

    def __init__(self, in_channels: tuple[int, ...], width: int, depth: int, expand_ratio: float,
                 out_chans: int = 256):
        super().__init__()
        norm = nn.BatchNorm2d
        self.inputs = nn.ModuleList(
            ConvNormAct(c, width, 1, norm_layer=norm, act_layer=None) for c in in_channels
        )
        self.middle = nn.Sequential(*[
            ResidualBlock(
                FusedMBConv(width, width, expand_ratio=expand_ratio, norm_layer=norm, act_layer=(GELUTanh, None)),
                nn.Identity(),
            )
            for _ in range(depth)
        ])
        self.out = nn.Conv2d(width, out_chans, 1, bias=True)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = None
        for proj, f in zip(self.inputs, feats, strict=True):
            f = proj(f)
            if f.shape[-2:] != (64, 64):
                f = F.interpolate(f, size=(64, 64), mode="bicubic", align_corners=False)
            x = f if x is None else x + f
        return self.out(self.middle(x))


class EfficientViTSamEncoder(ImageEncoder):
    """EfficientViT-SAM image encoder: (B, 3, S, S) -> (B, 256, 64, 64); S = 512 (L) or 1024 (XL)."""

    def __init__(self, variant: str):
        super().__init__()
        cfg = CONFIGS[variant]
        self.cfg = cfg
        if cfg.xl:
            self.backbone = EfficientViTXLBackbone(cfg.widths, cfg.depths)
        else:
            body = EfficientVitLarge(widths=cfg.widths, depths=cfg.depths, head_widths=(3072, 3200), num_classes=0)
            del body.head  # classification head: not part of the SAM encoder
            self.backbone = body
        for m in self.backbone.modules():
            if isinstance(m, LiteMLA):
                m.eps = OFFICIAL_LITE_MLA_EPS
        self.neck = EfficientViTSamNeck(
            tuple(cfg.widths[i] for i in cfg.neck_levels), 256, cfg.neck_depth, cfg.neck_expand
        )
        self.norm = LayerNorm2d(256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = {}
        x = self.backbone.stem(x)
        for i, stage in enumerate(self.backbone.stages, start=1):
            x = stage(x)
            feats[i] = x
        return self.norm(self.neck([feats[i] for i in self.cfg.neck_levels]))

    def official_key(self, key: str) -> str:
        m = re.match(r"backbone\.stem\.(in_conv|res(\d+))\.(.*)", key)
        if m:
            j = 0 if m.group(1) == "in_conv" else int(m.group(2)) + 1
            return f"backbone.stages.0.op_list.{j}.{m.group(3)}"
        m = re.match(r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.(.*)", key)
        if m:
            return f"backbone.stages.{int(m.group(1)) + 1}.op_list.{m.group(2)}.{m.group(3)}"
        m = re.match(r"neck\.inputs\.(\d+)\.(.*)", key)
        if m:
            return f"neck.input_ops.{m.group(1)}.op_list.0.{m.group(2)}"
        m = re.match(r"neck\.middle\.(\d+)\.(.*)", key)
        if m:
            return f"neck.middle.op_list.{m.group(1)}.{m.group(2)}"
        if key.startswith("neck.out."):
            return "neck.output_ops.0.op_list.0.conv." + key.removeprefix("neck.out.")
        return key

