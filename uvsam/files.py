"""Small file-system helpers: atomic writes, output locks, content hashes and vector reads."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyogrio
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
def atomic_path(path: str | Path, clean: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    On any error the temporary file is removed and ``path`` is left as it was. ``clean``: first
    remove what killed writers of ``path`` left (:func:`remove_litter`; a folder of many small
    files, the journal, cleans itself once instead).
    """
    path = Path(path)
    if clean:
        remove_litter(path)
    # the real extension last: drivers that choose a format by it (GDAL's GPKG) stay quiet; the
    # writer's pid in the name tells a later writer whether it is still at work (remove_litter)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.{os.getpid()}.", suffix=f".part{path.suffix}", dir=path.parent)
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


def remove_litter(path: str | Path, every: bool = False) -> list[Path]:
    """Remove the temporary files of ``path`` that a killed writer left (SIGKILL, power loss):
    ``.STEM.PID.*.part.EXT`` beside it whose process no longer runs on this machine. A live
    writer's file is left alone. ``every``: ``path`` is a folder, clean all its files' litter.
    Returns what was removed."""
    path = Path(path)
    if every:
        folder, pattern = path, re.compile(r"\..+\.(\d+)\.[^/.]+\.part(\.[^/]*)?")
    else:
        folder = path.parent
        pattern = re.compile(rf"\.{re.escape(path.stem)}\.(\d+)\.[^/.]+\.part{re.escape(path.suffix)}")
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if m and not _alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(folder / name)
                removed.append(folder / name)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class Busy(OutputError):
    """Another process holds the lock of an output (:class:`OutputLock`)."""


class OutputLock:
    """An advisory lock (``flock``) on an output, held in a hidden file beside it
    (``.NAME[.PURPOSE].lock``, removed on release). The kernel releases it when its process dies,
    however it dies, so a killed run never leaves a stale lock.

    ``wait``: block until free (a short read-modify-replace of a shared file), else refuse at once
    with :class:`Busy` naming who holds it (a whole run claiming its output)."""

    def __init__(self, path: str | Path, purpose: str = "", wait: bool = True, what: str = ""):
        self.path = Path(path)
        self.file = self.path.with_name(f".{self.path.name}{'.' + purpose if purpose else ''}.lock")
        self.wait, self.what = wait, what
        self.fd: int | None = None

    def acquire(self) -> OutputLock:
        while True:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise Busy(f"{self.what or 'is being written'} by another uvsam run{holder}; wait for it to "
                               "finish, or write elsewhere", self.path) from None
                raise OutputError(f"cannot lock ({e.strerror})", self.path) from None
            # the file may have been removed by the holder that released it just before we got
            # it: then the lock is on a name nobody else sees; take the file that is there now
            try:
                same = os.fstat(fd).st_ino == os.stat(self.file).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
                self.fd = fd
                return self
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.file)  # under the lock: a waiter re-checks the name (acquire)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid, since = os.pread(fd, 200, 0).decode().strip().split(" ", 1)
        return f" (pid {int(pid)}, since {since})"
    return ""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def work_folder(out: str | Path, layer: str) -> Path:
    """Where a run writing ``layer`` of ``out`` keeps its journal and intermediate rasters:
    ``OUT.work/LAYER/`` (runs writing other layers of the same file never share it)."""
    out = Path(out)
    return out.with_name(out.stem + ".work") / layer


def remove_work_folder(folder: Path) -> None:
    """A finished run's :func:`work_folder`, and ``OUT.work`` itself once no other layer's is left."""
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        folder.parent.rmdir()  # only when empty


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


def read_features(path: str | Path, layer: str | None = None, **kwargs):
    """A vector layer as a GeoDataFrame (``pyogrio.read_dataframe`` arguments), read through GDAL's
    Arrow stream: memory follows the features the file holds. pyogrio's default path allocates
    arrays for the count the file's header declares (a GeoPackage's ``gpkg_ogr_contents``, a
    shapefile's record count): a few polygons declaring 10^8 features took 3.9 GB that way."""
    return pyogrio.read_dataframe(path, layer=layer, use_arrow=True, **kwargs)


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
