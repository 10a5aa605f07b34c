"""Any specialist (issue 22, part 3): every segmentation-models-pytorch architecture with any of
its encoders serves as UV-SAM's specialist, its decoder output the semantic prompt's feature.

DeepLabV3+ (the paper's pick for Beijing's courtyard villages) and UNet are trained, evaluated
and used to predict end to end on the command line on the real Beijing tiles; short schedules
(the mechanism, not the accuracy: docs/results.md has the full-schedule numbers)."""

from __future__ import annotations

import json

import pyogrio
import pytest
import torch

from tests.conftest import run_cli


@pytest.mark.parametrize(("specialist", "net"),
                         [("deeplabv3plus:resnet18", "DeepLabV3Plus"), ("unet:resnet18", "Unet")])
def test_an_smp_specialist_trains_evaluates_and_predicts(specialist, net, beijing, tmp_path, capsys):
    from uvsam.modelfile import ModelFile, load_model

    model = tmp_path / "m.ckpt"
    code, _, err = run_cli(["train", "--images", beijing / "train/images", "--labels", beijing / "train/masks",
                            "--out", model, "--encoder", "efficientvit_sam_l0", "--specialist", specialist,
                            "--epochs", "2", "--steps", "3", "--sam-epochs", "0", "--batch-size", "4"], capsys)
    assert code == 0, err
    record = ModelFile.read(model)
    assert record.config.specialist == specialist
    uvsam = load_model(record)[0]
    assert type(uvsam.specialist.net).__name__ == net
    # the semantic prompt reads the decoder's output, at SAM's width
    x = torch.rand(2, 3, 96, 96) * 255
    with torch.no_grad():
        logits, feature = uvsam.run_specialist(x)
        inner = uvsam.specialist.net
        decoded = inner.decoder(inner.encoder(_normalised(uvsam, x)))
    assert logits.shape == (2, 2, 96, 96) and feature.shape[:2] == (2, 256)
    torch.testing.assert_close(feature, uvsam.specialist.feature_proj(decoded))

    code, stdout, err = run_cli(["evaluate", "--model", model, "--images", beijing / "val/images", "--labels",
                                 beijing / "val/masks", "--force-refine"], capsys)
    assert code == 0, err
    scores = json.loads(stdout)
    assert scores["model"]["specialist"] == specialist and 0 <= scores["uvsam"]["iou"] <= 1
    out = tmp_path / "v.gpkg"
    code, _, err = run_cli(["predict", beijing / "val/images.vrt", "--model", model, "--out", out, "--local",
                            "--no-quicklook", "--probabilities", tmp_path / "p.tif"], capsys)
    assert code == 0, err
    assert set(pyogrio.list_layers(out)[:, 0]) >= {"villages", "tiles", "runs"}
    runs = pyogrio.read_dataframe(out, layer="runs")
    assert runs["model_sha256"].iloc[0] == record.sha256


def _normalised(uvsam, x):
    from uvsam.modeling.specialist import specialist_input

    c = uvsam.config
    return specialist_input(x, c.specialist_input, uvsam.pixel_mean, uvsam.pixel_std, c.lcn_sigma_m / c.gsd_m)


def test_unknown_specialists_are_refused_in_one_line(beijing, tmp_path, capsys):
    for name, why in (("unet:nonsense", "unknown encoder 'nonsense'"), ("segnet", "unknown specialist 'segnet'")):
        code, _, err = run_cli(["train", "--images", beijing / "train/images", "--labels", beijing / "train/masks",
                                "--out", tmp_path / "m.ckpt", "--specialist", name], capsys)
        assert code == 2 and why in err and len(err.strip().splitlines()) == 1, err


def test_an_smp_encoder_starts_from_imagenet_weights_in_the_torchvision_layout(tmp_path):
    """``--mit-weights`` also loads an smp encoder's ImageNet file (torchvision / timm keys; the
    classifier head left out); a file of another depth is refused naming what does not fit."""
    import timm

    from uvsam.errors import CheckpointError
    from uvsam.modeling.specialist import Specialist, load_mit_weights

    reference = timm.create_model("resnet18", pretrained=False)  # torchvision's key layout
    weights = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), weights)
    spec = Specialist("deeplabv3plus:resnet18")
    summary = load_mit_weights(spec, weights)
    assert summary["layout"] == "encoder" and summary["tensors"] == len(spec.net.encoder.state_dict())
    torch.testing.assert_close(spec.net.encoder.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    deeper = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34", pretrained=False).state_dict(), deeper)
    with pytest.raises(CheckpointError, match="encoder weights do not fit deeplabv3plus:resnet18: .*unexpected"):
        load_mit_weights(Specialist("deeplabv3plus:resnet18"), deeper)
