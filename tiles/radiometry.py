"""Radiometry: one normalisation per scene (or dataset), applied identically to every tile.

Per-tile min-max makes the same roof look different in neighbouring tiles, and a blind
divide by 255 leaves 16-bit imagery black: both are what :class:`Stretch` replaces. Its
per-band low/high values come from the scene's overview (or a decimated read) with invalid
pixels ignored, are written into every manifest, and map each band linearly to 0..1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from tiles.errors import TilesError


@dataclass(frozen=True)
class Stretch:
    """Per-band linear map ``(x - low) / (high - low)`` clipped to 0..1.

    ``method``: "percentile" (low/high are scene percentiles) or "identity" (8-bit imagery
    as it is: low 0, high 255).
    """

    method: Literal["percentile", "identity"]
    low: tuple[float, ...]
    high: tuple[float, ...]
    percentiles: tuple[float, float] | None = None

    def apply(self, data: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """(bands, h, w) any dtype -> float32 0..1; invalid pixels become 0."""
        if data.shape[0] != len(self.low):
            raise TilesError(f"stretch has {len(self.low)} bands, data has {data.shape[0]}")
        low = np.asarray(self.low, np.float64)[:, None, None]
        scale = (1.0 / np.maximum(np.asarray(self.high, np.float64)[:, None, None] - low, 1e-12))
        out = data.astype(np.float32)  # float32 holds 16-bit values exactly and 0..1 ample
        out -= low.astype(np.float32)
        out *= scale.astype(np.float32)
        np.clip(out, 0.0, 1.0, out=out)
        if valid is not None:
            out[:, ~valid] = 0.0
        return out

    def to_dict(self) -> dict:
        return {"method": self.method, "low": list(self.low), "high": list(self.high),
                "percentiles": list(self.percentiles) if self.percentiles else None}

    @classmethod
    def from_dict(cls, d: dict) -> Stretch:
        p = d.get("percentiles")
        return cls(d["method"], tuple(d["low"]), tuple(d["high"]), tuple(p) if p else None)


def compute_stretch(data: np.ndarray, valid: np.ndarray, method: str = "auto",
                    percentiles: tuple[float, float] = (2.0, 98.0)) -> Stretch:
    """The scene's stretch from a decimated read (``RasterSource.read_overview``).

    ``method="auto"``: uint8 imagery is taken as it is (identity), anything else is stretched
    between the given percentiles of its valid pixels, band by band.
    """
    if method == "auto":
        method = "identity" if data.dtype == np.uint8 else "percentile"
    bands = data.shape[0]
    if method == "identity":
        return Stretch("identity", (0.0,) * bands, (255.0,) * bands)
    if method != "percentile":
        raise TilesError(f"unknown normalisation {method!r}; use auto, percentile or identity")
    lo_p, hi_p = percentiles
    if not 0 <= lo_p < hi_p <= 100:
        raise TilesError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    pix = data[:, valid]
    pix = pix[:, np.isfinite(pix).all(axis=0)] if np.issubdtype(pix.dtype, np.floating) else pix
    if pix.shape[1] == 0:
        raise TilesError("the scene has no valid pixels to compute a normalisation from")
    low = np.percentile(pix, lo_p, axis=1)
    high = np.percentile(pix, hi_p, axis=1)
    high = np.where(high > low, high, low + 1)  # a constant band maps to 0, not NaN
    return Stretch("percentile", tuple(float(v) for v in low), tuple(float(v) for v in high), (lo_p, hi_p))
