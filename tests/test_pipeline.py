"""One pipeline: one reader, one preprocessing, one model contract, imports that point down the flow.

- train's, evaluate's and predict's reading and preprocessing feed the model the same pixels;
- the same image stored RGB and BGR (colour interpretation set) gives the same masks and villages;
- one prediction reads the model file once and hashes each weights file once;
- the import graph has no cycle and no upward import; the CLI's defaults are the configs'.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from rasterio.enums import ColorInterp
from rasterio.windows import Window

from tests.conftest import ROOT, run_cli
from tiles.reader import RasterSource
from uvsam.config import ChangeConfig, PredictConfig, TrainConfig

SCENE = "49566_107866"


# -- one preprocessing ----------------------------------------------------------------------------------
def test_train_evaluate_and_predict_feed_the_model_the_same_pixels(beijing, model, tmp_path):
    """A real training scene as training prepares it, as evaluation's in-memory path reads it with
    the model file's record, and as predict reads its one tile: identical, pixel for pixel."""
    from uvsam.datasets import LabelledScene, load_scene
    from uvsam.modelfile import ModelFile
    from uvsam.prediction import model_info, open_source, prepare_scene, read_tile, tile_windows
    from uvsam.training import prepare_data

    # the conftest model's training run, read again (the same settings but the output)
    cfg = TrainConfig(images=str(beijing / "train/images"), labels=str(beijing / "train/masks"),
                      out=str(tmp_path / "unused.ckpt"), encoder="efficientvit_sam_l0", views_per_scene=1)
    data = prepare_data(cfg, log=lambda m: None)
    k = next(i for i, s in enumerate(data.train) if s.path.stem == SCENE)
    trained = data.train[k]
    recorded = ModelFile.read(model)
    assert recorded.inputs == data.inputs  # the record that travels with the model is training's own
    image = beijing / "train/images" / f"{SCENE}.tif"
    evaluated = load_scene(LabelledScene(image, beijing / "train/masks" / f"{SCENE}.tif"), recorded.inputs)
    info = model_info(model)
    scene, prep = prepare_scene(image, info, PredictConfig())
    windows = [w for _, w in tile_windows(scene)]
    side = max(prep.width, prep.height)
    assert windows == [(0, 0, side, side)]  # a scene smaller than a tile is one square tile of its longer side
    predicted, valid = read_tile(prep, info, Window(*windows[0]), open_source(prep))
    h, w = prep.height, prep.width
    assert trained.image.shape == (3, h, w) and valid[:h, :w].mean() > 0.98 and not valid[h:, w:].any()
    assert prep.preprocessing.mode == "histogram" and trained.preprocessing == prep.preprocessing
    np.testing.assert_array_equal(trained.image, evaluated.image)
    np.testing.assert_array_equal(trained.image, predicted[:, :h, :w])  # beyond the scene: its mirror image
    assert float(trained.image.std()) > 10  # a real image, not a constant


def test_invalid_pixels_reach_every_path_as_the_training_median(beijing, model, tmp_path):
    """Nodata inside a scene is filled with the training imagery's median colour by training's,
    evaluation's and predict's reading alike (training used to fill 0, predict the median)."""
    from uvsam.datasets import LabelledScene, load_scene
    from uvsam.modelfile import ModelFile
    from uvsam.prediction import model_info, open_source, prepare_scene, read_tile

    src_path = beijing / "train/images" / f"{SCENE}.tif"
    with rasterio.open(src_path) as ds:
        data, profile = ds.read(), ds.profile
    data[:, :300, :400] = 0
    path = tmp_path / "holed.tif"
    with rasterio.open(path, "w", **{**profile, "nodata": 0}) as dst:
        dst.write(data)
    recorded = ModelFile.read(model)
    scene = load_scene(LabelledScene(path, beijing / "train/masks" / f"{SCENE}.tif"), recorded.inputs)
    info = model_info(model)
    _, prep = prepare_scene(path, info, PredictConfig())
    img, valid = read_tile(prep, info, Window(0, 0, prep.width, prep.height), open_source(prep))
    assert img.shape == scene.image.shape
    assert 0.05 < 1 - valid.mean() < 0.2
    np.testing.assert_array_equal(scene.image, img)
    np.testing.assert_allclose(img[:, ~valid].mean(axis=1), recorded.inputs.fill, atol=1e-4)


