"""``uvsam everything``: every object a generalist finds in a scene of any size, as polygons.

Everything mode (:mod:`uvsam.everything`) at city scale, object-aware like ``uvsam predict``:

1. **lattice**: the point prompts are one lattice over the whole scene (``tile /
   points_per_side`` px apart, anchored at the scene's corner, not at the tiles), so where the
   tile grid falls never changes what is prompted;
2. **windows**: each lattice point is decoded in the tile whose centre is nearest (every point
   exactly once, at least ``overlap / 2`` px inside its tile); each tile's objects are NMS-ed
   as SAM does in an image;
3. **cut objects**: an object touching a tile edge inside the scene was cut by the tile: its
   point is decoded again (the same one of its three masks) in a window centred on it
   (:func:`uvsam.prediction.refine.plan_windows`); still cut there, it is kept and flagged
   ``complete = 0``;
4. **merge**: duplicates across tiles (different points finding one object) are removed by box
   NMS over the scene, complete objects first, then by predicted IoU.

Tasks are plain functions run in process or on Dask (:mod:`uvsam.prediction.execution`) and
journaled beside the output, so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
import torch
from affine import Affine
from rasterio.windows import Window

from tiles.errors import TilesError
from tiles.plan import TilingConfig, plan
from tiles.radiometry import Stretch
from tiles.reader import RasterSource, ReadOptions
from uvsam import __version__
from uvsam.checkpoint import load_generalist
from uvsam.devices import Device, select
from uvsam.errors import InputError
from uvsam.everything import EverythingConfig, Objects, decode_points, generate
from uvsam.files import OutputLock, check_writable, remove_work_folder, sha256_file, work_folder
from uvsam.layers import layer_problem, write_layer
from uvsam.modeling.registry import get_spec
from uvsam.polygons import measure, polygonise
from uvsam.prediction.execution import Runner, run_journaled, run_local
from uvsam.prediction.journal import Journal, scene_identity
from uvsam.prediction.refine import plan_windows
from uvsam.prediction.scene import find_scenes
from uvsam.predictor import Predictor
from uvsam.progress import stage

COLUMNS = ["object_id", "scene", "predicted_iou", "stability", "area_m2", "complete", "point_x", "point_y"]


@dataclass(frozen=True)
class ObjectsConfig:
    """Everything mode over a scene: the per-image settings and the tiling."""

    everything: EverythingConfig = field(default_factory=EverythingConfig)
    tile: int = 1024
    overlap: int = 256
    gsd_m: float | None = None  # resample to this ground sample distance first (None: native)
    grid_offset: int = 0  # the tile grid starts this many px up-left of the scene (a check of seam handling)
    margin: int = 32  # px an object keeps from a window's edge to count as whole there

    def __post_init__(self):
        if self.tile < 64:
            raise InputError(f"tile must be at least 64 px, not {self.tile}")
        if not 0 <= self.overlap < self.tile:
            raise InputError(f"overlap must be in [0, tile {self.tile}) px, not {self.overlap}")
        if not 0 <= self.grid_offset < self.tile:
            raise InputError(f"grid offset must be in [0, tile {self.tile}) px, not {self.grid_offset}")
        if self.gsd_m is not None and not (math.isfinite(self.gsd_m) and self.gsd_m > 0):
            raise InputError(f"--gsd must be a positive number of metres, not {self.gsd_m}")
        if not 0 <= self.margin < self.tile // 4:
            raise InputError(f"margin must be in [0, tile / 4) px, not {self.margin}")

    @property
    def spacing(self) -> float:
        """Px between lattice points (the dense lattice in hierarchical mode)."""
        return self.tile / self.everything.points_per_side

    def to_dict(self) -> dict:
        return asdict(self)


# -- the generalist, as workers load it ---------------------------------------------------------
@dataclass(frozen=True)
class GeneralistRef:
    """A generalist as tasks need it (picklable): loaded once per process by :meth:`load`."""

    encoder: str
    checkpoint: str
    sha256: str
    device: Device = Device()

    def load(self) -> GeneralistSegmenter:
        key = (self.encoder, self.checkpoint, self.sha256, self.device.name)
        if _LOADED.get("key") != key:
            _LOADED.clear()
            _LOADED.update(key=key, value=GeneralistSegmenter(
                load_generalist(self.encoder, self.checkpoint).to(self.device.torch).eval(), self.device))
        return _LOADED["value"]


_LOADED: dict = {}


def generalist_ref(encoder: str, checkpoint: str | Path, device: str = "auto", precision: str = "auto"
                   ) -> GeneralistRef:
    """The :class:`GeneralistRef` of ``encoder`` with weights ``checkpoint``, checked before any work."""
    name = get_spec(encoder).name
    path = Path(checkpoint)
    if not path.is_file():
        raise InputError("checkpoint not found", path)
    return GeneralistRef(name, str(path), sha256_file(path), select(device, precision))


class GeneralistSegmenter:
    """Everything mode and point re-decoding on one image with a loaded generalist."""

    def __init__(self, model, device: Device = Device()):
        self.predictor = Predictor(model)
        self.device = device

    def find(self, image: np.ndarray, points: np.ndarray, cfg: EverythingConfig, stride: tuple[float, float]
             ) -> Objects:
        with self.device.autocast():
            self.predictor.set_image(image)
            return generate(self.predictor, cfg, points=points, stride=stride)

    def redecode(self, image: np.ndarray, points: np.ndarray, which: np.ndarray, cfg: EverythingConfig
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with self.device.autocast():
            self.predictor.set_image(image)
            return decode_points(self.predictor, points, which, cfg)


# -- the scene ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SceneRef:
    """A scene as tasks read it (picklable): path, read options and the 8-bit stretch."""

    path: str
    read: ReadOptions
    stretch: dict
    width: int
    height: int
    transform: tuple[float, ...]
    crs: str

    @property
    def affine(self) -> Affine:
        return Affine(*self.transform[:6])


def read_rgb_window(scene: SceneRef, col: int, row: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """((size, size, 3) uint8 RGB, (size, size) validity) of a window (one band is repeated)."""
    with stage("read"), RasterSource(scene.path, scene.read) as src:
        data, valid = src.read(Window(col, row, size, size))
    x = Stretch.from_dict(scene.stretch).apply(data, valid)
    x = np.repeat(x, 3, axis=0) if x.shape[0] == 1 else x[:3]
    return np.ascontiguousarray((x * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)), valid


def lattice(width: int, height: int, spacing: float) -> np.ndarray:
    """(P, 2) XY scene px: cell centres of a ``spacing`` lattice anchored at the scene's corner."""
    xs = (np.arange(math.ceil(width / spacing)) + 0.5) * spacing
    ys = (np.arange(math.ceil(height / spacing)) + 0.5) * spacing
    xs, ys = xs[xs < width], ys[ys < height]
    return np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)


