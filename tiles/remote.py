"""Rasters where they live: ``http(s)://``, ``s3://``, ``gs://``, ``az://`` URLs and GDAL ``/vsi...``
paths, read by windows through GDAL's virtual file systems (a COG costs a few range requests per
tile, never a download).

:class:`RemotePath` is the name of such a raster: a ``str`` (the URL as given) with the parts of
a path people read (``name``, ``stem``, ``suffix``) and what GDAL opens (``gdal``); it is never a
``pathlib.Path``, which folds ``https://host`` into ``https:/host``. :func:`location` turns what a
user wrote into a ``Path`` or a ``RemotePath``.

Credentials come from GDAL's usual environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_S3_ENDPOINT``,
``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_CONNECTION_STRING``, ...). Transient failures
(HTTP 429/5xx, dropped connections) are retried by GDAL with back-off (:data:`RETRY`, unless the
environment sets them). :meth:`RemotePath.identity` names the object's version (ETag or
Last-Modified, and size), so a resumed run never mixes results of a replaced object, and
:func:`read_afresh_if_replaced` makes a long-lived process (a notebook, a Dask worker) forget what
GDAL cached of an object once a run sees another version of it.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from tiles.errors import TilesError, first_line

RETRY_STATUS = (408, 429, 500, 502, 503, 504)  # HTTP answers worth asking again (after a pause)
SCHEMES = {"http": "/vsicurl/", "https": "/vsicurl/", "s3": "/vsis3/", "gs": "/vsigs/", "az": "/vsiaz/"}
# GDAL's retries of transient HTTP errors, with its back-off between them (GDAL >= 3.2 doubles the delay)
RETRY = {"GDAL_HTTP_MAX_RETRY": "5", "GDAL_HTTP_RETRY_DELAY": "1", "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
         "GDAL_HTTP_TIMEOUT": "60"}


def is_remote(spec: str | os.PathLike) -> bool:
    text = str(spec) if not isinstance(spec, Path) else ""
    return text.startswith("/vsi") or urlsplit(text).scheme in SCHEMES


class RemotePath(str):
    """A raster behind a URL or a GDAL ``/vsi`` path (see the module docstring)."""

    @property
    def gdal(self) -> str:
        """What GDAL opens: ``/vsicurl/https://...``, ``/vsis3/bucket/key``, or the ``/vsi`` path as given."""
        if self.startswith("/vsi"):
            return str(self)
        parts = urlsplit(self)
        if parts.scheme in ("http", "https"):
            return SCHEMES[parts.scheme] + str(self)
        return SCHEMES[parts.scheme] + parts.netloc + parts.path

    @property
    def _pure(self) -> PurePosixPath:
        return PurePosixPath(urlsplit(self).path if not self.startswith("/vsi") else self)

    @property
    def name(self) -> str:
        return self._pure.name

    @property
    def stem(self) -> str:
        return self._pure.stem

    @property
    def suffix(self) -> str:
        return self._pure.suffix

    def exists(self) -> bool:  # whether it opens is GDAL's to say, with its own error
        return True

    is_file = exists

    def is_dir(self) -> bool:
        return False

    def resolve(self) -> RemotePath:
        return self

    def identity(self, attempts: int = 4) -> str:
        """The object's version: ``URL|ETag|Last-Modified|size`` from an HTTP HEAD (retried with
        back-off), or for ``s3://`` from S3's HEAD through botocore when installed (with GDAL's
        ``AWS_S3_ENDPOINT``/``AWS_HTTPS`` settings). Where the store names no version (``gs://``,
        ``az://``, other ``/vsi`` paths, an HTTP server without ETag or Last-Modified, S3 without
        botocore): :meth:`content_identity`."""
        scheme = urlsplit(self).scheme
        if scheme == "s3":
            return self._s3_identity()
        if scheme not in ("http", "https"):
            return self.content_identity()
        delay = 0.5
        for attempt in range(attempts):
            try:
                with urllib.request.urlopen(urllib.request.Request(self, method="HEAD"), timeout=30) as r:
                    h = r.headers
                    if not (h.get("ETag") or h.get("Last-Modified")):
                        return self.content_identity()
                    return "|".join([str(self), h.get("ETag", ""), h.get("Last-Modified", ""),
                                     h.get("Content-Length", "")])
            except urllib.error.HTTPError as e:
                if e.code not in RETRY_STATUS or attempt == attempts - 1:
                    raise TilesError(f"cannot reach the raster (HTTP {e.code})", self) from None
            except (urllib.error.URLError, OSError) as e:
                if attempt == attempts - 1:
                    raise TilesError(f"cannot reach the raster ({getattr(e, 'reason', e)})", self) from None
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def content_identity(self, blocks: int = 16) -> str:
        """A version read from the raster itself, for stores that name none: its shape, type and
        georeferencing, the compressed sizes of ``blocks`` tiles spread over a GeoTIFF (from its
        header: no pixel is read) and the checksum of its smallest overview. Any re-encoding of
        the pixels changes the tile sizes; a few requests, whatever the raster's size."""
        import rasterio  # the tiling engine's reader; imported here so that naming a path stays light

        env = {k: v for k, v in RETRY.items() if k not in os.environ}
        try:
            with rasterio.Env(**env), rasterio.open(self.gdal) as ds:
                parts = [str(self), ds.driver, ds.width, ds.height, ds.count, *ds.dtypes, *tuple(ds.transform)[:6],
                         ds.crs.to_wkt() if ds.crs else ""]
                if ds.driver in ("GTiff", "COG"):
                    bh, bw = ds.block_shapes[0]
                    nx, ny = -(-ds.width // bw), -(-ds.height // bh)
                    for i in range(blocks):  # along the diagonal and the anti-diagonal
                        x, y = i * nx // blocks, (i * ny // blocks if i % 2 else ny - 1 - i * ny // blocks)
                        parts.append(ds.get_tag_item(f"BLOCK_SIZE_{x}_{y}", "TIFF", bidx=1))
                levels = len(ds.overviews(1))
            smallest = {"overview_level": levels - 1} if levels else {}
            with rasterio.Env(**env), rasterio.open(self.gdal, **smallest) as ov:
                parts += [ov.checksum(b) for b in ov.indexes] if ov.width * ov.height <= 4_000_000 else []
        except rasterio.errors.RasterioIOError as e:
            raise TilesError(f"cannot read the raster ({first_line(e)})", self) from None
        return "|".join(str(p) for p in parts)

    def _s3_identity(self) -> str:
        try:
            import botocore.session
        except ImportError:  # GDAL reads s3 without it; the version is then read from the raster
            return self.content_identity()
        parts = urlsplit(self)
        endpoint = os.environ.get("AWS_S3_ENDPOINT")
        if endpoint and "://" not in endpoint:
            endpoint = ("https://" if os.environ.get("AWS_HTTPS", "YES").upper() != "NO" else "http://") + endpoint
        client = botocore.session.get_session().create_client(
            "s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_REGION", os.environ.get("AWS_DEFAULT_REGION")))
        try:
            h = client.head_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"))
        except Exception as e:  # noqa: BLE001 - botocore's ClientError and connection errors
            raise TilesError(f"cannot reach the raster ({str(e).splitlines()[0][:120]})", self) from None
        return "|".join([str(self), h.get("ETag", ""), str(h.get("LastModified", "")), str(h.get("ContentLength", ""))])


