"""Tile services as rasters: an XYZ/TMS URL template (or a GDAL WMS/WMTS service description)
read through GDAL's WMS driver over an area, with an on-disk cache and a polite rate limit.

For a URL template, :func:`service_raster` first brings the tiles covering ``bbox`` at the zoom
into the cache folder (:func:`fetch_tiles`): at most ``max_connections`` requests at once and
``rate`` per second, transient failures (429, 5xx, dropped connections) retried with back-off
(``Retry-After`` honoured), a tile the server lacks (204/404) stored as a transparent one, every
tile written atomically and never asked for again (a later run, or a resumed one, reads the
cache). It then writes two small files and returns the second, a raster like any other scene:

- ``zZ.xml``: a GDAL_WMS description (TMS mini-driver) of the cached tiles on the Web Mercator
  grid of the zoom, RGBA, so a transparent tile reads as no data, never as black;
- ``zZ_AREA.vrt``: the part covering ``bbox`` (degrees), snapped outwards to whole pixels, with
  the lower zooms as overviews (the reader resamples to the model's GSD).

Both are rewritten only when their content changes, so a run over the same area resumes (the
journal keys a local scene by its file's size and time). The cache is a folder of files: Dask
workers on other machines need it on shared storage (``--tile-cache``), as they would local
scenes. A GDAL WMS/WMTS XML of the user's is read as it is (its own cache and limits).
"""

from __future__ import annotations

import email.utils
import hashlib
import math
import os
import re
import threading
import time
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

import numpy as np
import rasterio
from pyproj import Transformer
from rasterio.dtypes import _gdal_typename
from rasterio.io import MemoryFile

from tiles.errors import TilesError, first_line
from tiles.remote import RETRY_STATUS
from tiles.xyz import HALF_CIRCUMFERENCE, XYZ_TILE_PX

MAX_ZOOM = 24
MAX_TILES = 250_000  # one request's worth of tiles (a 60 x 60 km city at zoom 17 is ~40 000)
_TOKENS = re.compile(r"\{(z|x|y|-y)\}")


@dataclass(frozen=True)
class TileService:
    """A tile service and the area to read: ``url`` (an XYZ/TMS template with ``{z}``, ``{x}``,
    ``{y}`` or ``{-y}``, or a GDAL WMS/WMTS XML file), ``bbox`` (west, south, east, north in
    degrees), ``zoom`` (None: the coarsest whose pixels are at most the model's GSD on the
    ground at the area's centre), ``cache`` (folder; None: :func:`default_cache`),
    ``max_connections`` (requests at once), ``rate`` (requests per second), ``user_agent``."""

    url: str
    bbox: tuple[float, float, float, float]
    zoom: int | None = None
    cache: Path | None = None
    max_connections: int = 2
    rate: float = 8.0
    user_agent: str = "uvsam"

    @property
    def is_template(self) -> bool:
        return bool(_TOKENS.search(self.url))


def zoom_for(gsd_m: float, latitude: float) -> int:
    """The coarsest zoom whose Web Mercator pixels are at most ``gsd_m`` on the ground at ``latitude``."""
    ground0 = 2 * HALF_CIRCUMFERENCE / XYZ_TILE_PX * math.cos(math.radians(latitude))
    return max(0, min(MAX_ZOOM, math.ceil(math.log2(ground0 / gsd_m))))


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/uvsam/tiles`` (``~/.cache/uvsam/tiles``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "uvsam" / "tiles"


def check_template(template: str) -> None:
    """A TilesError naming the template unless it is an http(s)/file URL with {z}, {x} and {y} (or {-y})."""
    if urlsplit(template).scheme not in ("http", "https", "file"):
        raise TilesError("a tile URL template starts with http://, https:// or file://", template)
    named = set(re.findall(r"\{[^}]*\}", template))
    if "{s}" in named or not ({"{z}", "{x}"} <= named and named & {"{y}", "{-y}"}):
        raise TilesError("a tile URL template names {z}, {x} and {y} (or {-y} for TMS), and no {s}: give one host",
                         template)


def tiles_covering(bbox: tuple[float, float, float, float], zoom: int) -> list[tuple[int, int]]:
    """(x, y) of the XYZ tiles at ``zoom`` that cover ``bbox`` (degrees), row by row."""
    to_merc = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)
    x0, y0, x1, y1 = to_merc.transform_bounds(*bbox, densify_pts=21)
    h, n = HALF_CIRCUMFERENCE, 2**zoom
    step = 2 * h / n

    def index(v: float, upper: bool) -> int:  # an area ending on a tile's edge (to 1/100 px, after the
        eps = 0.01 / XYZ_TILE_PX               # round trip through degrees) does not need the next tile
        return min(n - 1, max(0, math.floor(v / step - (eps if upper else -eps))))

    c0, c1 = index(x0 + h, False), index(x1 + h, True)
    r0, r1 = index(h - y1, False), index(h - y0, True)
    count = (c1 - c0 + 1) * (r1 - r0 + 1)
    if count > MAX_TILES:
        raise TilesError(f"bbox {bbox} at zoom {zoom} is {count} tiles (at most {MAX_TILES}): a smaller area or zoom")
    return [(x, y) for y in range(r0, r1 + 1) for x in range(c0, c1 + 1)]