def owners(points: np.ndarray, cols: list[int], rows: list[int], size: int) -> np.ndarray:
    """(P, 2) (row index, col index) of the tile whose centre is nearest each point, per axis."""
    cx = np.asarray(cols, float) + size / 2
    cy = np.asarray(rows, float) + size / 2
    return np.stack([np.abs(points[:, 1:2] - cy[None]).argmin(1), np.abs(points[:, :1] - cx[None]).argmin(1)], 1)


def _inner_sides(scene: SceneRef, col: int, row: int, size: int) -> tuple[bool, bool, bool, bool]:
    """(left, top, right, bottom): which edges of a window lie inside the scene (objects cut there)."""
    return col > 0, row > 0, col + size < scene.width, row + size < scene.height


def _records(scene: SceneRef, col: int, row: int, size: int, masks: np.ndarray, valid: np.ndarray,
             iou: np.ndarray, stab: np.ndarray, points: np.ndarray, which: np.ndarray) -> list[dict]:
    transform = scene.affine @ Affine.translation(col, row)
    left, top, right, bottom = _inner_sides(scene, col, row, size)
    out = []
    for k in range(len(masks)):
        m = masks[k] & valid
        if not m.any():
            continue
        rows_any, cols_any = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        y0, y1, x0, x1 = int(rows_any[0]), int(rows_any[-1]), int(cols_any[0]), int(cols_any[-1])
        cut = (left and x0 == 0) or (top and y0 == 0) or (right and x1 == size - 1) or (bottom and y1 == size - 1)
        with stage("vectorise"):
            geom = _valid(shapely.multipolygons(polygonise(m, transform)))
        out.append({"wkb": shapely.to_wkb(geom, hex=True), "box": [x0 + col, y0 + row, x1 + col, y1 + row],
                    "predicted_iou": float(iou[k]), "stability": float(stab[k]), "cut": bool(cut),
                    "point": [float(points[k][0]) + col, float(points[k][1]) + row], "which": int(which[k]),
                    "pixels": int(m.sum())})
    return out


