"""``uvsam predict``: scenes -> village layers (and the dry run that estimates one)."""

from __future__ import annotations

import hashlib
import json
import resource
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import torch
from rasterio.windows import Window

from tiles.errors import TilesError
from tiles.remote import location
from uvsam import __version__
from uvsam.compiled import AUTO_MIN_PIXELS, COMPILED_PRECISIONS, Shapes
from uvsam.config import FORMATS, PredictConfig
from uvsam.devices import Device
from uvsam.errors import ConfigError, UvsamError
from uvsam.files import OutputLock, check_writable, remove_work_folder, work_folder
from uvsam.layers import check_crs, check_format, date_column, write_layers
from uvsam.modeling.uvsam import UVSAM
from uvsam.pictures import quicklook as draw_quicklook
from uvsam.polygons import measure as measure_polygons
from uvsam.prediction.assemble import village_id
from uvsam.prediction.execution import Runner, run_local
from uvsam.prediction.journal import scene_identity
from uvsam.prediction.model import CompilePlan, ModelInfo, compile_builds, gate_info, get_model, model_info, refines
from uvsam.prediction.pipeline import predict_scene
from uvsam.prediction.probabilities import scene_output, write_probabilities
from uvsam.prediction.scene import (
    find_scenes,
    harmonisation_record,
    open_source,
    prepare_scene,
    read_tile,
    scene_row,
)
from uvsam.prediction.specialist import specialist_batch, tile_windows
from uvsam.progress import Progress, stage
from uvsam.quantize import int8_check, quantize_encoder_static
from uvsam.stac.items import build_item, item_path, write_item
from uvsam.stac.scenes import StacScene


def run_prediction(scenes: list[str | StacScene], model: str | Path, out: str | Path,
                   cfg: PredictConfig = PredictConfig(), layer: str = "villages", fmt: str | None = None,
                   crs: str | None = None,
                   checkpoint: str | Path | None = None, runner: Runner = run_local, log=print,
                   run_extra: dict | None = None, prepared: list[tuple] | None = None,
                   probabilities: str | Path | None = None, quicklook: bool = True) -> dict:
    """Predict every scene and write the layers; returns a summary.

    Resumable: finished tasks are journaled beside the output (``OUT.work/LAYER/journal``), so the
    same command run again after an interruption skips them and writes the same layers. The
    run id is derived from the inputs, model and configuration, so it too is the same.
    ``run_extra`` adds columns to the ``runs`` table (a workflow stores its name and text);
    ``prepared``: :func:`prepare_scene` of each scene found, when the caller has it already;
    ``probabilities``: a GeoTIFF to write the village probabilities to, on the exact grid of the
    model's GSD (:mod:`.probabilities`; one file per scene beside it when there are several);
    ``quicklook``: a PNG of the scenes with the villages outlined beside the output
    (:func:`quicklook_path`). A scene may be a :class:`~uvsam.stac.scenes.StacScene`: its
    villages are then ``acquired`` on the item's date (``cfg.acquired`` dates the others), and
    the runs table names its item.
    """
    out = check_writable(out)
    fmt = check_format(fmt, layer, out)  # given, else the extension's
    crs = check_crs(crs)
    # one run at a time writes a layer of a file (a second is refused at once, before any work);
    # runs of other layers of the same file go ahead and take turns to write (write_layers)
    with OutputLock(out, f"{layer}.run", wait=False, what=f"layer {layer!r} is being written"):
        return _run_prediction(scenes, model, out, cfg, layer, fmt, crs, checkpoint, runner, log, run_extra,
                               prepared, probabilities, quicklook)


