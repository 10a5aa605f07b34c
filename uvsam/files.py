"""Small file-system helpers: atomic writes and content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyogrio.errors
import rasterio.errors

from tiles.errors import TilesError, write_failure
from uvsam.errors import OutputError, UvsamError

_WRITE_ERRORS = (OSError, RuntimeError, rasterio.errors.RasterioError, pyogrio.errors.DataSourceError,
                 pyogrio.errors.DataLayerError, pyogrio.errors.FieldError, pyogrio.errors.GeometryError)


def cache_home() -> Path:
    """Where uvsam keeps what it can rebuild (weights, compiled model parts, embeddings):
    ``$UVSAM_CACHE``, default ``~/.cache/uvsam``."""
    return Path(os.environ.get("UVSAM_CACHE", Path.home() / ".cache" / "uvsam"))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    # the real extension last: drivers that choose a format by it (GDAL's GPKG) stay quiet
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".part{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp's 0600 would make outputs private to their writer
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:  # on disk before it takes the name: a crash leaves old or new
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except (UvsamError, TilesError):
        raise
    except _WRITE_ERRORS as e:
        # a full disk, a quota or a lost mount surfaces as whatever the writer raises: OSError
        # from Python, RuntimeError from torch's zip writer, GDAL's errors from rasterio/pyogrio
        raise OutputError(f"cannot write ({write_failure(e)})", path) from e
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def check_writable(path: str | Path, folder: bool = False) -> Path:
    """Refuse an output location before any work is done: its folder must exist and take a new
    file (a write test, which also catches read-only mounts and permissions that ``os.access``
    misjudges for root). ``folder``: the output is itself a folder (created if missing, with
    its missing parents)."""
    path = Path(path)
    parent = path.parent
    if folder and not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as e:
            raise OutputError(f"cannot create the output folder ({e.strerror})", parent) from None
    if parent.exists() and not parent.is_dir():
        raise OutputError("is a file, not a folder", parent)
    if not parent.is_dir():
        raise OutputError("output folder does not exist", parent)
    if path.is_dir() and not folder:
        raise OutputError("is a folder; give a file name", path)
    if path.exists() and not path.is_dir() and folder:
        raise OutputError("is a file; give a folder", path)
    try:
        fd, probe = tempfile.mkstemp(prefix=".uvsam-write-test.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write here ({e.strerror})", path) from None
    return path


_DIGESTS: dict[tuple, str] = {}


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, hashed once per process: a file unchanged since (same inode, size
    and modification time) is not read again (SAM ViT-H's weights are 2.5 GB)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = hash_file(path)
    return _DIGESTS[key]


def hash_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (every call reads it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
