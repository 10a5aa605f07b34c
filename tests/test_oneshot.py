"""PerSAM / PerSAM-F one-shot personalisation (issue 24): the decoder's priors, the location
confidence map, the point priors, the peaks over a city, and `uvsam oneshot` on real imagery."""

from __future__ import annotations

import json

import numpy as np
import pyogrio
import pytest
import torch

from uvsam.modeling import build_generalist
from uvsam.modeling.persam import PersonalisedDecoder, location_prior
from uvsam.oneshot import (
    OneShotConfig,
    confidence_map,
    learn_target,
    mask_on_grid,
    peaks,
    point_priors,
)
from uvsam.predictor import Predictor

from .conftest import run_cli


@pytest.fixture(scope="module")
def generalist():
    torch.manual_seed(0)
    return build_generalist("mobile_sam").eval()


def test_without_priors_the_personalised_decoder_is_sams(generalist):
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(1, 256, 64, 64, generator=g)
    pts = (torch.tensor([[[300.0, 400.0], [700.0, 100.0]]]), torch.tensor([[1, 0]]))
    sparse, dense = generalist.prompt_encoder(points=pts, boxes=None, masks=None)
    pe = generalist.prompt_encoder.get_dense_pe()
    dec = PersonalisedDecoder(generalist.mask_decoder)
    with torch.inference_mode():
        for multi in (False, True):
            ref = generalist.mask_decoder(emb, pe, sparse, dense, multi)
            got = dec(emb, pe, sparse, dense, multi)
            assert torch.allclose(got[0], ref[0], atol=1e-4) and torch.allclose(got[1], ref[1], atol=1e-5)
        # each prior changes the masks; a uniform attention prior leaves softmax's ranking alone
        target = torch.randn(1, 1, 256, generator=g)
        sim = torch.zeros(64, 64)
        sim[10:20, 30:40] = 1
        plain = generalist.mask_decoder(emb, pe, sparse, dense, False)[0]
        assert not torch.allclose(dec(emb, pe, sparse, dense, False, None, target)[0], plain, atol=1e-3)
        assert not torch.allclose(dec(emb, pe, sparse, dense, False, location_prior(sim), None)[0], plain, atol=1e-3)


def test_location_prior_is_a_standardised_sigmoid_on_the_grid():
    sim = torch.zeros(1024, 1024)
    sim[:512] = 1.0  # top half similar
    prior = location_prior(sim)
    assert prior.shape == (1, 1, 1, 64 * 64)
    grid = prior.reshape(64, 64)
    assert torch.allclose(grid[:31], torch.sigmoid(torch.tensor(1.0)))  # z-score +1 above, -1 below
    assert torch.allclose(grid[33:], torch.sigmoid(torch.tensor(-1.0)))


def _planted(generalist, size=(1024, 1024)):
    """A predictor whose embedding holds feature f in cells rows 10-19, cols 30-39 and -f at
    cell (50, 5), noise elsewhere; the reference mask covers the f cells' pixels."""
    g = torch.Generator().manual_seed(2)
    f = torch.randn(256, generator=g)
    emb = 0.05 * torch.randn(1, 256, 64, 64, generator=g)
    emb[0, :, 10:20, 30:40] += f[:, None, None]
    emb[0, :, 50, 5] = -f
    pred = Predictor(generalist)
    pred.embeddings, pred.sizes = emb, [size]
    mask = np.zeros(size, bool)
    mask[160:320, 480:640] = True
    return pred, f, mask


