"""EfficientSAM (Xiong et al., CVPR 2024): a plain ViT encoder and its own prompt/decoder variant.

The encoder is a ViT-Tiny (192 wide) or ViT-Small (384 wide), patch 16, global attention at
1024x1024 (stretched input), with a 224-pixel pretraining position embedding (cls slot included)
resized bicubically to the 64x64 token grid, and SAM's neck. Its blocks are timm's ViT
``Block`` (same keys and computation as the official ones).

The decoder differs from Meta's in four small ways, all reproduced here on Meta's modules:
GELU instead of ReLU in the hypernetwork and IoU MLPs, GroupNorm(1, 64) instead of LayerNorm2d
in the upscaling path, GELU in the two-way transformer's MLP, and a prompt encoder that takes
points only (a box is two points labelled 2 and 3, padded to six points with label -1) and no
mask prompt. :meth:`official_key` methods give the published file's key names.
"""

from __future__ import annotations

import re
from functools import partial

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, TwoWayTransformer
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from timm.models.vision_transformer import Block
from torch import nn

from uvsam.modeling.common import ImageEncoder, vit_neck

MAX_POINTS = 6  # the decoder was trained with at most six prompt points (a box counts as two)
PRETRAIN_GRID = 14  # 224 / 16: the position embedding is stored at its pretraining size


class EfficientSamEncoder(ImageEncoder):
    """EfficientSAM ViT: (B, 3, 1024, 1024) -> (B, 256, 64, 64)."""

    def __init__(self, embed_dim: int, num_heads: int, depth: int = 12, patch_size: int = 16):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, PRETRAIN_GRID * PRETRAIN_GRID + 1, embed_dim))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)
        )
        self.neck = vit_neck(embed_dim, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x)  # (B, C, 64, 64)
        b, c, h, w = x.shape
        pos = self.pos_embed[:, 1:].reshape(1, PRETRAIN_GRID, PRETRAIN_GRID, c).permute(0, 3, 1, 2)
        if (h, w) != (PRETRAIN_GRID, PRETRAIN_GRID):
            pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
        x = (x + pos).flatten(2).transpose(1, 2)  # (B, h*w, C)
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.transpose(1, 2).reshape(b, c, h, w))


class EfficientSamPromptEncoder(nn.Module):
    """EfficientSAM's point-only prompt encoder behind Meta's ``PromptEncoder`` interface.

    ``forward(points, boxes, masks)`` returns sparse (N, 6, 256) embeddings and zero dense
    embeddings (N, 256, 64, 64) (EfficientSAM has no mask prompt; zeros leave Meta's decoder
    computation exactly as EfficientSAM's). Coordinates are in the 1024 prompt frame.
    """

    def __init__(self, embed_dim: int = 256, image_embedding_size: tuple[int, int] = (64, 64),
                 input_image_size: tuple[int, int] = (1024, 1024)):
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.invalid_points = nn.Embedding(1, embed_dim)
        self.point_embeddings = nn.Embedding(1, embed_dim)
        self.bbox_top_left_embeddings = nn.Embedding(1, embed_dim)
        self.bbox_bottom_right_embeddings = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """(1, 256, 64, 64) positional encoding of the image embedding grid."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def forward(self, points=None, boxes=None, masks=None) -> tuple[torch.Tensor, torch.Tensor]:
        if masks is not None:
            raise ValueError("EfficientSAM takes no mask prompt; give boxes or points")
        coords, labels = [], []
        if points is not None:
            coords.append(points[0].float())
            labels.append(points[1].float())
        if boxes is not None:
            coords.append(boxes.float().reshape(-1, 2, 2))
            labels.append(torch.tensor([2.0, 3.0], device=boxes.device).expand(boxes.shape[0], 2))
        if not coords:
            raise ValueError("EfficientSAM needs a box or point prompt")
        coords, labels = torch.cat(coords, dim=1), torch.cat(labels, dim=1)
        n, p = labels.shape
        if p > MAX_POINTS:
            raise ValueError(f"EfficientSAM takes at most {MAX_POINTS} prompt points (a box counts as 2), got {p}")
        coords = F.pad(coords, (0, 0, 0, MAX_POINTS - p), value=-1.0)
        labels = F.pad(labels, (0, MAX_POINTS - p), value=-1.0)
        emb = self.pe_layer.forward_with_coords(coords + 0.5, self.input_image_size)
        for value, table in ((-1, self.invalid_points), (1, self.point_embeddings),
                             (2, self.bbox_top_left_embeddings), (3, self.bbox_bottom_right_embeddings)):
            emb = emb + (labels == value).unsqueeze(-1) * table.weight
        h, w = self.image_embedding_size
        dense = emb.new_zeros(n, self.embed_dim, h, w)
        return emb, dense


class GeluMLP(MLP):
    """Meta's decoder MLP with GELU between layers, as EfficientSAM trains it."""

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.gelu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


class EfficientSamMaskDecoder(MaskDecoder):
    """Meta's ``MaskDecoder`` set up as EfficientSAM's (GELU MLPs, GroupNorm upscaling)."""

    def __init__(self):
        super().__init__(
            transformer_dim=256,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8,
                                          activation=nn.GELU),
            num_multimask_outputs=3,
            activation=nn.GELU,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        )
        self.output_upscaling[1] = nn.GroupNorm(1, 256 // 4)
        self.output_hypernetworks_mlps = nn.ModuleList(GeluMLP(256, 256, 256 // 8, 3) for _ in range(4))
        self.iou_prediction_head = GeluMLP(256, 256, 4, 3)

    @staticmethod
    def official_key(key: str) -> str:
        key = re.sub(r"^transformer\.layers\.(\d+)\.mlp\.lin1\.", r"transformer.layers.\1.mlp.layers.0.0.", key)
        key = re.sub(r"^transformer\.layers\.(\d+)\.mlp\.lin2\.", r"transformer.layers.\1.mlp.fc.", key)
        for ours, theirs in (("0", "0.0"), ("1", "0.1"), ("3", "1.0")):
            key = key.replace(f"output_upscaling.{ours}.", f"final_output_upscaling_layers.{theirs}.")
        key = re.sub(r"^((?:output_hypernetworks_mlps\.\d+)|iou_prediction_head)\.layers\.2\.", r"\1.fc.", key)
        return re.sub(r"^((?:output_hypernetworks_mlps\.\d+)|iou_prediction_head)\.layers\.([01])\.",
                      r"\1.layers.\2.0.", key)
