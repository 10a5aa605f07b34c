"""Meta's ViT image encoder (SAM ViT-B/L/H), reused from ``segment_anything`` unchanged."""

from __future__ import annotations

from functools import partial

from segment_anything.modeling import ImageEncoderViT
from torch import nn

from uvsam.modeling.common import ImageEncoder

# (embed_dim, depth, num_heads, global attention blocks), as in segment_anything/build_sam.py
SAM_VIT_CONFIGS = {
    "b": (768, 12, 12, (2, 5, 8, 11)),
    "l": (1024, 24, 16, (5, 11, 17, 23)),
    "h": (1280, 32, 16, (7, 15, 23, 31)),
}


class SamViTEncoder(ImageEncoderViT, ImageEncoder):
    """SAM's ViT: (B, 3, 1024, 1024) -> (B, 256, 64, 64); keys exactly Meta's."""

    def __init__(self, size: str):
        embed_dim, depth, num_heads, global_attn = SAM_VIT_CONFIGS[size]
        super().__init__(
            depth=depth,
            embed_dim=embed_dim,
            img_size=1024,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=num_heads,
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=global_attn,
            window_size=14,
            out_chans=256,
        )
