"""Relative radiometric normalisation: bring a scene's colours to a reference radiometry.

Change detection in remote sensing matches each scene's per-band distribution to a reference
before comparing years. uvsam records the training imagery's radiometry in every model (per-band
quantiles of the valid pixels, on the 0..255 scale the model sees) and, at inference, maps
each scene onto it by quantile (histogram) matching. The mapping is computed once per scene
from nodata-free samples and applied identically to every tile, so tiles of one scene never
disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QUANTILES = 101  # 1 % steps: smooth enough for a monotone map, small enough to store anywhere
MAX_SAMPLES = 2_000_000


@dataclass(frozen=True)
class Radiometry:
    """Per-band quantiles (at ``np.linspace(0, 1, len(q))``) of valid pixels on the 0..255 scale."""

    quantiles: tuple[tuple[float, ...], ...]

    @property
    def bands(self) -> int:
        return len(self.quantiles)

    def to_dict(self) -> dict:
        return {"quantiles": [list(q) for q in self.quantiles]}

    @classmethod
    def from_dict(cls, d: dict) -> Radiometry:
        return cls(tuple(tuple(float(v) for v in q) for q in d["quantiles"]))


def measure(images: list[np.ndarray], valids: list[np.ndarray], seed: int = 0) -> Radiometry:
    """The radiometry of one or more (bands, H, W) images; each contributes equally."""
    if not images:
        raise ValueError("no images to measure")
    rng = np.random.default_rng(seed)
    per_image = MAX_SAMPLES // len(images)
    samples = []
    for img, valid in zip(images, valids, strict=True):
        pix = img[:, valid]
        if pix.shape[1] > per_image:
            pix = pix[:, rng.choice(pix.shape[1], per_image, replace=False)]
        samples.append(pix)
    pix = np.concatenate(samples, axis=1)
    if pix.shape[1] == 0:
        raise ValueError("no valid pixels to measure a radiometry from")
    q = np.quantile(pix.astype(np.float64), np.linspace(0, 1, QUANTILES), axis=1).T
    return Radiometry(tuple(tuple(float(v) for v in band) for band in q))


def histogram_match(image: np.ndarray, source: Radiometry, reference: Radiometry,
                    valid: np.ndarray | None = None) -> np.ndarray:
    """Map a (bands, H, W) image with radiometry ``source`` onto ``reference``, band by band.

    Flat stretches of the source distribution (many pixels of one value) map to the middle
    of the reference range they cover, so the map stays monotone. Invalid pixels stay 0.
    """
    if image.shape[0] != source.bands or source.bands != reference.bands:
        raise ValueError(f"image has {image.shape[0]} bands, source radiometry {source.bands}, "
                         f"reference {reference.bands}")
    out = np.empty(image.shape, np.float32)
    levels = np.linspace(0, 1, QUANTILES)
    for b in range(image.shape[0]):
        src_q = np.asarray(source.quantiles[b])
        ref_q = np.asarray(reference.quantiles[b])
        xs, idx = np.unique(src_q, return_index=True)
        # the probability at each distinct source value: the middle of its run of quantiles
        counts = np.diff(np.append(idx, len(src_q)))
        probs = levels[idx] + (counts - 1) / (2 * (QUANTILES - 1))
        if len(xs) == 1:
            out[b] = np.interp(0.5, levels, ref_q)
        else:
            out[b] = np.interp(image[b], xs, np.interp(probs, levels, ref_q))
    if valid is not None:
        out[:, ~valid] = 0
    return out
