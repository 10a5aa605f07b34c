"""Reading: a raster as the model should see it, window by window, with its validity mask.

:class:`RasterSource` opens anything GDAL reads (GeoTIFF, COG, VRT, 1..N bands, 8/16-bit,
float) through rasterio. Nodata values, internal masks and alpha bands all become one validity
mask read alongside every window. With ``gsd`` the scene is resampled on the fly (a WarpedVRT)
so that one pixel spans ``gsd`` metres *on the ground* along both axes, whatever the CRS
(metres, Web Mercator's inflated metres, or degrees); with ``crs`` it is also reprojected.
Windows may reach past the scene: the outside is filled and marked invalid.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from pyproj import CRS, Geod, Transformer
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.env import set_gdal_config
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform
from rasterio.windows import Window

from tiles.errors import TilesError, first_line
from tiles.remote import RETRY, RemotePath, gdal_name, location

_GEOD = Geod(ellps="WGS84")
GDAL_CACHE_MB = 256  # GDAL's block cache defaults to 5% of RAM; tiling needs about one block row
_CACHE_BOUND = False
GSD_TOLERANCE = 0.01  # within 1% of the target ground resolution the scene is read as it is


@dataclass(frozen=True)
class ReadOptions:
    """How to read a scene. ``bands`` are 1-based (None: :func:`default_bands`, red, green and
    blue by colour interpretation); ``gsd`` the target ground sample distance in metres; ``crs``
    a CRS to reproject to."""

    bands: tuple[int, ...] | None = None
    gsd: float | None = None
    crs: str | None = None
    resampling: str = "bilinear"

    def to_dict(self) -> dict:
        return {"bands": list(self.bands) if self.bands else None, "gsd": self.gsd, "crs": self.crs,
                "resampling": self.resampling}


def bound_gdal_cache() -> None:
    """Cap GDAL's block cache for this process at ``GDAL_CACHE_MB`` (once; a no-op if the user
    set ``GDAL_CACHEMAX`` themselves), so that memory stays flat however large the scene.

    Set once rather than per call: changing the cap flushes GDAL's cache, and tiles re-read the
    blocks they share with their neighbours.
    """
    global _CACHE_BOUND
    if not _CACHE_BOUND and "GDAL_CACHEMAX" not in os.environ:
        set_gdal_config("GDAL_CACHEMAX", GDAL_CACHE_MB * 2**20)  # in bytes: a small number would be bytes too
    if not _CACHE_BOUND:  # remote rasters: transient errors retried with back-off, unless the user chose
        for key, value in RETRY.items():
            if key not in os.environ:
                set_gdal_config(key, value)
    _CACHE_BOUND = True


def ground_resolution(crs, transform: Affine, width: int, height: int) -> tuple[float, float]:
    """Metres on the ground spanned by one pixel (along x, along y) at the scene's centre."""
    if crs is None:
        raise TilesError("raster has no CRS, so its ground resolution is unknown")
    cx, cy = width / 2, height / 2
    pts = [transform @ (cx, cy), transform @ (cx + 1, cy), transform @ (cx, cy + 1)]
    to_ll = Transformer.from_crs(CRS.from_user_input(crs), CRS.from_epsg(4326), always_xy=True)
    (lon0, lat0), (lon1, lat1), (lon2, lat2) = (to_ll.transform(x, y) for x, y in pts)
    gx = _GEOD.inv(lon0, lat0, lon1, lat1)[2]
    gy = _GEOD.inv(lon0, lat0, lon2, lat2)[2]
    return gx, gy


_REMOTE_LOCKS: dict[str, threading.RLock] = {}
_REMOTE_LOCKS_GUARD = threading.Lock()


def _guard(path) -> contextlib.AbstractContextManager:
    """What a source's GDAL calls hold: for a remote raster, one lock per URL and process. Two
    threads of a process that open or read the same object at once can hang for good in GDAL's
    /vsicurl/ when a download fails meanwhile (seen with GDAL 3.10: both threads waiting on the
    region being downloaded, after a dropped connection); reading an object one call at a time
    per process avoids it, and processes (Dask workers) still read in parallel. Local files: none."""
    if not isinstance(path, RemotePath):
        return contextlib.nullcontext()
    with _REMOTE_LOCKS_GUARD:
        return _REMOTE_LOCKS.setdefault(str(path), threading.RLock())


