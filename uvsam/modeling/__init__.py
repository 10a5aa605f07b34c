"""Generalist models: SAM's prompt encoder and mask decoder on interchangeable image encoders.

One file per concept, as in Meta's ``segment_anything.modeling``:

- ``common``: necks and small shared layers;
- ``sam_vit``: Meta's ViT image encoder (SAM ViT-B/L/H) and SAM-Lightening's dilated-attention ViT;
- ``tiny_vit``: TinyViT-5M (MobileSAM, TinySAM) on timm's TinyViT;
- ``efficientvit``: EfficientViT-SAM L and XL encoders on timm's EfficientViT;
- ``registry``: one declarative spec per encoder variant;
- ``sam``: the generalist (encoder + prompt encoder + mask decoder) and its official key layout.
"""

from uvsam.modeling.registry import ENCODERS, EncoderSpec, get_spec
from uvsam.modeling.sam import Generalist, build_generalist

__all__ = ["ENCODERS", "EncoderSpec", "Generalist", "build_generalist", "get_spec"]
