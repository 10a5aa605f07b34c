"""The flat Python API (``uvsam.train``, ``uvsam.predict``, ``uvsam.evaluate``, ``uvsam.change``):
one function per command, the command's options as keywords, results as GeoDataFrames, dicts
and paths. Reached through the package (``import uvsam; uvsam.predict(...)``), which loads this
module on first use so that ``import uvsam`` stays light."""

from __future__ import annotations

import sys
import tempfile
from dataclasses import fields
from pathlib import Path

import geopandas as gpd
import pyogrio

from uvsam.changes import run_change
from uvsam.config import ChangeConfig, PredictConfig, TrainConfig
from uvsam.evaluation import evaluate as run_evaluation
from uvsam.files import read_features
from uvsam.prediction import run_prediction
from uvsam.prediction.sources import scene_sources
from uvsam.training import train as run_training

__all__ = ["change", "evaluate", "predict", "train"]


def train(images: str | Path, labels: str | Path, out: str | Path, *, resume: bool = False, log=None,
          **options) -> Path:
    """``uvsam train``: a model file at ``out`` from imagery and village labels (masks named
    like the images, or a vector file); ``options``: any field of
    :class:`uvsam.config.TrainConfig` (``encoder``, ``checkpoint``, ``epochs``, ``gsd_m`` ...).
    Returns the model file's path; its curves and metrics CSV lie beside it."""
    cfg = TrainConfig(images=str(images), labels=str(labels), out=str(out), **options)
    run_training(cfg, resume=resume, log=log or _quiet)
    return Path(out)


def predict(scenes: str | Path | list | None, model: str | Path, out: str | Path, *, layer: str = "villages",
            crs: str | None = None, checkpoint: str | Path | None = None, probabilities: str | Path | None = None,
            quicklook: bool = True, log=None, stac: str | None = None, asset: str | None = None,
            bbox: tuple[float, float, float, float] | None = None, datetime: str | None = None,
            tiles: str | None = None, zoom: int | None = None, tile_cache: str | Path | None = None,
            **options) -> gpd.GeoDataFrame:
    """``uvsam predict``: the villages of ``scenes`` (files, folders, globs or URLs; or None),
    of the items of ``stac`` (an Item, ItemCollection, Catalog, Collection or API; ``asset``,
    ``bbox``, ``datetime`` choose) and of the tile service ``tiles`` (an XYZ template or GDAL WMS
    XML, read over ``bbox`` at ``zoom``), written to ``out`` (format from its extension) and
    returned as a GeoDataFrame. ``options``: any field of :class:`uvsam.config.PredictConfig`
    (``refine``, ``threshold``, ``acquired`` ...). The frame's ``attrs`` hold the run's summary
    (output, quicklook, STAC Item, run id)."""
    named = [] if scenes is None else ([str(s) for s in scenes] if isinstance(scenes, list | tuple) else [str(scenes)])
    scenes = scene_sources(named, stac=stac, asset=asset, bbox=bbox, datetime=datetime, tiles=tiles, zoom=zoom,
                           tile_cache=tile_cache, acquired=options.get("acquired"))
    summary = run_prediction(scenes, model, out, PredictConfig(**options), layer=layer, crs=crs,
                             checkpoint=checkpoint, log=log or _quiet, probabilities=probabilities,
                             quicklook=quicklook)
    fmt = Path(out).suffix.lower()
    if fmt == ".parquet":
        villages = gpd.read_parquet(out)
    else:
        villages = read_features(out, layer if fmt == ".gpkg" else None)
    villages.attrs.update(summary)
    return villages


def evaluate(model: str | Path, images: str | Path, labels: str | Path, *, checkpoint: str | Path | None = None,
             specialist_only: bool = False, overlays: str | Path | None = None, ablations: bool = False, log=None,
             **options) -> dict:
    """``uvsam evaluate``: IoU, F1, precision, recall, object and outline scores of what
    ``predict`` ships (``polygons``), the specialist and the UV-SAM path, on labelled scenes;
    ``overlays``: a folder for one PNG per scene; ``ablations``: also the UV-SAM path with each
    prompt and embedding left out; ``options``: PredictConfig fields."""
    return run_evaluation(model, images, labels, checkpoint, specialist_only=specialist_only,
                          predict_config=PredictConfig(**options), log=log or _quiet, overlays=overlays,
                          ablations=ablations)


def change(years: dict, out: str | Path, *, report: str | Path | None = None, images: dict | None = None,
           log=None, **options) -> gpd.GeoDataFrame:
    """``uvsam change``: lifecycles of villages through the years, written to the GeoPackage
    ``out`` (and an HTML ``report``); returns the ``changes`` layer. ``years`` maps a year label
    to ``FILE[:LAYER]`` or a GeoDataFrame (e.g. what :func:`predict` returned); ``images`` maps
    a year to its imagery; ``options``: :class:`uvsam.config.ChangeConfig` fields
    (``min_overlap``, ``stable_pct``, ``min_area_m2``, ``crs``) and ``run_change``'s
    (``districts``, ``district_field``, ``centre``, ``ring_km``, ``step_km``, ``belts``,
    ``belt_field``, ``map_year``, ``output_crs``, ``max_shift_m``, ``accuracy``)."""
    names = {f.name for f in fields(ChangeConfig)}
    cfg = ChangeConfig(**{k: v for k, v in options.items() if k in names})
    extra = {k: v for k, v in options.items() if k not in names}
    if "output_crs" in extra:
        extra["crs"] = extra.pop("output_crs")
    with tempfile.TemporaryDirectory(prefix="uvsam-change-") as tmp:
        specs = []
        for year, layer in years.items():
            if hasattr(layer, "geometry"):  # a GeoDataFrame: handed over as a file, as the CLI takes it
                path = Path(tmp) / f"{year}.gpkg"
                pyogrio.write_dataframe(layer, path, layer="villages", driver="GPKG")
                layer = f"{path}:villages"
            specs.append(f"{year}={layer}")
        summary = run_change(specs, out, cfg, report=report, images=[f"{y}={p}" for y, p in (images or {}).items()],
                             log=log or _quiet, **extra)
    changes = read_features(out, "changes")
    changes.attrs.update(summary)
    return changes


def _quiet(message: str) -> None:
    """The API's default log: warnings reach the user (stderr), notes do not."""
    if message.startswith("warning"):
        print(message, file=sys.stderr)
