"""The per-task journal that makes a long prediction resumable.

Every finished task (a batch of specialist tiles, a refinement window) leaves its result in the
journal folder, written atomically and compressed, under a key that names the task; the folder
itself is named by everything else that determines a result: the scene's content (every file
GDAL reads for it: a VRT's sources, sidecars), the model, the options. A re-run of an
interrupted command finds it, skips that work and assembles exactly the same output. A run whose
scene, model or options changed gets a new folder: the old one, which no command of the new
inputs could use, is removed and the run says why it starts afresh (:attr:`Journal.replaced`).
An entry that cannot be read back (a disk error, a file cut short) is computed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from tiles.remote import RemotePath, location
from uvsam.files import atomic_path, remove_litter

FORMAT = 5  # of the stored results; part of every journal's identity, so older ones are never misread

IDENTITY = "identity.json"

WHAT = {"content": "the scene's pixels or files changed", "model": "the model file changed",
        "options": "options that change results changed", "format": "it was written by another uvsam version"}


class Journal:
    """Finished tasks of one scene under ``root``; ``identity``: what determines its results,
    by name (``scene``: the scene's name in the run, ``content``: :func:`scene_identity`,
    ``model``, ``options``)."""

    def __init__(self, root: str | Path, **identity: object):
        ident = {"format": str(FORMAT), **{k: str(v) for k, v in identity.items()}}
        h = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        base = Path(root)
        self.root = base / h
        self.hits = 0
        self.replaced: list[str] = []  # why an earlier journal of this scene was set aside
        if base.is_dir():
            for other in base.iterdir():
                if other != self.root and other.is_dir():
                    self.replaced += self._stale(other, ident)
        self.root.mkdir(parents=True, exist_ok=True)
        remove_litter(self.root, every=True)  # what a killed run was writing
        if not (self.root / IDENTITY).exists():
            with atomic_path(self.root / IDENTITY, clean=False) as tmp:
                tmp.write_text(json.dumps(ident, indent=1))

    @staticmethod
    def _stale(other: Path, ident: dict) -> list[str]:
        """An earlier journal of the same scene with another identity: removed, with why."""
        try:
            old = json.loads((other / IDENTITY).read_text())
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and old.get("scene") != ident.get("scene"):
            return []  # another scene of the run
        shutil.rmtree(other, ignore_errors=True)
        if not isinstance(old, dict):
            return [WHAT["format"]]
        return [WHAT.get(k, f"{k} changed") for k in ident if k != "scene" and old.get(k) != ident[k]] or \
            [WHAT["format"]]

    def _path(self, kind: str, key: str, suffix: str) -> Path:
        return self.root / f"{kind}-{key}{suffix}"

    def has_arrays(self, key: str) -> bool:
        return self._path("tiles", key, ".npz").exists()

    def has_blobs(self, key: str) -> bool:
        return self._path("window", key, ".json").exists()

    def load_arrays(self, key: str) -> dict[str, np.ndarray] | None:
        """A task's arrays, or None when missing or unreadable (then removed: computed again)."""
        p = self._path("tiles", key, ".npz")
        try:
            with np.load(p, allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}
            arrays = {name.removesuffix(SHUFFLED): unshuffle(a, arrays[name + SHAPE])
                      if name.endswith(SHUFFLED) else a
                      for name, a in arrays.items() if not name.endswith(SHAPE)}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, TypeError):
            _drop(p)
            return None
        self.hits += 1
        return arrays

    def save_arrays(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        """An ``.npz`` deflated at level 1 (a third of the time of numpy's default level, 2 % larger);
        a float array's bytes grouped by significance first (:func:`shuffle`: the probabilities
        take ~70 % of their raw size instead of ~90 %, exactly restored)."""
        stored = {}
        for name, a in arrays.items():
            if a.dtype.kind == "f" and a.ndim:
                stored[name + SHUFFLED] = shuffle(a)
                stored[name + SHUFFLED + SHAPE] = np.array([a.dtype.str, *map(str, a.shape)])
            else:
                stored[name] = a
        with (atomic_path(self._path("tiles", key, ".npz"), clean=False) as tmp,
              zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z):
            for name, a in stored.items():
                with z.open(name + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, a, allow_pickle=False)

    def load_blobs(self, key: str) -> list | None:
        """A task's JSON-able result (a refinement window's records), or None when missing or
        unreadable (then removed: computed again)."""
        p = self._path("window", key, ".json")
        try:
            records = json.loads(p.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            _drop(p)
            return None
        if not isinstance(records, list):
            _drop(p)
            return None
        self.hits += 1
        return records

    def save_blobs(self, key: str, records: list) -> None:
        with atomic_path(self._path("window", key, ".json"), clean=False) as tmp:
            tmp.write_text(json.dumps(records))


SHUFFLED, SHAPE = ".shuffled", ".shape"


def shuffle(a: np.ndarray) -> np.ndarray:
    """A float array's bytes as (itemsize, n) planes, the byte of each value's same significance
    together (what HDF5's and Blosc's shuffle filters do): sign and exponent bytes, nearly
    constant, then deflate well."""
    a = np.ascontiguousarray(a)
    return a.reshape(-1).view(np.uint8).reshape(-1, a.itemsize).T.copy()


def unshuffle(planes: np.ndarray, record: np.ndarray) -> np.ndarray:
    """The array :func:`shuffle` stored; ``record``: its dtype then shape, as strings."""
    dtype, *shape = (str(x) for x in record)
    return np.ascontiguousarray(planes.T).view(np.dtype(dtype)).reshape(tuple(int(n) for n in shape))


def _drop(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def scene_identity(path: str | Path) -> str:
    """What a scene's pixels come from: every local file GDAL reads for it (the file, a VRT's
    sources at any depth, sidecars such as ``.aux.xml`` or ``.ovr``) by resolved name, size and
    modification time; a remote raster: URL, ETag or Last-Modified, and size. A changed file or
    object anywhere in it is a new scene."""
    path = location(path)
    if isinstance(path, RemotePath):
        return path.identity()
    files = sorted(_files(Path(path), set()))
    return "|".join(f"{f}:{st.st_size}:{st.st_mtime_ns}" for f, st in ((f, os.stat(f)) for f in files)
                    ) if files else _stat(Path(path))


def version_digest(identity: str) -> str:
    """A short digest of a :func:`scene_identity` (what a scene's preparation records)."""
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def _stat(path: Path) -> str:
    st = os.stat(path)
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _files(path: Path, seen: set[str], depth: int = 0) -> set[str]:
    """The local files GDAL opens for ``path`` (resolved), following VRTs (bounded depth)."""
    import rasterio

    key = str(path.resolve())
    if key in seen or depth > 8:
        return seen
    seen.add(key)
    try:
        with rasterio.open(path) as ds:
            listed = ds.files or []
    except Exception:  # noqa: BLE001 - not readable: the scene's own checks say why, later
        return seen
    for f in listed:
        p = Path(f)
        if not p.is_absolute():
            p = (Path.cwd() / p)
        if p.exists() and str(p.resolve()) not in seen:
            if p.suffix.lower() == ".vrt":
                _files(p, seen, depth + 1)
            else:
                seen.add(str(p.resolve()))
    return seen
