"""The per-task journal that makes a long prediction resumable.

Every finished task (a batch of specialist tiles, a refinement window) leaves its result in the
journal folder, written atomically, under a key that names the scene, the model, the
configuration and the task itself. A re-run of an interrupted command finds them, skips that
work and assembles exactly the same output; a change of model, configuration or scene content
(size, modification time) changes the keys, so stale results are never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from tiles.remote import RemotePath, location
from uvsam.files import atomic_path

FORMAT = 3  # of the stored results; part of every journal's identity, so older ones are never misread


class Journal:
    def __init__(self, root: str | Path, *identity: object):
        h = hashlib.sha256(json.dumps([FORMAT, *(str(i) for i in identity)]).encode()).hexdigest()[:16]
        self.root = Path(root) / h
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = 0

    def _path(self, kind: str, key: str, suffix: str) -> Path:
        return self.root / f"{kind}-{key}{suffix}"

    def has_arrays(self, key: str) -> bool:
        return self._path("tiles", key, ".npz").exists()

    def has_blobs(self, key: str) -> bool:
        return self._path("window", key, ".json").exists()

    def load_arrays(self, key: str) -> dict[str, np.ndarray] | None:
        p = self._path("tiles", key, ".npz")
        if not p.exists():
            return None
        with np.load(p, allow_pickle=False) as z:
            self.hits += 1
            return {name: z[name] for name in z.files}

    def save_arrays(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        with atomic_path(self._path("tiles", key, ".npz")) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    def load_blobs(self, key: str) -> list | None:
        """A task's JSON-able result (a refinement window's records)."""
        p = self._path("window", key, ".json")
        if not p.exists():
            return None
        self.hits += 1
        return json.loads(p.read_text())

    def save_blobs(self, key: str, records: list) -> None:
        with atomic_path(self._path("window", key, ".json")) as tmp:
            tmp.write_text(json.dumps(records))


def scene_identity(path: str | Path) -> str:
    """Name, size and modification time (a remote raster: URL, ETag or Last-Modified, and size):
    a changed file or object is a new scene."""
    path = location(path)
    if isinstance(path, RemotePath):
        return path.identity()
    st = os.stat(path)
    return f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"
