"""Post-training int8 quantisation of an image encoder for CPU (TinySAM's idea, dynamic form).

Linear layers (the bulk of the arithmetic of ViT and TinyViT encoders) get int8 weights and
dynamically quantised int8 activations; convolutions and norms stay fp32. No calibration data
is needed, and the encoder keeps its interface. Agreement with fp32 is measured, never assumed.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn


def quantize_encoder_int8(encoder: nn.Module) -> nn.Module:
    """A copy of ``encoder`` with int8 dynamic quantisation of every ``nn.Linear`` (CPU only)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(copy.deepcopy(encoder).eval().cpu(), {nn.Linear}, dtype=torch.qint8)


def embedding_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images and positions of the cosine similarity of (B, C, H, W) embeddings."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1).mean().item()