def _valid(geom):
    """``geom`` made valid (8-connected pixel outlines may touch themselves), as a MultiPolygon."""
    if geom.is_valid:
        return geom
    fixed = shapely.make_valid(geom)
    parts = shapely.get_parts(fixed)
    return shapely.multipolygons([q for p in parts if p.geom_type in ("Polygon", "MultiPolygon")
                                  for q in shapely.get_parts(p)])


def window_objects(scene: SceneRef, col: int, row: int, size: int, points: np.ndarray, seg_ref, cfg: ObjectsConfig
                   ) -> list[dict]:
    """Everything mode in one window for the lattice points it owns (scene px): one record per object."""
    image, valid = read_rgb_window(scene, col, row, size)
    local = np.asarray(points, float) - [col, row]
    spacing = cfg.spacing
    found = seg_ref.load().find(image, local, cfg.everything, (spacing, spacing))
    return _records(scene, col, row, size, found.masks, valid, found.predicted_iou, found.stability,
                    found.points, found.which)


def recentred_objects(scene: SceneRef, col: int, row: int, size: int, points: np.ndarray, which: np.ndarray,
                      seg_ref, cfg: ObjectsConfig) -> list[dict]:
    """Cut objects' points (scene px) decoded again in a window around them, one record each
    (``pixels`` 0 where the mask came out empty)."""
    image, valid = read_rgb_window(scene, col, row, size)
    local = np.asarray(points, float) - [col, row]
    masks, iou, stab = seg_ref.load().redecode(image, local, np.asarray(which), cfg.everything)
    recs = _records(scene, col, row, size, masks, valid, iou, stab, local, which)
    # one per point, in order: an empty mask gives an empty record
    full, it = [], iter(recs)
    for k in range(len(points)):
        if (masks[k] & valid).any():
            full.append(next(it))
        else:
            full.append({"pixels": 0})
    return full


def prepare(path: str | Path, cfg: ObjectsConfig, bands: tuple[int, ...] | None = None):
    """(SceneRef, tiles) of one scene: checked, its stretch to 8 bits and its tile windows."""
    read = ReadOptions(bands, cfg.gsd_m)
    try:
        scene = plan(path, TilingConfig(cfg.tile, cfg.overlap, "px", "auto", read=read, offset=cfg.grid_offset,
                                        edges="inside"))
    except TilesError as e:
        raise InputError(str(e.message if hasattr(e, "message") else e), path) from None
    s = scene.source
    if not s.get("crs"):
        raise InputError("raster has no CRS; object polygons need georeferenced imagery", path)
    ref = SceneRef(str(path), read, scene.stretch.to_dict(), s["width"], s["height"], tuple(s["transform"]),
                   str(s["crs"]))
    return ref, scene


