"""One preprocessing: how a scene's pixels become the model's input, at train, evaluate and predict time.

A scene is read through the one reader (:class:`tiles.reader.RasterSource`) at the model's GSD
and bands, and then, in this order:

1. **stretch**: one per-band linear map per scene (:class:`tiles.radiometry.Stretch`; 8-bit as
   it is, other types between scene percentiles), computed from the scene's overview;
2. **PIF** (predict only, when asked): a per-band linear map onto a reference year, fitted on
   pseudo-invariant pixels (:class:`uvsam.harmonise.LinearMap`);
3. **bands to RGB** (:func:`uvsam.raster.to_rgb`);
4. **harmonisation**: the scene's radiometry (measured on its overview's valid pixels) matched
   to the training radiometry the model records (:func:`uvsam.harmonise.histogram_match`);
5. **fill**: invalid pixels take the training imagery's median colour.

:class:`Preprocessing` is that record for one scene, built once by :func:`scene_preprocessing`
and applied identically to every window of it; :class:`InputSpec` is what of it travels with
the model (GSD, bands, normalisation, whether to harmonise, the training radiometry).
Training measures its radiometry from the same overviews, so a training scene reaches the
network pixel for pixel as ``uvsam predict`` and ``uvsam evaluate`` later read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rasterio.windows import Window

from tiles.radiometry import Stretch, compute_stretch
from tiles.reader import RasterSource, ReadOptions
from uvsam.errors import InputError
from uvsam.harmonise import LinearMap, Radiometry, histogram_match, measure, pif_against
from uvsam.raster import to_rgb

OVERVIEW_PIXELS = 1_000_000  # a scene's stretch and radiometry come from a read of at most this many pixels


@dataclass(frozen=True)
class InputSpec:
    """What the model needs of its input (recorded in the model file): ``gsd_m`` (m/px),
    ``bands`` (1-based; None: red, green, blue by colour interpretation), ``normalisation``
    (auto, percentile or identity), ``harmonise`` (match each scene to ``radiometry``, the
    training imagery's, which also gives the fill colour)."""

    gsd_m: float | None  # None: each scene's native resolution
    bands: tuple[int, ...] | None = None
    normalisation: str = "auto"
    harmonise: bool = True
    radiometry: Radiometry | None = None

    @property
    def read(self) -> ReadOptions:
        return ReadOptions(self.bands, self.gsd_m)

    @property
    def fill(self) -> tuple[float, ...] | None:
        """The training imagery's median colour (None before the radiometry is known)."""
        if self.radiometry is None:
            return None
        return tuple(float(q[len(q) // 2]) for q in self.radiometry.quantiles[:3])

    def to_dict(self) -> dict:
        return {"gsd_m": self.gsd_m, "bands": list(self.bands) if self.bands else None,
                "normalisation": self.normalisation, "harmonise": self.harmonise,
                "radiometry": self.radiometry.to_dict() if self.radiometry else None}


@dataclass(frozen=True)
class Preprocessing:
    """One scene's preprocessing (see the module docstring): ``stretch``, optional ``pif`` map,
    ``source`` radiometry of the scene with the ``reference`` it is matched to (both None:
    no harmonisation) and ``fill``, the colour of invalid pixels (None: 0)."""

    stretch: Stretch
    pif: LinearMap | None = None
    pif_reference: str | None = None
    source: Radiometry | None = None
    reference: Radiometry | None = None
    fill: tuple[float, ...] | None = field(default=None)
    # per (dtype, band count): what apply gives each raw level of 8- and 16-bit data, built once
    _tables: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def mode(self) -> str:
        """``pif``, ``histogram`` or ``none``: how the scene's radiometry was brought to the model's."""
        return "pif" if self.pif else ("histogram" if self.source is not None else "none")

    def apply(self, data: np.ndarray, valid: np.ndarray, path: str | Path = "") -> np.ndarray:
        """(bands, h, w) raw pixels and (h, w) validity -> (3, h, w) float32 model input, 0..255.

        Every step is a function of one band's value, so 8- and 16-bit data are looked up in a
        table of what the steps give each level (the same float32 values, computed once per
        scene, not once per pixel)."""
        table = self._table(data, path) if data.dtype in (np.uint8, np.uint16) else None
        if table is None:
            return self._compute(data, valid, path)
        levels, invalid = table
        source = [0, 0, 0] if data.shape[0] == 1 else [0, 1, 2]  # to_rgb's bands
        out = np.empty((3, *data.shape[1:]), np.float32)
        for c, b in enumerate(source):
            np.take(levels[c], data[b], out=out[c])
        if not valid.all():
            out[:, ~valid] = invalid[:, None]
        return out

    def _table(self, data: np.ndarray, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
        """((3, levels) model input of each raw level, (3,) that of an invalid pixel) for data
        of this dtype and band count."""
        key = (data.dtype.str, data.shape[0])
        if key not in self._tables:
            n = np.iinfo(data.dtype).max + 1
            ramp = np.broadcast_to(np.arange(n, dtype=data.dtype), (data.shape[0], 1, n))
            levels = self._compute(ramp, np.ones((1, n), bool), path)[:, 0]
            invalid = self._compute(np.zeros((data.shape[0], 1, 1), data.dtype), np.zeros((1, 1), bool), path)
            self._tables[key] = (levels, invalid[:, 0, 0])
        return self._tables[key]

    def _compute(self, data: np.ndarray, valid: np.ndarray, path: str | Path = "") -> np.ndarray:
        """apply's steps, pixel by pixel."""
        img = self.stretch.apply(data, valid) * 255.0
        if self.pif is not None:
            img = self.pif.apply(img)
        img = to_rgb(img, path)
        if self.source is not None and self.reference is not None:
            img = histogram_match(img, self.source, self.reference, valid)
        if self.fill is not None and not valid.all():
            img[:, ~valid] = np.asarray(self.fill, np.float32)[:, None]
        return img.astype(np.float32, copy=False)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "stretch": self.stretch.to_dict(),
                "pif": {"reference": self.pif_reference, **self.pif.to_dict()} if self.pif else None,
                "source_radiometry": self.source.to_dict() if self.source else None,
                "reference_radiometry": self.reference.to_dict() if self.reference else None,
                "fill": list(self.fill) if self.fill else None}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        pif = d.get("pif")
        return cls(Stretch.from_dict(d["stretch"]), LinearMap.from_dict(pif) if pif else None,
                   pif["reference"] if pif else None,
                   Radiometry.from_dict(d["source_radiometry"]) if d.get("source_radiometry") else None,
                   Radiometry.from_dict(d["reference_radiometry"]) if d.get("reference_radiometry") else None,
                   tuple(d["fill"]) if d.get("fill") else None)


def read_overview(src: RasterSource) -> tuple[np.ndarray, np.ndarray]:
    """The scene's overview every per-scene statistic comes from."""
    return src.read_overview(OVERVIEW_PIXELS)


def scene_radiometry(src: RasterSource, spec: InputSpec, overview=None) -> tuple[Stretch, np.ndarray, np.ndarray]:
    """(stretch, stretched RGB overview 0..255, its validity) of an opened scene."""
    data, valid = overview if overview is not None else read_overview(src)
    if not valid.any():
        raise InputError("raster has no valid pixels (all nodata)", src.path)
    stretch = compute_stretch(data, valid, spec.normalisation)
    return stretch, to_rgb(stretch.apply(data, valid) * 255.0, src.path), valid


def scene_preprocessing(src: RasterSource, spec: InputSpec, pif_reference: str | Path | None = None,
                        overview=None) -> Preprocessing:
    """The :class:`Preprocessing` of the scene ``src`` (opened with ``spec.read``) for a model of
    ``spec``; ``pif_reference``: a reference year's raster to normalise onto first."""
    stretch, rgb, valid = scene_radiometry(src, spec, overview)
    pif = source = None
    if pif_reference:  # onto the reference year by its invariant pixels, then as the reference year
        pif, ref_radiometry = pif_against(src.path, pif_reference, src.options, stretch, spec.normalisation)
        source = ref_radiometry if spec.harmonise else None
    elif spec.harmonise:
        source = measure([rgb], [valid])
    reference = spec.radiometry if source is not None else None
    return Preprocessing(stretch, pif, str(pif_reference) if pif_reference else None, source if reference else None,
                         reference, spec.fill)


def mirror_outside(img: np.ndarray, window: Window, height: int, width: int) -> np.ndarray:
    """``img`` of ``window`` with the part beyond a ``height`` x ``width`` scene mirrored from
    the scene (no flat area a model could call village)."""
    h, w = img.shape[1:]
    r0, c0 = max(0, -int(window.row_off)), max(0, -int(window.col_off))
    r1, c1 = min(h, height - int(window.row_off)), min(w, width - int(window.col_off))
    if r1 > r0 and c1 > c0 and (r0, c0, r1, c1) != (0, 0, h, w):
        img = np.pad(img[:, r0:r1, c0:c1], ((0, 0), (r0, h - r1), (c0, w - c1)), mode="symmetric")
    return img


def read_window(src: RasterSource, prep: Preprocessing, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """(3, h, w) model input and (h, w) validity of a window of an opened scene: read,
    preprocessed, and mirrored past the scene's edge (that part stays invalid)."""
    data, valid = src.read(window)
    img = prep.apply(data, valid, src.path)
    if not valid.all():
        img = mirror_outside(img, window, src.height, src.width)
    return img, valid


def training_radiometry(paths: list[Path], spec: InputSpec) -> Radiometry:
    """The radiometry of training scenes as the model reads them (stretched RGB overviews,
    valid pixels, each scene weighing the same): what every later scene is matched to."""
    images, valids = [], []
    for path in paths:
        with RasterSource(path, spec.read) as src:
            _, rgb, valid = scene_radiometry(src, spec)
        images.append(rgb)
        valids.append(valid)
    return measure(images, valids)