class RateLimit:
    """At most ``rate`` calls of :meth:`wait` per second, across threads (evenly spaced)."""

    def __init__(self, rate: float):
        self.interval, self.next, self.lock = 1.0 / rate, 0.0, threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            at, self.next = max(now, self.next), max(now, self.next) + self.interval
        time.sleep(max(0.0, at - now))


def _empty_tile() -> bytes:
    """A transparent 256 px PNG: what a tile the server lacks reads as (no data)."""
    with MemoryFile() as mem, warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)  # a tile: placed by its name
        with mem.open(driver="PNG", width=XYZ_TILE_PX, height=XYZ_TILE_PX, count=4, dtype="uint8") as png:
            png.write(np.zeros((4, XYZ_TILE_PX, XYZ_TILE_PX), np.uint8))
        return mem.read()


def fetch_tiles(service: TileService, zoom: int, folder: Path, attempts: int = 6,
                progress=None) -> dict[str, int]:
    """Bring the tiles covering ``service.bbox`` at ``zoom`` into ``folder/{z}/{x}/{y}.tile``
    (see the module docstring); returns counts: ``fetched``, ``cached``, ``missing``."""
    check_template(service.url)
    wanted = tiles_covering(service.bbox, zoom)
    counts = {"fetched": 0, "cached": 0, "missing": 0}
    todo = []
    for x, y in wanted:
        if (folder / str(zoom) / str(x) / f"{y}.tile").is_file():
            counts["cached"] += 1
        else:
            todo.append((x, y))
    limit, lock, empty = RateLimit(service.rate), threading.Lock(), _empty_tile()

    def fetch(xy: tuple[int, int]) -> None:
        x, y = xy
        url = (service.url.replace("{z}", str(zoom)).replace("{x}", str(x)).replace("{-y}", str(2**zoom - 1 - y))
               .replace("{y}", str(y)))
        delay = 1.0
        for attempt in range(attempts):
            limit.wait()
            try:
                request = urllib.request.Request(url, headers={"User-Agent": service.user_agent})
                with urllib.request.urlopen(request, timeout=60) as r:
                    body = r.read() if r.status != 204 else b""
                kind = "fetched" if body else "missing"
                break
            except urllib.error.HTTPError as err:
                if err.code == 404:
                    body, kind = b"", "missing"
                    break
                if err.code not in RETRY_STATUS or attempt == attempts - 1:
                    raise TilesError(f"the tile server answered HTTP {err.code}", url) from None
                delay = max(delay, _retry_after(err.headers.get("Retry-After")))
            except (urllib.error.URLError, OSError) as err:
                if attempt == attempts - 1:
                    raise TilesError(f"cannot reach the tile server ({getattr(err, 'reason', err)})", url) from None
            time.sleep(delay)
            delay = min(delay * 2, 60.0)
        target = folder / str(zoom) / str(x) / f"{y}.tile"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{threading.get_ident()}.part")
        tmp.write_bytes(body or empty)
        tmp.replace(target)
        with lock:
            counts[kind] += 1
        if progress is not None:
            progress(1)

    with ThreadPoolExecutor(max_workers=max(1, service.max_connections)) as pool:
        list(pool.map(fetch, todo))  # the first failure is raised here (the tiles fetched so far are kept)
    return counts


