"""UV-SAM's prompts from the specialist, pinned on hand-made masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uvsam.modeling.prompts import mask_prompt, min_area_m2, semantic_prompts, village_boxes


def _mask() -> np.ndarray:
    m = np.zeros((400, 500), bool)
    m[10:140, 20:150] = True  # large square village, 130 x 130 px
    m[200:230, 300:330] = True  # small village, 30 x 30 px
    m[230:260, 330:360] = True  # touches the small one at a corner only: 8-connected, one village
    m[300:320, 100:400] = True  # a long thin strip: a big box from few pixels
    m[320:390, 100:120] = True  # ...with a leg: an L shape
    return m


def test_boxes_follow_8_connected_villages():
    vb = village_boxes(_mask(), gsd_m=1.0)
    assert len(vb) == 3
    np.testing.assert_array_equal(vb.boxes, [[20, 10, 150, 140], [300, 200, 360, 260], [100, 300, 400, 390]])
    assert vb.labels.max() == 3 and (vb.labels > 0).sum() == _mask().sum()


def test_size_rule_in_square_metres():
    assert min_area_m2(1.0) == 10_000  # the official 100 x 100 px at 1 m
    vb = village_boxes(_mask(), gsd_m=1.0)
    # box areas: 16900, 3600, 27000 m^2 -> the 60 x 60 corner pair is below 100 x 100
    np.testing.assert_array_equal(vb.large, [True, False, True])
    # the same scene at 2 m per pixel: every box covers 4x the ground, the pair now passes
    np.testing.assert_array_equal(village_boxes(_mask(), gsd_m=2.0, min_area=min_area_m2(1.0)).large,
                                  [True, True, True])
    assert village_boxes(np.zeros((50, 50), bool), 1.0).boxes.shape == (0, 4)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        village_boxes(np.zeros((1, 50, 50), bool), 1.0)


def test_mask_prompt_is_pooled_village_log_odds():
    logits = torch.zeros(1, 2, 512, 512)
    logits[:, 1, :, :256] = 4.0  # left half: village log-odds +4
    logits[:, 0, :, 256:] = 2.0  # right half: log-odds -2
    p = mask_prompt(logits)
    assert p.shape == (1, 1, 256, 256)
    assert torch.allclose(p[..., :128], torch.tensor(4.0)) and torch.allclose(p[..., 128:], torch.tensor(-2.0))
    # a 1024 input pools 4 x 4 pixels into each cell: averages, not samples
    x = torch.zeros(1, 1, 1024, 1024)
    x[..., ::4, ::4] = 16.0
    assert torch.allclose(mask_prompt(x), torch.tensor(1.0))


def test_semantic_prompts_are_unit_pooled_vectors():
    torch.manual_seed(0)
    emb, feat = torch.randn(2, 256, 64, 64), torch.randn(2, 256, 128, 128) + 3
    s = semantic_prompts(emb, feat)
    assert s.shape == (2, 2, 256)
    assert torch.allclose(s.norm(dim=-1), torch.ones(2, 2))
    assert torch.allclose(s[:, 1], torch.nn.functional.normalize(feat.mean(dim=(2, 3)), dim=1))
    with pytest.raises(ValueError, match="channels"):
        semantic_prompts(emb, torch.randn(2, 128, 8, 8))
