"""The pre-classification gate (issue 22, part 1): ``uvsam train-gate`` and ``predict --gate``.

A small gate (ResNet-18, a few steps) is trained in the test on the Beijing train tiles, read as
the session's model reads them; what is tested is the mechanism: the paper's metrics measured
on tiles the gate never saw, the threshold chosen for recall on a held-out strip, the gate
refused for another model's inputs, and predict skipping the specialist on every tile the gate
rejects (recorded in the tiles layer) while a gate that passes everything changes nothing.
"""

from __future__ import annotations

import json

import numpy as np
import pyogrio
import pytest
import torch

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def gate(beijing, model, tmp_path_factory):
    from uvsam.gate import GateConfig, train_gate

    out = tmp_path_factory.mktemp("gate") / "gate.pt"
    train_gate(GateConfig(images=str(beijing / "train/images"), labels=str(beijing / "train/masks"), model=str(model),
                          out=str(out), backbone="resnet18", epochs=2, steps_per_epoch=6, batch_size=8,
                          val_images=str(beijing / "val/images"), val_labels=str(beijing / "val/masks")),
               log=lambda m: None)
    return out


def test_train_gate_reports_auc_recall_precision_f1_and_a_threshold_chosen_for_recall(beijing, model, tmp_path,
                                                                                      capsys):
    from uvsam.gatefile import GateFile

    out = tmp_path / "g.pt"
    code, stdout, err = run_cli(["train-gate", "--images", beijing / "train/images", "--labels",
                                 beijing / "train/masks", "--model", model, "--out", out, "--backbone", "resnet18",
                                 "--epochs", "1", "--steps", "4", "--batch-size", "8", "--recall", "0.9",
                                 "--val-images", beijing / "val/images", "--val-labels", beijing / "val/masks"],
                                capsys)
    assert code == 0, err
    result = json.loads(stdout)
    held, val = result["metrics"]["threshold_set"], result["metrics"]["validation"]
    for m in (held, val):
        assert {"auc", "recall", "precision", "f1", "tiles", "village_tiles"} <= set(m)
        assert 0 < m["village_tiles"] < m["tiles"]  # both kinds of tile, 1:1 not assumed in the measurement
    assert held["recall"] >= 0.9  # the threshold keeps the asked share of held-out village tiles
    assert held["strip"] in ("east", "west", "south", "north") and held["village_tiles"] >= 10
    gate = GateFile.read(out)
    assert gate.threshold == pytest.approx(result["threshold"]) and gate.crop == result["crop"]
    assert gate.crop == round(240 / 3.7) or gate.crop >= 32  # 240 m at the model's GSD
    assert gate.record["input_mode"] == "lcn_rgb"  # what the model's specialist sees


def test_a_gate_is_refused_for_another_models_inputs(gate, model, beijing, tmp_path, capsys):
    from uvsam.errors import InputError
    from uvsam.gatefile import GateFile
    from uvsam.modelfile import ModelFile

    g = GateFile.read(gate)
    g.check_inputs(ModelFile.read(model))  # made for it: accepted
    g.inputs = {**g.inputs, "gsd_m": 1.0}
    with pytest.raises(InputError, match="trained for the inputs of another model"):
        g.check_inputs(ModelFile.read(model))
    bad = tmp_path / "notagate.pt"
    torch.save({"format": "something else"}, bad)
    code, _, err = run_cli(["predict", beijing / "val/images.vrt", "--model", model, "--gate", bad, "--out",
                            tmp_path / "v.gpkg", "--local"], capsys)
    assert code == 2 and "notagate.pt: not a gate file" in err and "Traceback" not in err


def _with_threshold(gate, threshold: float, path):
    payload = torch.load(gate, map_location="cpu", weights_only=True)
    torch.save({**payload, "threshold": threshold}, path)
    return path


