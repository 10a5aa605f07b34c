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
        assert auto.name.startswith("cuda:") and auto.precision in ("bf16", "fp16")
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
    """The same scene through fp32 (auto, this machine's CPU) and CPU bf16 autocast: the shipped
    villages agree (union IoU >= 0.95), and each run's row names where it ran."""
    scene = beijing / "val/images.vrt"
    outs = {}
    for precision in ("auto", "bf16"):
        out = tmp_path / f"{precision}.gpkg"
        code, _, err = run_cli(["predict", scene, "--model", model, "--out", out, "--local", "--no-quicklook",
                                "--device", "auto", "--precision", precision], capsys)
        assert code == 0, err
        outs[precision] = shapely.union_all(pyogrio.read_dataframe(out, layer="villages").geometry.values)
        runs = pyogrio.read_dataframe(out, layer="runs")
        expected = "fp32" if precision == "auto" and not torch.cuda.is_available() else precision
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