def _run_prediction(scenes, model, out: Path, cfg: PredictConfig, layer: str, fmt: str, crs, checkpoint,
                    runner: Runner, log, run_extra, prepared, probabilities, quicklook) -> dict:
    if probabilities is not None:
        probabilities = check_writable(probabilities)
        if probabilities.suffix.lower() not in (".tif", ".tiff"):
            raise ConfigError("must name a GeoTIFF (.tif)", probabilities, field="probabilities")
    info = model_info(model, checkpoint, cfg.device, cfg.precision)
    if cfg.gate:  # checked against the model before any work
        info = replace(info, gate=gate_info(cfg.gate, model))
    paths = find_scenes(scenes, info.gsd_m)
    from_stac = {str(location(s.href)): s for s in scenes if isinstance(s, StacScene)}
    dates = {str(p): from_stac[str(p)].acquired if str(p) in from_stac else cfg.acquired for p in paths}
    names = scene_names(paths, {k: s.item_id for k, s in from_stac.items()})
    versions = [scene_identity(p) for p in paths]  # a remote scene's version asked for once, here
    identity = versions + [info.sha256, cfg.identity(), layer,
                           *([info.gate.sha256] if info.gate else [])]
    run_id = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:12]
    if prepared is None:  # every scene opened and checked before any work (a workflow did it for all years)
        prepared = [prepare_scene(p, info, cfg, v) for p, v in zip(paths, versions, strict=True)]
    if cfg.refine and not refines(cfg, info):
        log(f"note: {info.generalist_note}: villages keep the specialist's outlines (not refined); "
            "bring the official weights, or give --force-refine to refine anyway")
    int8_note = None
    if cfg.int8:
        if info.device != Device():
            raise ConfigError(f"is the CPU's fp32 path, the run is on {info.device.describe()}: give --device cpu "
                              "--precision fp32", field="int8")
        if runner is not run_local:
            raise ConfigError("is measured and kept in this process: give --local", field="int8")
        if refines(cfg, info):
            info = replace(info, int8=True)
            int8_note = install_int8(info, prepared, log)
        else:
            int8_note = "not used: the generalist does not run (refinement off)"
            log(f"note: --int8 {int8_note}")
    info, compile_note = plan_compiled(info, cfg, prepared, runner is run_local, log)
    for _, prep in prepared:
        for line in (prep.suitability or {}).get("warnings", []):
            log(f"warning: {names.get(prep.path, prep.path)}: {line}")
        if (prep.suitability or {}).get("problems"):
            log(f"warning: {names.get(prep.path, prep.path)}: run with --force despite: "
                + "; ".join(prep.suitability["problems"]))
    workdir = work_folder(out, layer)
    workdir.mkdir(parents=True, exist_ok=True)
    frames, cands, tiles = [], [], []
    out_crs = crs
    with tiles_progress([scene_row(scene, info) for scene, _ in prepared]) as bar:
        for path, prep in zip(paths, prepared, strict=True):
            name = names[str(path)]
            res = predict_scene(path, info, cfg, workdir, runner, progress=bar_callback(bar), prepared=prep,
                                name=name, log=log)
            if probabilities is not None:
                with stage("write"):
                    write_probabilities(res.mosaic, scene_output(probabilities, name, len(paths)), info.gsd_m)
            out_crs = out_crs or res.crs
            frames.append(village_frame(name, res, dates[str(path)], info, run_id).to_crs(out_crs))
            cands.append(gpd.GeoDataFrame({"scene": [name] * len(res.candidates)}, geometry=res.candidates,
                                          crs=res.crs).to_crs(out_crs) if res.candidates else None)
            t = gpd.GeoDataFrame(res.tiles, geometry="geometry", crs=res.crs) if res.tiles else None
            if t is not None:
                t["scene"] = name
                tiles.append(t.to_crs(out_crs))
            gated = sum(r["status"] == "gated" for r in res.tiles)
            log(f"{name}: {len(res.villages)} villages ({sum(res.refined)} refined), "
                f"{len(res.candidates)} candidates, {sum(r['status'] == 'done' for r in res.tiles)} tiles"
                + (f", {gated} rejected by the gate" if info.gate else ""))
    if frames:
        villages = gpd.GeoDataFrame(pd_concat(frames), geometry="geometry", crs=out_crs)
    else:  # no village anywhere: an empty layer with the full schema
        villages = gpd.GeoDataFrame({c: date_column(None, 0) if c == "acquired" else pd.Series(dtype=object)
                                     for c in VILLAGE_COLUMNS}, geometry=gpd.GeoSeries([], crs=out_crs))
    run = {"run_id": run_id, "layer": layer, "scenes": json.dumps([str(p) for p in paths]),
           "config": json.dumps(cfg.to_dict()), "model": str(model), "model_sha256": info.sha256,
           "model_gsd_m": info.gsd_m, "generalist": info.generalist_note, "device": info.device.describe(),
           "gate": json.dumps(asdict(info.gate) if info.gate else None),
           "refinement": "on" if refines(cfg, info) else ("off" if not cfg.refine else "off: generalist not verified"),
           "int8": int8_note, "compiled": compile_note,
           "normalisation": info.inputs.normalisation, "harmonise": info.inputs.harmonise,
           "harmonisation": json.dumps([harmonisation_record(prep) for _, prep in prepared]),
           "suitability": json.dumps([prep.suitability for _, prep in prepared]),
           "acquired": json.dumps(dates),
           "stac_items": json.dumps([asdict(s) for s in from_stac.values()]),
           "uvsam_version": __version__, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           **(run_extra or {})}
    empty = gpd.GeoDataFrame({"scene": []}, geometry=[], crs=out_crs)
    candidates = pd_concat([c for c in cands if c is not None]) if any(c is not None for c in cands) else empty
    with stage("write"):
        write_layers(out, fmt, layer, villages, candidates, pd_concat(tiles) if tiles else empty, run)
    picture = None
    if quicklook:
        area = float(villages["area_m2"].sum()) / 1e6 if len(villages) else 0.0
        try:
            with stage("write"):
                picture = draw_quicklook(
                    quicklook_path(out, layer), paths, villages, candidates, bands=info.inputs.bands,
                    title=f"{layer}: {len(villages)} villages, {area:.2f} km² ({len(paths)} scene"
                          f"{'s' if len(paths) != 1 else ''})",
                    subtitle=f"acquired {acquired_text(dates.values())} - model {Path(model).name} "
                             f"({info.sha256[:12]}) - refinement {run['refinement']} - uvsam {__version__}").path
        except (UvsamError, TilesError, OSError) as e:  # the layers are written: a picture is no reason to fail
            log(f"warning: the quicklook was not drawn ({e})")
    with stage("write"):  # the STAC Item describing what was written (the layers, COGs, quicklook)
        grids = [(prep.crs, prep.transform, prep.width, prep.height) for _, prep in prepared]
        written = ([scene_output(probabilities, names[str(p)], len(paths)) for p in paths]
                   if probabilities is not None else [])
        item = build_item(out, FORMATS[fmt], layer, run, grids,
                          [dates[str(p)] for p in paths], "EPSG:4326" if fmt == "geojson" else out_crs, written,
                          picture, list(from_stac.values()), info.gsd_m)
        stac_item = write_item(item, item_path(out, layer))
    remove_work_folder(workdir)  # the layers are written: the journal and mosaics have served their purpose
    return {"out": str(out), "layer": layer, "scenes": len(paths), "villages": len(villages), "run_id": run_id,
            "quicklook": str(picture) if picture else None, "stac_item": str(stac_item),
            "device": info.device.describe(), "compiled": compile_note}


