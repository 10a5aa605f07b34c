"""Every registered generalist builds, embeds to 256x64x64 and has the official size."""

from __future__ import annotations

import pytest
import torch

from uvsam.errors import UvsamError
from uvsam.modeling import ENCODERS, build_generalist, get_spec

# Official code on PyPI gives exact counts for these (tests/test_parity.py checks the rest of
# the model); here each variant's encoder or whole model is checked against the published figure.
PUBLISHED_IS_ENCODER_ONLY = {"sam_vit_b", "sam_vit_l", "sam_vit_h"}
# SAM's ViTs are checked number for number against the official package in tests/test_parity.py
# (ViT-B; L and H run the same code with more and wider blocks): here they are built and run on
# the meta device, which checks every shape and parameter count without two minutes of CPU matmuls.
SHAPES_ONLY = {"sam_vit_b", "sam_vit_l", "sam_vit_h"}


@pytest.mark.parametrize("name", list(ENCODERS))
def test_builds_and_embeds(name):
    spec = get_spec(name)
    device = torch.device("meta" if name in SHAPES_ONLY else "cpu")
    with device:
        model = build_generalist(name)
        x = torch.rand(1, 3, spec.input_size, spec.input_size) * 255
    with torch.inference_mode():
        emb = model.image_encoder(model.preprocess(x))
    assert tuple(emb.shape) == (1, *spec.embed_shape) == (1, 256, 64, 64)
    assert emb.device == device and (device.type == "meta" or torch.isfinite(emb).all())
    keys = list(model.official_state_dict())  # the published layout names every tensor once
    assert len(set(keys)) == len(keys) == len(model.state_dict())

    if spec.published_params_m is None:  # no published figure: see the tests below
        return
    if name in PUBLISHED_IS_ENCODER_ONLY:
        n = sum(p.numel() for p in model.image_encoder.parameters())
    elif spec.family == "tiny_vit":  # published 5.78M: the encoder without its unused classifier
        enc = model.image_encoder
        n = sum(p.numel() for k, p in enc.named_parameters() if not k.startswith("body.head"))
    else:
        n = sum(p.numel() for p in model.parameters())
    assert n / 1e6 == pytest.approx(spec.published_params_m, rel=0.015), n


def test_preprocessing_frames():
    l0 = build_generalist("efficientvit_sam_l0")
    assert l0.spec.input_size == 512 and l0.spec.prompt_frame == 1024
    # a 2048 x 1024 image: encoder sees 512 x 256, prompts are scaled into the 1024 frame
    assert l0.input_shape(1024, 2048) == (256, 512)
    assert l0.prompt_scale(1024, 2048) == (0.5, 0.5)
    x = l0.preprocess(torch.full((1, 3, 1024, 2048), 128.0))
    assert x.shape == (1, 3, 512, 512)
    assert (x[..., 256:, :] == 0).all()  # bottom padding


def test_unknown_encoder_is_a_user_error():
    with pytest.raises(UvsamError, match="unknown encoder 'sam_vit_x'.*mobile_sam"):
        get_spec("sam_vit_x")


# The official RepViT cfg tables, one row (out channels, SE, stride) per block after the stem:
# EdgeSAM's m1_cfgs (edge_sam/modeling/rep_vit.py) and RepViT-SAM's (sam/repvit_sam/modeling/repvit.py).
def _rows(c, n, se_first=True):
    return [(c, (i % 2 == 0) == se_first, 1) for i in range(n)]


EDGESAM_CFG = (
    [(48, 1, 1), (48, 0, 1), (48, 0, 1)]
    + [(96, 0, 2), (96, 1, 1), (96, 0, 1), (96, 0, 1)]
    + [(192, 0, 2)] + _rows(192, 14) + [(192, 0, 1)]
    + [(384, 0, 2), (384, 1, 1), (384, 0, 1)]
)
REPVIT_SAM_CFG = (
    _rows(80, 6) + [(80, 0, 1)]
    + [(160, 0, 2)] + _rows(160, 6) + [(160, 0, 1)]
    + [(320, 0, 2)] + _rows(320, 34) + [(320, 0, 1)]
    + [(640, 0, 2), (640, 1, 1), (640, 0, 1)]
)


def _official_repvit_params(cfg, legacy: bool, fuse: bool) -> int:
    """Parameter count of the official RepViT image encoder, from its cfg table alone."""
    def conv_bn(i, o, k=1, groups=1):
        return i // groups * o * k * k + 2 * o

    def se(c):
        rd = max(8, int(c * 0.25 + 4) // 8 * 8)  # timm SqueezeExcite(c, 0.25), make_divisible(.., 8)
        return c * rd + rd + rd * c + c

    c0 = cfg[0][0]
    n = conv_bn(3, c0 // 2, 3) + conv_bn(c0 // 2, c0, 3)
    inp = c0
    for c, use_se, stride in cfg:
        if stride == 2:  # dw 3x3 (+SE) + 1x1 to the new width, then the residual FFN
            n += conv_bn(inp, inp, 3, inp) + (se(inp) if use_se else 0) + conv_bn(inp, c)
        else:  # RepVGG-DW (+SE), then the residual FFN
            n += conv_bn(c, c, 3, c) + (conv_bn(c, c, 1, c) if legacy else c + c + 2 * c)
            n += se(c) if use_se else 0
        n += conv_bn(c, 2 * c) + conv_bn(2 * c, c)
        inp = c
    neck_in = 256 if fuse else inp
    if fuse:
        n += cfg[-4][0] * 256 + inp * 256  # 1/16 and 1/32 projections
    return n + neck_in * 256 + 2 * 256 + 256 * 256 * 9 + 2 * 256


@pytest.mark.parametrize("name,cfg,legacy,fuse", [
    ("edgesam", EDGESAM_CFG, True, True),
    ("repvit_sam", REPVIT_SAM_CFG, False, False),
])
def test_repvit_encoders_match_official_cfg_tables(name, cfg, legacy, fuse):
    model = build_generalist(name)
    assert sum(p.numel() for p in model.image_encoder.parameters()) == _official_repvit_params(cfg, legacy, fuse)
    # the official flat block list has one entry per cfg row (features.1 .. features.N)
    keys = model.official_state_dict()
    assert max(int(k.split(".")[2]) for k in keys if k.startswith("image_encoder.features.")) == len(cfg)


def test_licences_and_unreleased_weights():
    assert get_spec("edgesam").non_commercial and "S-Lab" in get_spec("edgesam").licence
    assert not any(s.non_commercial for n, s in ENCODERS.items() if n != "edgesam")
    lightening = get_spec("sam_lightening")
    assert lightening.weights is None and "never released" in lightening.weights_note

