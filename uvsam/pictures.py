"""Pictures a user looks at before opening a GIS: the quicklook of a prediction, the overlay of an
evaluation and the curves of a training run (PNG, drawn with matplotlib's Agg canvas: no display,
no pyplot state, safe in threads and notebooks).

The map pictures place the image at known pixels: :class:`Picture` says where the map lies in
the PNG and the map's geotransform, so a point on the ground can be found in the picture (the
tests look for village outlines there). Imagery is read through the one reader
(:class:`tiles.reader.RasterSource`: bands by colour interpretation, validity from nodata, masks
and alpha) onto the picture's grid, and shown with a per-band 2-98 percentile stretch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from affine import Affine
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from pyproj import CRS
from rasterio.transform import array_bounds
from rasterio.warp import transform_bounds

from tiles.radiometry import compute_stretch
from tiles.reader import RasterSource, ReadOptions, ground_resolution
from tiles.remote import location
from uvsam import __version__
from uvsam.files import atomic_path

LONGEST = 1400  # px, the longest side of a map picture
MARGIN, TITLE = 16, 56  # px around the map, and the band above it for the title
VILLAGE_RGB = (228, 26, 28)  # the villages layer's QGIS style colour
CANDIDATE_RGB = (255, 127, 0)
OUTCOME_RGB = {"hit": (26, 152, 80), "false alarm": (215, 48, 39), "miss": (69, 117, 180)}


@dataclass(frozen=True)
class Picture:
    """A PNG on disk; the map occupies ``map_box`` = (left, top, width, height) px of it, with
    ``transform`` (map pixel -> ``crs`` coordinates)."""

    path: Path
    size: tuple[int, int]  # width, height of the PNG
    map_box: tuple[int, int, int, int]
    transform: Affine
    crs: CRS

    @classmethod
    def read(cls, path: str | Path) -> Picture:
        """The placement of a map picture uvsam wrote (from its PNG text chunk)."""
        with Image.open(path) as im:
            meta, size = json.loads(im.text["uvsam-map"]), im.size
        return cls(Path(path), size, tuple(meta["map_box"]), Affine(*meta["transform"]),
                   CRS.from_user_input(meta["crs"]))

    def pixel(self, x: float, y: float) -> tuple[int, int]:
        """(column, row) in the PNG of the point ``(x, y)`` in the map's CRS."""
        col, row = ~self.transform @ (x, y)
        return int(self.map_box[0] + col), int(self.map_box[1] + row)


# -- grids and imagery --------------------------------------------------------------------------------
def map_grid(bounds: tuple[float, float, float, float], longest: int = LONGEST) -> tuple[Affine, int, int]:
    """A north-up grid over ``bounds`` with square pixels, its longer side ``longest`` px."""
    x0, y0, x1, y1 = bounds
    size = max(x1 - x0, y1 - y0) / longest
    w, h = max(1, math.ceil((x1 - x0) / size)), max(1, math.ceil((y1 - y0) / size))
    return Affine(size, 0, x0, 0, -size, y1), w, h


