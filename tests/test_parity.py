"""Parity with the official code: same random weights, saved in the official layout, loaded
through uvsam's loader, give the same embeddings and the same masks on a real Beijing tile.

The official packages (segment-anything, mobilesam-mirror, efficientsam) are test-only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uvsam.checkpoint import load_generalist
from uvsam.predictor import Predictor

BOXES = np.array([[100, 120, 600, 700], [400, 300, 980, 1000]], dtype=np.float32)
POINT = (np.array([[[512, 400]]], dtype=np.float32), np.array([[1]]))


def _official(name: str):
    torch.manual_seed(0)
    if name == "sam_vit_b":
        from segment_anything import SamPredictor, build_sam_vit_b

        model = build_sam_vit_b()
        return model, SamPredictor(model)
    if name == "mobile_sam":
        from mobile_sam import SamPredictor as MobilePredictor
        from mobile_sam import sam_model_registry

        model = sam_model_registry["vit_t"]()
        return model, MobilePredictor(model)
    from efficientsam.models.efficientvit.sam import EfficientViTSamPredictor
    from efficientsam.sam_model_zoo import create_efficientvit_sam_model

    model = create_efficientvit_sam_model(name.replace("_", "-"), pretrained=False)
    return model, EfficientViTSamPredictor(model)


def _randomise_buffers(model: torch.nn.Module) -> None:
    """Give BatchNorm statistics and zero-initialised weights non-trivial values."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)


@pytest.mark.parametrize("name", ["sam_vit_b", "mobile_sam", "efficientvit_sam_l0", "efficientvit_sam_xl0"])
def test_official_parity(name, tmp_path, beijing_tile):
    official, official_predictor = _official(name)
    _randomise_buffers(official)
    official.eval()
    ckpt = tmp_path / f"{name}.pt"
    state = official.state_dict()
    if name.startswith("efficientvit"):
        state = {"state_dict": state}  # the published EfficientViT-SAM files are wrapped
    torch.save(state, ckpt)

    ours = load_generalist(name, ckpt)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in official.parameters())

    # Embeddings: the same encoder input through both encoders.
    x = ours.preprocess(torch.as_tensor(beijing_tile).permute(2, 0, 1)[None])
    with torch.inference_mode():
        e_ours = ours.image_encoder(x)
        e_ref = official.image_encoder(x)
    scale = e_ref.abs().max().item()
    assert e_ours.shape == (1, 256, 64, 64)
    assert (e_ours - e_ref).abs().max().item() <= 1e-4 * max(scale, 1.0)

    # Masks: each side's own predictor, the same box and point prompts.
    official_predictor.set_image(beijing_tile)
    pred = Predictor(ours)
    pred.set_image(beijing_tile)
    fractions = []
    for i, box in enumerate(BOXES):
        ref_masks, ref_iou, _ = official_predictor.predict(box=box, multimask_output=False)
        got = pred.predict(boxes=box[None])
        fractions.append(_assert_same_mask(got.masks[0, 0], np.asarray(ref_masks[0]), f"{name} box {i}"))
        np.testing.assert_allclose(got.iou[0], ref_iou, atol=1e-3)
    ref_masks, ref_iou, _ = official_predictor.predict(
        point_coords=POINT[0][0], point_labels=POINT[1][0], multimask_output=True
    )
    got = pred.predict(point_coords=POINT[0], point_labels=POINT[1], multimask_output=True)
    for c in range(3):
        fractions.append(_assert_same_mask(got.masks[0, c], np.asarray(ref_masks[c]), f"{name} point mask {c}"))
    # the comparison means something only if the masks are neither empty nor full
    assert sum(0.01 < f < 0.99 for f in fractions) >= 3, fractions


def _assert_same_mask(a: np.ndarray, b: np.ndarray, what: str) -> float:
    a, b = a.astype(bool), b.astype(bool)
    union = np.logical_or(a, b).sum()
    iou = 1.0 if union == 0 else np.logical_and(a, b).sum() / union
    assert iou >= 0.999, f"{what}: IoU {iou:.5f}"
    return float(b.mean())


def test_mobile_sam_schema(tmp_path):
    """uvsam's mobile_sam, in its official layout, has exactly the published keys and shapes."""
    from uvsam.modeling import build_generalist

    from .conftest import SCHEMAS

    rows = (SCHEMAS / "mobile_sam_state_dict.tsv").read_text().splitlines()[1:]
    schema = {}
    for row in rows:
        key, shape, _ = row.split("\t")
        schema[key] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
    ours = {k: tuple(v.shape) for k, v in build_generalist("mobile_sam").official_state_dict().items()}
    assert ours == schema
