"""The GeoPackage as a QGIS user meets it: opened in real QGIS (Debian's python3-qgis, headless),
every layer uvsam writes shows with the style stored in the file, in a CRS QGIS knows, and the
file opens without GDAL's version warning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import ROOT
from tests.test_change import _write_years
from uvsam.changes import LIFECYCLES, run_change
from uvsam.config import PredictConfig

PLUGINS = ROOT / "qgis_plugin"  # the plugin folder users copy or zip into QGIS
QGIS_PYTHON = "/usr/bin/python3"  # QGIS's bindings import under the system Python, not the project's venv

PROBE = textwrap.dedent('''
    import json, os, sys
    from qgis.core import QgsApplication, QgsRenderContext, QgsVectorLayer
    app = QgsApplication([], False)
    app.initQgis()
    out = {}
    for name in sys.argv[2:]:
        layer = QgsVectorLayer(f"{sys.argv[1]}|layername={name}", name, "ogr")
        r = layer.renderer()
        single = r.type() == "singleSymbol"
        ctx = QgsRenderContext()
        r.startRender(ctx, layer.fields())
        drawn = sum(r.symbolForFeature(f, ctx) is not None for f in layer.getFeatures())
        r.stopRender(ctx)
        out[name] = {"valid": layer.isValid(), "renderer": r.type(), "crs": layer.crs().authid(),
                     "colour": list(r.symbol().color().getRgb()) if single else None,
                     "categories": [c.value() for c in r.categories()] if r.type() == "categorizedSymbol" else None,
                     "labels": layer.labelsEnabled(), "features": layer.featureCount(), "drawn": drawn,
                     "types": {f.name(): f.typeName() for f in layer.fields()},
                     "widgets": {f.name(): layer.editorWidgetSetup(i).type() for i, f in enumerate(layer.fields())}}
    print(json.dumps(out), flush=True)
    os._exit(0)  # QGIS's own teardown can crash a headless process after the work is done
''')


def qgis_open(path, layers: list[str]) -> tuple[dict, str]:
    runtime = path.parent / "xdg-runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "XDG_RUNTIME_DIR": str(runtime)}
    run = subprocess.run([QGIS_PYTHON, "-c", PROBE, str(path), *layers], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1]), run.stderr


def test_predict_geopackage_opens_in_qgis_with_its_styles(beijing, model, tmp_path):
    from uvsam.prediction import run_prediction

    out = tmp_path / "villages.gpkg"
    for layer in ("villages", "y2020"):  # a second year's layers beside the first: styles for both
        run_prediction([str(beijing / "val/images.vrt")], model, out, PredictConfig(acquired="2020-07-01"),
                       layer=layer, log=lambda m: None)
    shown, err = qgis_open(out, ["villages", "candidates", "tiles", "y2020", "y2020_candidates", "y2020_tiles"])
    assert "GeoPackage" not in err and "Warning" not in err, err  # no version warning on open
    for name in ("villages", "y2020"):
        v = shown[name]
        assert v["valid"] and v["features"] > 0 and v["crs"] == "EPSG:3857"
        assert v["renderer"] == "singleSymbol" and v["colour"] == [228, 26, 28, 90] and v["labels"]
        assert v["types"]["acquired"].lower() == "date", v["types"]
    for name in ("candidates", "y2020_candidates"):
        assert shown[name]["renderer"] == "singleSymbol" and shown[name]["colour"] == [255, 127, 0, 0]
    for name in ("tiles", "y2020_tiles"):
        assert shown[name]["renderer"] == "categorizedSymbol"
        assert shown[name]["categories"] == ["done", "nodata", "gated"]  # gated: the tile gate found no village


def test_change_geopackage_opens_in_qgis_with_lifecycle_styles(villages, tmp_path):
    """Three years with every lifecycle: the changes categorised by lifecycle (the report's
    colours), the tracked villages by year and labelled, in the years' own EPSG code."""
    src = tmp_path / "years.gpkg"
    _write_years(villages, src)
    out = tmp_path / "change.gpkg"
    run_change([f"{y}={src}:villages_{y}" for y in ("2018", "2020", "2022")], out, log=lambda m: None)
    shown, err = qgis_open(out, ["changes", "villages_tracked"])
    assert "Warning" not in err and "ERROR" not in err, err
    changes, tracked = shown["changes"], shown["villages_tracked"]
    assert changes["valid"] and changes["features"] > 0 and tracked["features"] > 0
    assert changes["renderer"] == "categorizedSymbol" and changes["categories"] == list(LIFECYCLES)
    assert tracked["renderer"] == "categorizedSymbol" and tracked["categories"] == ["2018", "2020", "2022"]
    assert tracked["labels"] and changes["crs"] == tracked["crs"] == "EPSG:3857"


def test_objects_layers_open_in_qgis_with_their_style(tmp_path):
    """`uvsam everything` / `select` / `oneshot` layers: categorised by `complete` (an integer
    field), every object drawn with one of the two symbols."""
    import geopandas as gpd
    import shapely

    from uvsam.layers import write_layer

    out = tmp_path / "objects.gpkg"
    frame = gpd.GeoDataFrame({"object_id": ["a", "b"], "complete": [1, 0], "predicted_iou": [0.9, 0.8]},
                             geometry=[shapely.box(0, 0, 10, 10), shapely.box(20, 0, 30, 10)], crs="EPSG:3857")
    for layer in ("objects", "selected"):
        write_layer(out, layer, frame, {"layer": layer, "command": "everything"}, "objects")
    shown, err = qgis_open(out, ["objects", "selected"])
    assert "Warning" not in err, err
    for name in ("objects", "selected"):
        v = shown[name]
        assert v["valid"] and v["renderer"] == "categorizedSymbol" and v["categories"] == ["1", "0"]
        assert v["features"] == v["drawn"] == 2 and v["crs"] == "EPSG:3857"