def _uncached(path) -> rasterio.Env:
    """GDAL reading ``path`` afresh (not from what it cached of an earlier, failed transfer)."""
    return rasterio.Env(CPL_VSIL_CURL_NON_CACHED=gdal_name(path))


def _serial(method):
    """Run a :class:`RasterSource` method holding its source's guard (:func:`_guard`)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._guard:
            return method(self, *args, **kwargs)
    return wrapper


class RasterSource:
    """A scene opened for tiling (a context manager).

    Attributes after opening: ``crs``, ``transform``, ``width``, ``height`` (of the grid the model
    sees, after any resampling), ``bands``, ``dtype``, ``nodata``, ``ground_res`` (metres, x/y).
    """

    def __init__(self, path: str | Path, options: ReadOptions | None = None):
        self.path = location(path)  # a Path, or a RemotePath (URL or /vsi path) GDAL reads by ranges
        self.options = options or ReadOptions()
        self._src = None
        self._vrt = None
        self._added_alpha = False
        self._guard = _guard(self.path)
        self.open()

    # -- opening ---------------------------------------------------------------------------
    @_serial
    def open(self) -> None:
        self._retrying(self._open_once, reopen=False)  # a remote body cut short reads as a corrupt file

    def _open_once(self) -> None:
        if not self.path.exists():
            raise TilesError("file does not exist", self.path)
        bound_gdal_cache()
        try:
            self._src = rasterio.open(gdal_name(self.path))
        except rasterio.errors.RasterioIOError as e:
            raise TilesError(f"not a raster GDAL can read ({first_line(e)})", self.path) from None
        src = self._src
        _check_integrity(src, self.path)
        bands = self.options.bands or default_bands(src.colorinterp)
        bad = [b for b in bands if not 1 <= b <= src.count]
        if bad:
            raise TilesError(f"band(s) {bad} requested but the raster has {src.count}", self.path)
        self.bands = tuple(bands)
        self.dtype = np.dtype(src.dtypes[self.bands[0] - 1])
        if any(np.dtype(src.dtypes[b - 1]) != self.dtype for b in self.bands):
            raise TilesError(f"bands {self.bands} have different data types {src.dtypes}", self.path)
        self.nodata = src.nodata
        self._dataset = self._warp(src) if (self.options.gsd or self.options.crs) else src
        ds = self._dataset
        self.crs, self.transform, self.width, self.height = ds.crs, ds.transform, ds.width, ds.height
        # Where the only mask is a nodata value, validity is computed from the data itself:
        # GDAL would otherwise decode every block a second time to build the mask.
        flags = [ds.mask_flag_enums[b - 1] for b in self.bands]
        self._mask_from_nodata = ds.nodata is not None and all(f == [MaskFlags.nodata] for f in flags)
        # The warper's alpha band is the validity; read it directly: GDAL exposes it as the
        # bands' mask only for some photometric layouts (not, e.g., for 8-band multispectral)
        self._alpha = ds.count if (ds is self._vrt and self._added_alpha) else None
        self.ground_res = ground_resolution(self.crs, self.transform, self.width, self.height) if self.crs else None

    def _warp(self, src):
        if src.crs is None:
            raise TilesError("raster has no CRS: it cannot be resampled to a ground resolution or reprojected",
                             self.path)
        dst_crs = CRS.from_user_input(self.options.crs) if self.options.crs else src.crs
        if dst_crs != src.crs:
            transform, width, height = calculate_default_transform(src.crs, dst_crs, src.width, src.height,
                                                                   *src.bounds)
        else:
            transform, width, height = src.transform, src.width, src.height
        if self.options.gsd:
            gx, gy = ground_resolution(dst_crs, transform, width, height)
            fx, fy = self.options.gsd / gx, self.options.gsd / gy
            if abs(fx - 1) > GSD_TOLERANCE or abs(fy - 1) > GSD_TOLERANCE:
                transform = transform @ Affine.scale(fx, fy)
                width, height = max(1, math.ceil(width / fx)), max(1, math.ceil(height / fy))
        if dst_crs == src.crs and (transform, width, height) == (src.transform, src.width, src.height):
            return src
        # Without a nodata value the warped view carries validity in an alpha band, built by
        # GDAL's warper from the source's own mask (internal mask, alpha, or a VRT's mask band)
        # and from the edges of the source footprint.
        # Floating-point scenes without one: NaN is their nodata, so the warper neither blends
        # NaN into its neighbours nor marks NaN pixels valid.
        nan_nodata = src.nodata is None and np.dtype(src.dtypes[0]).kind == "f"
        extra = {"src_nodata": np.nan, "nodata": np.nan} if nan_nodata else {}
        self._added_alpha = src.nodata is None and not nan_nodata and ColorInterp.alpha not in src.colorinterp
        self._vrt = WarpedVRT(
            src, crs=dst_crs, transform=transform, width=width, height=height,
            resampling=Resampling[self.options.resampling], add_alpha=self._added_alpha, **extra,
        )
        return self._vrt

    @_serial
    def close(self) -> None:
        for ds in (self._vrt, self._src):
            if ds is not None:
                ds.close()
        self._vrt = self._src = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):  # picklable for DataLoader workers and Dask: reopen on the other side
        return {"path": self.path, "options": self.options}

    def __setstate__(self, state):
        self.path, self.options = state["path"], state["options"]
        self._src = self._vrt = None
        self._guard = _guard(self.path)
        self.open()

    # -- reading ---------------------------------------------------------------------------
    @_serial
    def read(self, window: Window, per_band: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(bands, h, w) data in the source dtype and (h, w) bool validity for ``window``.

        A pixel is valid where every band is; ``per_band=True`` returns the (bands, h, w) masks
        instead (a nodata value may hit one band of a pixel and not the others). Parts of the
        window outside the scene are filled with the nodata value (or 0) and invalid.
        """
        h, w = int(window.height), int(window.width)
        data = np.full((len(self.bands), h, w), self.nodata if self.nodata is not None else 0, self.dtype)
        valid = np.zeros((len(self.bands), h, w) if per_band else (h, w), bool)
        r0, c0 = int(window.row_off), int(window.col_off)
        rr0, cc0 = max(r0, 0), max(c0, 0)
        rr1, cc1 = min(r0 + h, self.height), min(c0 + w, self.width)
        if rr1 <= rr0 or cc1 <= cc0:
            return data, valid
        inner = Window(cc0, rr0, cc1 - cc0, rr1 - rr0)
        block, masks = self._retrying(lambda: self._read_window(inner))
        if block.dtype.kind == "f":  # NaN and infinities are never data, whatever the nodata value says
            masks = np.where(np.isfinite(block), masks, 0)
        ys, xs = slice(rr0 - r0, rr1 - r0), slice(cc0 - c0, cc1 - c0)
        data[:, ys, xs] = block
        if per_band:
            valid[:, ys, xs] = masks > 0
        else:
            valid[ys, xs] = (masks > 0).all(axis=0)
        return data, valid

    def _read_window(self, inner: Window) -> tuple[np.ndarray, np.ndarray]:
        try:
            block = self._dataset.read(self.bands, window=inner)
            return block, self._masks(block, window=inner)
        except rasterio.errors.RasterioIOError as e:
            raise TilesError(f"cannot read window {inner} ({first_line(e)})", self.path, transient=True) from None

    def _retrying(self, read, reopen: bool = True):
        """``read()``, asked again after a pause on a remote source whose transfer failed (a body
        cut short, a connection reset: what GDAL's own retries of HTTP errors do not cover), GDAL
        reading the object afresh (and the dataset reopened first, with ``reopen``); a local file's
        error is final at once."""
        attempts = REMOTE_READ_RETRIES + 1 if isinstance(self.path, RemotePath) else 1
        for attempt in range(attempts):
            try:
                with _uncached(self.path) if attempt else contextlib.nullcontext():
                    if attempt and reopen:
                        self._open_once()
                    return read()
            except TilesError as e:
                if attempt == attempts - 1 or not e.transient:
                    raise
                self.close()
                time.sleep(REMOTE_RETRY_DELAY_S * 2**attempt)
        raise AssertionError("unreachable")

    def _masks(self, block: np.ndarray, **read) -> np.ndarray:
        """(bands, h, w) validity (0 invalid) of ``block``, read with the same window/shape."""
        if self._mask_from_nodata:
            return self._nodata_masks(block)
        if self._alpha is not None:
            if "out_shape" in read:
                read["out_shape"] = read["out_shape"][-2:]
            return np.broadcast_to(self._dataset.read(self._alpha, **read), block.shape)
        if "out_shape" in read:
            read["out_shape"] = (len(self.bands), *read["out_shape"][-2:])
        return self._dataset.read_masks(self.bands, **read)

    def _nodata_masks(self, block: np.ndarray) -> np.ndarray:
        nd = self._dataset.nodata
        if np.isnan(nd):
            return ~np.isnan(block)
        if np.issubdtype(block.dtype, np.integer):
            info = np.iinfo(block.dtype)
            if nd != int(nd) or not info.min <= nd <= info.max:  # a value the band cannot hold
                return np.ones(block.shape, bool)
        return block != np.asarray(nd).astype(block.dtype)

    @_serial
    def read_overview(self, max_pixels: int = 4_000_000) -> tuple[np.ndarray, np.ndarray]:
        """The whole scene decimated to at most ``max_pixels`` (GDAL uses overviews where present)."""
        f = max(1.0, math.sqrt(self.width * self.height / max_pixels))
        h, w = max(1, round(self.height / f)), max(1, round(self.width / f))
        def read():
            ds = self._dataset
            try:
                data = ds.read(self.bands, out_shape=(len(self.bands), h, w), resampling=Resampling.nearest)
                return data, self._masks(data, out_shape=(h, w), resampling=Resampling.nearest)
            except rasterio.errors.RasterioIOError as e:
                raise TilesError(f"cannot read the scene's overview ({first_line(e)})", self.path,
                                 transient=True) from None

        data, masks = self._retrying(read)
        valid = (masks > 0).all(axis=0)
        if data.dtype.kind == "f":
            valid &= np.isfinite(data).all(axis=0)
        return data, valid

    @_serial
    def read_on_grid(self, crs, transform: Affine, width: int, height: int,
                     resampling: str = "average") -> tuple[np.ndarray, np.ndarray]:
        """(bands, height, width) float64 data and (height, width) validity of the source's
        bands (chosen as for every read), resampled onto an arbitrary grid (``crs``,
        ``transform``, size): how two years are compared on common ground.

        Validity follows the source's own mask (nodata, internal mask, alpha) and the edges of
        its footprint, as in :meth:`read`.
        """
        src = self._src
        nan_nodata = src.nodata is None and np.dtype(src.dtypes[0]).kind == "f"
        extra = {"src_nodata": np.nan, "nodata": np.nan} if nan_nodata else {}
        alpha = src.nodata is None and not nan_nodata and ColorInterp.alpha not in src.colorinterp
        try:
            with WarpedVRT(src, crs=CRS.from_user_input(crs), transform=transform, width=width, height=height,
                           resampling=Resampling[resampling], add_alpha=alpha, **extra) as vrt:
                data = vrt.read(list(self.bands)).astype(np.float64)
                if alpha:
                    valid = vrt.read(vrt.count) > 0
                else:
                    valid = (vrt.read_masks(list(self.bands)) > 0).all(axis=0)
        except rasterio.errors.RasterioIOError as e:
            raise TilesError(f"cannot resample onto the common grid ({first_line(e)})", self.path) from None
        return data, valid & np.isfinite(data).all(axis=0)

    @_serial
    def read_picture(self, crs, transform: Affine, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`read_on_grid` for a picture: where the grid is in the scene's own CRS, north-up
        and no finer than the scene, the scene's pixels under it are averaged by GDAL's decimating
        read instead of the warper (several times quicker on a large scene; the grid's pixels only
        partly on the scene are left out). Any other grid is warped."""
        src = self._src
        rel = ~src.transform * transform  # grid pixel -> scene pixel
        aligned = (self._dataset is src and src.crs is not None and CRS.from_user_input(crs) == CRS(src.crs)
                   and rel.b == rel.d == 0 and rel.a >= 1 and rel.e >= 1)
        if not aligned:
            return self.read_on_grid(crs, transform, width, height)
        # the grid's columns and rows that lie on the scene, and the scene window (fractional) under them
        eps = 1e-9
        c0, r0 = max(0, math.ceil(-rel.c / rel.a - eps)), max(0, math.ceil(-rel.f / rel.e - eps))
        c1 = min(width, math.floor((src.width - rel.c) / rel.a + eps))
        r1 = min(height, math.floor((src.height - rel.f) / rel.e + eps))
        data, valid = np.zeros((len(self.bands), height, width)), np.zeros((height, width), bool)
        if c1 <= c0 or r1 <= r0:
            return data, valid
        x0, y0 = max(0.0, rel.c + c0 * rel.a), max(0.0, rel.f + r0 * rel.e)
        x1, y1 = min(src.width, rel.c + c1 * rel.a), min(src.height, rel.f + r1 * rel.e)
        window, shape = Window(x0, y0, x1 - x0, y1 - y0), (r1 - r0, c1 - c0)

        def read():
            try:
                block = src.read(self.bands, window=window, out_shape=(len(self.bands), *shape),
                                 resampling=Resampling.average)
                return block, self._masks(block, window=window, out_shape=shape, resampling=Resampling.nearest)
            except rasterio.errors.RasterioIOError as e:
                raise TilesError(f"cannot read the scene for a picture ({first_line(e)})", self.path,
                                 transient=True) from None

        block, masks = self._retrying(read)
        data[:, r0:r1, c0:c1] = block
        valid[r0:r1, c0:c1] = (masks > 0).all(axis=0) & np.isfinite(block).all(axis=0)
        return data, valid

    def describe(self) -> dict:
        """What the model sees, for manifests."""
        return {
            "path": str(self.path), "options": self.options.to_dict(),
            "crs": self.crs.to_string() if self.crs else None,
            "transform": list(self.transform)[:6], "width": self.width, "height": self.height,
            "bands": list(self.bands), "dtype": self.dtype.name, "nodata": self.nodata,
            "ground_res_m": list(self.ground_res) if self.ground_res else None,
        }


def read_on_grid(path: str | Path, crs, bounds, width: int, height: int,
                 bands: tuple[int, ...] | list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(bands, height, width) float64 image (``bands``; default :func:`default_bands`) and
    validity of the raster at ``path``, averaged onto a grid of ``bounds`` in ``crs``."""
    x0, y0, x1, y1 = bounds
    transform = Affine((x1 - x0) / width, 0, x0, 0, -(y1 - y0) / height, y1)
    with RasterSource(path, ReadOptions(tuple(bands) if bands else None)) as src:
        return src.read_on_grid(crs, transform, width, height)


def default_bands(colorinterp) -> tuple[int, ...]:
    """The bands read when none are named: red, green, blue by their colour interpretation;
    else the first three that are not alpha (a multispectral file's first three); else all."""
    where = {ci: i for i, ci in enumerate(colorinterp, start=1)}
    if all(ci in where for ci in (ColorInterp.red, ColorInterp.green, ColorInterp.blue)):
        return where[ColorInterp.red], where[ColorInterp.green], where[ColorInterp.blue]
    colour = [i for i, ci in enumerate(colorinterp, start=1) if ci != ColorInterp.alpha]
    return tuple(colour[:3]) if len(colour) >= 3 else tuple(colour or range(1, len(colorinterp) + 1))


REMOTE_READ_RETRIES = 3  # a remote read whose transfer failed is asked again this often, after
REMOTE_RETRY_DELAY_S = 0.5  # this pause, doubled each time
MAX_BLOCK_BYTES = 256 * 2**20  # one compressed block decoded: a 4096 x 4096 px RGBA float32 tile is 256 MiB


def _check_integrity(src, path) -> None:
    """Refuse a GeoTIFF whose header promises more than the file holds (truncated downloads,
    headers claiming huge dimensions) before any work is planned on it.

    An uncompressed GeoTIFF must be at least as large as its pixels; any GeoTIFF must be able
    to decode its first and last blocks (where a truncated file fails).
    """
    if src.driver != "GTiff":
        return
    if src.compression is not None:  # a compressed block is decoded whole, however little of it is read
        (bh, bw) = src.block_shapes[0]
        block = bh * bw * sum(np.dtype(d).itemsize for d in src.dtypes)
        if block > MAX_BLOCK_BYTES:
            raise TilesError(f"its compressed blocks are {bw} x {bh} px: {block / 1e6:,.0f} MB each to decode "
                             f"(more than {MAX_BLOCK_BYTES / 1e6:,.0f} MB; a decompression bomb?). Re-tile it: "
                             "gdal_translate -co TILED=YES -co COMPRESS=DEFLATE IN OUT", path)
    size = path.stat().st_size if isinstance(path, Path) else None  # a remote object: its blocks are checked
    if src.compression is None and size is not None:
        need = src.width * src.height * sum(np.dtype(d).itemsize for d in src.dtypes)
        if need > size:
            raise TilesError(f"header says {src.width} x {src.height} px x {src.count} bands ({need / 1e6:,.0f} MB) "
                             f"but the file holds {size / 1e6:,.1f} MB: truncated or corrupt", path)
    try:
        for r, c in ((0, 0), (src.height - 1, src.width - 1)):
            src.read(1, window=Window(c, r, 1, 1))
    except rasterio.errors.RasterioIOError as e:
        raise TilesError(f"truncated or corrupt: cannot decode its pixels ({first_line(e)})", path,
                         transient=True) from None
