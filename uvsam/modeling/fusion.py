"""UV-SAM's fusion head and SAM-LST's ladder side network: the small parts that train.

:class:`PromptFusion` merges the generalist's sparse (box) prompt tokens with the two semantic
prompts, in either of the paper's variants:

- ``mlp``: each L2-normalised sparse token is concatenated with the two semantic prompts
  (256 + 2 x 256 = 768) and mapped 768 -> 512 -> 256;
- ``add``: the semantic prompts are added to the sparse tokens.

Both are residual and start as the identity (last layer / gates zero-initialised), so training
begins from the frozen generalist's own box behaviour instead of from random tokens.

:class:`LadderSideNetwork` is SAM-LST's small CNN beside the frozen encoder: it maps the
generalist's preprocessed input to a (B, 256, 64, 64) correction added to the image
embedding through a learnable gate (zero at start).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EMBED_DIM = 256


class PromptFusion(nn.Module):
    """(N, T, 256) sparse tokens + (N, 2, 256) semantic prompts -> (N, T, 256) fused tokens."""

    def __init__(self, mode: str = "mlp", dim: int = EMBED_DIM, hidden: int = 512):
        super().__init__()
        if mode not in ("mlp", "add"):
            raise ValueError(f"fusion must be 'mlp' or 'add', got {mode!r}")
        self.mode = mode
        if mode == "mlp":
            self.mlp = nn.Sequential(nn.Linear(3 * dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)
        else:
            self.gates = nn.Parameter(torch.zeros(2))
        self.dim = dim

    def forward(self, sparse: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        if sparse.shape[1] == 0:
            return sparse
        n, t, _ = sparse.shape
        semantic = semantic.expand(n, -1, -1)
        if self.mode == "add":
            return sparse + (self.gates.view(1, 2, 1) * semantic).sum(1, keepdim=True)
        context = semantic.reshape(n, 1, 2 * self.dim).expand(n, t, -1)
        return sparse + self.mlp(torch.cat([F.normalize(sparse, dim=-1), context], dim=-1))


class LadderSideNetwork(nn.Module):
    """SAM-LST side network: (B, 3, S, S) encoder input -> (B, 256, 64, 64), scaled by tanh(gate)."""

    def __init__(self, width: int = 64, out_dim: int = EMBED_DIM, grid: int = 64):
        super().__init__()
        self.grid = grid

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.GELU())

        self.body = nn.Sequential(block(3, width // 2), block(width // 2, width), block(width, width),
                                  block(width, 2 * width))
        self.proj = nn.Conv2d(2 * width, out_dim, 1)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(self.body(x))
        if y.shape[-1] != self.grid or y.shape[-2] != self.grid:
            y = F.adaptive_avg_pool2d(y, self.grid)
        return torch.tanh(self.gate) * y
