"""Bad checkpoints: one clear line naming the file, exit code 2, nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from uvsam.checkpoint import load_generalist, read_state_dict
from uvsam.errors import CheckpointError

from .conftest import run_cli

TILE = "beijing-uv/image/train/49566_107866.png"


def _segment_args(data_dir, ckpt, out, encoder="mobile_sam"):
    return ["segment", data_dir / TILE, "--encoder", encoder, "--checkpoint", ckpt, "--out", out,
            "--box", "100,100,500,500"]


@pytest.fixture()
def bad_checkpoints(tmp_path, mobile_sam_ckpt):
    good = mobile_sam_ckpt.read_bytes()
    files = {}
    files["empty"] = tmp_path / "empty.pt"
    files["empty"].write_bytes(b"")
    files["truncated"] = tmp_path / "truncated.pt"
    files["truncated"].write_bytes(good[: len(good) // 3])
    files["garbage"] = tmp_path / "garbage.pt"
    files["garbage"].write_bytes(b"this is not a checkpoint\n" * 100)
    files["pickled_model"] = tmp_path / "pickled_model.pt"
    torch.save(torch.nn.Linear(2, 2), files["pickled_model"])  # a whole pickled module
    files["not_tensors"] = tmp_path / "not_tensors.pt"
    torch.save({"epoch": 3, "lr": 0.1}, files["not_tensors"])
    return files


@pytest.mark.parametrize("kind,expect", [
    ("empty", "empty"),
    ("truncated", "truncated or corrupt"),
    ("garbage", "not a valid PyTorch file"),
    ("pickled_model", "pickled Python object"),
    ("not_tensors", "not a state dict"),
])
def test_bad_checkpoint_cli(kind, expect, bad_checkpoints, data_dir, tmp_path, capsys):
    out = tmp_path / "mask.tif"
    code, stdout, stderr = run_cli(_segment_args(data_dir, bad_checkpoints[kind], out), capsys)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert str(bad_checkpoints[kind]) in lines[0] and expect in lines[0]
    assert "Traceback" not in stderr
    assert not out.exists()


def test_wrong_family_lists_keys(mobile_sam_ckpt, data_dir, tmp_path, capsys):
    out = tmp_path / "mask.tif"
    code, _, stderr = run_cli(_segment_args(data_dir, mobile_sam_ckpt, out, "efficientvit_sam_l0"), capsys)
    assert code == 2
    assert "does not fit encoder 'efficientvit_sam_l0'" in stderr
    assert "missing keys" in stderr and "unexpected keys" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_wrapped_layouts_load(mobile_sam_ckpt, tmp_path):
    state = torch.load(mobile_sam_ckpt, weights_only=True)
    for wrapper in ("model", "state_dict"):
        p = tmp_path / f"{wrapper}.pt"
        torch.save({wrapper: state, "epoch": 1}, p)
        assert read_state_dict(p).keys() == state.keys()
    model = load_generalist("mobile_sam", tmp_path / "model.pt")
    assert torch.equal(model.official_state_dict()["mask_decoder.iou_token.weight"],
                       state["mask_decoder.iou_token.weight"])


def test_wrong_shape_is_reported(mobile_sam_ckpt, tmp_path):
    state = torch.load(mobile_sam_ckpt, weights_only=True)
    state["image_encoder.neck.0.weight"] = torch.zeros(8, 8, 1, 1)
    p = tmp_path / "shape.pt"
    torch.save(state, p)
    with pytest.raises(CheckpointError, match=r"wrong shapes \(image_encoder.neck.0.weight \(8, 8, 1, 1\)"):
        load_generalist("mobile_sam", p)


def test_console_script_no_traceback_unless_debug(bad_checkpoints, data_dir, tmp_path):
    args = [sys.executable, "-m", "uvsam"]
    rest = [str(a) for a in _segment_args(data_dir, bad_checkpoints["truncated"], tmp_path / "m.tif")]
    r = subprocess.run(args + rest, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(args + ["--debug"] + rest, capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr
