"""City-scale prediction: a scene on disk -> village polygons, object-aware so no village is cut.

1. **specialist** over overlapping tiles of the scene at the model's GSD (read, normalised and
   harmonised as in training), its village probabilities blended into a mosaic (a COG);
2. **candidates**: the thresholded mosaic polygonised in square blocks (specks too small to
   become a village dropped first), pieces merged across blocks;
3. **refinement**: each candidate large enough for the generalist gets a window centred on it
   (large candidates several overlapping windows); the candidates of a window are decoded in
   batched calls; the pieces of a candidate are merged;
4. **polygons**: simplified by the GSD in the mosaic's pixels, small villages and holes
   dropped, measured in a local equal-area projection.

Work runs as plain functions on a Dask cluster (:mod:`uvsam.distributed`): tile batches and
refinement windows are tasks; each worker loads the model once. The same functions run in
process for tests and small scenes.
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
import shapely
from affine import Affine
from pyproj import CRS, Transformer
from rasterio.features import geometry_mask
from rasterio.windows import Window

from tiles.grid import Tile
from tiles.plan import TilingConfig, plan
from tiles.radiometry import Stretch
from tiles.reader import RasterSource, ReadOptions
from tiles.stitch import Stitcher
from uvsam.datasets import to_rgb
from uvsam.errors import InputError
from uvsam.files import check_writable
from uvsam.generalist import OFF, REFINED, SMALL, UNVERIFIED, RefineRule, generalist_status, judge, stability_score
from uvsam.harmonise import LinearMap, Radiometry, histogram_match, measure, pif_against
from uvsam.journal import Journal, scene_identity
from uvsam.polygons import clean_each, merge, polygonise
from uvsam.polygons import measure as measure_polygons
from uvsam.suitability import check_radiometry, check_resolution


@dataclass(frozen=True)
class PredictConfig:
    """How a scene is predicted (all sizes in pixels at the model's GSD unless named _m/_m2)."""

    tile: int = 512
    overlap: int = 256  # half a tile: measured to halve the disagreement of shifted grids (issue 5 note)
    batch_size: int = 2  # tiles a specialist call: on CPU as fast per tile as 1 or 4 (docs/benchmarks.md)
    threshold: float = 0.5
    refine: bool = True
    force_refine: bool = False  # refine even with a generalist whose weights are not verified official ones
    refine_min_iou: float = 0.88  # the generalist's predicted IoU a refined outline needs (uvsam.generalist)
    refine_min_stability: float = 0.95
    refine_min_overlap: float = 0.5  # IoU of the refined outline with the specialist's candidate
    window: int = 512
    window_margin: int = 32
    min_area_m2: float = 2500.0
    simplify_m: float | None = None  # None: the model's GSD
    block: int = 2048  # the mosaic is vectorised in square blocks of this many pixels (bounded memory)
    acquired: str | None = None
    grid_offset: int = 0  # shift the tile grid up-left by this many pixels (a grid-invariance check)
    pif_reference: str | None = None  # a reference year's raster: normalise each scene on pseudo-invariant pixels
    force: bool = False  # run scenes the suitability check refuses (uvsam.suitability)

    def __post_init__(self):
        problems = []
        if self.tile < 32:
            problems.append(f"tile must be at least 32 px, got {self.tile}")
        if not 0 <= self.overlap < self.tile:
            problems.append(f"overlap must be in [0, tile {self.tile}), got {self.overlap}")
        if not 0 <= self.grid_offset < self.tile:
            problems.append(f"grid offset must be in [0, tile {self.tile}), got {self.grid_offset}")
        if not 0 < self.threshold < 1:
            problems.append(f"threshold must be in (0, 1), got {self.threshold}")
        if self.window < 64 or self.window <= 2 * self.window_margin:
            problems.append(f"refinement window {self.window} px too small for its margin {self.window_margin}")
        if self.batch_size < 1 or self.block < 1:
            problems.append("batch size and block must be positive")
        if self.min_area_m2 < 0 or (self.simplify_m is not None and self.simplify_m < 0):
            problems.append("minimum area and simplification tolerance cannot be negative")
        if self.acquired is not None:
            try:
                datetime.strptime(self.acquired, "%Y-%m-%d")
            except ValueError:
                problems.append(f"acquired must be a date YYYY-MM-DD, got {self.acquired!r}")
        if problems:
            raise InputError("; ".join(problems))
        self.rule  # noqa: B018 - validates the refinement thresholds
        if self.pif_reference is not None and not Path(self.pif_reference).is_file():
            raise InputError("PIF reference raster does not exist", self.pif_reference)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def rule(self) -> RefineRule:
        return RefineRule(self.refine_min_iou, self.refine_min_stability, self.refine_min_overlap)


@dataclass(frozen=True)
class ModelInfo:
    """What the workers need to know of the model to prepare inputs (picklable, small)."""

    path: str
    checkpoint: str | None
    gsd_m: float
    normalisation: str
    bands: tuple[int, ...] | None
    harmonise: bool
    radiometry: dict
    sha256: str
    min_area_m2: float
    generalist_verified: bool = False
    generalist_note: str = ""
    training_gsd_m: float | None = None  # native resolution of the training imagery (None: recorded before it was)


@dataclass(frozen=True)
class ScenePrep:
    """A scene as every tile of it is read: options, normalisation and harmonisation map."""

    path: str
    read: ReadOptions
    stretch: dict
    source_radiometry: dict | None
    crs: str
    transform: tuple[float, ...]
    width: int
    height: int
    pif: dict | None = None  # LinearMap onto the PIF reference year (with its path), applied first
    suitability: dict | None = None  # uvsam.suitability.Suitability of the scene

    @property
    def affine(self) -> Affine:
        return Affine(*self.transform[:6])


# -- the model on a worker --------------------------------------------------------------------
_MODELS: dict[tuple[str, str | None], object] = {}


def get_model(info: ModelInfo):
    """The model, loaded once per process (a Dask worker plugin preloads it)."""
    key = (info.path, info.checkpoint)
    if key not in _MODELS:
        from uvsam.modelfile import load_model

        _MODELS[key] = load_model(info.path, info.checkpoint)[0]
    return _MODELS[key]


def model_info(path: str | Path, checkpoint: str | Path | None = None) -> ModelInfo:
    from uvsam.files import sha256_file
    from uvsam.modelfile import generalist_file, read_model_file
    from uvsam.modeling.uvsam import UVSAMConfig

    payload = read_model_file(path)
    generalist_file(payload, path, checkpoint)  # the right weights are there, before any work
    meta = payload["meta"]
    config = UVSAMConfig.from_dict(payload["config"])
    status = generalist_status(meta, config.encoder)
    return ModelInfo(str(path), str(checkpoint) if checkpoint else None, float(meta["gsd_m"]),
                     meta.get("normalisation", "auto"), tuple(meta["bands"]) if meta.get("bands") else None,
                     bool(meta.get("harmonise")), meta["radiometry"], sha256_file(path), config.min_area,
                     status.verified, status.note, meta.get("source_gsd_m"))


def refines(cfg: PredictConfig, info: ModelInfo) -> bool:
    """Whether the generalist redraws candidates: asked for, and verified weights or forced."""
    return cfg.refine and (info.generalist_verified or cfg.force_refine)


_SOURCES = threading.local()


def open_source(prep: ScenePrep) -> RasterSource:
    """The scene, opened once per worker thread and kept open while its tasks run.

    Tiles overlap and refinement windows fall on tiles already read: an open source serves
    them from GDAL's block cache, where opening it for every task would decode every
    compressed block four times or more.
    """
    stat = Path(prep.path).stat()
    key = (prep.path, prep.read, stat.st_mtime_ns, stat.st_size)  # a file replaced on disk is reopened
    cached = getattr(_SOURCES, "open", None)
    if cached is None or cached[0] != key:
        if cached is not None:
            cached[1].close()
        _SOURCES.open = (key, RasterSource(prep.path, prep.read))
    return _SOURCES.open[1]


def close_sources() -> None:
    """Close this thread's open scene (the run is over, or the file is about to change)."""
    cached = getattr(_SOURCES, "open", None)
    if cached is not None:
        cached[1].close()
        _SOURCES.open = None


# -- 1. specialist tiles ----------------------------------------------------------------------
def prepare_scene(path: str | Path, info: ModelInfo, cfg: PredictConfig):
    """The tiling plan and the per-scene preparation (stretch, radiometry) of one scene, from one
    read of its overview."""
    read = ReadOptions(info.bands, info.gsd_m)
    with RasterSource(path, ReadOptions(info.bands)) as native:  # the header only: nothing resampled yet
        scene_gsd = float(np.mean(native.ground_res)) if native.ground_res else None
        suit = check_resolution(path, scene_gsd, native.height, native.width, info.training_gsd_m or info.gsd_m,
                                info.gsd_m, len(native.bands), cfg.force)
    suit.raise_if_unsuitable()
    with RasterSource(path, read) as src:
        data, valid = src.read_overview(1_000_000)
        tile, overlap, offset = scene_tiling(cfg, src.height, src.width)
    scene = plan(path, TilingConfig(tile, overlap, "px", info.normalisation, read=read, offset=offset,
                                    edges="inside"), overview=(data, valid))
    source_radiometry = pif = None
    if cfg.pif_reference:  # onto the reference year by its invariant pixels, then as the reference year
        linear, ref_radiometry = pif_against(path, cfg.pif_reference, read, scene.stretch, info.normalisation)
        pif = {"reference": str(cfg.pif_reference), **linear.to_dict()}
        source_radiometry = ref_radiometry.to_dict() if info.harmonise else None
    elif info.harmonise:
        img = to_rgb(scene.stretch.apply(data, valid) * 255.0, path)
        source_radiometry = measure([img], [valid]).to_dict()
    if source_radiometry is not None and not pif:
        check_radiometry(suit, source_radiometry["quantiles"], info.radiometry["quantiles"])
    src = scene.source
    prep = ScenePrep(str(path), read, scene.stretch.to_dict(), source_radiometry, src["crs"],
                     tuple(src["transform"]), src["width"], src["height"], pif, suit.to_dict())
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
    """(3, h, w) 0..255 harmonised image and (h, w) validity of a window.

    Nodata inside the scene takes the training imagery's median colour (a neutral fill, the
    same in every tile, instead of black edges the model would react to); the part of a window
    beyond the scene's edge mirrors the scene (no flat area the model could call village).
    Both stay invalid: they never reach the mosaic.
    """
    data, valid = src.read(window)
    img = Stretch.from_dict(prep.stretch).apply(data, valid) * 255.0
    if prep.pif is not None:
        img = LinearMap.from_dict(prep.pif).apply(img)
    img = to_rgb(img, prep.path)
    reference = Radiometry.from_dict(info.radiometry)
    if prep.source_radiometry is not None:
        img = histogram_match(img, Radiometry.from_dict(prep.source_radiometry), reference, valid)
    if not valid.all():
        median = np.array([q[len(q) // 2] for q in reference.quantiles[:3]], np.float32)
        img[:, ~valid] = median[:, None]
        h, w = valid.shape
        r0, c0 = max(0, -int(window.row_off)), max(0, -int(window.col_off))
        r1, c1 = min(h, prep.height - int(window.row_off)), min(w, prep.width - int(window.col_off))
        if r1 > r0 and c1 > c0 and (r0, c0, r1, c1) != (0, 0, h, w):
            img = np.pad(img[:, r0:r1, c0:c1], ((0, 0), (r0, h - r1), (c0, w - c1)), mode="symmetric")
    return img, valid


def specialist_batch(prep: ScenePrep, info: ModelInfo, windows: list[tuple[int, int, int, int]]) -> dict:
    """Village probabilities of tile windows (col, row, w, h), read and computed together.

    Returns ``prob`` (n, size, size) float32, NaN where the input was invalid, and ``seconds``
    the batch took on its worker (reading included), for the tiles layer.
    """
    import torch

    t0 = time.perf_counter()
    model = get_model(info)
    src = open_source(prep)
    tiles = [read_tile(prep, info, Window(*w), src) for w in windows]
    x = torch.from_numpy(np.stack([t[0] for t in tiles]))
    with torch.inference_mode():
        logits, _ = model.run_specialist(x)
        prob = torch.softmax(logits, 1)[:, 1].numpy().astype(np.float32)
    prob[~np.stack([valid for _, valid in tiles])] = np.nan
    return {"prob": prob, "seconds": np.float64(time.perf_counter() - t0)}


# -- 2. candidates ----------------------------------------------------------------------------
def candidates_from_mosaic(mosaic: Path, threshold: float, block: int, min_pixels: int = 0) -> list:
    """Polygons (scene CRS) of the mosaic's pixels >= threshold, extracted in square blocks and merged.

    Connected pieces of fewer than ``min_pixels`` pixels are dropped before polygonising (a
    mosaic holds thousands of specks no village can grow from), except where they touch a
    block's edge and may continue in the next block.
    """
    pieces = []
    with rasterio.open(mosaic) as ds:
        for r0 in range(0, ds.height, block):
            for c0 in range(0, ds.width, block):
                # one more row and column than the block: pixels touching only by a corner across
                # a block edge are then in one block together, and their pieces overlap to merge
                win = Window(c0, r0, min(block + 1, ds.width - c0), min(block + 1, ds.height - r0))
                mask = ds.read(1, window=win) >= threshold  # NaN (no data) compares False
                if min_pixels > 1:
                    mask = drop_specks(mask, min_pixels)
                pieces += polygonise(mask, ds.transform @ Affine.translation(c0, r0))
    return merge(pieces)


def drop_specks(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """``mask`` without its 8-connected pieces of fewer than ``min_pixels`` pixels that do not touch its edge."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    keep = np.bincount(labels.ravel(), minlength=n + 1) >= min_pixels
    keep[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = True
    keep[0] = False
    return keep[labels]


# -- 3. refinement windows --------------------------------------------------------------------
@dataclass
class RefineWindow:
    """A square window (col, row, size) in scene pixels and the candidates decoded in it, with
    each candidate's box clipped to the window (window pixels, XYXY)."""

    col: int
    row: int
    size: int
    members: list[int] = field(default_factory=list)
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)


def plan_windows(boxes_px: np.ndarray, size: int, margin: int) -> list[RefineWindow]:
    """Windows centred on candidates; candidates inside a window's interior share it.

    A candidate whose box exceeds ``size - 2 * margin`` gets a grid of windows overlapping by
    half, covering the box. Placement depends only on the candidates, never on the tile grid.
    """
    inner = size - 2 * margin
    windows: list[RefineWindow] = []
    order = np.argsort(-(boxes_px[:, 2] - boxes_px[:, 0]) * (boxes_px[:, 3] - boxes_px[:, 1]), kind="stable")
    for i in order:
        x0, y0, x1, y1 = (float(v) for v in boxes_px[i])
        if x1 - x0 <= inner and y1 - y0 <= inner:
            host = next((w for w in windows if w.col + margin <= x0 and x1 <= w.col + size - margin
                         and w.row + margin <= y0 and y1 <= w.row + size - margin), None)
            if host is None:
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                host = RefineWindow(int(math.floor(cx - size / 2)), int(math.floor(cy - size / 2)), size)
                windows.append(host)
            host.members.append(int(i))
            host.boxes.append((x0 - host.col, y0 - host.row, x1 - host.col, y1 - host.row))
            continue
        step = size // 2
        nx = max(1, math.ceil((x1 - x0 - size) / step) + 1)
        ny = max(1, math.ceil((y1 - y0 - size) / step) + 1)
        cx0 = (x0 + x1) / 2 - ((nx - 1) * step + size) / 2
        cy0 = (y0 + y1) / 2 - ((ny - 1) * step + size) / 2
        for a in range(ny):
            for b in range(nx):
                w = RefineWindow(int(math.floor(cx0 + b * step)), int(math.floor(cy0 + a * step)), size)
                clip = (max(x0 - w.col, 0), max(y0 - w.row, 0), min(x1 - w.col, size), min(y1 - w.row, size))
                w.members.append(int(i))
                w.boxes.append(clip)
                windows.append(w)
    return windows


def refine_window(prep: ScenePrep, info: ModelInfo, window: RefineWindow, margin: int) -> list[dict]:
    """The generalist's mask of each member candidate: ``wkb`` (hex WKB multipolygon, scene CRS;
    empty when the mask is empty), its ``predicted_iou`` and ``stability`` score.

    A candidate's piece is kept within its box grown by ``margin`` pixels (the generalist
    draws the boundary, it does not annex the neighbourhood); pieces from several windows are
    merged, and judged against the candidate, by the caller.
    """
    import torch

    model = get_model(info)
    win = Window(window.col, window.row, window.size, window.size)
    img, valid = read_tile(prep, info, win, open_source(prep))
    with torch.inference_mode():
        (masks, ious), = model.refine(torch.from_numpy(img)[None], [np.asarray(window.boxes, np.float32)])
    transform = prep.affine @ Affine.translation(window.col, window.row)
    out = []
    for k, (x0, y0, x1, y1) in enumerate(window.boxes):
        logits = masks[k, 0].numpy()
        mask = (logits > 0) & valid
        keep = np.zeros_like(mask)
        r0, c0 = max(0, int(y0) - margin), max(0, int(x0) - margin)
        keep[r0 : int(math.ceil(y1)) + margin, c0 : int(math.ceil(x1)) + margin] = True
        polys = polygonise(mask & keep, transform)  # 8-connected pieces: they never touch
        out.append({"wkb": shapely.to_wkb(shapely.multipolygons(polys), hex=True) if polys else "",
                    "predicted_iou": float(ious[k]), "stability": stability_score(logits[keep])})
    return out


# -- 4. assembling ----------------------------------------------------------------------------
def village_id(scene_name: str, polygon, crs) -> str:
    """A stable id: the scene name and the polygon's representative point to 1e-5 degree."""
    pt = polygon.representative_point()
    lon, lat = Transformer.from_crs(CRS.from_user_input(crs), "EPSG:4326", always_xy=True).transform(pt.x, pt.y)
    digest = hashlib.sha1(f"{scene_name}|{lon:.5f}|{lat:.5f}".encode()).hexdigest()[:12]
    return f"{Path(scene_name).stem}-{digest}"


def mean_probability(mosaic: Path, polygons: list) -> np.ndarray:
    out = np.zeros(len(polygons))
    with rasterio.open(mosaic) as ds:
        for i, p in enumerate(polygons):
            x0, y0, x1, y1 = p.bounds
            (ca, ra), (cb, rb) = ~ds.transform @ (x0, y1), ~ds.transform @ (x1, y0)
            c0, r0 = math.floor(min(ca, cb)), math.floor(min(ra, rb))
            win = Window(c0, r0, math.ceil(max(ca, cb)) - c0, math.ceil(max(ra, rb)) - r0)
            win = win.intersection(Window(0, 0, ds.width, ds.height))
            prob = ds.read(1, window=Window(win.col_off, win.row_off, max(1, win.width), max(1, win.height)))
            inside = geometry_mask([p], prob.shape, ds.transform @ Affine.translation(win.col_off, win.row_off),
                                  invert=True, all_touched=True)
            vals = prob[inside & np.isfinite(prob)]
            out[i] = float(vals.mean()) if vals.size else float("nan")
    return out


def _tile_row(tile: Tile, grid, status: str, seconds: float | None, valid_fraction: float) -> dict:
    """A feature of the tiles layer: where the tile is, whether it ran, how long it took."""
    return {"index": tile.index, "row": tile.row, "col": tile.col, "status": status, "seconds": seconds,
            "valid_fraction": round(valid_fraction, 4),
            "geometry": shapely.box(*_bounds(tile.window, grid.transform))}


def _bounds(window: Window, transform: Affine) -> tuple[float, float, float, float]:
    """(minx, miny, maxx, maxy) of a pixel window (rasterio.windows.bounds, without its deprecated ``*``)."""
    c0, r0 = window.col_off, window.row_off
    (xa, ya), (xb, yb) = transform @ (c0, r0), transform @ (c0 + window.width, r0 + window.height)
    return min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)


def tile_windows(scene) -> list[tuple[Tile, tuple[int, int, int, int]]]:
    return [(t, (int(t.window.col_off), int(t.window.row_off), int(t.window.width), int(t.window.height)))
            for t in scene.tiles]


def batches(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


Runner = Callable[[Callable, Iterable[tuple]], Iterator]


LOCAL_CLUSTER_MIN_CORES = 8


def runs_in_process(local: bool | None, scheduler: str | None = None, workers: int | None = None) -> bool:
    """Where a prediction runs when the user did not say (``local`` None): on a named scheduler
    or a requested number of workers, Dask; otherwise in this process on machines with fewer
    than ``LOCAL_CLUSTER_MIN_CORES`` cores, where one model's threads already use every core and
    a local cluster only adds processes and memory (docs/benchmarks.md), else a local cluster."""
    if local is not None:
        return local
    if scheduler or workers:
        return False
    import os

    return (os.cpu_count() or 1) < LOCAL_CLUSTER_MIN_CORES


def run_local(fn: Callable, arg_list: Iterable[tuple]) -> Iterator:
    """Run tasks in this process, in order (the runner used without a cluster)."""
    for args in arg_list:
        yield fn(*args)


def run_journaled(runner: Runner, fn: Callable, arg_list: list[tuple], keys: list[str], exists: Callable,
                  load: Callable, save: Callable) -> Iterator:
    """``runner`` over the tasks the journal does not hold yet; all results in order.

    Finished results are read back lazily, so memory holds no more than the runner does.
    """
    todo = [i for i, k in enumerate(keys) if not exists(k)]
    computed = iter(zip(todo, runner(fn, (arg_list[i] for i in todo)), strict=True))
    pending = set(todo)
    for i, key in enumerate(keys):
        if i in pending:
            j, result = next(computed)
            save(keys[j], result)
            yield result
        else:
            yield load(key)


@dataclass
class SceneResult:
    villages: list  # polygons, scene CRS
    refined: list[bool]
    candidates: list
    mean_prob: np.ndarray
    tiles: list[dict]
    crs: str
    mosaic: Path
    journal: Path
    reasons: list[str] = field(default_factory=list)  # per village: why it was or was not refined
    predicted_iou: list[float | None] = field(default_factory=list)  # the generalist's, where it ran
    refine_on: bool = False


def predict_scene(path: str | Path, info: ModelInfo, cfg: PredictConfig, workdir: Path,
                  runner: Runner = run_local, progress: Callable[[str, int], None] | None = None,
                  prepared: tuple | None = None) -> SceneResult:
    """Run the four steps on one scene; the probability mosaic is written into ``workdir``.

    Finished tasks are journaled in ``workdir``: an interrupted run, run again, skips them.
    ``progress(stage, n)`` is called as tiles and windows finish. ``prepared``: the scene's
    :func:`prepare_scene` when the caller has it already.
    """
    path = Path(path)
    scene, prep = prepared if prepared is not None else prepare_scene(path, info, cfg)
    journal = Journal(workdir / "journal", scene_identity(path), info.sha256, json.dumps(cfg.to_dict(), sort_keys=True))
    if prep.crs is None:
        raise InputError("raster has no CRS; village polygons need georeferenced imagery", path)
    mosaic = workdir / f"{path.stem}.probability.tif"
    jobs = tile_windows(scene)
    tile_rows = []
    with Stitcher(mosaic, scene.grid, channels=1, dtype="float32", crs=prep.crs, nodata=float("nan"),
                  driver="COG") as stitcher:
        groups = list(batches(jobs, cfg.batch_size))
        keys = [f"{g[0][0].index}-{g[-1][0].index}" for g in groups]
        results = run_journaled(runner, specialist_batch, [(prep, info, [w for _, w in g]) for g in groups], keys,
                                journal.has_arrays, journal.load_arrays, journal.save_arrays)
        for group, result in zip(groups, results, strict=True):
            if progress is not None:
                progress("tiles", len(group))
            seconds = float(result["seconds"]) / len(group)
            for (tile, _), p in zip(group, result["prob"], strict=True):
                valid = np.isfinite(p)
                stitcher.add(tile, p[None], valid)
                tile_rows.append(_tile_row(tile, scene.grid, "done", round(seconds, 3), float(valid.mean())))
    done = {r["index"] for r in tile_rows}
    tile_rows += [_tile_row(t, scene.grid, "nodata", None, 0.0) for t in scene.grid if t.index not in done]
    tile_rows.sort(key=lambda r: r["index"])
    # a speck under half the minimum village area cannot become a village (clean() drops it)
    candidates = candidates_from_mosaic(mosaic, cfg.threshold, cfg.block, int(0.5 * cfg.min_area_m2 / info.gsd_m**2))
    simplify = info.gsd_m if cfg.simplify_m is None else cfg.simplify_m
    n = len(candidates)
    refine_on = refines(cfg, info)
    reasons = [OFF if not cfg.refine else UNVERIFIED] * n
    scores: list[float | None] = [None] * n
    records: list[list[dict]] = [[] for _ in candidates]
    if refine_on and candidates:
        inv = ~prep.affine
        boxes = []
        for c in candidates:
            x0, y0, x1, y1 = c.bounds
            (ca, ra), (cb, rb) = inv @ (x0, y1), inv @ (x1, y0)
            boxes.append((min(ca, cb), min(ra, rb), max(ca, cb), max(ra, rb)))
        boxes_px = np.asarray(boxes, np.float32)
        areas, _ = measure_polygons(candidates, prep.crs)
        large = np.flatnonzero(areas >= info.min_area_m2)
        reasons = [SMALL] * n
        windows = plan_windows(boxes_px[large], cfg.window, cfg.window_margin)
        for w in windows:
            w.members = [int(large[m]) for m in w.members]
        keys = [hashlib.sha1(json.dumps([w.col, w.row, w.size, w.boxes]).encode()).hexdigest()[:16] for w in windows]
        results = run_journaled(runner, refine_window, [(prep, info, w, cfg.window_margin) for w in windows], keys,
                                journal.has_blobs, journal.load_blobs, journal.save_blobs)
        for w, out in zip(windows, results, strict=True):
            if progress is not None:
                progress("windows", 1)
            for m, record in zip(w.members, out, strict=True):
                records[m].append(record)
    geoms = list(candidates)
    for i, recs in enumerate(records):
        if not recs:
            continue
        geoms[i], reasons[i], scores[i] = judge_candidate(candidates[i], recs, cfg.rule)
    # refinement never deletes a candidate: an accepted outline that cleaning removes falls back
    # to the specialist's, which is cleaned the same way
    cleaned = clean_each(geoms, prep.crs, cfg.min_area_m2, simplify, (prep.affine, info.gsd_m))
    lost = [i for i, (g, kept) in enumerate(zip(geoms, cleaned, strict=True)) if not kept and g is not candidates[i]]
    for i, kept in zip(lost, clean_each([candidates[i] for i in lost], prep.crs, cfg.min_area_m2, simplify,
                                        (prep.affine, info.gsd_m)), strict=True):
        cleaned[i], reasons[i] = kept, "refined outline too small"
    villages, refined, why, ious = [], [], [], []
    for i, kept in enumerate(cleaned):
        villages += kept
        refined += [reasons[i] == REFINED] * len(kept)
        why += [reasons[i]] * len(kept)
        ious += [scores[i]] * len(kept)
    merged = merge(villages)
    if len(merged) != len(villages):  # refined villages that now touch: one village
        v_idx, m_idx = shapely.STRtree(villages).query(merged, predicate="intersects")[::-1]
        groups = [v_idx[m_idx == j] for j in range(len(merged))]
        refined = [any(refined[k] for k in g) for g in groups]
        why = ["; ".join(sorted({why[k] for k in g})) for g in groups]
        ious = [min((ious[k] for k in g if ious[k] is not None), default=None) for g in groups]
        villages = merged
    close_sources()  # tasks run in this thread keep the scene open until here
    return SceneResult(villages, refined, candidates, mean_probability(mosaic, villages), tile_rows, prep.crs,
                       mosaic, journal.root, why, ious, refine_on)


def judge_candidate(candidate, records: list[dict], rule: RefineRule) -> tuple[object, str, float | None]:
    """(outline, reason, predicted IoU) of one candidate from its refinement windows' records:
    the generalist's outline when :func:`uvsam.generalist.judge` accepts it, else the candidate.
    Across windows the least confident one speaks (lowest predicted IoU and stability)."""
    pieces = [shapely.from_wkb(r["wkb"]) for r in records if r["wkb"]]
    outline = shapely.union_all(pieces) if pieces else None
    predicted_iou = min(float(r["predicted_iou"]) for r in records)
    stability = min(float(r["stability"]) for r in records)
    empty = outline is None or outline.is_empty
    overlap = 0.0
    if not empty:
        union = shapely.union(outline, candidate).area
        overlap = shapely.intersection(outline, candidate).area / union if union > 0 else 0.0
    ok, reason = judge(rule, overlap, predicted_iou, stability, empty)
    return (outline if ok else candidate), reason, round(predicted_iou, 4)


# -- the command ------------------------------------------------------------------------------
def find_scenes(specs: list[str]) -> list[Path]:
    """Rasters named by files, VRTs, folders or globs, in the given order, without repeats."""
    from uvsam.datasets import RASTER_EXT, find_files

    out: list[Path] = []
    for spec in specs:
        for f in find_files(spec, RASTER_EXT, "rasters"):
            if f not in out:
                out.append(f)
    return out


def run_prediction(scenes: list[str], model: str | Path, out: str | Path, cfg: PredictConfig = PredictConfig(),
                   layer: str = "villages", fmt: str = "gpkg", crs: str | None = None,
                   checkpoint: str | Path | None = None, runner: Runner = run_local, log=print,
                   run_extra: dict | None = None, prepared: list[tuple] | None = None) -> dict:
    """Predict every scene and write the layers; returns a summary.

    Resumable: finished tasks are journaled beside the output (``OUT.work/journal``), so the
    same command run again after an interruption skips them and writes the same layers. The
    run id is derived from the inputs, model and configuration, so it too is the same.
    ``run_extra`` adds columns to the ``runs`` table (a workflow stores its name and text);
    ``prepared``: :func:`prepare_scene` of each scene found, when the caller has it already.
    """
    import shutil

    import geopandas as gpd

    from uvsam import __version__
    from uvsam.layers import FORMATS, layer_problem, write_geopackage, write_vector

    out = check_writable(out)
    problem = layer_problem(layer) if fmt == "gpkg" else None
    if problem:
        raise InputError(problem, out)
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: use {', '.join(FORMATS)}", out)
    paths = find_scenes(scenes)
    info = model_info(model, checkpoint)
    identity = [scene_identity(p) for p in paths] + [info.sha256, json.dumps(cfg.to_dict(), sort_keys=True), layer]
    run_id = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:12]
    if prepared is None:  # every scene opened and checked before any work (a workflow did it for all years)
        prepared = [prepare_scene(p, info, cfg) for p in paths]
    if cfg.refine and not refines(cfg, info):
        log(f"note: {info.generalist_note}: villages keep the specialist's outlines (not refined); "
            "bring the official weights, or give --force-refine to refine anyway")
    for _, prep in prepared:
        for line in (prep.suitability or {}).get("warnings", []):
            log(f"warning: {Path(prep.path).name}: {line}")
        if (prep.suitability or {}).get("problems"):
            log(f"warning: {Path(prep.path).name}: run with --force despite: "
                + "; ".join(prep.suitability["problems"]))
    bar = Progress([scene_row(scene, info) for scene, _ in prepared])
    workdir = out.with_name(out.stem + ".work")
    workdir.mkdir(exist_ok=True)
    frames, cands, tiles, journals = [], [], [], []
    out_crs = crs
    for path, prep in zip(paths, prepared, strict=True):
        res = predict_scene(path, info, cfg, workdir, runner, progress=bar.update, prepared=prep)
        journals.append(res.journal)
        out_crs = out_crs or res.crs
        area, perim = measure_polygons(res.villages, res.crs)
        v = gpd.GeoDataFrame({
            "village_id": [village_id(path.name, p, res.crs) for p in res.villages],
            "area_m2": area.round(1), "perimeter_m": perim.round(1), "mean_prob": res.mean_prob.round(4),
            "refined": np.asarray(res.refined, bool), "refine_reason": pd.array(res.reasons, dtype=object),
            "predicted_iou": pd.array([None if v is None else round(v, 4) for v in res.predicted_iou], dtype="Float64"),
            "scene": path.name, "acquired": cfg.acquired, "model_sha256": info.sha256,
            "run_id": run_id}, geometry=res.villages, crs=res.crs)
        frames.append(v.to_crs(out_crs))
        cands.append(gpd.GeoDataFrame({"scene": [path.name] * len(res.candidates)}, geometry=res.candidates,
                                      crs=res.crs).to_crs(out_crs) if res.candidates else None)
        t = gpd.GeoDataFrame(res.tiles, geometry="geometry", crs=res.crs) if res.tiles else None
        if t is not None:
            t["scene"] = path.name
            tiles.append(t.to_crs(out_crs))
        log(f"{path.name}: {len(res.villages)} villages ({sum(res.refined)} refined), "
            f"{len(res.candidates)} candidates, {sum(r['status'] == 'done' for r in res.tiles)} tiles")
    columns = ["village_id", "area_m2", "perimeter_m", "mean_prob", "refined", "refine_reason", "predicted_iou",
               "scene", "acquired", "model_sha256", "run_id"]
    if frames:
        villages = gpd.GeoDataFrame(pd_concat(frames), geometry="geometry", crs=out_crs)
    else:  # no village anywhere: an empty layer with the full schema
        villages = gpd.GeoDataFrame({c: pd.Series(dtype=object) for c in columns},
                                    geometry=gpd.GeoSeries([], crs=out_crs))
    run = {"run_id": run_id, "layer": layer, "scenes": json.dumps([str(p) for p in paths]),
           "config": json.dumps(cfg.to_dict()), "model": str(model), "model_sha256": info.sha256,
           "model_gsd_m": info.gsd_m, "generalist": info.generalist_note,
           "refinement": "on" if refines(cfg, info) else ("off" if not cfg.refine else "off: generalist not verified"),
           "normalisation": info.normalisation, "harmonise": info.harmonise,
           "harmonisation": json.dumps([harmonisation_record(prep) for _, prep in prepared]),
           "suitability": json.dumps([prep.suitability for _, prep in prepared]),
           "uvsam_version": __version__, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           **(run_extra or {})}
    if fmt == "gpkg":
        empty = gpd.GeoDataFrame({"scene": []}, geometry=[], crs=out_crs)
        write_geopackage(out, layer, villages,
                         pd_concat([c for c in cands if c is not None]) if any(c is not None for c in cands) else empty,
                         pd_concat(tiles) if tiles else empty, run)
    else:
        write_vector(out, fmt, villages)
    bar.close()
    for j in journals:  # the layers are written: the journal has served its purpose
        shutil.rmtree(j, ignore_errors=True)
    return {"out": str(out), "layer": layer, "scenes": len(paths), "villages": len(villages), "run_id": run_id}


def harmonisation_record(prep: ScenePrep) -> dict:
    """How a scene's radiometry was brought to the model's (for the runs table): ``pif`` (a
    linear map onto a reference year fitted on invariant pixels, then histogram matching of the
    reference year), ``histogram`` (the scene's own histogram onto the training radiometry) or
    ``none``."""
    mode = "pif" if prep.pif else ("histogram" if prep.source_radiometry else "none")
    return {"scene": prep.path, "mode": mode, "pif": prep.pif, "source_radiometry": prep.source_radiometry}


def scene_row(scene, info: ModelInfo) -> dict:
    """What a scene's plan amounts to: tiles, km2 of valid ground, size in pixels at the model's GSD."""
    gx, gy = scene.source["ground_res_m"] or (info.gsd_m, info.gsd_m)
    km2 = scene.valid_fraction * scene.grid.height * scene.grid.width * gx * gy / 1e6
    return {"scene": scene.source["path"], "tiles": len(scene.tiles), "km2": round(km2, 3),
            "width": scene.grid.width, "height": scene.grid.height}


class Progress:
    """Tiles/s, km2/h and ETA on a terminal; silent otherwise."""

    def __init__(self, scenes: list[dict]):
        self.total = sum(s["tiles"] for s in scenes)
        self.km2_per_tile = sum(s["km2"] for s in scenes) / max(1, self.total)
        self.done = 0
        self.windows = 0
        self.t0 = time.monotonic()
        self.out = sys.stderr if sys.stderr.isatty() else None

    def update(self, stage: str, n: int) -> None:
        if stage == "tiles":
            self.done += n
        else:
            self.windows += n
        if self.out is None:
            return
        dt = max(time.monotonic() - self.t0, 1e-9)
        rate = self.done / dt
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        self.out.write(f"\rtiles {self.done}/{self.total} {rate:.2f}/s {rate * self.km2_per_tile * 3600:.1f} km2/h "
                       f"windows {self.windows} ETA(tiles) {eta:.0f}s ")
        self.out.flush()

    def close(self) -> None:
        if self.out is not None:
            self.out.write("\n")


def dry_run(scenes: list[str], model: str | Path, cfg: PredictConfig = PredictConfig(),
            checkpoint: str | Path | None = None, prepared: list[tuple] | None = None) -> dict:
    """What a prediction would do: tiles and km2 per scene, and time and memory estimated from
    one specialist batch and one refinement window measured on this machine. ``prepared``:
    :func:`prepare_scene` of each scene found, when the caller has it already."""
    import torch

    info = model_info(model, checkpoint)
    if prepared is None:
        prepared = [prepare_scene(p, info, cfg) for p in find_scenes(scenes)]
    rows = [scene_row(scene, info) for scene, _ in prepared]
    scene, prep = prepared[0]
    windows = [w for _, w in tile_windows(scene)][: cfg.batch_size]
    t = time.perf_counter()
    specialist_batch(prep, info, windows)
    per_tile = (time.perf_counter() - t) / max(1, len(windows))
    model_ = get_model(info)
    t = time.perf_counter()
    with torch.inference_mode():
        model_.refine(torch.zeros(1, 3, cfg.window, cfg.window), [np.array([[8, 8, cfg.window - 8, cfg.window - 8]],
                                                                          np.float32)])
    per_window = time.perf_counter() - t
    tiles_total = sum(r["tiles"] for r in rows)
    widest = max(r["width"] for r in rows)
    stitch_mb = 2 * cfg.tile * widest * 8 / 1e6
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"scenes": rows, "tiles": tiles_total, "km2": round(sum(r["km2"] for r in rows), 3),
            "specialist_s_per_tile": round(per_tile, 3), "generalist_s_per_window": round(per_window, 3),
            "estimated_s": round(tiles_total * (per_tile + per_window), 1),
            "estimate_note": "assumes one refinement window per tile; the real count follows the candidates",
            "estimated_peak_rss_mb": round(rss_mb + stitch_mb, 1)}


def pd_concat(frames: list) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True)