def dry_run(scenes: list[str], model: str | Path, cfg: PredictConfig = PredictConfig(),
            checkpoint: str | Path | None = None, prepared: list[tuple] | None = None) -> dict:
    """What a prediction would do: tiles and km2 per scene, and time and memory estimated from
    one specialist batch and one refinement window measured on this machine. ``prepared``:
    :func:`prepare_scene` of each scene found, when the caller has it already."""
    t = time.perf_counter()
    info = model_info(model, checkpoint, cfg.device, cfg.precision)
    if prepared is None:
        prepared = [prepare_scene(p, info, cfg) for p in find_scenes(scenes, info.gsd_m)]
    fixed = time.perf_counter() - t  # what the run spends too before its first tile: model, scene checks
    rows = [scene_row(scene, info) for scene, _ in prepared]
    scene, prep = prepared[0]
    # one tile twice: the first call warms the model up, the second is the steady-state cost (the
    # estimate costs two tiles, not a batch; the generalist only when refinement will run)
    window = [w for _, w in tile_windows(scene)][:1]
    specialist_batch(prep, info, window)
    t = time.perf_counter()
    specialist_batch(prep, info, window)
    info.device.synchronize()
    per_tile = time.perf_counter() - t
    per_window = 0.0
    if refines(cfg, info):
        model_ = get_model(info)
        box = [np.array([[8, 8, cfg.window - 8, cfg.window - 8]], np.float32)]
        image = torch.zeros(1, 3, cfg.window, cfg.window, device=info.device.torch)
        with torch.inference_mode(), info.device.autocast():
            model_.refine(image, box, cfg.cascade)
            info.device.synchronize()
            t = time.perf_counter()
            model_.refine(image, box, cfg.cascade)
            info.device.synchronize()
        per_window = time.perf_counter() - t
    tiles_total = sum(r["tiles"] for r in rows)
    widest = max(r["width"] for r in rows)
    stitch_mb = 2 * cfg.tile * widest * 8 / 1e6
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"scenes": rows, "tiles": tiles_total, "km2": round(sum(r["km2"] for r in rows), 3),
            "specialist_s_per_tile": round(per_tile, 3), "generalist_s_per_window": round(per_window, 3),
            "preparation_s": round(fixed, 2),
            "estimated_s": round(fixed + tiles_total * (per_tile + per_window), 1),
            "estimate_note": ("assumes one refinement window per tile; the real count follows the candidates"
                              if per_window else "refinement off: the specialist's tiles only"),
            "estimated_peak_rss_mb": round(rss_mb + stitch_mb, 1)}