def _retry_after(value: str | None) -> float:
    """Seconds a ``Retry-After`` header asks for (a number or an HTTP date), capped at 5 minutes."""
    if not value:
        return 0.0
    try:
        return min(300.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return min(300.0, max(0.0, when.timestamp() - time.time()))


def wms_xml(folder: Path, zoom: int) -> str:
    """The GDAL_WMS description of the cached tiles of ``folder`` at ``zoom`` (RGBA, Web Mercator)."""
    server = escape(folder.resolve().as_uri() + "/${z}/${x}/${y}.tile")
    h = HALF_CIRCUMFERENCE
    return (f"<GDAL_WMS>\n"
            f'  <Service name="TMS"><ServerUrl>{server}</ServerUrl></Service>\n'
            f"  <DataWindow><UpperLeftX>{-h!r}</UpperLeftX><UpperLeftY>{h!r}</UpperLeftY>"
            f"<LowerRightX>{h!r}</LowerRightX><LowerRightY>{-h!r}</LowerRightY><TileLevel>{zoom}</TileLevel>"
            f"<TileCountX>1</TileCountX><TileCountY>1</TileCountY><YOrigin>top</YOrigin></DataWindow>\n"
            f"  <Projection>EPSG:3857</Projection>\n"
            f"  <BlockSizeX>{XYZ_TILE_PX}</BlockSizeX><BlockSizeY>{XYZ_TILE_PX}</BlockSizeY>\n"
            f"  <BandsCount>4</BandsCount>\n"
            f"</GDAL_WMS>\n")


def service_raster(service: TileService, gsd_m: float | None = None, progress=None) -> Path:
    """The raster (a VRT) of ``service`` over its bbox, its tiles fetched first for a template
    (see the module docstring)."""
    w, s, e, n = service.bbox
    if not (-180 <= w < e <= 180 and -85.06 <= s < n <= 85.06):
        raise TilesError(f"bbox {service.bbox}: give WEST,SOUTH,EAST,NORTH in degrees (Web Mercator: |lat| <= 85)")
    key = hashlib.sha256(service.url.encode()).hexdigest()[:12]
    folder = (service.cache or default_cache()) / f"{urlsplit(service.url).hostname or 'local'}-{key}"
    if service.is_template:
        if service.zoom is None and gsd_m is None:
            raise TilesError("give the zoom to read the tile service at", service.url)
        zoom = service.zoom if service.zoom is not None else zoom_for(gsd_m, (s + n) / 2)
        if not 0 <= zoom <= MAX_ZOOM:
            raise TilesError(f"zoom {zoom} is outside 0..{MAX_ZOOM}", service.url)
        fetch_tiles(service, zoom, folder / "tiles", progress=progress)
        source = folder / f"z{zoom}.xml"
        _write_if_changed(source, wms_xml(folder / "tiles", zoom))
    else:  # the user's own GDAL WMS/WMTS description (its cache and limits are its own)
        source = Path(service.url)
        if not source.is_file():
            raise TilesError("tile service description does not exist (give a file, or a URL template with "
                             "{z}/{x}/{y})", service.url)
        zoom = None
    area = hashlib.sha256(repr((service.bbox, str(source.resolve()))).encode()).hexdigest()[:8]
    vrt = folder / f"{'z' + str(zoom) if zoom is not None else source.stem}_{area}.vrt"
    _write_if_changed(vrt, _subset_vrt(source, service.bbox, vrt))
    return vrt


def _subset_vrt(source: Path, bbox: tuple[float, float, float, float], vrt: Path) -> str:
    """A VRT of ``source``'s pixels that cover ``bbox`` (degrees), snapped outwards to whole pixels."""
    try:
        ds = rasterio.open(source)
    except rasterio.errors.RasterioIOError as e:
        raise TilesError(f"not a tile service GDAL can open ({first_line(e)})", source) from None
    with ds:
        if ds.crs is None:
            raise TilesError("tile service has no CRS", source)
        to_src = Transformer.from_crs("EPSG:4326", ds.crs, always_xy=True)
        x0, y0, x1, y1 = to_src.transform_bounds(*bbox, densify_pts=21)
        inv = ~ds.transform
        cols, rows = zip(*[inv * (x, y) for x in (x0, x1) for y in (y0, y1)], strict=True)
        eps = 0.01  # px: a bbox on a pixel's edge, give or take its round trip through degrees
        c0, r0 = max(0, math.floor(min(cols) + eps)), max(0, math.floor(min(rows) + eps))
        c1, r1 = min(ds.width, math.ceil(max(cols) - eps)), min(ds.height, math.ceil(max(rows) - eps))
        if c1 <= c0 or r1 <= r0:
            raise TilesError(f"bbox {bbox} lies outside the tile service's extent", source)
        width, height = c1 - c0, r1 - r0
        t = ds.transform * rasterio.Affine.translation(c0, r0)
        rel = os.path.relpath(source.resolve(), vrt.parent.resolve())
        lines = [f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">',
                 f"  <SRS>{escape(ds.crs.to_wkt())}</SRS>",
                 f"  <GeoTransform>{t.c!r}, {t.a!r}, {t.b!r}, {t.f!r}, {t.d!r}, {t.e!r}</GeoTransform>"]
        for b in range(1, ds.count + 1):
            lines += [f'  <VRTRasterBand dataType="{_gdal_typename(ds.dtypes[b - 1])}" band="{b}">',
                      f"    <ColorInterp>{ds.colorinterp[b - 1].name.capitalize()}</ColorInterp>",
                      "    <SimpleSource>",
                      f'      <SourceFilename relativeToVRT="1">{escape(rel)}</SourceFilename>',
                      f"      <SourceBand>{b}</SourceBand>",
                      f'      <SrcRect xOff="{c0}" yOff="{r0}" xSize="{width}" ySize="{height}"/>',
                      f'      <DstRect xOff="0" yOff="0" xSize="{width}" ySize="{height}"/>',
                      "    </SimpleSource>", "  </VRTRasterBand>"]
        lines.append("</VRTDataset>")
    return "\n".join(lines) + "\n"


def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` atomically, leaving an identical file (and its modification time) alone."""
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(text)
    tmp.replace(path)