def scene_objects(path: str | Path, seg_ref, cfg: ObjectsConfig, workdir: Path, runner: Runner = run_local,
                  progress: Callable[[str, int], None] | None = None, prepared=None) -> tuple[list[dict], SceneRef]:
    """Every object of one scene: records (scene CRS ``geometry``, attributes) after the merge."""
    ref, scene = prepared or prepare(path, cfg)
    journal = Journal(workdir / "journal", scene=Path(str(path)).name, content=scene_identity(path),
                      model=seg_ref.sha256, options=json.dumps(cfg.to_dict(), sort_keys=True))
    size = cfg.tile
    grid = scene.grid
    rows, cols = sorted({t.window.row_off for t in grid}), sorted({t.window.col_off for t in grid})
    rows, cols = [int(r) for r in rows], [int(c) for c in cols]
    planned = {(int(t.window.row_off), int(t.window.col_off)) for t in scene.tiles}
    spacing = cfg.spacing * (4 if cfg.everything.hierarchical else 1)  # the sparse pass's lattice
    pts = lattice(ref.width, ref.height, spacing)
    own = owners(pts, cols, rows, size)
    tasks = []
    for (r, c) in sorted({tuple(o) for o in own.tolist()}):
        if (rows[r], cols[c]) not in planned:  # a tile without valid pixels
            continue
        mine = pts[(own[:, 0] == r) & (own[:, 1] == c)]
        tasks.append((ref, cols[c], rows[r], size, mine, seg_ref, cfg))
    keys = [_key("tile", t[1], t[2], t[3], t[4]) for t in tasks]
    records: list[dict] = []
    for out in run_journaled(runner, window_objects, tasks, keys, journal.has_blobs, journal.load_blobs,
                             journal.save_blobs):
        records += out
        if progress is not None:
            progress("tiles", 1)
    records = _recentre(ref, records, seg_ref, cfg, runner, journal, progress)
    return merge_objects(records, cfg.everything.box_nms_thresh), ref


def _key(*parts) -> str:
    return hashlib.sha1(json.dumps([p.tolist() if isinstance(p, np.ndarray) else p for p in parts]).encode()
                        ).hexdigest()[:16]


def _recentre(ref: SceneRef, records: list[dict], seg_ref, cfg: ObjectsConfig, runner: Runner, journal: Journal,
              progress) -> list[dict]:
    cut = [i for i, r in enumerate(records) if r["cut"]]
    if not cut:
        return records
    size = cfg.tile
    boxes = np.asarray([records[i]["box"] for i in cut], np.float32)
    boxes[:, 2:] += 1  # max inclusive -> exclusive
    windows = plan_windows(boxes, size, cfg.margin)
    tasks = []
    for w in windows:
        col = min(max(w.col, 0), max(ref.width - size, 0))  # inside the scene: no synthetic border
        row = min(max(w.row, 0), max(ref.height - size, 0))
        members = [cut[m] for m in w.members]
        tasks.append((ref, col, row, size, np.asarray([records[i]["point"] for i in members]),
                      np.asarray([records[i]["which"] for i in members]), seg_ref, cfg))
    keys = [_key("recentre", t[1], t[2], t[3], t[4], t[5]) for t in tasks]
    redrawn: dict[int, dict] = {}
    for w, out in zip(windows, run_journaled(runner, recentred_objects, tasks, keys, journal.has_blobs,
                                             journal.load_blobs, journal.save_blobs), strict=True):
        if progress is not None:
            progress("windows", 1)
        for m, rec in zip(w.members, out, strict=True):
            i = cut[m]
            if not rec.get("pixels"):
                continue
            best = redrawn.get(i)
            # of several windows (an object wider than one), a whole one first, else the largest
            if best is None or (best["cut"], -best["pixels"]) > (rec["cut"], -rec["pixels"]):
                redrawn[i] = rec
    return [redrawn.get(i, r) for i, r in enumerate(records)]


def merge_objects(records: list[dict], nms_thresh: float) -> list[dict]:
    """Records after box NMS over the scene (whole objects first, then higher predicted IoU), with
    ``complete`` and ``geometry``, in NMS order."""
    from torchvision.ops import nms

    if not records:
        return []
    boxes = torch.tensor([r["box"] for r in records], dtype=torch.float32)
    iou = torch.tensor([r["predicted_iou"] for r in records], dtype=torch.float64)
    score = iou - iou.min() + (~torch.tensor([r["cut"] for r in records])).double() * (iou.max() - iou.min() + 1)
    keep = nms(boxes, score.float(), nms_thresh).tolist()
    out = []
    for i in keep:
        r = dict(records[i])
        r["geometry"] = shapely.from_wkb(r.pop("wkb"))
        r["complete"] = int(not r.pop("cut"))
        out.append(r)
    return out