def stretch(data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(bands, h, w) -> (h, w, 3) uint8: each band's 2-98 percentile of valid pixels to 0..255
    (:func:`tiles.radiometry.compute_stretch`); one band shown grey; invalid pixels light grey."""
    bands = data if data.shape[0] >= 3 else np.repeat(data[:1], 3, axis=0)
    out = np.full((*valid.shape, 3), 235, np.uint8)
    if valid.any():
        scaled = np.clip(compute_stretch(bands[:3], valid, "percentile").apply(bands[:3], valid), 0, 1) * 255
        out[valid] = np.moveaxis(scaled, 0, -1)[valid].astype(np.uint8)
    return out


def read_picture(paths: list[Path], boxes: list[tuple], crs, transform: Affine, width: int, height: int,
                 bands: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(h, w, 3) uint8 image and validity of the scenes (the first valid pixel wins) on a grid;
    each scene read only over its own box (bounds in ``crs``), so a city of many tiles is quick."""
    data, valid = np.zeros((3, height, width)), np.zeros((height, width), bool)
    for path, (x0, y0, x1, y1) in zip(paths, boxes, strict=True):
        c0, r0 = ~transform @ (x0, y1)
        c1, r1 = ~transform @ (x1, y0)
        c0, r0 = max(0, math.floor(c0)), max(0, math.floor(r0))
        c1, r1 = min(width, math.ceil(c1)), min(height, math.ceil(r1))
        if c1 <= c0 or r1 <= r0:
            continue
        with RasterSource(path, ReadOptions(bands)) as src:
            d, v = src.read_picture(crs, transform @ Affine.translation(c0, r0), c1 - c0, r1 - r0)
        d = d if d.shape[0] >= 3 else np.repeat(d[:1], 3, axis=0)
        new = v & ~valid[r0:r1, c0:c1]
        data[:, r0:r1, c0:c1][:, new] = d[:3, new]
        valid[r0:r1, c0:c1] |= new
    return stretch(data, valid), valid


def _rings(geoms, transform: Affine) -> list[np.ndarray]:
    """Every ring of ``geoms`` as (n, 2) map-pixel coordinates."""
    out = []
    for g in geoms:
        for ring in shapely.get_rings(shapely.get_parts(g)) if g is not None and not g.is_empty else []:
            xy = shapely.get_coordinates(ring)
            col, row = ~transform @ (xy[:, 0], xy[:, 1])
            out.append(np.column_stack([col, row]))
    return out


def nice_length(target: float) -> float:
    """The 1-2-5 number at or below ``target``."""
    if target <= 0:
        return 0.0
    k = 10 ** math.floor(math.log10(target))
    return max(m * k for m in (1, 2, 5) if m * k <= target)


# -- figure plumbing ----------------------------------------------------------------------------------
def _map_figure(width: int, height: int, title: str, subtitle: str) -> tuple[Figure, object, tuple]:
    fw, fh = width + 2 * MARGIN, height + TITLE + MARGIN
    fig = Figure(figsize=(fw / 100, fh / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((MARGIN / fw, MARGIN / fh, width / fw, height / fh))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    fig.text(MARGIN / fw, 1 - 22 / fh, title, fontsize=13, weight="bold", va="baseline")
    fig.text(MARGIN / fw, 1 - 42 / fh, subtitle, fontsize=9, color="#444444", va="baseline")
    return fig, ax, (MARGIN, TITLE, width, height)


def _scale_bar(ax, metres_per_px: float, width: int, height: int) -> None:
    metres = nice_length(0.2 * width * metres_per_px)
    if metres <= 0:
        return
    px = metres / metres_per_px
    x, y = 12, height - 14
    ax.add_patch(Rectangle((x - 6, y - 22), px + 12, 32, facecolor="white", alpha=0.8, lw=0))
    ax.add_patch(Rectangle((x, y), px / 2, 5, facecolor="black", lw=0))
    ax.add_patch(Rectangle((x + px / 2, y), px / 2, 5, facecolor="white", edgecolor="black", lw=0.8))
    ax.text(x + px / 2, y - 4, f"{metres / 1000:g} km" if metres >= 1000 else f"{metres:g} m", ha="center",
            va="bottom", fontsize=9)


def _save(fig: Figure, png: Path, box=None, transform: Affine | None = None, crs=None) -> tuple[int, int]:
    """Write the PNG (atomically), RGB when every pixel is opaque (a white figure: a quarter fewer
    bytes to deflate than matplotlib's RGBA, the same colours); a map's placement travels in its
    ``uvsam-map`` text chunk (:meth:`Picture.read`)."""
    png = Path(png)
    info = PngInfo()
    info.add_text("Software", f"uvsam {__version__}")
    if box is not None:
        info.add_text("uvsam-map", json.dumps({"map_box": list(box), "transform": list(transform)[:6],
                                                "crs": CRS.from_user_input(crs).to_wkt()}))
    fig.set_facecolor("white")
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    image = Image.fromarray(rgba[..., :3] if (rgba[..., 3] == 255).all() else rgba)
    with atomic_path(png) as tmp:
        image.save(tmp, format="png", pnginfo=info, dpi=(fig.dpi, fig.dpi))
    return image.size


def _rgb(c: tuple[int, int, int]) -> tuple[float, float, float]:
    return tuple(v / 255 for v in c)


# -- the three pictures -------------------------------------------------------------------------------
def quicklook(png: str | Path, scenes: list[str | Path], villages, candidates=None, title: str = "villages",
              subtitle: str = "", bands: tuple[int, ...] | None = None) -> Picture:
    """The scenes' thumbnail with the villages outlined (and candidates dashed), a legend and a
    scale bar, in the first scene's CRS. ``villages``/``candidates``: GeoDataFrames (any CRS)."""
    paths = [location(s) for s in scenes]  # files or URLs
    crs, boxes = None, []
    for p in paths:
        with RasterSource(p, ReadOptions(bands)) as src:
            crs = crs or CRS.from_user_input(src.crs)
            boxes.append(transform_bounds(src.crs, crs, *array_bounds(src.height, src.width, src.transform)))
    b = np.array(boxes)
    transform, w, h = map_grid((b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()))
    image, _ = read_picture(paths, boxes, crs, transform, w, h, bands)
    fig, ax, box = _map_figure(w, h, title, subtitle)
    ax.imshow(image, extent=(0, w, h, 0), interpolation="nearest")
    handles = []
    if candidates is not None and len(candidates):
        ax.add_collection(LineCollection(_rings(candidates.to_crs(crs).geometry, transform),
                                         colors=[_rgb(CANDIDATE_RGB)], linewidths=1.2, linestyles="dashed"))
        handles.append(Line2D([], [], color=_rgb(CANDIDATE_RGB), ls="--", label="candidates (specialist)"))
    v = villages.to_crs(crs) if len(villages) else villages
    ax.add_collection(LineCollection(_rings(v.geometry, transform) if len(v) else [],
                                     colors=[_rgb(VILLAGE_RGB)], linewidths=2.0))
    handles.insert(0, Line2D([], [], color=_rgb(VILLAGE_RGB), lw=2, label=f"villages ({len(villages)})"))
    handles.append(Patch(facecolor=(235 / 255,) * 3, edgecolor="#999999", label="no data"))
    ax.legend(handles=handles, loc="upper right", fontsize=9, framealpha=0.85)
    _scale_bar(ax, ground_resolution(crs, transform, w, h)[0], w, h)
    size = _save(fig, png, box, transform, crs)
    return Picture(Path(png), size, box, transform, crs)


def outcome_image(image: np.ndarray, predicted: np.ndarray, truth: np.ndarray, known: np.ndarray,
                  alpha: float = 0.55) -> np.ndarray:
    """``image`` with hits, false alarms and misses blended in their colours (where ``known``)."""
    out = image.astype(np.float32)
    for name, where in (("hit", predicted & truth), ("false alarm", predicted & ~truth), ("miss", ~predicted & truth)):
        where = where & known
        out[where] = (1 - alpha) * out[where] + alpha * np.array(OUTCOME_RGB[name], np.float32)
    return out.astype(np.uint8)


def overlay(png: str | Path, image_path: str | Path, predicted: np.ndarray, truth: np.ndarray, known: np.ndarray,
            crs, transform: Affine, title: str, subtitle: str = "", bands: tuple[int, ...] | None = None,
            pixel_m: tuple[float, float] | None = None) -> Picture:
    """An evaluation's outcome on its scene: hits, false alarms and misses over the image, with
    their areas in the legend and a scale bar. The masks are (H, W) on the grid (``crs``,
    ``transform``); ``known``: labelled pixels (IGNORE excluded)."""
    height, width = truth.shape
    f = max(1, math.ceil(max(height, width) / LONGEST))
    small = transform @ Affine.scale(f, f)
    h, w = math.ceil(height / f), math.ceil(width / f)
    with RasterSource(image_path, ReadOptions(bands)) as src:
        data, valid = src.read_on_grid(crs, small, w, h)
    picture = outcome_image(stretch(data, valid), predicted[::f, ::f], truth[::f, ::f], known[::f, ::f])
    fig, ax, box = _map_figure(w, h, title, subtitle)
    ax.imshow(picture, extent=(0, w, h, 0), interpolation="nearest")
    px_m2 = (pixel_m[0] * pixel_m[1]) if pixel_m else abs(transform.a * transform.e)
    areas = {"hit": predicted & truth, "false alarm": predicted & ~truth, "miss": ~predicted & truth}
    handles = [Patch(facecolor=_rgb(OUTCOME_RGB[k]), label=f"{k}: {(m & known).sum() * px_m2 / 1e4:.2f} ha")
               for k, m in areas.items()]
    ax.legend(handles=handles, loc="upper right", fontsize=9, framealpha=0.85)
    _scale_bar(ax, (pixel_m[0] if pixel_m else abs(transform.a)) * f, w, h)
    size = _save(fig, png, box, small, crs)
    return Picture(Path(png), size, box, small, CRS.from_user_input(crs))


def curves(png: str | Path, history: list[dict]) -> Path:
    """A training run's curves: training loss and validation IoU per epoch (the metrics CSV's
    columns ``train_*`` and ``val_*_iou``), the epochs of the UV-SAM path shaded."""
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    loss, iou = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in history]
    parts = any(r.get("train_sam") is not None for r in history)  # else the total is the CE alone
    for key, colour, style, z in (("train_ce", "#ff7f0e", "--", 2), ("train_sam", "#9467bd", "--", 2),
                                  ("train_total", "#d62728", "o-", 3)):
        values = [r.get(key) for r in history]
        if (key == "train_total" or parts) and any(v is not None for v in values):
            loss.plot(epochs, [np.nan if v is None else v for v in values], style, color=colour, label=key[6:], ms=3,
                      zorder=z)
    for key, colour, name in (("val_specialist_iou", "#1f77b4", "specialist"), ("val_uvsam_iou", "#2ca02c", "UV-SAM")):
        values = [r.get(key) for r in history]
        if any(v is not None for v in values):
            iou.plot(epochs, [np.nan if v is None else v for v in values], "o-", color=colour, label=name, ms=3)
    sam = [r["epoch"] for r in history if r.get("sam_path")]
    for ax in (loss, iou):
        if sam:
            ax.axvspan(min(sam) - 0.5, max(sam) + 0.5, color="#eeeeee", zorder=0, label="UV-SAM path")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=9)
    loss.set_title("training loss")
    iou.set_title("validation IoU" if any("val_specialist_iou" in r for r in history) else
                  "validation IoU (no validation scenes)")
    iou.set_ylim(0, 1)
    fig.tight_layout()
    _save(fig, png)
    return Path(png)
