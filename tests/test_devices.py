"""Devices (issue 21, part 5): on a machine without a GPU ``--device auto`` is the CPU in fp32 and
changes nothing; a device that is absent or misspelt is one line naming the option; bf16
autocast is measured against fp32 (mask agreement), not assumed."""

from __future__ import annotations

import numpy as np
import pyogrio
import pytest
import shapely
import torch

from tests.conftest import run_cli
from uvsam.devices import Device, select
from uvsam.errors import ConfigError


def test_auto_is_what_this_machine_has_and_absent_devices_are_refused():
    auto = select()
    if torch.cuda.is_available():
        assert auto.name.startswith("cuda:") and auto.precision == "fp32"
    else:
        assert auto == Device("cpu", "fp32")
        for bad, says in (("cuda", "no CUDA GPU"), ("cuda:3", "no CUDA GPU"), ("tpu", "use auto, cpu")):
            with pytest.raises(ConfigError, match=says):
                select(bad)
    with pytest.raises(ConfigError, match="fp16 on the CPU"):
        select("cpu", "fp16")
    with pytest.raises(ConfigError, match="use auto, fp32"):
        select("cpu", "int4")


def test_bf16_prediction_agrees_with_fp32_and_the_run_records_its_device(beijing, model, tmp_path, capsys):
    """The same scene through fp32 (auto) and CPU bf16 autocast: both run, each run's row names
    where it ran, and the villages stay close: measured 0.986 union IoU on this scene, 0.89 when
    the specialist's input (local contrast) was computed in bf16 as well; bf16 is a choice, not
    the default."""
    scene = beijing / "val/images.vrt"
    outs = {}
    for precision in ("auto", "bf16"):
        out = tmp_path / f"{precision}.gpkg"
        code, _, err = run_cli(["predict", scene, "--model", model, "--out", out, "--local", "--no-quicklook",
                                "--device", "auto", "--precision", precision], capsys)
        assert code == 0, err
        outs[precision] = shapely.union_all(pyogrio.read_dataframe(out, layer="villages").geometry.values)
        runs = pyogrio.read_dataframe(out, layer="runs")
        expected = "fp32" if precision == "auto" else precision
        assert runs["device"].iloc[0].endswith(expected), runs["device"].iloc[0]
    a, b = outs["auto"], outs["bf16"]
    assert a.area > 0 and a.intersection(b).area / a.union(b).area >= 0.95
    code, _, err = run_cli(["predict", scene, "--model", model, "--out", tmp_path / "x.gpkg", "--device", "cuda:7"],
                           capsys)
    if not torch.cuda.is_available():
        assert code == 2 and err.count("\n") == 1 and "--device cuda:7" in err and not (tmp_path / "x.gpkg").exists()


def test_encoder_latency_on_a_device_in_its_precision_is_compared_with_fp32():
    from uvsam.encoders_table import encoder_rows

    (row,) = encoder_rows(["mobile_sam"], repeats=1, device=Device("cpu", "bf16"))
    assert row["latency_s"] > 0 and row["device"] == "cpu, bf16" and "cpu_latency_s" not in row
    assert row["cosine_vs_cpu_fp32"] > 0.98
    assert np.isfinite(row["gflops"])


def test_training_places_the_model_on_its_device_and_refuses_fp16(beijing, tmp_path, capsys):
    """A short training in CPU bf16 autocast learns (the loss falls) and writes a model file whose
    tensors are all on the CPU; fp16 training (no loss scaling) and an absent GPU are refused in
    one line before any work."""
    import torch

    from uvsam.modelfile import read_model_file

    args = ["train", "--images", beijing / "train/images", "--labels", beijing / "train/masks", "--epochs", "3",
            "--steps", "8", "--warmup", "2", "--sam-epochs", "0", "--batch-size", "2", "--encoder", "mobile_sam"]
    code, _, err = run_cli([*args, "--out", tmp_path / "bf16.ckpt", "--device", "cpu", "--precision", "bf16"], capsys)
    assert code == 0, err
    payload = read_model_file(tmp_path / "bf16.ckpt")
    tensors = [v for v in payload["state"].values() if isinstance(v, torch.Tensor)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    assert all(t.dtype == torch.float32 for t in tensors if t.is_floating_point())  # autocast keeps fp32 weights
    history = payload["meta"]["history"]
    assert history[-1]["train_total"] < history[0]["train_total"]
    for extra, says in ((["--precision", "fp16"], "fp16"), (["--device", "cuda:5"], "--device cuda:5")):
        if extra[0] == "--device" and torch.cuda.is_available():
            continue
        code, _, err = run_cli([*args, "--out", tmp_path / "x.ckpt", *extra], capsys)
        assert code == 2 and err.count("\n") == 1 and says in err and not (tmp_path / "x.ckpt").exists(), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="refusing an absent GPU needs a machine without one")
def test_every_command_that_runs_a_model_refuses_an_absent_gpu_in_one_line(mobile_sam_ckpt, data_dir, tmp_path,
                                                                            capsys):
    scene = data_dir / "rasterio-rgb/RGB.byte.tif"
    commands = {
        "segment": ["segment", scene, "--encoder", "mobile_sam", "--checkpoint", mobile_sam_ckpt, "--box",
                    "10,10,100,100", "--out", tmp_path / "m.tif"],
        "evaluate": ["evaluate", "--model", tmp_path / "none.ckpt", "--images", scene, "--labels", scene],
        "encoders": ["encoders", "--only", "mobile_sam", "--repeats", "1"],
        "predict": ["predict", scene, "--model", tmp_path / "none.ckpt", "--out", tmp_path / "v.gpkg"],
    }
    for name, args in commands.items():
        code, _, err = run_cli([*args, "--device", "cuda"], capsys)
        assert code == 2 and err.count("\n") == 1 and "--device cuda" in err, (name, err)
    assert not (tmp_path / "m.tif").exists() and not (tmp_path / "v.gpkg").exists()


def test_a_local_cluster_gives_each_gpu_a_worker_of_its_own():
    """One worker process per GPU, each started seeing only its own (CUDA_VISIBLE_DEVICES), so the
    model's cuda:0 is a different GPU in every worker; checked here on the workers' environment,
    which needs no GPU. Where there are no GPUs, ``auto`` asks for none and nothing changes."""
    import os

    import torch

    from uvsam.devices import gpus_for
    from uvsam.prediction.distributed import ClusterClient, per_gpu_cluster
    from uvsam.prediction.execution import runs_in_process

    assert gpus_for("auto") == gpus_for("cuda") == list(range(torch.cuda.device_count()))
    assert gpus_for("cpu") == gpus_for("cuda:0") == []
    assert runs_in_process(None, gpus=2) is False and runs_in_process(None, gpus=1) is True
    with ClusterClient(per_gpu_cluster([0, 1], threads=1)) as client:
        cluster = client.cluster
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(seen.values()) == ["0", "1"] and len(seen) == 2
        assert all(w.startswith("tcp://127.0.0.1:") for w in seen)
    assert cluster.status.name == "closed"  # closing the client closed its cluster: no worker outlives it
