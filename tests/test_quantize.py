"""Static int8 (TinySAM's post-training quantisation): convolutions and linear layers in int8,
calibrated on real imagery, close to fp32 in embeddings and masks; batch norms folded exactly;
`segment --int8` and `predict --int8` measure it on the user's imagery and say what they did;
int8 off the CPU or away from this process is refused in one line."""

from __future__ import annotations

import json

import pyogrio
import torch
from torch import nn

from tests.conftest import run_cli
from uvsam.modeling.sam import build_generalist
from uvsam.quantize import Int8Layer, fold_batch_norms, int8_check, quantize_encoder_int8, quantize_encoder_static


def test_static_int8_quantises_the_convolutions_dynamic_int8_leaves(beijing_tile):
    torch.manual_seed(0)
    model = build_generalist("efficientvit_sam_l0").eval()  # a convolutional encoder: no nn.Linear in it
    enc = model.image_encoder
    convs = sum(isinstance(m, nn.Conv2d) for m in enc.modules())
    assert convs > 50 and not any(type(m) is nn.Linear for m in enc.modules())
    dynamic = quantize_encoder_int8(enc)
    assert not any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in dynamic.modules())  # a no-op
    x = model.preprocess(torch.from_numpy(beijing_tile.copy()).permute(2, 0, 1)[None].float())
    static = quantize_encoder_static(enc, [x, x.flip(-1)])
    wrapped = [m for m in static.modules() if isinstance(m, Int8Layer)]
    assert len(wrapped) == convs  # every convolution runs in int8
    assert all(isinstance(m.layer, torch.ao.nn.quantized.Conv2d) for m in wrapped)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in static.modules())  # folded first
    check = int8_check(model, static, [x])
    assert check.cosine > 0.99 and check.mask_iou > 0.95, check


def test_batch_norms_fold_into_their_convolutions_exactly():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                        nn.BatchNorm2d(4))
    for bn in (net[1], net[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
    net.eval()
    x = torch.randn(2, 3, 16, 16)
    ref = net(x)
    assert fold_batch_norms(net) == 2
    assert isinstance(net[1], nn.Identity) and torch.allclose(net(x), ref, atol=1e-5)


def test_segment_and_predict_measure_int8_on_the_users_imagery(beijing, model, mobile_sam_ckpt, tmp_path, capsys):
    tile = sorted((beijing / "val/images").glob("*.tif"))[0]
    code, out, err = run_cli(["segment", tile, "--encoder", "mobile_sam", "--checkpoint", mobile_sam_ckpt, "--box",
                              "100,100,600,600", "--out", tmp_path / "m.tif", "--int8", "--device", "cpu"], capsys)
    assert code == 0, err
    note = json.loads(out)["int8"]
    assert note.startswith(("used: int8 encoder", "not used: int8 encoder")) and "masks agree at IoU" in note
    # predict: calibrated on tiles of the run's scene; the test model's generalist is EfficientViT-SAM-L0
    gpkg = tmp_path / "v.gpkg"
    args = ["predict", beijing / "val/images.vrt", "--model", model, "--out", gpkg, "--local", "--force-refine",
            "--int8", "--device", "cpu"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert "int8: used" in err or "int8: not used" in err
    runs = pyogrio.read_dataframe(gpkg, layer="runs")
    assert "masks agree at IoU" in runs["int8"][0] and json.loads(runs["config"][0])["int8"]
    assert pyogrio.read_dataframe(gpkg, layer="villages").geometry.is_valid.all()
    for extra, expected in ((["--local", "--precision", "bf16"], "--int8 is the CPU's fp32 path"),
                            (["--dask", "--workers", "1"], "give --local")):
        code, _, err = run_cli(["predict", beijing / "val/images.vrt", "--model", model, "--out",
                                tmp_path / "w.gpkg", "--force-refine", "--int8", "--device", "cpu", *extra], capsys)
        assert code == 2 and expected in err and err.count("\n") == 1, err
        assert not (tmp_path / "w.gpkg").exists()