VILLAGE_COLUMNS = ["village_id", "area_m2", "perimeter_m", "mean_prob", "refined", "refine_reason", "predicted_iou",
                   "scene", "acquired", "model_sha256", "run_id"]


def village_frame(name: str, res, acquired: str | None, info, run_id: str) -> gpd.GeoDataFrame:
    """One scene's villages with the layer's columns (:data:`VILLAGE_COLUMNS`), scene CRS;
    ``name``: the scene's (:func:`scene_names`), ``acquired``: its date (YYYY-MM-DD) or None."""
    area, perim = measure_polygons(res.villages, res.crs)
    return gpd.GeoDataFrame({
        "village_id": [village_id(name, p, res.crs) for p in res.villages],
        "area_m2": area.round(1), "perimeter_m": perim.round(1), "mean_prob": res.mean_prob.round(4),
        "refined": np.asarray(res.refined, bool), "refine_reason": pd.array(res.reasons, dtype=object),
        "predicted_iou": pd.array([None if v is None else round(v, 4) for v in res.predicted_iou], dtype="Float64"),
        "scene": name, "acquired": date_column(acquired, len(res.villages)), "model_sha256": info.sha256,
        "run_id": run_id}, geometry=res.villages, crs=res.crs)


def scene_names(paths: list, items: dict[str, str]) -> dict[str, str]:
    """The name each scene goes by in the layers (``scene``, village ids, per-scene files): its
    STAC item's id (``items``: path -> id), else its file name; names two scenes would share
    (``a/scene.tif``, ``b/scene.tif``; several items' ``visual.tif``) take their folders until
    they differ."""
    def name(p, depth: int) -> str:
        if str(p) in items:
            return items[str(p)]
        parts = [x for x in str(p).replace("\\", "/").split("/") if x]
        return "_".join(parts[-1 - depth:])

    depth = {str(p): 0 for p in paths}
    while True:
        names = {str(p): name(p, depth[str(p)]) for p in paths}
        seen: dict[str, list[str]] = {}
        for key, n in names.items():
            seen.setdefault(n, []).append(key)
        clashes = [keys for keys in seen.values() if len(keys) > 1]
        grown = False
        for keys in clashes:
            for key in keys:
                if key not in items and depth[key] < len([x for x in key.split("/") if x]) - 1:
                    depth[key] += 1
                    grown = True
        if not clashes or not grown:
            return names


def acquired_text(dates) -> str:
    """The scenes' dates for a caption: one date, a range, or "not given"."""
    known = sorted({d for d in dates if d})
    if not known:
        return "not given"
    return known[0] if len(known) == 1 else f"{known[0]} to {known[-1]} ({len(known)} dates)"


def bar_callback(bar: Progress):
    """``progress(stage, n)`` for the pipeline: tiles advance the bar, tiles a resumed run found
    in the journal are done but not throughput, anything else (windows) is a counter."""
    def on_progress(stage: str, n: int) -> None:
        if stage == "tiles":
            bar.advance(n)
        elif stage == "tiles_resumed":
            bar.skip(n)
        else:
            bar.count(stage, n)
    return on_progress


def quicklook_path(out: Path, layer: str) -> Path:
    """The quicklook beside the output: ``OUT.png``, or ``OUT_LAYER.png`` for a named layer."""
    return out.with_name(f"{out.stem}.png" if layer == "villages" else f"{out.stem}_{layer}.png")