def test_target_confidence_map_and_point_priors(generalist):
    pred, f, mask = _planted(generalist)
    on = mask_on_grid(pred, mask)
    assert on.sum() == 100 and on[10:20, 30:40].all()  # 16 px per cell: the same cells
    target = learn_target(pred, mask)
    assert torch.nn.functional.cosine_similarity(target.feature, f, dim=0) > 0.99
    assert torch.allclose(target.embedding, pred.embeddings[0, :, 10:20, 30:40].mean((1, 2)))
    sim = confidence_map(pred, target)
    assert sim.shape == (1024, 1024) and sim[200:300, 500:620].min() > 0.95
    (px, py), (nx, ny) = point_priors(sim)
    assert 160 <= py < 320 and 480 <= px < 640  # the most similar pixel: on the object
    assert abs(nx - (5 * 16 + 8)) <= 16 and abs(ny - (50 * 16 + 8)) <= 16  # the least similar: the -f cell
    # PerSAM-F's target: the mean of the mean and the channel-wise max
    feat = pred.embeddings[0, :, 10:20, 30:40].reshape(256, -1)
    expected = feat.max(1).values / 2 + feat.mean(1) / 2
    assert torch.allclose(learn_target(pred, mask, "persam-f").feature, expected / expected.norm(), atol=1e-6)


def test_peaks_are_local_maxima_apart_and_above_the_threshold():
    sim = np.zeros((200, 200), np.float32)
    for (x, y), v in {(20, 20): 0.9, (30, 25): 0.95, (150, 40): 0.85, (100, 150): 0.5}.items():
        sim[y, x] = v
    got = peaks(sim, 0.8, 32, 10)
    assert got.tolist() == [[30, 25], [150, 40]]  # (20, 20) is within 32 px of a higher one; 0.5 too low
    assert peaks(sim, 0.8, 32, 1).tolist() == [[30, 25]]
    assert peaks(sim, 0.99, 32, 10).shape == (0, 2)


def test_one_shot_settings_are_checked():
    from uvsam.errors import InputError

    for bad in ({"method": "persam-x"}, {"min_similarity": 1.5}, {"train_steps": 0}, {"max_points": 0}):
        with pytest.raises(InputError):
            OneShotConfig(**bad)


def test_oneshot_command_on_real_tiles(beijing, mobile_sam_ckpt, tmp_path, capsys):
    """Mark the labelled village of one Beijing train tile, search a val tile (another district,
    another season) for its kind with PerSAM and PerSAM-F. A random mobile_sam (no official weights reachable
    here): the mechanics only, the masks mean nothing."""
    reference = beijing / "train/images/49566_107866.tif"
    mask = beijing / "train/masks/49566_107866.tif"
    scenes = [str(beijing / "val/images/49554_107968.tif")]
    common = ["--reference", str(reference), "--reference-mask", str(mask), "--encoder", "mobile_sam",
              "--checkpoint", str(mobile_sam_ckpt), "--min-similarity", "0.2", "--max-points", "2", "--tile", "640",
              "--overlap", "128", "--local", "--device", "cpu", "--precision", "fp32"]
    out = tmp_path / "found.gpkg"
    for method in ("persam", "persam-f"):
        code, _, err = run_cli(["oneshot", *scenes, *common, "--method", method, "--train-steps", "200",
                                "--layer", method.replace("-", "_"), "--out", str(out)], capsys)
        assert code == 0, err
        frame = pyogrio.read_dataframe(out, layer=method.replace("-", "_"))
        assert len(frame) > 0 and frame["similarity"].between(0.2, 1.0).all() and frame.geometry.is_valid.all()
        assert set(frame["scene"]) == {"49554_107968.tif"}
    runs = pyogrio.read_dataframe(out, layer="runs")
    assert runs["method"].tolist() == ["persam", "persam-f"]
    weights = np.array(json.loads(runs["scale_weights"].iloc[1]))
    assert weights.shape == (3,) and weights.sum() == pytest.approx(1.0)
    empty = tmp_path / "empty.tif"
    import rasterio

    with rasterio.open(mask) as src:
        profile = src.profile
    with rasterio.open(empty, "w", **{**profile, "driver": "GTiff"}) as dst:
        dst.write(np.zeros((1, profile["height"], profile["width"]), profile["dtype"]))
    code, _, err = run_cli(["oneshot", scenes[0], *[c if c != str(mask) else str(empty) for c in common],
                            "--out", str(tmp_path / "none.gpkg")], capsys)
    assert code == 2 and "marks no pixel" in err and not (tmp_path / "none.gpkg").exists()
