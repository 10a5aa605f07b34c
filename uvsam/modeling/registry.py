"""One declarative spec per generalist variant: how to build it, feed it and load its weights.

Like timm's model registry: ``ENCODERS[name]`` is an :class:`EncoderSpec`; ``build_generalist``
(``uvsam.modeling.sam``) turns a spec into a model. The spec is the single place that says
what input size and preprocessing a variant expects, which checkpoint layout its published
file has, where to download it, its SHA-256, and its licence.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from uvsam.errors import UvsamError

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class WeightsFile:
    """A published checkpoint file.

    ``sha256`` is None where the authors publish no digest and none has been pinned yet; such a
    file is only used after the user pins its digest on import (``uvsam weights import``).
    ``wrapper`` is the dict key that holds the state dict in the published file, or None for a
    flat state dict. Where ``archive_member`` is set, ``url`` is a zip archive and the checkpoint
    is that member of it; ``sha256`` is always the checkpoint file's own digest.
    """

    filename: str
    url: str
    sha256: str | None
    size: int | None
    wrapper: str | None = None
    archive_member: str | None = None  # the authors ship some files zipped: the member to extract


@dataclass(frozen=True)
class EncoderSpec:
    """Everything uvsam needs to know about one generalist variant.

    Preprocessing: the image (H, W) is resized so that its longest side is ``input_size``
    (``resize="longest_side"``, then padded bottom-right to a square) or stretched to
    ``input_size`` x ``input_size`` (``resize="stretch"``), normalised with ``pixel_mean`` /
    ``pixel_std`` (0..255 scale). Prompts live in a ``prompt_frame`` x ``prompt_frame`` frame
    whatever the encoder's input size (EfficientViT-SAM-L encodes at 512, prompts stay at 1024).
    ``resize_in_uint8``: the reference code resizes 8-bit images (SAM's ``ResizeLongestSide``
    through PIL), so uvsam rounds the resized image; EfficientSAM resizes floats.
    ``decoder``: "sam" is Meta's prompt encoder and mask decoder; "efficient_sam" is
    EfficientSAM's variant (points and boxes only, no mask prompt, at most six points).
    """

    name: str
    family: str
    description: str
    build_encoder: Callable[[], nn.Module]
    input_size: int
    resize: Literal["longest_side", "stretch"]
    licence: str
    paper: str
    weights: WeightsFile | None
    weights_note: str = ""
    non_commercial: bool = False
    prompt_frame: int = 1024
    embed_shape: tuple[int, int, int] = (256, 64, 64)
    pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = SAM_PIXEL_STD
    resize_in_uint8: bool = True
    decoder: Literal["sam", "efficient_sam"] = "sam"
    norm_eps: float | None = None
    published_params_m: float | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)


def _lazy(module: str, cls: str, *args) -> Callable[[], nn.Module]:
    """A builder that imports ``uvsam.modeling.<module>`` only when the variant is built."""

    def build() -> nn.Module:
        return getattr(importlib.import_module(f"uvsam.modeling.{module}"), cls)(*args)

    return build


_NO_DIGEST = "no digest published by the authors: pin it with `uvsam weights import --sha256`"
_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
_EFFSAM_URL = "https://github.com/yformer/EfficientSAM/raw/main/weights/"
_EVIT_URL = "https://huggingface.co/mit-han-lab/efficientvit-sam/resolve/main/"
_EVIT_PUBLISHED_M = {"l0": 34.8, "l1": 47.7, "l2": 61.3, "xl0": 117.0, "xl1": 203.3}

_SPECS: list[EncoderSpec] = [
    *[
        EncoderSpec(
            name=f"sam_vit_{s}",
            family="sam_vit",
            description=f"Segment Anything ViT-{s.upper()} (Meta)",
            build_encoder=_lazy("sam_vit", "SamViTEncoder", s),
            input_size=1024,
            resize="longest_side",
            licence="Apache-2.0",
            paper="Kirillov et al., Segment Anything, ICCV 2023",
            weights=WeightsFile(f"sam_vit_{s}_{tag}.pth", _SAM_URL + f"sam_vit_{s}_{tag}.pth", sha, size),
            published_params_m=m,
        )
        for s, tag, sha, size, m in [
            ("b", "01ec64", "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 375042383, 91),
            ("l", "0b3195", "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", 1249524607, 308),
            ("h", "4b8939", "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", 2564550879, 636),
        ]
    ],
    EncoderSpec(
        name="mobile_sam",
        family="tiny_vit",
        description="MobileSAM: TinyViT-5M distilled from SAM ViT-H",
        build_encoder=_lazy("tiny_vit", "TinyViTEncoder"),
        input_size=1024,
        resize="longest_side",
        licence="Apache-2.0",
        paper="Zhang et al., Faster Segment Anything (MobileSAM), arXiv 2306.14289",
        weights=WeightsFile(
            "mobile_sam.pt", "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
            None, None,
        ),
        weights_note=_NO_DIGEST,
        published_params_m=5.78,
    ),
    EncoderSpec(
        name="tinysam",
        family="tiny_vit",
        description="TinySAM: TinyViT-5M with full-stage knowledge distillation",
        build_encoder=_lazy("tiny_vit", "TinyViTEncoder"),
        input_size=1024,
        resize="longest_side",
        licence="Apache-2.0",
        paper="Shu et al., TinySAM, AAAI 2025 (arXiv 2312.13789)",
        weights=WeightsFile(
            "tinysam_42.3.pth", "https://github.com/xinghaochen/TinySAM/releases/download/3.0/tinysam_42.3.pth",
            None, None,
        ),
        weights_note=(
            "fp32 state dict; the w8a8 release is a pickled whole model and is refused: "
            "quantise with `uvsam.quantize` instead"
        ),
        published_params_m=5.78,
    ),
    *[
        EncoderSpec(
            name=f"efficientvit_sam_{v}",
            family="efficientvit_sam",
            description=f"EfficientViT-SAM-{v.upper()} (MIT HAN Lab)",
            build_encoder=_lazy("efficientvit", "EfficientViTSamEncoder", v),
            input_size=512 if v.startswith("l") else 1024,
            resize="longest_side",
            licence="Apache-2.0",
            paper="Zhang et al., EfficientViT-SAM, CVPR 2024 workshops (arXiv 2402.05008)",
            weights=WeightsFile(f"efficientvit_sam_{v}.pt", _EVIT_URL + f"efficientvit_sam_{v}.pt", None, None,
                                wrapper="state_dict"),
            weights_note=_NO_DIGEST,
            norm_eps=1e-6,
            published_params_m=_EVIT_PUBLISHED_M[v],
        )
        for v in ("l0", "l1", "l2", "xl0", "xl1")
    ],
    *[
        EncoderSpec(
            name=f"efficientsam_{v}",
            family="efficient_sam",
            description=f"EfficientSAM-{v.upper()}: ViT-{v.upper()} pretrained with SAMI masked image modelling",
            build_encoder=_lazy("efficient_sam", "EfficientSamEncoder", dim, heads),
            input_size=1024,
            resize="stretch",
            resize_in_uint8=False,
            decoder="efficient_sam",
            licence="Apache-2.0",
            paper="Xiong et al., EfficientSAM, CVPR 2024 (arXiv 2312.00863)",
            weights=weights,
            weights_note=_NO_DIGEST,
            published_params_m=m,
        )
        for v, dim, heads, m, weights in [
            ("ti", 192, 3, 10.22, WeightsFile(
                "efficient_sam_vitt.pt", _EFFSAM_URL + "efficient_sam_vitt.pt", None, None, wrapper="model")),
            ("s", 384, 6, 26.41, WeightsFile(
                "efficient_sam_vits.pt", _EFFSAM_URL + "efficient_sam_vits.pt.zip", None, None, wrapper="model",
                archive_member="efficient_sam_vits.pt")),
        ]
    ],
    EncoderSpec(
        name="edgesam",
        family="repvit",
        description="EdgeSAM: RepViT-M1 with a 1/16 + 1/32 feature fusion, prompt-in-the-loop distilled",
        build_encoder=_lazy("repvit", "RepViTEncoder", "edgesam"),
        input_size=1024,
        resize="longest_side",
        licence="S-Lab License 1.0",
        non_commercial=True,
        paper="Zhou et al., EdgeSAM, arXiv 2312.06660",
        weights=WeightsFile(
            "edge_sam.pth", "https://huggingface.co/spaces/chongzhou/EdgeSAM/resolve/main/weights/edge_sam.pth",
            None, None,
        ),
        weights_note=_NO_DIGEST + "; the S-Lab licence forbids commercial use",
        published_params_m=9.6,
    ),
    EncoderSpec(
        name="repvit_sam",
        family="repvit",
        description="RepViT-SAM: RepViT-M2.3 (last downsample at stride 1) distilled from SAM ViT-H",
        build_encoder=_lazy("repvit", "RepViTEncoder", "repvit_sam"),
        input_size=1024,
        resize="longest_side",
        licence="Apache-2.0",
        paper="Wang et al., RepViT-SAM, arXiv 2312.05760",
        weights=WeightsFile(
            "repvit_sam.pt", "https://github.com/THU-MIG/RepViT/releases/download/v1.0/repvit_sam.pt", None, None,
        ),
        weights_note=_NO_DIGEST,
        # The paper publishes no count; tests/test_registry.py counts the official cfg table.
        published_params_m=None,
    ),
    EncoderSpec(
        name="sam_lightening",
        family="sam_lightening",
        description="SAM-Lightening: ViT with dilated (flash) attention, linear in the number of tokens",
        build_encoder=_lazy("sam_lightening", "SamLighteningEncoder"),
        input_size=1024,
        resize="longest_side",
        licence="unspecified (no code or weights released)",
        paper="Song et al., SAM-Lightening, arXiv 2403.09195",
        weights=None,
        weights_note=(
            "the authors never released weights: uvsam builds the paper's configuration (384 wide, 6 heads, "
            "6 layers); distil or train it and pass the file with --checkpoint"
        ),
        published_params_m=None,
    ),
]

ENCODERS: dict[str, EncoderSpec] = {s.name: s for s in _SPECS}


def get_spec(name: str) -> EncoderSpec:
    """The spec of encoder ``name``; an unknown name is a user error listing the known ones."""
    try:
        return ENCODERS[name]
    except KeyError:
        raise UvsamError(f"unknown encoder {name!r}; known encoders: {', '.join(ENCODERS)}") from None
