"""Workflows (issue 5): the example files in workflows/ run as written, and bad files are
refused before anything runs, with every problem named in one line."""

from __future__ import annotations

import shutil

import pyogrio
import pytest

from tests.conftest import ROOT, run_cli

EXAMPLES = ROOT / "workflows"


def _stage(example: str, tmp_path, model, imagery: dict) -> tuple:
    """The example copied into a project folder laid out as its paths expect."""
    wf = tmp_path / example
    shutil.copy(EXAMPLES / example, wf)
    (tmp_path / "models").mkdir()
    (tmp_path / "models/villages.ckpt").symlink_to(model)  # out/ is created by the run
    for rel, target in imagery.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).symlink_to(target)
    return wf


def test_single_city_example_runs(beijing, model, tmp_path, capsys):
    wf = _stage("single_city.yaml", tmp_path, model, {"imagery/beijing_2020.vrt": beijing / "val/images.vrt"})
    code, out, err = run_cli(["run", wf, "--dry-run"], capsys)
    assert code == 0, err
    assert '"layer": "villages_2020"' in out and not (tmp_path / "out/beijing.gpkg").exists()
    code, out, err = run_cli(["run", wf, "--local"], capsys)
    assert code == 0, err
    gpkg = tmp_path / "out/beijing.gpkg"
    assert {"villages_2020", "villages_2020_candidates", "runs"} <= {n for n, _ in pyogrio.list_layers(gpkg)}
    runs = pyogrio.read_dataframe(gpkg, layer="runs")
    assert runs["workflow"][0] == "beijing-2020" and "villages_2020" in runs["workflow_yaml"][0]
    v = pyogrio.read_dataframe(gpkg, layer="villages_2020")
    assert (v["acquired"] == "2020-07-01").all()


def test_several_years_example_writes_one_layer_per_year(beijing, model, tmp_path, capsys):
    imagery = {f"imagery/{year}": beijing / "val/images" for year in (2018, 2020, 2022)}
    wf = _stage("several_years.yaml", tmp_path, model, imagery)
    text = wf.read_text().replace("refine: true", "refine: false")  # the years, not the generalist, under test
    wf.write_text(text)
    code, out, err = run_cli(["run", wf, "--local"], capsys)
    assert code == 0, err
    gpkg = tmp_path / "out/beijing_years.gpkg"
    layers = {n for n, _ in pyogrio.list_layers(gpkg)}
    assert {"villages_2018", "villages_2020", "villages_2022"} <= layers
    runs = pyogrio.read_dataframe(gpkg, layer="runs")
    assert list(runs["layer"]) == ["villages_2018", "villages_2020", "villages_2022"]
    scenes = set(pyogrio.read_dataframe(gpkg, layer="villages_2018")["scene"])
    assert len(scenes) == 2 and all(s.endswith(".tif") for s in scenes)  # the glob found both GeoTIFFs


@pytest.mark.parametrize("body,expected", [
    ("name: x\nmodel: m.ckpt\nout: o.gpkg\n", ["years: Field required"]),
    ("name: x\nmodel: m.ckpt\nout: o.gpkg\nyears:\n  - layer: runs\n    scenes: [a.tif]\n",
     ["years.0.layer", "reserved"]),
    ("name: x\nmodel: m.ckpt\nout: o.gpkg\ntile: 5\nyears:\n  - layer: y\n    scenes: []\n",
     ["tile: Extra inputs are not permitted", "years.0: give scenes, a stac source, or both"]),
    ("name: x\nmodel: m.ckpt\nout: o.gpkg\npredict: {tile: 256, overlap: 300}\nyears:\n  - layer: y\n"
     "    scenes: [a.tif]\n", ["predict: overlap must be in [0, tile 256), got 300"]),
    ("name: x\nmodel: m.ckpt\nout: o.gpkg\nyears:\n  - layer: y\n    acquired: July\n    scenes: [a.tif]\n",
     ["acquired must be a date"]),
    ("name: x\nmodel: m.ckpt\nout: o.gpkg\nyears:\n  - layer: a\n    scenes: [a.tif]\n  - layer: a\n"
     "    scenes: [b.tif]\n", ["layer(s) a named by more than one year"]),
    ("name: [unclosed\n", ["not valid YAML at line"]),
    ("name: x\nmodel: missing.ckpt\nout: o.gpkg\nyears:\n  - layer: y\n    scenes: [a.tif]\n",
     ["model:", "missing.ckpt does not exist"]),
])
def test_bad_workflows_are_refused_in_one_line(tmp_path, capsys, body, expected):
    (tmp_path / "m.ckpt").write_bytes(b"x")
    wf = tmp_path / "bad.yaml"
    wf.write_text(body)
    code, out, err = run_cli(["run", wf], capsys)
    assert code == 2 and err.count("\n") == 1 and "bad.yaml" in err and "Traceback" not in err
    for text in expected:
        assert text in err, err
    assert not (tmp_path / "o.gpkg").exists()


def test_workflow_scenes_that_do_not_exist_stop_before_any_year_runs(model, tmp_path, capsys):
    wf = tmp_path / "w.yaml"
    wf.write_text(f"name: x\nmodel: {model}\nout: o.gpkg\nyears:\n  - layer: y1\n    scenes: [{model}]\n"
                  "  - layer: y2\n    scenes: [nowhere/*.tif]\n")
    code, out, err = run_cli(["run", wf, "--local"], capsys)
    assert code == 2 and "nowhere" in err and err.count("\n") == 1
    assert not (tmp_path / "o.gpkg").exists()
