"""`uvsam demo` (issue 5): the whole pipeline offline on the synthetic city it draws, said to be synthetic."""

from __future__ import annotations

import json

import pyogrio

from tests.conftest import run_cli


def test_demo_runs_every_stage_and_says_it_is_synthetic(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, err = run_cli(["demo", "--out", out, "--local"], capsys)
    assert code == 0, err
    assert "SYNTHETIC" in err and json.loads(stdout)["synthetic"] is True
    for stage in ("[1/4]", "[2/4]", "[3/4]", "[4/4]"):
        assert stage in err
    gpkg = out / "villages.gpkg"
    assert {"villages", "candidates", "tiles", "runs", "layer_styles"} <= {n for n, _ in pyogrio.list_layers(gpkg)}
    villages = pyogrio.read_dataframe(gpkg, layer="villages")
    assert len(villages) >= 2 and villages.crs.to_epsg() == 32650 and villages.geometry.is_valid.all()
    report = json.loads((out / "demo.json").read_text())
    assert report["score"]["iou"] > 0.5  # the drawn villages are found
    assert pyogrio.read_dataframe(gpkg, layer="runs")["synthetic"].astype(str).str.lower().eq("true").all()
