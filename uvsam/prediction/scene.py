"""A scene as prediction reads it: found, checked, tiled and preprocessed once (:func:`prepare_scene`),
then read window by window (:func:`read_tile`) through one open source per worker thread."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from affine import Affine
from rasterio.windows import Window

from tiles.plan import TilingConfig, plan
from tiles.reader import RasterSource, ReadOptions
from tiles.remote import RemotePath, location, read_afresh_if_replaced
from tiles.service import TileService, service_raster
from uvsam.config import PredictConfig
from uvsam.datasets import RASTER_EXT, find_files
from uvsam.prediction.journal import scene_identity, version_digest
from uvsam.prediction.model import ModelInfo
from uvsam.preprocess import Preprocessing, read_overview, read_window, scene_preprocessing
from uvsam.progress import stage
from uvsam.stac.scenes import StacScene
from uvsam.suitability import check_radiometry, check_resolution


@dataclass(frozen=True)
class ScenePrep:
    """A scene as every tile of it is read: read options, its :class:`Preprocessing` and grid."""

    path: str
    read: ReadOptions
    preprocessing: Preprocessing
    crs: str
    transform: tuple[float, ...]
    width: int
    height: int
    suitability: dict | None = None  # uvsam.suitability.Suitability of the scene
    version: str = ""  # digest of what its pixels come from when it was prepared (journal.scene_identity)

    @property
    def affine(self) -> Affine:
        return Affine(*self.transform[:6])

    @property
    def source_radiometry(self) -> dict | None:
        """The radiometry the scene is matched from (None: not harmonised)."""
        src = self.preprocessing.source
        return src.to_dict() if src is not None else None

    @property
    def pif(self) -> dict | None:
        """The linear map onto the PIF reference year (with its path), or None."""
        return self.preprocessing.to_dict()["pif"]


def find_scenes(specs: list[str | StacScene | TileService], gsd_m: float | None = None) -> list[Path]:
    """Rasters named by files, VRTs, folders, globs, URLs, STAC scenes or tile services (read at
    the zoom nearest ``gsd_m`` unless they name one), in the given order, without repeats."""
    out: list[Path] = []
    for spec in specs:
        if isinstance(spec, TileService):
            spec = str(service_raster(spec, gsd_m))
        for f in find_files(spec.href if isinstance(spec, StacScene) else spec, RASTER_EXT, "rasters"):
            if f not in out:
                out.append(f)
    return out


def prepare_scene(path: str | Path, info: ModelInfo, cfg: PredictConfig, identity: str | None = None):
    """The tiling plan and the :class:`ScenePrep` of one scene, from one read of its overview;
    ``identity``: its :func:`~uvsam.prediction.journal.scene_identity` when the caller has it."""
    read = info.inputs.read
    if isinstance(where := location(path), RemotePath):  # its version known before GDAL reads it
        identity = identity or scene_identity(path)
        read_afresh_if_replaced(where, version_digest(identity))
    with RasterSource(path, ReadOptions(info.inputs.bands)) as native:  # the header only: nothing resampled yet
        scene_gsd = float(np.mean(native.ground_res)) if native.ground_res else None
        suit = check_resolution(path, scene_gsd, native.height, native.width, info.training_gsd_m or info.gsd_m,
                                info.gsd_m, len(native.bands), cfg.force)
    suit.raise_if_unsuitable()
    with RasterSource(path, read) as src:
        overview = read_overview(src)
        tile, overlap, offset = scene_tiling(cfg, src.height, src.width)
        preprocessing = scene_preprocessing(src, info.inputs, cfg.pif_reference, overview)
    scene = plan(path, TilingConfig(tile, overlap, "px", info.inputs.normalisation, read=read, offset=offset,
                                    edges="inside"), stretch=preprocessing.stretch,
                 overview=overview)
    if preprocessing.mode == "histogram":
        check_radiometry(suit, preprocessing.source.quantiles, info.inputs.radiometry.quantiles)
    s = scene.source
    prep = ScenePrep(str(path), read, preprocessing, s["crs"], tuple(s["transform"]), s["width"], s["height"],
                     suit.to_dict(), version_digest(identity or scene_identity(path)))
    return scene, prep


def scene_tiling(cfg: PredictConfig, height: int, width: int) -> tuple[int, int, int]:
    """(tile, overlap, grid offset) for a scene of ``height`` x ``width`` px at the model's GSD.

    A scene smaller than the tile gets one tile of its own longer side: the specialist then sees
    the scene and nothing else, as in training and evaluation (a 1024 px XYZ tile at 0.92 m is
    ~330 px at 3.7 m; a 512 px tile would be two thirds synthetic fill).
    """
    tile = max(32, min(cfg.tile, max(height, width)))
    return tile, min(cfg.overlap, tile // 2), min(cfg.grid_offset, tile - 1)


def read_tile(prep: ScenePrep, info: ModelInfo, window: Window, src: RasterSource) -> tuple[np.ndarray, np.ndarray]:
    """(3, h, w) 0..255 model input and (h, w) validity of a window (:func:`uvsam.preprocess.read_window`).

    Nodata inside the scene takes the training imagery's median colour (a neutral fill, the
    same in every tile); the part of a window beyond the scene's edge mirrors the scene. Both
    stay invalid: they never reach the mosaic.
    """
    with stage("read"):
        return read_window(src, prep.preprocessing, window)


def harmonisation_record(prep: ScenePrep) -> dict:
    """How a scene's radiometry was brought to the model's (for the runs table): ``pif`` (a
    linear map onto a reference year fitted on invariant pixels, then histogram matching of the
    reference year), ``histogram`` (the scene's own histogram onto the training radiometry) or
    ``none``; with the whole preprocessing record."""
    record = prep.preprocessing.to_dict()
    return {"scene": prep.path, "mode": record["mode"], "pif": record["pif"],
            "source_radiometry": record["source_radiometry"], "preprocessing": record}


def scene_row(scene, info: ModelInfo) -> dict:
    """What a scene's plan amounts to: tiles, km2 of valid ground, size in pixels at the model's GSD."""
    gx, gy = scene.source["ground_res_m"] or (info.gsd_m, info.gsd_m)
    km2 = scene.valid_fraction * scene.grid.height * scene.grid.width * gx * gy / 1e6
    return {"scene": scene.source["path"], "tiles": len(scene.tiles), "km2": round(km2, 3),
            "width": scene.grid.width, "height": scene.grid.height}


_SOURCES = threading.local()


def open_source(prep: ScenePrep) -> RasterSource:
    """The scene, opened once per worker thread and kept open while its tasks run.

    Tiles overlap and refinement windows fall on tiles already read: an open source serves
    them from GDAL's block cache, where opening it for every task would decode every
    compressed block four times or more.
    """
    # by what its pixels come from when the run began: a scene whose file or any source of it (a
    # VRT's tiles) changed since is reopened, never served from blocks cached before (a Dask
    # worker lives on from run to run); a remote scene's version is the one the run fixed
    key = (prep.path, prep.read, prep.version)
    cached = getattr(_SOURCES, "open", None)
    if cached is None or cached[0] != key:
        if cached is not None:
            cached[1].close()
        read_afresh_if_replaced(location(prep.path), prep.version)
        _SOURCES.open = (key, RasterSource(prep.path, prep.read))
    return _SOURCES.open[1]


def close_sources() -> None:
    """Close this thread's open scene (the run is over, or the file is about to change)."""
    cached = getattr(_SOURCES, "open", None)
    if cached is not None:
        cached[1].close()
        _SOURCES.open = None