def pd_concat(frames: list) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True)


def tiles_progress(scenes: list[dict]) -> Progress:
    """The run's progress line: tiles/s, km2/h, refinement windows and ETA."""
    total = sum(s["tiles"] for s in scenes)
    return Progress(total, "tiles", rates={"km2/h": 3600 * sum(s["km2"] for s in scenes) / max(1, total)},
                    task="predict")


INT8_CALIBRATION_TILES = 4


def plan_compiled(info: ModelInfo, cfg: PredictConfig, prepared: list, in_process: bool,
                  log=print) -> tuple[ModelInfo, str]:
    """The run's :class:`CompilePlan` (``cfg.compile``; :mod:`uvsam.compiled`) in ``info``, and a note
    of what it did for the runs table. In process the parts are installed here (built if the plan
    says so); Dask workers install them when they load the model (from the same cache)."""
    if cfg.compile == "never" or not prepared:
        return info, "off (--compile never)" if prepared else "off: no scene"
    if cfg.int8:
        return info, "off: with --int8 the model runs eager"
    if info.device.precision not in COMPILED_PRECISIONS:
        return info, (f"off: compiled parts run in {' or '.join(COMPILED_PRECISIONS)} (with "
                      f"{info.device.precision} the model runs eager)")
    pixels = sum(scene.grid.width * scene.grid.height for scene, _ in prepared)
    build = cfg.compile == "always" or pixels >= AUTO_MIN_PIXELS
    tile = max(scene.grid.size for scene, _ in prepared)  # scenes smaller than cfg.tile get smaller tiles
    shapes = Shapes(tile, cfg.batch_size or info.device.tile_batch(tile), cfg.window, UVSAM.decode_chunk)
    info = replace(info, compiled=CompilePlan(shapes, refines(cfg, info), build))
    if not in_process:
        return info, f"on the workers ({'built where missing' if build else 'from the cache where present'})"
    get_model(info)
    builds = compile_builds()
    if any(b.status == "built" for b in builds):
        log(f"compiled {', '.join(b.part.split(':')[0] for b in builds if b.status == 'built')} for this machine "
            f"in {sum(b.seconds for b in builds):.0f} s (cached: later runs load them at once)")
    for b in builds:
        if b.status == "failed":
            log(f"note: the compiled {b.part.split(':')[0]} is not used ({b.note}): it runs eager")
    parts = [f"{b.part.split(':')[0]} {b.status}" + (f" {b.seconds:.0f} s" if b.status == "built" else "")
             + (f" ({b.note})" if b.note else "") for b in builds]
    if not build and any(b.status == "skipped" for b in builds):
        parts.append(f"missing ones not built for a run of {pixels / 1e6:.1f} Mpx (< {AUTO_MIN_PIXELS / 1e6:.0f}; "
                     "--compile always builds them)")
    return info, "; ".join(parts)


def install_int8(info, prepared: list, log=print) -> str:
    """Quantise the process's generalist encoder to static int8, calibrated on tiles of the run's
    own scenes (up to :data:`INT8_CALIBRATION_TILES`, spread over the first scene), and keep it
    only if it measures faster there with masks agreeing at IoU >= 0.95; returns what was measured."""
    model = get_model(info)
    scene, prep = prepared[0]
    wins = [w for _, w in tile_windows(scene)]
    picks = sorted({round(i * (len(wins) - 1) / max(1, INT8_CALIBRATION_TILES - 1))
                    for i in range(INT8_CALIBRATION_TILES)})
    src = open_source(prep)
    inputs = []
    for i in picks:
        img, _ = read_tile(prep, info, Window(*wins[i]), src)
        inputs.append(model.generalist.preprocess(torch.from_numpy(img)[None].float()))
    with stage("int8"):
        quantized = quantize_encoder_static(model.generalist.image_encoder, inputs)
        check = int8_check(model.generalist, quantized, inputs)
    if check.worth_it:
        model.generalist.image_encoder = quantized
        note = f"used: {check.describe()} on {len(inputs)} tiles"
    else:
        note = f"not used: {check.describe()} on {len(inputs)} tiles (needs faster and IoU >= 0.95)"
    log(f"int8: {note}")
    return note
