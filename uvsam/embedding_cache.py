"""A disk cache of image embeddings, so that a frozen encoder never runs twice on the same input.

An entry's key is the SHA-256 of (encoder name, weights digest, preprocessing, image content, and
the autocast dtype when the encoder runs under one): changing any of them misses. Entries are
``.npy`` files (read with ``allow_pickle=False``), written atomically, so concurrent workers and
interrupted runs never see half an entry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from uvsam.files import atomic_path, cache_home
from uvsam.modeling.sam import Generalist


def weights_digest(model: Generalist) -> str:
    """The loaded file's SHA-256, or (random or trained in memory) a digest of the parameters."""
    digest = getattr(model, "weights_sha256", None)
    if digest:
        return digest
    h = hashlib.sha256()
    for k, v in sorted(model.image_encoder.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    model.weights_sha256 = h.hexdigest()
    return model.weights_sha256


def preprocessing_id(model: Generalist) -> str:
    s = model.spec
    return json.dumps([s.input_size, s.resize, list(s.pixel_mean), list(s.pixel_std)])


def default_root() -> Path:
    """``$UVSAM_CACHE/embeddings`` (default ``~/.cache/uvsam/embeddings``)."""
    return cache_home() / "embeddings"


class EmbeddingCache:
    """``embed(model, images)`` = ``model.encode(images)``, computed once per distinct input.

    ``dtype``: how entries are stored (``float16`` halves the disk for training's views; entries of
    another dtype are other keys)."""

    def __init__(self, root: str | Path, dtype: str = "float32"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self.hits = 0
        self.misses = 0

    def key(self, model: Generalist, image: torch.Tensor) -> str:
        h = hashlib.sha256()
        if self.dtype != np.float32:
            h.update(f"stored:{self.dtype}".encode())
        device = image.device.type
        if torch.is_autocast_enabled(device):  # computed in reduced precision: not an fp32 run's embedding
            h.update(f"autocast:{torch.get_autocast_dtype(device)}".encode())
        h.update(model.spec.name.encode())
        h.update(weights_digest(model).encode())
        h.update(preprocessing_id(model).encode())
        arr = image.detach().cpu().contiguous().numpy()
        h.update(f"{arr.dtype}{arr.shape}".encode())
        h.update(arr.tobytes())
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def embed(self, model: Generalist, images: torch.Tensor,
              encode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """(B, 3, H, W) 0..255 images -> (B, 256, 64, 64), encoding only the images not cached;
        ``encode``: what computes ``model.encode`` (a compiled encoder, :mod:`uvsam.compiled`)."""
        keys = [self.key(model, im) for im in images]
        out: list[torch.Tensor | None] = []
        for k in keys:
            p = self._path(k)
            out.append(torch.from_numpy(np.load(p, allow_pickle=False).astype(np.float32)) if p.exists() else None)
        todo = [i for i, e in enumerate(out) if e is None]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            with torch.inference_mode():
                fresh = (encode or model.encode)(images[todo])
            for i, e in zip(todo, fresh, strict=True):
                stored = e.cpu().numpy().astype(self.dtype)
                out[i] = torch.from_numpy(stored.astype(np.float32))  # as a hit reads it
                p = self._path(keys[i])
                p.parent.mkdir(exist_ok=True)
                with atomic_path(p) as tmp, open(tmp, "wb") as f:
                    np.save(f, stored, allow_pickle=False)
        return torch.stack(out).to(images.device)
