"""SAM-Lightening (Song et al., arXiv 2403.09195): a ViT whose self-attention is dilated attention.

Dilated attention (LongNet's, which SAM-Lightening's "dilated flash attention" re-engineers for
FlashAttention kernels): the token sequence is cut into segments of length ``w``; inside each
segment only every ``r``-th token takes part (head ``h`` starts at offset ``h mod r``), so every
branch attends over ``w / r`` tokens. Several (w, r) branches run side by side and their outputs
are mixed, per token and head, with weights proportional to each branch's softmax denominator
(the exact combination of attention over the union of their keys). With the 64x64 = 4096
tokens of a 1024 input and branches (256, 1), (1024, 4), (4096, 16), every branch attends over
256 tokens, so attention cost grows linearly with the image instead of quadratically.

The encoder is the configuration the seed document gives for SAM-Lightening (384 wide, 6 heads,
6 layers, patch 16), with SAM's position embedding and neck. Its weights were never released: it
is meant to be distilled or trained by the user, and ``uvsam`` loads such a checkpoint with
``--checkpoint`` like any other.
"""

from __future__ import annotations

import torch
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import PatchEmbed
from torch import nn

from uvsam.modeling.common import ImageEncoder, vit_neck

BRANCHES = ((256, 1), (1024, 4), (4096, 16))


def dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      branches=BRANCHES) -> torch.Tensor:
    """Mixed dilated attention. q, k, v: (B, H, N, D) -> (B, H, N, D).

    Every token must be covered by some branch (one branch with r = 1 guarantees it).
    """
    b, h, n, d = q.shape
    outs, lses = [], []
    for w, r in branches:
        w = min(w, n)
        if n % w or w % r:
            raise ValueError(f"{n} tokens cannot be split into segments of {w} with dilation {r}")
        sel = torch.arange(0, w, r, device=q.device)  # (w/r,)
        offsets = torch.arange(h, device=q.device) % r  # per-head start
        idx = (offsets[:, None] + sel[None, :]).clamp(max=w - 1)  # (H, w/r)
        gather = idx.view(1, h, 1, -1, 1).expand(b, h, n // w, -1, d)

        def pick(x, gather=gather, w=w):
            return x.reshape(b, h, n // w, w, d).gather(3, gather)

        qs, ks, vs = pick(q), pick(k), pick(v)
        logits = (qs @ ks.transpose(-1, -2)) * d**-0.5  # (B, H, S, w/r, w/r)
        lse = logits.logsumexp(-1, keepdim=True)
        o = torch.exp(logits - lse) @ vs
        full_o = q.new_zeros(b, h, n // w, w, d).scatter(3, gather, o)
        full_lse = q.new_full((b, h, n // w, w, 1), float("-inf")).scatter(3, gather[..., :1], lse)
        outs.append(full_o.reshape(b, h, n, d))
        lses.append(full_lse.reshape(b, h, n, 1))
    weights = torch.softmax(torch.stack(lses), dim=0)  # (branches, B, H, N, 1)
    return (weights * torch.stack(outs)).sum(0)


class DilatedAttention(nn.Module):
    """Multi-head dilated self-attention over (B, H, W, C) tokens in raster order."""

    def __init__(self, dim: int, num_heads: int, branches=BRANCHES):
        super().__init__()
        self.num_heads = num_heads
        self.branches = branches
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, hh, ww, c = x.shape
        qkv = self.qkv(x).reshape(b, hh * ww, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = dilated_attention(qkv[0], qkv[1], qkv[2], self.branches)
        return self.proj(out.transpose(1, 2).reshape(b, hh, ww, c))


class DilatedBlock(nn.Module):
    """Pre-norm transformer block with dilated attention; (B, H, W, C) -> same."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = DilatedAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SamLighteningEncoder(ImageEncoder):
    """Dilated-attention ViT: (B, 3, 1024, 1024) -> (B, 256, 64, 64)."""

    def __init__(self, embed_dim: int = 384, depth: int = 6, num_heads: int = 6, img_size: int = 1024,
                 patch_size: int = 16):
        super().__init__()
        grid = img_size // patch_size
        patch = (patch_size, patch_size)
        self.patch_embed = PatchEmbed(patch, patch, in_chans=3, embed_dim=embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(DilatedBlock(embed_dim, num_heads) for _ in range(depth))
        self.neck = vit_neck(embed_dim, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, 64, 64, C)
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))