def location(spec: str | os.PathLike) -> Path | RemotePath:
    """A local ``Path`` or a :class:`RemotePath`, from what the user wrote."""
    if isinstance(spec, RemotePath):
        return spec
    return RemotePath(str(spec)) if is_remote(spec) else Path(spec)


_LAST_READ: dict[str, str] = {}  # URL -> the version of it this process last read
_LAST_READ_LOCK = threading.Lock()


def read_afresh_if_replaced(path: Path | RemotePath, version: str) -> None:
    """Before reading ``version`` of a remote object: if this process read another version of it,
    GDAL forgets the ranges and size it cached for the URL (they are keyed by URL alone, so a
    replaced object would otherwise be read, in part or whole, as the old one).

    A handle opened with the URL in ``CPL_VSIL_CURL_NON_CACHED`` invalidates GDAL's cached data of
    that URL when it closes. Threads asking for the same new version wait for the one doing it."""
    if not isinstance(path, RemotePath):
        return
    with _LAST_READ_LOCK:
        previous = _LAST_READ.get(str(path))
        if previous == version:
            return
        _LAST_READ[str(path)] = version
        if previous is None:
            return
        import rasterio

        with rasterio.Env(CPL_VSIL_CURL_NON_CACHED=path.gdal):
            try:
                rasterio.open(path.gdal).close()
            except rasterio.errors.RasterioIOError:  # gone or unreadable: the read that follows says so
                pass


def gdal_name(path: Path | RemotePath) -> str | Path:
    """What ``rasterio.open`` takes for ``path``."""
    return path.gdal if isinstance(path, RemotePath) else path
