"""`uvsam distill`: the embedding recipe's loss falls on real Beijing crops; the student is saved in
its family's official layout (uvsam segment takes it), with the teacher's digest and the recipe
recorded; a resumed run continues where it stopped; bad input is refused in one line."""

from __future__ import annotations

import json

import pandas as pd
import torch

from tests.conftest import run_cli
from uvsam.checkpoint import read_state_dict
from uvsam.files import sha256_file
from uvsam.modeling.sam import build_generalist


def test_embedding_distillation_on_real_crops(beijing, mobile_sam_ckpt, tmp_path, capsys):
    tile = sorted((beijing / "train/images").glob("*.tif"))[0]
    out = tmp_path / "l0.pt"
    args = ["distill", "--teacher", "mobile_sam", "--teacher-checkpoint", mobile_sam_ckpt, "--student",
            "efficientvit_sam_l0", "--images", tile, "--out", out, "--views", "2", "--steps-per-epoch", "3",
            "--batch-size", "1", "--lr", "2e-3"]
    code, stdout, err = run_cli([*args, "--epochs", "1"], capsys)
    assert code == 0, err
    code, stdout, err = run_cli([*args, "--epochs", "2", "--resume"], capsys)  # one more epoch
    assert code == 0, err
    losses = pd.read_csv(out.with_name("l0.pt.losses.csv"))
    assert list(losses["step"]) == [1, 2, 3, 4, 5, 6]  # the resumed epoch appended, numbered on
    assert losses["loss"].iloc[-2:].mean() < 0.9 * losses["loss"].iloc[0]  # the student learns the teacher
    record = json.loads(out.with_name("l0.pt.json").read_text())
    assert record["teacher_sha256"] == sha256_file(mobile_sam_ckpt) and record["recipe"] == "embedding"
    assert record["epochs_done"] == 2 and record["decoder_from_teacher"] and not record["teacher_verified"]
    assert record["student_sha256"] == sha256_file(out)
    # the official layout of the family, key for key and shape for shape
    official = build_generalist("efficientvit_sam_l0").official_state_dict()
    saved = read_state_dict(out)
    assert saved.keys() == official.keys() and all(saved[k].shape == official[k].shape for k in saved)
    teacher = read_state_dict(mobile_sam_ckpt)
    assert torch.equal(saved["mask_decoder.iou_prediction_head.layers.0.weight"],
                       teacher["mask_decoder.iou_prediction_head.layers.0.weight"])  # MobileSAM's practice
    code, stdout, err = run_cli(["segment", tile, "--encoder", "efficientvit_sam_l0", "--checkpoint", out,
                                 "--box", "100,100,400,400", "--out", tmp_path / "mask.tif"], capsys)
    assert code == 0, err


def test_bad_distillation_inputs_are_refused_in_one_line(beijing, mobile_sam_ckpt, tmp_path, capsys):
    tile = sorted((beijing / "train/images").glob("*.tif"))[0]
    base = ["distill", "--teacher", "mobile_sam", "--teacher-checkpoint", mobile_sam_ckpt, "--images", tile,
            "--out", tmp_path / "s.pt"]
    for args, expected in (([*base, "--student", "nope"], "--student 'nope' is not a registered encoder"),
                           ([*base, "--student", "mobile_sam", "--recipe", "magic"],
                            "--recipe 'magic' is not a recipe"),
                           ([*base, "--student", "mobile_sam", "--views", "9"], "8 flips and quarter turns"),
                           ([*base, "--student", "mobile_sam", "--resume"], "no distillation to resume"),
                           (["distill", "--teacher", "sam_vit_b", "--student", "mobile_sam", "--images", tile,
                             "--out", tmp_path / "s.pt", "--teacher-checkpoint", mobile_sam_ckpt],
                            "does not fit encoder 'sam_vit_b'")):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and expected in err and err.count("\n") == 1, err
        assert not (tmp_path / "s.pt").exists()