def test_predict_skips_the_specialist_on_tiles_the_gate_rejects(gate, model, beijing, tmp_path, capsys, monkeypatch):
    from uvsam.modeling.uvsam import UVSAM

    scene = beijing / "val/images.vrt"
    calls = []
    original = UVSAM.run_specialist

    def counted(self, x):
        calls.append(int(x.shape[0]))
        return original(self, x)

    monkeypatch.setattr(UVSAM, "run_specialist", counted)
    runs = {}
    for name, gate_file in (("none", None), ("open", _with_threshold(gate, 0.0, tmp_path / "open.pt")),
                            ("shut", _with_threshold(gate, 1.01, tmp_path / "shut.pt")), ("trained", gate)):
        calls.clear()
        out = tmp_path / f"{name}.gpkg"
        code, _, err = run_cli(["predict", scene, "--model", model, "--out", out, "--local", "--no-quicklook",
                                *(["--gate", gate_file] if gate_file else [])], capsys)
        assert code == 0, err
        tiles = pyogrio.read_dataframe(out, layer="tiles")
        villages = pyogrio.read_dataframe(out, layer="villages")
        runs[name] = (tiles, villages, sum(calls), err)
    tiles, villages, ran, _ = runs["none"]
    assert len(villages) > 0 and ran == (tiles["status"] == "done").sum() and tiles["gate_score"].isna().all()
    # a gate that passes every tile changes nothing
    t, v, r, err = runs["open"]
    assert r == ran and (t["status"] == "done").sum() == (tiles["status"] == "done").sum()
    assert sorted(v["area_m2"].round(1)) == sorted(villages["area_m2"].round(1))
    assert t.loc[t["status"] == "done", "gate_score"].between(0, 1).all()
    # a gate that rejects every tile: the specialist never runs, no village, every tile recorded as gated
    t, v, r, err = runs["shut"]
    assert r == 0 and len(v) == 0 and set(t["status"]) <= {"gated", "nodata"} and (t["status"] == "gated").any()
    assert "rejected by the gate" in err
    # the trained gate: each tile gated exactly when its score is under the threshold
    t, v, r, _ = runs["trained"]
    from uvsam.gatefile import GateFile

    threshold = GateFile.read(gate).threshold
    ran_tiles = t[t["status"].isin(["done", "gated"])]
    np.testing.assert_array_equal(ran_tiles["status"] == "gated", ran_tiles["gate_score"] < threshold)
    assert r == (t["status"] == "done").sum()


def test_auc_and_recall_threshold_match_their_definitions():
    from uvsam.gate import auc, classification, recall_threshold

    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.random(60) < 0.4
        s = np.round(rng.random(60) + 0.3 * y, 2)  # ties on purpose
        pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
        assert auc(y, s) == pytest.approx(np.mean(pairs), abs=1e-12)
        for target in (0.5, 0.9, 0.99, 1.0):
            t = recall_threshold(s[y], target)
            assert (s[y] >= t).mean() >= target  # keeps at least the asked share
            higher = s[y][s[y] > t]
            assert len(higher) == 0 or (s[y] >= higher.min()).mean() < target  # and is the highest that does
        m = classification(y, s, 0.5)
        hit = s >= 0.5
        assert m["recall"] == pytest.approx(round((hit & y).sum() / y.sum(), 4))


def test_the_backbone_starts_from_pretrained_weights_the_user_brings(beijing, model, tmp_path, capsys):
    """ImageNet weights (here: a timm ResNet-18's own state dict written to a file, the layout
    timm and torchvision publish) start the backbone; weights of another architecture are
    refused in one line naming the file."""
    import timm

    from uvsam.files import sha256_file
    from uvsam.gatefile import GateFile
    from uvsam.modeling.gate import TileGate

    weights = tmp_path / "resnet18_imagenet.pth"
    reference = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    torch.save(reference.state_dict(), weights)
    net = TileGate("resnet18")
    assert net.load_backbone(torch.load(weights, weights_only=True)) == []
    torch.testing.assert_close(net.backbone.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    args = ["train-gate", "--images", beijing / "train/images", "--labels", beijing / "train/masks", "--model", model,
            "--backbone", "resnet18", "--epochs", "1", "--steps", "1", "--batch-size", "2"]
    code, _, err = run_cli([*args, "--out", tmp_path / "g.pt", "--backbone-weights", weights], capsys)
    assert code == 0, err
    assert GateFile.read(tmp_path / "g.pt").record["pretrained"]["sha256"] == sha256_file(weights)
    other = tmp_path / "mobilenet.pth"
    torch.save(timm.create_model("mobilenetv3_small_050", pretrained=False).state_dict(), other)
    code, _, err = run_cli([*args, "--out", tmp_path / "g2.pt", "--backbone-weights", other], capsys)
    assert code == 2 and "mobilenet.pth: not weights of resnet18" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g2.pt").exists()
