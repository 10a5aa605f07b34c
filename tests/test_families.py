"""Families whose official code is not on PyPI: EfficientSAM, EdgeSAM / RepViT-SAM, SAM-Lightening.

Their layouts are checked against the key names and shapes of the official code, their
behaviour against the official semantics (EfficientSAM's point-only prompts, LongNet's dilated
attention) on real data.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uvsam.checkpoint import load_generalist
from uvsam.modeling import build_generalist
from uvsam.modeling.sam_lightening import dilated_attention
from uvsam.predictor import Predictor

# Names and shapes as the official EfficientSAM code (yformer/EfficientSAM) creates them.
EFFICIENTSAM_TI_KEYS = {
    "image_encoder.patch_embed.proj.weight": (192, 3, 16, 16),
    "image_encoder.pos_embed": (1, 197, 192),
    "image_encoder.blocks.11.attn.qkv.weight": (576, 192),
    "image_encoder.blocks.0.mlp.fc2.weight": (192, 768),
    "image_encoder.neck.0.weight": (256, 192, 1, 1),
    "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (2, 128),
    "prompt_encoder.invalid_points.weight": (1, 256),
    "prompt_encoder.point_embeddings.weight": (1, 256),
    "prompt_encoder.bbox_top_left_embeddings.weight": (1, 256),
    "prompt_encoder.bbox_bottom_right_embeddings.weight": (1, 256),
    "mask_decoder.transformer.layers.1.mlp.layers.0.0.weight": (2048, 256),
    "mask_decoder.transformer.layers.1.mlp.fc.weight": (256, 2048),
    "mask_decoder.final_output_upscaling_layers.0.0.weight": (256, 64, 2, 2),
    "mask_decoder.final_output_upscaling_layers.0.1.weight": (64,),
    "mask_decoder.final_output_upscaling_layers.1.0.weight": (64, 32, 2, 2),
    "mask_decoder.output_hypernetworks_mlps.3.layers.1.0.weight": (256, 256),
    "mask_decoder.output_hypernetworks_mlps.3.fc.weight": (32, 256),
    "mask_decoder.iou_prediction_head.layers.1.0.weight": (256, 256),
    "mask_decoder.iou_prediction_head.fc.weight": (4, 256),
}


def test_efficientsam_official_layout_and_roundtrip(tmp_path, beijing_tile):
    torch.manual_seed(0)
    model = build_generalist("efficientsam_ti")
    state = model.official_state_dict()
    for key, shape in EFFICIENTSAM_TI_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    assert not any("mask_downscaling" in k or "no_mask_embed" in k for k in state)
    assert sum(k.startswith("prompt_encoder.") for k in state) == 5

    ckpt = tmp_path / "efficient_sam_vitt.pt"
    torch.save({"model": state}, ckpt)  # the published file wraps the state dict in "model"
    loaded = load_generalist("efficientsam_ti", ckpt)
    x = torch.as_tensor(beijing_tile).permute(2, 0, 1)[None]
    with torch.inference_mode():
        assert torch.equal(loaded.encode(x), model.encode(x))


@pytest.fixture(scope="module")
def efficientsam(beijing_tile):
    torch.manual_seed(0)
    pred = Predictor(build_generalist("efficientsam_ti"))
    pred.set_image(beijing_tile)
    return pred


def test_efficientsam_prompts(efficientsam):
    model = efficientsam.model
    pe = model.prompt_encoder
    box = torch.tensor([[100.0, 120.0, 600.0, 700.0]])
    sparse, dense = pe(boxes=box)
    # a box is two points labelled 2 and 3 (+0.5 pixel centre), padded to six with label -1
    corners = pe.pe_layer.forward_with_coords(box.view(1, 2, 2) + 0.5, (1024, 1024))
    assert torch.allclose(sparse[0, 0], corners[0, 0] + pe.bbox_top_left_embeddings.weight[0])
    assert torch.allclose(sparse[0, 1], corners[0, 1] + pe.bbox_bottom_right_embeddings.weight[0])
    pad = pe.pe_layer.forward_with_coords(torch.full((1, 1, 2), -0.5), (1024, 1024))[0, 0]
    assert sparse.shape == (1, 6, 256)
    assert torch.allclose(sparse[0, 5], pad + pe.invalid_points.weight[0])
    assert dense.abs().sum() == 0
    # a negative point carries no label embedding, a positive one does
    pts = torch.tensor([[[300.0, 300.0], [300.0, 300.0]]])
    s, _ = pe(points=(pts, torch.tensor([[1, 0]])))
    assert torch.allclose(s[0, 0] - s[0, 1], pe.point_embeddings.weight[0])

    with pytest.raises(ValueError, match="no mask prompt"):
        pe(boxes=box, masks=torch.zeros(1, 1, 256, 256))
    with pytest.raises(ValueError, match="at most 6"):
        pe(points=(torch.zeros(1, 7, 2), torch.ones(1, 7)))


def test_efficientsam_predicts_on_a_real_tile(efficientsam, beijing_tile):
    got = efficientsam.predict(boxes=np.array([[100, 120, 600, 700], [400, 300, 980, 1000]], np.float32),
                               multimask_output=True)
    assert got.masks.shape == (2, 3, *beijing_tile.shape[:2])
    assert got.iou.shape == (2, 3) and np.isfinite(got.iou).all()
    # the two boxes are different prompts: their logits differ
    assert not np.allclose(got.low_res_logits[0], got.low_res_logits[1])


def _dense_dilated(q, k, v, branches):
    """Reference: softmax attention where key j counts once per branch that pairs it with query i."""
    b, h, n, d = q.shape
    counts = torch.zeros(h, n, n)
    pos = torch.arange(n)
    for w, r in branches:
        for head in range(h):
            sel = (pos % w) % r == head % r
            same = (pos[:, None] // w) == (pos[None, :] // w)
            counts[head] += (same & sel[:, None] & sel[None, :]).float()
    logits = (q @ k.transpose(-1, -2)) * d**-0.5
    weights = counts * torch.exp(logits - logits.amax(-1, keepdim=True))
    return (weights / weights.sum(-1, keepdim=True)) @ v


def test_dilated_attention_is_longnet_mixture():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 64, 8).unbind(0)
    full = dilated_attention(q, k, v, ((64, 1),))
    assert torch.allclose(full, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5)
    branches = ((16, 1), (32, 4), (64, 8))
    assert torch.allclose(dilated_attention(q, k, v, branches), _dense_dilated(q, k, v, branches), atol=1e-5)
    with pytest.raises(ValueError, match="cannot be split"):
        dilated_attention(q, k, v, ((48, 1),))


def test_edgesam_fuses_the_16th_and_32nd_scale_features():
    torch.manual_seed(0)
    enc = build_generalist("edgesam").image_encoder
    x = torch.randn(1, 3, 1024, 1024)
    with torch.inference_mode():
        base = enc(x)
        torch.nn.init.zeros_(enc.fuse_stage3.weight)
        without_32 = enc(x)
    assert base.shape == (1, 256, 64, 64)
    assert not torch.allclose(base, without_32)  # the 1/32 branch contributes
