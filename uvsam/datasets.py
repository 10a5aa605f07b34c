"""Labelled scenes for training and evaluation: rasters paired with village labels.

Images are any GDAL raster (a file, a folder or a glob), read through :mod:`tiles` at the
model's ground resolution and preprocessed exactly as ``uvsam predict`` reads them
(:mod:`uvsam.preprocess`). Labels are either masks (any
raster; values > 0 are village, the mask's nodata is "unlabelled") or vector files
(GeoPackage, GeoJSON, Shapefile, FlatGeobuf, GeoParquet) in any CRS, reprojected to the
image and rasterised on the fly. A folder of labels is paired with the images by file stem
(``uvsam import-xyz`` writes ``images/`` and ``masks/`` that pair this way); a single vector
file labels every image.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import shapely
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from tiles.errors import first_line
from tiles.radiometry import Stretch
from tiles.reader import RasterSource, ReadOptions
from tiles.remote import is_remote, location
from tiles.vrt import check_vrt_sources
from uvsam.errors import InputError
from uvsam.files import read_features
from uvsam.labels import IGNORE
from uvsam.polygons import nonfinite, valid_parts
from uvsam.preprocess import InputSpec, Preprocessing, scene_preprocessing

RASTER_EXT = (".tif", ".tiff", ".vrt", ".png", ".jpg", ".jpeg", ".jp2", ".img")
VECTOR_EXT = (".gpkg", ".geojson", ".json", ".shp", ".fgb", ".parquet")
MAX_SCENE_PIXELS = 12_000 * 12_000  # one training scene in memory (at the training GSD)


def find_files(spec: str | Path, exts: tuple[str, ...], what: str) -> list[Path]:
    """Files named by ``spec``: a file, a folder (its files with ``exts``, sorted) or a glob."""
    text = str(spec)
    if is_remote(text):  # a URL or /vsi path: one raster, opened (and checked) by GDAL
        return [location(text)]
    p = Path(text)
    if p.is_file():
        return _checked([p])
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in exts and not f.name.startswith("."))
        if not files:
            raise InputError(f"folder holds no {what} ({', '.join(exts)})", p)
        return _checked(files)
    if any(c in text for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(text, recursive=True) if Path(f).suffix.lower() in exts)
        if not files:
            raise InputError(f"pattern matches no {what}", text)
        return _checked(files)
    raise InputError("does not exist", p)


def _checked(files: list[Path]) -> list[Path]:
    """The user's VRTs may read only what :func:`tiles.vrt.check_vrt_sources` allows."""
    for f in files:
        if f.suffix.lower() == ".vrt":
            check_vrt_sources(f)
    return files


@dataclass(frozen=True)
class LabelledScene:
    image: Path
    labels: Path


def pair_scenes(images: str | Path, labels: str | Path) -> list[LabelledScene]:
    """Pair each image with its labels (same stem in a folder or glob, or one shared vector file)."""
    image_files = find_files(images, RASTER_EXT, "rasters")
    label_path = location(str(labels))
    if label_path.is_file():
        if label_path.suffix.lower() in VECTOR_EXT or len(image_files) == 1:
            return [LabelledScene(im, label_path) for im in image_files]
        raise InputError("one label raster for several images; give a folder of masks named like the images",
                         label_path)
    label_files = find_files(labels, RASTER_EXT + VECTOR_EXT, "label files")
    by_stem: dict[str, Path] = {}
    for f in label_files:
        by_stem.setdefault(f.stem, f)
    out = []
    for im in image_files:
        if im.stem not in by_stem:
            raise InputError(f"no labels named {im.stem}.* in {labels}", im)
        out.append(LabelledScene(im, by_stem[im.stem]))
    return out


@dataclass
class SceneArrays:
    """One scene in memory at the model's GSD.

    image: (3, H, W) float32 model input on the 0..255 scale (:mod:`uvsam.preprocess`; invalid
    pixels take the training median colour); labels: (H, W) uint8 with 0 background, 1 village,
    255 unlabelled (nodata in image or mask); gsd_m: ground metres per pixel (mean of the two
    axes); preprocessing: the scene's :class:`~uvsam.preprocess.Preprocessing`.
    """

    path: Path
    image: np.ndarray
    labels: np.ndarray
    gsd_m: float
    preprocessing: Preprocessing

    @property
    def shape(self) -> tuple[int, int]:
        return self.labels.shape

    @property
    def stretch(self) -> Stretch:
        return self.preprocessing.stretch