def objects_frame(name: str, records: list[dict], ref: SceneRef) -> gpd.GeoDataFrame:
    """The objects of one scene as a GeoDataFrame in the scene's CRS (:data:`COLUMNS`)."""
    geoms = [r["geometry"] for r in records]
    frame = gpd.GeoDataFrame({"scene": [name] * len(records)}, geometry=geoms, crs=ref.crs)
    # on the ground (a local equal-area projection): Web Mercator's own areas are 1.7x too large at Beijing
    frame["area_m2"] = np.round(measure(geoms, ref.crs)[0], 2) if len(frame) else pd.Series(dtype=float)
    t = ref.affine
    xy = [t @ tuple(r["point"]) for r in records]
    frame["predicted_iou"] = [round(r["predicted_iou"], 4) for r in records]
    frame["stability"] = [round(r["stability"], 4) for r in records]
    frame["complete"] = [r["complete"] for r in records]
    frame["point_x"] = [p[0] for p in xy]
    frame["point_y"] = [p[1] for p in xy]
    frame["object_id"] = [f"{Path(name).stem}-{k + 1}" for k in range(len(records))]
    return frame[[*COLUMNS, "geometry"]]


def run_everything(scenes: list[str], seg_ref, out: str | Path, cfg: ObjectsConfig,
                   layer: str = "objects", runner: Runner = run_local, bands: tuple[int, ...] | None = None,
                   crs: str | None = None, progress: Callable[[str, int], None] | None = None,
                   command: str = "everything", run_extra: dict | None = None, score: str = "stability") -> dict:
    """``uvsam everything``: every scene's objects into one GeoPackage layer (others kept), a run
    row in ``runs``. Resumable: tasks are journaled in ``OUT.work/LAYER/``, removed after success.

    ``seg_ref``: what finds the objects in a window (:class:`GeneralistRef`, or another with its
    ``load()``, ``sha256``, ``generalist`` (a GeneralistRef); ``uvsam oneshot``'s); ``score``: the
    name of the layer's column for the second score of each object (its stability in everything mode)."""
    out = check_writable(out)
    if out.suffix.lower() != ".gpkg":
        raise InputError("objects are written to a GeoPackage: give --out NAME.gpkg", out)
    problem = layer_problem(layer)
    if problem:
        raise InputError(problem, out)
    if crs is not None:
        from pyproj import CRS
        from pyproj.exceptions import CRSError

        try:
            CRS.from_user_input(crs)
        except CRSError:
            raise InputError(f"--crs {crs!r} is not a CRS pyproj knows", out) from None
    paths = find_scenes(scenes)
    if not paths:
        raise InputError("no rasters found in " + ", ".join(scenes))
    prepared = [prepare(p, cfg, bands) for p in paths]  # every scene checked before any work
    with OutputLock(out, f"{layer}.run", wait=False, what=f"layer {layer!r} is being written"):
        return _run_everything(paths, prepared, seg_ref, out, cfg, layer, runner, crs, progress, command,
                               run_extra, score)


def _run_everything(paths, prepared, seg_ref, out: Path, cfg: ObjectsConfig, layer: str, runner: Runner, crs,
                    progress, command: str, run_extra: dict | None, score: str) -> dict:
    workdir = work_folder(out, layer)
    workdir.mkdir(parents=True, exist_ok=True)
    frames, out_crs = [], crs
    for path, prep in zip(paths, prepared, strict=True):
        records, ref = scene_objects(path, seg_ref, cfg, workdir, runner, progress, prep)
        out_crs = out_crs or ref.crs
        frames.append(objects_frame(Path(path).name, records, ref).to_crs(out_crs))
    frame = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), geometry="geometry", crs=out_crs)
    if score != "stability":
        frame = frame.rename(columns={"stability": score})
    gen = getattr(seg_ref, "generalist", seg_ref)
    run = {"run_id": hashlib.sha1(f"{out}|{layer}|{datetime.now().isoformat()}".encode()).hexdigest()[:12],
           "layer": layer, "command": command, "scenes": json.dumps([str(p) for p in paths]),
           "config": json.dumps(cfg.to_dict()), "generalist": gen.encoder, "checkpoint": gen.checkpoint,
           "generalist_sha256": gen.sha256, "device": gen.device.describe(), **(run_extra or {}),
           "uvsam_version": __version__,
           "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with stage("write"):
        write_layer(out, layer, frame, run, "objects")
    remove_work_folder(workdir)
    return {"out": str(out), "layer": layer, "scenes": len(paths), "objects": len(frame),
            "complete": int(frame["complete"].sum()) if len(frame) else 0}
