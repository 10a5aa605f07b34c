"""`uvsam distill`: each recipe's loss falls on real Beijing crops; the student is saved in its
family's official layout (uvsam segment takes it), with the teacher's digest and the recipe
recorded; a resumed run continues where it stopped; the prompt samplers put their clicks where
student and teacher disagree; bad input is refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from tests.conftest import run_cli
from uvsam.checkpoint import read_state_dict, save_official
from uvsam.distill_losses import LOW_RES, LayerMatch, error_points, hardest
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
                           ([*base, "--student", "sam_lightening", "--recipe", "layerwise"],
                            "--teacher 'mobile_sam' is not a plain ViT"),
                           ([*base, "--student", "mobile_sam", "--focus-layers", "last"],
                            "--focus-layers 'last' is not a comma-separated list of whole numbers"),
                           ([*base, "--student", "mobile_sam", "--resume"], "no distillation to resume"),
                           (["distill", "--teacher", "sam_vit_b", "--student", "mobile_sam", "--images", tile,
                             "--out", tmp_path / "s.pt", "--teacher-checkpoint", mobile_sam_ckpt],
                            "does not fit encoder 'sam_vit_b'")):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and expected in err and err.count("\n") == 1, err
        assert not (tmp_path / "s.pt").exists()


@pytest.mark.parametrize("recipe", ["full-stage", "prompt-in-loop", "layerwise"])
def test_prompt_and_layer_recipes_learn_the_teacher_on_real_crops(recipe, beijing, mobile_sam_ckpt, tmp_path,
                                                                  capsys):
    tile = sorted((beijing / "train/images").glob("*.tif"))[0]
    out = tmp_path / "student.pt"
    if recipe == "layerwise":  # plain ViTs: the smallest teacher, SAM-Lightening's own student
        teacher_ckpt, teacher, student = tmp_path / "efficientsam_ti.pt", "efficientsam_ti", "sam_lightening"
        torch.manual_seed(0)
        save_official(build_generalist(teacher), teacher_ckpt)
        extra, steps = ["--layer-step", "1"], 9  # six layers: all switched on from step 7
    else:
        teacher_ckpt, teacher, student, extra, steps = mobile_sam_ckpt, "mobile_sam", "efficientvit_sam_l0", [], 8
    code, _, err = run_cli(["distill", "--teacher", teacher, "--teacher-checkpoint", teacher_ckpt, "--student",
                            student, "--images", tile, "--out", out, "--recipe", recipe, "--views", "1",
                            "--steps-per-epoch", str(steps), "--epochs", "1", "--batch-size", "1", "--lr", "2e-3",
                            "--warmup", "1", "--prompts", "2", *extra], capsys)
    assert code == 0, err
    losses = pd.read_csv(out.with_name("student.pt.losses.csv"))
    record = json.loads(out.with_name("student.pt.json").read_text())
    assert record["recipe"] == recipe and record["teacher_sha256"] == sha256_file(teacher_ckpt)
    if recipe == "full-stage":  # TinySAM: embedding, decoder tokens, masks and IoUs all distilled
        assert {"embedding", "tokens", "masks", "iou"} <= set(losses.columns)
        assert (losses[["tokens", "masks"]] > 0).all().all()
        assert losses["loss"].iloc[-3:].mean() < 0.8 * losses["loss"].iloc[:2].mean()
        assert record["decoder_trained"]
    elif recipe == "prompt-in-loop":  # EdgeSAM: BCE + dice to the teacher's masks, boxes or points at random
        assert losses["loss"].iloc[4:].mean() < 0.85 * losses["loss"].iloc[:4].mean()
        assert record["decoder_trained"]
    else:  # the layer loss grows as layers switch on, then falls once all are on
        assert losses["layers"].iloc[0] == 0 and losses["layers"].iloc[1] > 0
        assert losses["layers"].iloc[-1] < 0.85 * losses["layers"].iloc[6]
        assert losses["embedding"].iloc[-1] < 0.5 * losses["embedding"].iloc[0]
        assert not record["decoder_trained"] and not out.with_name("student.pt.cache").exists()  # nothing cached
    official = build_generalist(student).official_state_dict()
    saved = read_state_dict(out)
    assert saved.keys() == official.keys() and all(saved[k].shape == official[k].shape for k in saved)


def test_corrective_clicks_go_to_the_error_region():
    """EdgeSAM's refinement click: inside the disagreement, positive where only the teacher's mask is,
    negative where only the student's is, none when they (nearly) agree; TinySAM's variant prefers
    the pixels where the probabilities differ most."""
    teacher = torch.full((3, LOW_RES, LOW_RES), -5.0)
    student = torch.full((3, LOW_RES, LOW_RES), -5.0)
    teacher[0, 100:140, 50:90] = 5.0  # the student misses this object: a positive click in it
    student[1, 10:30, 200:220] = 5.0  # a false alarm: a negative click in it
    teacher[2, 0:2, 0:2] = 5.0  # four pixels differ: too few for a click
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        xy, lab = error_points(student, teacher, gen, frame=1024)
        (x0, y0), (x1, y1) = (xy[0, 0] / 4).tolist(), (xy[1, 0] / 4).tolist()
        assert 50 <= x0 < 90 and 100 <= y0 < 140 and lab[0, 0] == 1
        assert 200 <= x1 < 220 and 10 <= y1 < 30 and lab[1, 0] == 0
        assert lab[2, 0] == -1
    # hard: of two error regions the click goes where the probabilities differ most
    teacher = torch.full((1, LOW_RES, LOW_RES), -5.0)
    student = teacher.clone()
    teacher[0, 0:100, 0:100], student[0, 0:100, 0:100] = 0.02, -0.02  # 10 000 px of slight disagreement
    teacher[0, 200:210, 200:210] = 8.0  # 100 px of strong disagreement

    def hits(uniform: bool) -> int:
        return sum(bool(error_points(student, teacher, gen, 1024, uniform=uniform)[0][0, 0, 0] >= 800)
                   for _ in range(40))

    assert hits(uniform=False) >= 12  # gaps ~1 x 100 px against ~0.01 x 10 000 px: half of the draws
    assert hits(uniform=True) <= 4  # uniform: 100 of 10 100 px, one draw in a hundred
    # the hardest prompts: the student's masks least like the teacher's
    t = torch.full((3, 8, 8), 1.0)
    s = t.clone()
    s[1, :4] = -1.0  # half wrong
    s[2, :1] = -1.0  # an eighth wrong
    assert hardest(s, t, 2).tolist() == [1, 2]


def test_layers_switch_on_one_after_another():
    """SAM-Lightening's schedule: alpha_i(t) rises from 0 at T_i = i dt to 1 at T_i + dt; a student of
    6 layers matched to a teacher of 12 takes every second teacher layer, ending on the last."""
    match = LayerMatch(6, 12, 384, 768, dt=10, focus=(-1,), focus_weight=2.0)
    assert [j for _, j in match.pairs] == [1, 3, 5, 7, 9, 11]
    assert match.alpha(0) == [0.0] * 6
    assert match.alpha(5) == [0.5, 0, 0, 0, 0, 0]
    assert match.alpha(25) == [1.0, 1.0, 0.5, 0, 0, 0]
    assert match.alpha(60) == [1.0] * 6
    assert match.weights == [1, 1, 1, 1, 1, 2]
    same = LayerMatch(12, 12, 768, 768, dt=1)
    assert [j for _, j in same.pairs] == list(range(12))
    x = torch.randn(1, 16, 768)
    assert torch.equal(same.proj[0](x), x)  # equal widths: the projector starts as the identity


def test_distillation_runs_data_parallel_under_torchrun(beijing, mobile_sam_ckpt, tmp_path):
    """Two processes (gloo on the CPU; NCCL and one GPU each under torchrun on a GPU machine) share
    the teacher's embeddings, average their gradients and write one student and one report."""
    tiles = sorted((beijing / "train/images").glob("*.tif"))[:2]
    out = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "uvsam", "distill", "--teacher", "mobile_sam", "--teacher-checkpoint", str(mobile_sam_ckpt),
           "--student", "efficientvit_sam_l0", "--images", str(tiles[0]), "--images", str(tiles[1]), "--out",
           str(out), "--views", "1", "--steps-per-epoch", "2", "--epochs", "1", "--batch-size", "1",
           "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    reports = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1 and json.loads(reports[0])["epochs_done"] == 1  # the first process reports
    assert "2 processes" in done.stderr
    record = json.loads(out.with_name("ddp.pt.json").read_text())
    assert record["processes"] == 2 and record["student_sha256"] == sha256_file(out)
    assert len(list(out.with_name("ddp.pt.cache").rglob("*.npy"))) == 2  # each view's embedding, once