def open_scene(path: Path, read: ReadOptions) -> RasterSource:
    """A georeferenced scene opened through the one reader, small enough to hold in memory."""
    src = RasterSource(path, read)  # tiles' errors name the file themselves
    if src.crs is None:
        src.close()
        raise InputError("raster has no CRS: uvsam needs georeferenced imagery to know its ground "
                         "resolution (georeference XYZ tiles with `uvsam import-xyz`)", path)
    if src.width * src.height > MAX_SCENE_PIXELS:
        src.close()
        raise InputError(f"scene is {src.width} x {src.height} px at the training resolution; cut it into "
                         f"scenes of at most {MAX_SCENE_PIXELS // 10**6} Mpx", path)
    return src


def read_image(path: Path, spec: InputSpec) -> tuple[np.ndarray, np.ndarray, RasterSource, Preprocessing]:
    """(3, H, W) model input, (H, W) validity, the (closed) source and the scene's preprocessing,
    read and preprocessed as ``uvsam predict`` reads a scene for a model of ``spec``."""
    with open_scene(path, spec.read) as src:
        prep = scene_preprocessing(src, spec)
        data, valid = src.read(Window(0, 0, src.width, src.height))
        if not valid.any():
            raise InputError("raster has no valid pixels (all nodata)", path)
        img = prep.apply(data, valid, path)
    return img, valid, src, prep


def read_validity(path: Path, bands: tuple[int, ...] | None = None) -> tuple[np.ndarray, RasterSource]:
    """(H, W) validity of a scene on its native grid, and the (closed) source: the label grid."""
    with open_scene(path, ReadOptions(bands)) as src:
        _, valid = src.read(Window(0, 0, src.width, src.height))
    if not valid.any():
        raise InputError("raster has no valid pixels (all nodata)", path)
    return valid, src


def rasterise_labels(label_path: Path, src: RasterSource, labels_crs: str | None = None) -> np.ndarray:
    """(H, W) uint8 labels (0, 1, IGNORE) on ``src``'s grid from a mask raster or a vector file."""
    if label_path.suffix.lower() in VECTOR_EXT:
        return _rasterise_vector(label_path, src, labels_crs)
    try:
        with rasterio.open(label_path) as lab:
            same_grid = (lab.crs == src.crs and lab.transform == src.transform
                         and (lab.width, lab.height) == (src.width, src.height))
            if same_grid or (lab.crs is None and (lab.width, lab.height) == (src.width, src.height)):
                data = lab.read(1, masked=True)
            elif lab.crs is None:
                raise InputError(f"mask has no CRS and is {lab.width} x {lab.height} px, the image "
                                 f"{src.width} x {src.height}", label_path)
            else:
                _check_overlap(lab, src, label_path)
                with WarpedVRT(lab, crs=src.crs, transform=src.transform, width=src.width, height=src.height,
                               resampling=Resampling.nearest) as vrt:
                    data = vrt.read(1, masked=True)
    except rasterio.errors.RasterioIOError as e:
        raise InputError(f"not a readable raster ({first_line(e)})", label_path) from None
    out = (np.ma.getdata(data) > 0).astype(np.uint8)
    out[np.ma.getmaskarray(data)] = IGNORE
    return out


def _check_overlap(lab, src: RasterSource, label_path: Path) -> None:
    """A mask raster on another grid must cover some of the image (else: wrong file or CRS)."""
    from rasterio.warp import transform_bounds

    try:
        left, bottom, right, top = transform_bounds(lab.crs, src.crs, *lab.bounds)
    except Exception:  # noqa: BLE001 - bounds PROJ cannot carry over: the warp below decides
        return
    a, b = src.transform @ (0, 0), src.transform @ (src.width, src.height)
    if right <= min(a[0], b[0]) or left >= max(a[0], b[0]) or top <= min(a[1], b[1]) or bottom >= max(a[1], b[1]):
        image = [round(float(v), 1) for v in (min(a[0], b[0]), min(a[1], b[1]), max(a[0], b[0]), max(a[1], b[1]))]
        mask = [round(float(v), 1) for v in (left, bottom, right, top)]
        raise InputError(f"does not overlap {src.path.name} (the mask spans {mask}, the image {image} in {src.crs}): "
                         "wrong file or wrong CRS?", label_path)


