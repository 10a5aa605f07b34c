"""Relative radiometric normalisation: bring a scene's colours to a reference radiometry.

Change detection in remote sensing matches each scene's per-band distribution to a reference
before comparing years. uvsam records the training imagery's radiometry in every model (per-band
quantiles of the valid pixels, on the 0..255 scale the model sees) and, at inference, maps
each scene onto it by quantile (histogram) matching. The mapping is computed once per scene
from nodata-free samples and applied identically to every tile, so tiles of one scene never
disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tiles.radiometry import compute_stretch
from tiles.reader import RasterSource, read_on_grid
from tiles.remote import location
from uvsam.errors import InputError
from uvsam.raster import to_rgb

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


# -- relative normalisation on pseudo-invariant features --------------------------------------
PIF_FRACTION = 0.2  # the share of common valid pixels that changed least, taken as invariant
MIN_PIF_PIXELS = 1000


@dataclass(frozen=True)
class LinearMap:
    """Per-band ``gain * x + offset`` taking a scene's values onto a reference year's, fitted on
    pseudo-invariant pixels (PIFs); ``pixels`` of them were used, ``rmse`` is the fit's residual
    on them (0..255 levels)."""

    gains: tuple[float, ...]
    offsets: tuple[float, ...]
    pixels: int
    rmse: float

    def apply(self, image: np.ndarray) -> np.ndarray:
        g = np.asarray(self.gains, np.float32)[:, None, None]
        o = np.asarray(self.offsets, np.float32)[:, None, None]
        return (image.astype(np.float32) * g + o).clip(0.0, 255.0)

    def to_dict(self) -> dict:
        return {"gains": list(self.gains), "offsets": list(self.offsets), "pixels": self.pixels, "rmse": self.rmse}

    @classmethod
    def from_dict(cls, d: dict) -> LinearMap:
        return cls(tuple(d["gains"]), tuple(d["offsets"]), int(d["pixels"]), float(d["rmse"]))


def fit_pif(image: np.ndarray, reference: np.ndarray, valid: np.ndarray, fraction: float = PIF_FRACTION,
            rounds: int = 3) -> LinearMap:
    """The per-band linear map from ``image`` onto ``reference`` (both (bands, H, W) on one grid,
    0..255), fitted on the pixels that changed least between them.

    Pixels are ranked by how far they sit from the current fit (at first: from the per-band
    standardised values, so a radiometric difference alone does not rank them), the least
    changed ``fraction`` is kept, and each band is fitted by major-axis regression (both years
    carry noise, so neither is the exact predictor of the other); repeated ``rounds`` times.
    Houses built or demolished between the years stay out of the fit, unlike in whole-scene
    histogram matching, where they pull every level.
    """
    if image.shape != reference.shape:
        raise ValueError(f"image {image.shape} and reference {reference.shape} are not on one grid")
    a = image[:, valid].astype(np.float64)
    b = reference[:, valid].astype(np.float64)
    if a.shape[1] < MIN_PIF_PIXELS / fraction:
        raise ValueError(f"{a.shape[1]} common valid pixels: too few to find invariant ones")
    za = (a - a.mean(1, keepdims=True)) / np.maximum(a.std(1, keepdims=True), 1e-9)
    zb = (b - b.mean(1, keepdims=True)) / np.maximum(b.std(1, keepdims=True), 1e-9)
    distance = np.square(za - zb).sum(0)
    gains = np.ones(a.shape[0])
    offsets = np.zeros(a.shape[0])
    for _ in range(rounds):
        keep = distance <= np.quantile(distance, fraction)
        for k in range(a.shape[0]):
            x, y = a[k, keep], b[k, keep]
            sxx, syy, sxy = x.var(), y.var(), np.mean((x - x.mean()) * (y - y.mean()))
            gain = (syy - sxx + np.hypot(syy - sxx, 2 * sxy)) / (2 * sxy) if abs(sxy) > 1e-12 else 1.0
            gains[k], offsets[k] = gain, y.mean() - gain * x.mean()
        distance = np.square(a * gains[:, None] + offsets[:, None] - b).sum(0)
    rmse = float(np.sqrt(distance[keep].mean() / a.shape[0]))
    return LinearMap(tuple(float(g) for g in gains), tuple(float(o) for o in offsets), int(keep.sum()), round(rmse, 3))


def pif_against(path, reference, read, stretch, normalisation: str, max_pixels: int = 1_000_000):
    """(:class:`LinearMap` from the scene at ``path`` onto the ``reference`` raster, the
    reference's :class:`Radiometry` on their common ground), both read as the model reads them
    (``read`` options and the scene's ``stretch``; the reference gets its own stretch of
    ``normalisation``), averaged onto one grid of at most ``max_pixels`` over the scene."""
    with RasterSource(path, read) as src:
        f = max(1.0, math.sqrt(src.width * src.height / max_pixels))
        w, h = max(1, round(src.width / f)), max(1, round(src.height / f))
        t = src.transform
        bounds = (t.c, t.f + t.e * src.height, t.c + t.a * src.width, t.f)
        crs, bands = src.crs, list(src.bands)
    a, va = read_on_grid(location(path), crs, bounds, w, h, bands)
    b, vb = read_on_grid(location(reference), crs, bounds, w, h)
    with RasterSource(reference) as ref_src:  # stretched as it would be read itself: by its own data type
        kind = ref_src.dtype
    if kind.kind in "iu":
        a_kind = np.iinfo(kind)
        b = b.round().clip(a_kind.min, a_kind.max).astype(kind)
    if a.shape[0] != b.shape[0]:
        raise InputError(f"the PIF reference has {b.shape[0]} bands to compare, the scene {a.shape[0]}", reference)
    valid = va & vb
    img = stretch.apply(a, va) * 255.0
    ref = compute_stretch(b, vb, normalisation).apply(b, vb) * 255.0
    try:
        linear = fit_pif(img, ref, valid)
    except ValueError as e:
        raise InputError(f"cannot normalise against the PIF reference ({e})", reference) from None
    return linear, measure([to_rgb(ref, reference)], [valid])
