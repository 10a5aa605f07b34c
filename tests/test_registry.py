"""Every registered generalist builds, embeds to 256x64x64 and has the official size."""

from __future__ import annotations

import pytest
import torch

from uvsam.errors import UvsamError
from uvsam.modeling import ENCODERS, build_generalist, get_spec

# Official code on PyPI gives exact counts for these (tests/test_parity.py checks the rest of
# the model); here each variant's encoder or whole model is checked against the published figure.
PUBLISHED_IS_ENCODER_ONLY = {"sam_vit_b", "sam_vit_l", "sam_vit_h"}


@pytest.mark.parametrize("name", list(ENCODERS))
def test_builds_and_embeds(name):
    spec = get_spec(name)
    model = build_generalist(name)
    x = torch.rand(1, 3, spec.input_size, spec.input_size) * 255
    with torch.inference_mode():
        emb = model.image_encoder(model.preprocess(x))
    assert tuple(emb.shape) == (1, *spec.embed_shape) == (1, 256, 64, 64)
    assert torch.isfinite(emb).all()

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