def split_layer(spec: str) -> tuple[Path, str | None]:
    """``FILE[:LAYER]`` -> (file, layer or None); a file whose own name holds a colon stays whole."""
    path = Path(spec)
    if not path.exists() and ":" in spec:
        head, tail = spec.rsplit(":", 1)
        return Path(head), tail or None
    return path, None


def read_vector(path: Path, labels_crs: str | None = None, layer: str | None = None, flag: str = "--labels-crs"):
    """The features of a vector file (``layer`` of it, or its first) with their CRS: ``labels_crs``
    where given, else the file's; a file naming none is read as longitude/latitude only when its
    coordinates can be that (GeoJSON's rule), else refused naming ``flag``."""
    try:
        gdf = read_features(path, layer)
    except Exception as e:  # noqa: BLE001 - pyogrio raises several types for unreadable files
        raise InputError(f"not a readable vector file ({first_line(e)})", path) from None
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
    bad = nonfinite(gdf.geometry.values)
    if len(bad):
        raise InputError(f"{len(bad)} feature(s) have NaN or infinite coordinates (the first: feature "
                         f"{int(gdf.index[bad[0]])}); fix or remove them", path)
    if labels_crs:
        gdf = gdf.set_crs(labels_crs, allow_override=True)
    elif gdf.crs is None or (gdf.crs.to_epsg() == 4326 and len(gdf)):
        b = gdf.total_bounds if len(gdf) else np.zeros(4)
        if len(gdf) and not (-180 <= b[0] <= b[2] <= 180 and -90 <= b[1] <= b[3] <= 90):
            raise InputError(f"coordinates are not longitude/latitude but the file names no other CRS; give {flag}",
                             path)
        if gdf.crs is None:
            gdf = gdf.set_crs("EPSG:4326")
    return gdf


def _rasterise_vector(path: Path, src: RasterSource, labels_crs: str | None) -> np.ndarray:
    from rasterio.features import rasterize

    gdf = read_vector(path, labels_crs).to_crs(src.crs)
    geoms = list(valid_parts(gdf.geometry.values)[0])  # burnt part by part: no union needed, none risked
    if not geoms:
        return np.zeros((src.height, src.width), np.uint8)
    left, top = src.transform @ (0, 0)
    right, bottom = src.transform @ (src.width, src.height)
    footprint = shapely.box(min(left, right), min(top, bottom), max(left, right), max(top, bottom))
    if not any(g.intersects(footprint) for g in geoms):
        b = shapely.bounds(shapely.union_all(geoms)).round(1).tolist()
        f = [round(float(v), 1) for v in footprint.bounds]
        raise InputError(f"none of its {len(geoms)} polygons overlaps {src.path.name} (labels span {b}, the image "
                         f"{f} in {src.crs}): wrong file or wrong CRS?", path)
    return rasterize(((g, 1) for g in geoms), out_shape=(src.height, src.width), transform=src.transform,
                     fill=0, dtype="uint8")


def load_scene(scene: LabelledScene, spec: InputSpec, labels_crs: str | None = None) -> SceneArrays:
    """Read one labelled scene into memory for a model of ``spec`` (gsd None: the native resolution)."""
    img, valid, src, prep = read_image(scene.image, spec)
    labels = rasterise_labels(scene.labels, src, labels_crs)
    labels[~valid] = IGNORE
    if not (labels != IGNORE).any():
        raise InputError("no labelled pixel overlaps the image", scene.labels)
    return SceneArrays(scene.image, img, labels, float(np.mean(src.ground_res)), prep)


def native_gsd(path: Path) -> float:
    """Mean ground resolution (m/px) of a georeferenced raster."""
    with RasterSource(path) as src:
        if src.ground_res is None:
            raise InputError("raster has no CRS: its ground resolution is unknown", path)
        return float(np.mean(src.ground_res))