def _qgis_process(args: list[str], home, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """Debian's ``qgis_process`` wrapper passes an option (--noversioncheck) its 3.22 binary refuses:
    the binary is run directly, with a throw-away QGIS profile (HOME), the plugin's folder, and
    the system's Python first on the PATH."""
    binary = "/usr/bin/qgis_process.bin" if os.path.exists("/usr/bin/qgis_process.bin") else "qgis_process"
    runtime = home / "xdg-runtime"
    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    # QGIS's embedded Python finds its home through the first python3 on the PATH: an activated
    # virtual environment (CI's) would hand it another Python's library, without QGIS's modules
    venv = os.environ.get("VIRTUAL_ENV")
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if not (venv and p.startswith(venv))]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")}
    env.update({"PATH": os.pathsep.join(["/usr/bin", *path]), "HOME": str(home), "QT_QPA_PLATFORM": "offscreen",
                "XDG_RUNTIME_DIR": str(runtime), "QGIS_PLUGINPATH": str(PLUGINS), **(env_extra or {})})
    return subprocess.run([binary, *args], capture_output=True, text=True, env=env, timeout=600)


def test_the_qgis_processing_algorithms_give_the_command_line_results(beijing, model, villages, tmp_path,
                                                                      capsys):
    """The plugin folder as a user installs it: enabled in a fresh profile, its algorithms listed,
    ``qgis_process run uvsam:predict`` on the real Beijing mosaic writes the villages the CLI
    writes (same polygons), and ``uvsam:change`` tracks three years into the styled layers."""
    import geopandas as gpd
    import pyogrio
    import shapely

    from tests.conftest import run_cli

    home = tmp_path / "home"
    enabled = _qgis_process(["plugins", "enable", "uvsam_processing"], home)
    assert enabled.returncode == 0, enabled.stderr[-2000:]
    listed = _qgis_process(["list"], home).stdout
    assert all(f"uvsam:{a}" in listed for a in ("predict", "change", "train")), listed[-2000:]
    uvsam = {"UVSAM_EXECUTABLE": str(Path(sys.executable).with_name("uvsam"))}
    scene = beijing / "val/images.vrt"
    ran = _qgis_process(["--json", "run", "uvsam:predict", f"--SCENES={scene}", f"--MODEL={model}",
                         f"--OUTPUT={tmp_path / 'qgis.gpkg'}", "--LAYER=y2019", "--ACQUIRED=2019-07-01"], home, uvsam)
    assert ran.returncode == 0, ran.stderr[-3000:]
    results = json.loads(ran.stdout)["results"]
    assert results["VILLAGES"] == f"{tmp_path / 'qgis.gpkg'}|layername=y2019"
    code, _, err = run_cli(["predict", scene, "--model", model, "--out", tmp_path / "cli.gpkg", "--layer", "y2019",
                            "--acquired", "2019-07-01", "--local"], capsys)
    assert code == 0, err
    from_qgis = pyogrio.read_dataframe(tmp_path / "qgis.gpkg", layer="y2019")
    from_cli = pyogrio.read_dataframe(tmp_path / "cli.gpkg", layer="y2019")
    assert len(from_qgis) == len(from_cli) > 0
    assert sorted(from_qgis["village_id"]) == sorted(from_cli["village_id"])
    assert shapely.equals_exact(shapely.union_all(from_qgis.geometry.values),
                                shapely.union_all(from_cli.geometry.values), tolerance=1e-6)
    assert Path(results["QUICKLOOK"]).is_file()
    # change: three years of layers of one GeoPackage, as QGIS layers
    src = tmp_path / "years.gpkg"
    _write_years(villages, src)
    years = [f"--YEARS={src}|layername=villages_{y}" for y in ("2018", "2020", "2022")]
    ran = _qgis_process(["--json", "run", "uvsam:change", *years, "--LABELS=2018,2020,2022",
                         f"--OUTPUT={tmp_path / 'change.gpkg'}"], home, uvsam)
    assert ran.returncode == 0, ran.stderr[-3000:]
    changes = gpd.read_file(tmp_path / "change.gpkg", layer="changes")
    assert set(changes["lifecycle"]) == set(LIFECYCLES)
    # a uvsam error reaches the Processing log as its own line, and the algorithm fails
    bad = _qgis_process(["run", "uvsam:predict", f"--SCENES={scene}", f"--MODEL={tmp_path / 'years.gpkg'}",
                         f"--OUTPUT={tmp_path / 'bad.gpkg'}"], home, uvsam)
    assert bad.returncode != 0 and "uvsam: error" in bad.stdout + bad.stderr


def test_an_accuracy_sample_opens_in_qgis_ready_to_label(beijing, tmp_path):
    """`uvsam sample`'s points: coloured by label (grey until labelled), numbered, and the
    reference field a drop-down of the two classes (a value map), so a label cannot be misspelt."""
    from tests.test_accuracy import _truth_and_map
    from uvsam.changes.accuracy import SampleDesign, draw_sample

    *_, map_file = _truth_and_map(beijing, tmp_path)
    draw_sample(str(map_file), tmp_path / "sample.gpkg", SampleDesign(n=120, min_per_stratum=50))
    shown, err = qgis_open(tmp_path / "sample.gpkg", ["sample"])
    s = shown["sample"]
    assert s["valid"] and s["features"] == 120 and s["renderer"] == "categorizedSymbol", s
    assert s["categories"] == ["village", "not village", ""] and s["labels"]
    assert s["widgets"]["reference"] == "ValueMap" and s["crs"] == "EPSG:3857"