# -- one reader -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rgb_and_bgr(beijing, tmp_path_factory) -> tuple[Path, Path]:
    """A real tile as stored (red, green, blue) and the same pixels stored blue, green, red with
    the colour interpretation saying so."""
    rgb = beijing / "train/images" / f"{SCENE}.tif"
    bgr = tmp_path_factory.mktemp("bgr") / f"{SCENE}.tif"
    with rasterio.open(rgb) as ds:
        data, profile = ds.read(), ds.profile
        assert tuple(ds.colorinterp[:3]) == (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
    with rasterio.open(bgr, "w", **{**profile, "photometric": "MINISBLACK"}) as dst:
        dst.write(data[::-1])
        dst.colorinterp = [ColorInterp.blue, ColorInterp.green, ColorInterp.red]
    with RasterSource(bgr) as src:
        assert src.bands == (3, 2, 1)  # the reader picks red, green, blue by colour interpretation
    return rgb, bgr


def test_segment_reads_bgr_as_rgb(rgb_and_bgr, mobile_sam_ckpt, tmp_path, capsys):
    masks = []
    for path in rgb_and_bgr:
        out = tmp_path / f"{path.parent.name}.mask.tif"
        code, _, err = run_cli(["segment", path, "--encoder", "mobile_sam", "--checkpoint", mobile_sam_ckpt,
                                "--out", out, "--box", "200,200,700,650", "--point", "450,420"], capsys)
        assert code == 0, err
        with rasterio.open(out) as ds:
            masks.append(ds.read(1))
    assert masks[0].any()
    np.testing.assert_array_equal(masks[0], masks[1])


def test_predict_reads_bgr_as_rgb(rgb_and_bgr, model, tmp_path):
    import geopandas as gpd

    from uvsam.prediction import run_prediction

    layers = []
    for i, path in enumerate(rgb_and_bgr):
        out = tmp_path / f"v{i}.gpkg"
        run_prediction([str(path)], model, out, PredictConfig(), log=lambda m: None)
        layers.append(gpd.read_file(out, layer="villages"))
    assert len(layers[0]) > 0
    assert len(layers[0]) == len(layers[1])
    assert all(shapely.equals_exact(a, b, 1e-9) for a, b in zip(layers[0].geometry, layers[1].geometry, strict=True))


def test_coregistration_and_report_thumbnails_read_through_the_one_reader(rgb_and_bgr):
    """Co-registration compares the BGR copy with the RGB original as the same image (no shift,
    a perfect peak): it reads bands by colour interpretation, as predict does."""
    from uvsam.coregister import estimate_shift

    shift = estimate_shift(*rgb_and_bgr, "EPSG:3857", max_px=256)
    assert shift is not None and shift.metres < 0.05 and shift.peak > 0.99


# -- one model contract ---------------------------------------------------------------------------------
def test_one_prediction_reads_the_model_once_and_hashes_each_weights_file_once(beijing, mobile_sam_ckpt,
                                                                                tmp_path, monkeypatch):
    import uvsam.files
    import uvsam.modelfile
    import uvsam.prediction.model
    from uvsam.prediction import run_prediction
    from uvsam.training import train

    model = tmp_path / "m.ckpt"
    train(TrainConfig(images=str(beijing / "train/images"), labels=str(beijing / "train/masks"), out=str(model),
                      encoder="mobile_sam", checkpoint=str(mobile_sam_ckpt), epochs=1, steps_per_epoch=1,
                      sam_epochs=0, crop=64, batch_size=2, warmup_steps=1), log=lambda m: None)
    for cache in (uvsam.modelfile._READ, uvsam.files._DIGESTS, uvsam.prediction.model._MODELS):
        cache.clear()  # as in a new process
    reads, hashes = [], []
    load, hash_file = uvsam.modelfile._load_payload, uvsam.files.hash_file
    monkeypatch.setattr(uvsam.modelfile, "_load_payload", lambda p: reads.append(Path(p)) or load(p))
    monkeypatch.setattr(uvsam.files, "hash_file", lambda p, *a: hashes.append(Path(p)) or hash_file(p, *a))
    summary = run_prediction([str(beijing / "train/images" / f"{SCENE}.tif")], model, tmp_path / "v.gpkg",
                             PredictConfig(), checkpoint=mobile_sam_ckpt, log=lambda m: None)
    assert summary["scenes"] == 1
    assert reads == [model]  # loaded once (memory-mapped)
    # each weights file hashed once: the model file, and the generalist's 40 MB (2.5 GB for ViT-H)
    weights = [h for h in hashes if h.suffix in (".ckpt", ".pt")]
    assert sorted(weights) == sorted([model, mobile_sam_ckpt])
    assert sorted(h.name for h in hashes if h not in weights) == ["v.gpkg", "v.png"]  # the STAC Item's checksums
    record = uvsam.modelfile.ModelFile.read(model)
    assert record.generalist["source"] == "file" and record.inferred == ()


def test_an_older_model_file_loads_and_says_what_was_inferred(model, tmp_path):
    """A model file written before the GSD lived only in the config, and without the fields
    recorded since (bands, normalisation, harmonisation, training resolution), still loads."""
    import torch

    from uvsam.modelfile import ModelFile, load_model

    payload = torch.load(model, weights_only=True)
    gsd = payload["config"].pop("gsd_m")
    for name in ("bands", "normalisation", "harmonise", "source_gsd_m"):
        payload["meta"].pop(name, None)
    payload["meta"]["gsd_m"] = gsd
    old = tmp_path / "old.ckpt"
    torch.save(payload, old)
    record = ModelFile.read(old)
    assert record.gsd_m == gsd
    assert set(record.inferred) == {"gsd_m", "bands", "normalisation", "harmonise", "source_gsd_m"}
    net, _ = load_model(old)
    assert net.config.gsd_m == gsd


# -- imports point down the flow ------------------------------------------------------------------------
# The flow, bottom up: each module may import modules of its own or a lower rank (never of a higher
# one), the graph has no cycle, and commands (rank 100 and up) import no command of their own rank.
RANKS = {
    0: ["uvsam", "uvsam.errors", "uvsam.labels", "uvsam.config", "uvsam.files", "uvsam.progress", "tiles.errors",
        "uvsam.polygons", "uvsam.stac"],
    1: ["uvsam.modeling", "uvsam.modeling.*"],
    2: ["uvsam.devices", "uvsam.checkpoint", "uvsam.weights", "uvsam.generalist", "uvsam.embedding_cache",
        "uvsam.quantize", "uvsam.encoders_table", "uvsam.predictor", "uvsam.compiled"],
    10: ["tiles.remote", "tiles.reader", "tiles.radiometry", "tiles.grid", "tiles.vrt", "tiles.xyz", "uvsam.raster",
         "uvsam.folds", "uvsam.suitability", "uvsam.stac.scenes", "tiles.service"],  # raster
    15: ["uvsam.pictures"],  # what is drawn of rasters and polygons (quicklook, overlay, curves)
    20: ["uvsam.harmonise", "uvsam.preprocess"],  # harmonise
    25: ["uvsam.modelfile"],  # the train -> predict contract (records the preprocessing)
    26: ["uvsam.gatefile"],  # the tile gate's file, made for one model's inputs
    30: ["tiles.plan", "tiles.stitch", "tiles.dataset", "tiles", "uvsam.datasets", "uvsam.augment", "uvsam.losses",
         "uvsam.metrics"],  # tiles
    40: ["uvsam.prediction.model", "uvsam.prediction.execution", "uvsam.prediction.journal", "uvsam.prediction.scene",
         "uvsam.prediction.distributed", "uvsam.prediction.specialist", "uvsam.prediction.sources"],  # specialist
    50: ["uvsam.prediction.candidates"],  # prompts
    60: ["uvsam.prediction.refine", "uvsam.inference", "uvsam.distill_losses", "uvsam.everything"],  # generalist
    70: ["uvsam.prediction.assemble", "uvsam.prediction.pipeline",
         "uvsam.prediction.probabilities"],  # masks -> polygons
    80: ["uvsam.layers", "uvsam.stac.items", "uvsam.prediction.run", "uvsam.prediction"],  # layers
    90: ["uvsam.changes.sources", "uvsam.changes.track", "uvsam.changes.summaries", "uvsam.coregister",
         "uvsam.consistency", "uvsam.changes.imagery", "uvsam.changes.outputs", "uvsam.changes.accuracy",
         "uvsam.changes.propagate"],  # change (propagate: SAM-PT's check of the events)
    95: ["uvsam.changes.report", "uvsam.changes.run", "uvsam.changes"],  # report
    100: ["uvsam.training", "uvsam.evaluation", "uvsam.segment", "uvsam.gate", "uvsam.prompt_bench",
          "uvsam.objects", "uvsam.selection"],  # commands
    110: ["uvsam.crossval", "uvsam.workflow", "uvsam.demo", "uvsam.ablations",
          "uvsam.distill", "uvsam.oneshot"],  # commands made of commands (distill: training's schedule; oneshot:
    # PerSAM in everything mode's tiling)
    120: ["uvsam.cli", "uvsam.api"],  # the two doors: the command line and the flat Python API
    130: ["uvsam.__main__"],
}
# The CLI imports a command's modules when that command runs (``--help`` starts in half a second);
# ``tiles`` imports its torch Dataset on first use (the tiling engine works without torch).
# ``uvsam`` itself opens its API door (``uvsam.predict``) lazily: that edge is not part of the flow.
# ``uvsam.__main__`` handles signals before it loads the CLI (a Ctrl-C then is one line too).
LAZY_OK = {"uvsam.cli", "tiles", "uvsam.__main__"}
API_DOOR = ("uvsam", "uvsam.api")


def _modules() -> dict[str, Path]:
    out = {}
    for p in list((ROOT / "uvsam").rglob("*.py")) + list((ROOT / "tiles").rglob("*.py")):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _imports(path: Path, known: dict) -> list[tuple[str, bool]]:
    """(module imported, at module level?) for every project import of a file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        out += [(n, id(node) in top) for n in names if n in known]
    return out


def _rank(name: str) -> int:
    for rank, names in RANKS.items():
        for pattern in names:
            if name == pattern or (pattern.endswith(".*") and name.startswith(pattern[:-1])):
                return rank
    raise AssertionError(f"{name} has no place in the flow: add it to RANKS")


def test_imports_point_down_the_flow_without_cycles():
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    problems = []
    for name, path in modules.items():
        for target, at_top in _imports(path, modules):
            if target == name or name.startswith(target + ".") or (name, target) == API_DOOR:
                continue  # a package's own __init__; the package's lazy API door
            graph[name].add(target)
            if not at_top and name not in LAZY_OK:
                problems.append(f"{name} hides its import of {target} in a function")
            if _rank(target) > _rank(name) or (_rank(name) >= 100 and _rank(target) == _rank(name)):
                problems.append(f"{name} (rank {_rank(name)}) imports {target} (rank {_rank(target)})")
            if name.startswith("uvsam.modeling") and not target.startswith("uvsam.modeling") \
                    and target != "uvsam.errors":
                problems.append(f"{name} imports {target} from outside modeling/")
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                problems.append("cycle: " + " -> ".join(stack[stack.index(nxt):] + [node, nxt]))
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not problems, "\n".join(problems)


# -- one source of defaults -----------------------------------------------------------------------------
def test_cli_defaults_are_the_configs_and_every_predict_setting_has_a_flag():
    import typer

    from uvsam.cli import FLAGS, app, flag_for

    commands = {c.name: c for c in typer.main.get_command(app).commands.values()}
    checked = 0
    for command, config in (("train", TrainConfig), ("predict", PredictConfig), ("change", ChangeConfig)):
        options = {o: p for p in commands[command].params for o in p.opts}
        for f in fields(config):
            flag = flag_for(command, f.name)
            if flag not in options or f.default is MISSING:
                continue
            param = options[flag]
            want = ",".join(map(str, f.default)) if f.name == "scale" else f.default
            want = str(want) if f.name == "gsd_m" else want
            got = None if param.default == [] else param.default  # a repeatable option: none given is None
            assert got == want, (command, flag, param.default, f.default)
            checked += 1
    assert checked >= 42
    predict_flags = {o for p in commands["predict"].params for o in p.opts}
    missing = [f.name for f in fields(PredictConfig) if flag_for("predict", f.name) not in predict_flags]
    assert not missing, f"PredictConfig fields without a predict flag: {missing}"
    assert FLAGS["change"]["crs"] == "--analysis-crs"

    env = {**os.environ, "COLUMNS": "300", "TERM": "dumb", "NO_COLOR": "1"}
    out = subprocess.run([sys.executable, "-m", "uvsam", "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "predict" in out.stdout and "change" in out.stdout
    text = subprocess.run([sys.executable, "-m", "uvsam", "predict", "--help"], capture_output=True, text=True,
                          env=env).stdout
    for name in ("tile", "overlap", "window", "threshold", "min_area_m2", "block"):  # batch_size: None, by device
        shown = re.search(re.escape(flag_for("predict", name)) + r"\s.*?\[default: ([^\]]+)\]", text)
        assert shown and float(shown.group(1)) == float(getattr(PredictConfig, name)), name


def test_workflow_schema_is_predicts_config():
    from uvsam.workflow import PredictOptions

    settable = set(PredictOptions.model_fields)
    assert settable == {f.name for f in fields(PredictConfig)} - {"acquired"}
    assert all(PredictOptions.model_fields[f.name].default == f.default for f in fields(PredictConfig)
               if f.name in settable)


def test_config_errors_name_the_flag_the_user_typed(tmp_path, capsys):
    code, _, err = run_cli(["change", f"2018={tmp_path}/a.gpkg", f"2020={tmp_path}/b.gpkg", "--out",
                            tmp_path / "c.gpkg", "--analysis-crs", "EPSG:4326"], capsys)
    assert code == 2 and err.strip() == ("uvsam: error: --analysis-crs 'EPSG:4326' is geographic: areas need a "
                                         "projected CRS")
    code, _, err = run_cli(["train", "--images", tmp_path, "--labels", tmp_path, "--out", tmp_path / "m.ckpt",
                            "--steps", "0"], capsys)
    assert code == 2 and err.strip() == "uvsam: error: --steps must be at least 1"
    code, _, err = run_cli(["predict", tmp_path, "--model", tmp_path / "m.ckpt", "--out", tmp_path / "v.gpkg",
                            "--refine-min-iou", "1.5"], capsys)
    assert code == 2 and err.strip() == "uvsam: error: --refine-min-iou must be in [0, 1], got 1.5"


def test_the_configs_name_what_the_specialist_implements():
    from uvsam.config import SPECIALIST_INPUTS
    from uvsam.modeling.specialist import INPUTS

    assert SPECIALIST_INPUTS == INPUTS


# -- evaluation's measures ------------------------------------------------------------------------------
def test_boundary_distance_and_object_precision_recall():
    """A labelled square and a prediction of it shifted 2 px (3 m pixels) down, plus a false
    village: outlines 6 m apart at most, one of two predicted villages right, the one true found."""
    from uvsam.metrics import SegmentationCounts

    labels = np.zeros((100, 100), np.uint8)
    labels[10:50, 10:50] = 1
    pred = np.zeros((100, 100), bool)
    pred[12:52, 10:50] = True
    pred[70:80, 70:80] = True  # a village that is not one
    counts = SegmentationCounts()
    counts.update(pred, labels, pixel_m=(3.0, 3.0))
    s = counts.summary()
    assert s["object_precision"] == 0.5 and s["object_recall"] == 1.0 and abs(s["object_f1"] - 2 / 3) < 1e-9
    # the square's outlines: 0 m where the sides coincide, 6 m across the shifted top and bottom; the false
    # village's outline lies 20 px and more from any true one
    assert 0 < s["boundary_mean_m"] < 25 and s["boundary_p95_m"] >= 60
    square = SegmentationCounts()
    square.update(pred & (np.arange(100)[:, None] < 60), labels, pixel_m=(3.0, 3.0))
    assert square.summary()["boundary_p95_m"] == 6.0 and square.summary()["boundary_mean_m"] < 6.0
    assert SegmentationCounts().summary()["boundary_mean_m"] is None  # nothing measured: no figure
