"""The typed configurations of uvsam's steps, one registry: validated at the edge, frozen,
written into every output, and the single source of every default (the CLI's options and the
workflow schema read theirs from here).

A problem is raised as :class:`~uvsam.errors.ConfigError` naming the *field*; the command line
names its own flag instead (``uvsam change --analysis-crs`` for :attr:`ChangeConfig.crs`).

This module imports no model, raster or vector library: the CLI builds its help from it at
start-up.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path

from pyproj import CRS

from uvsam.errors import ConfigError

# What the specialist can be fed (uvsam.modeling.specialist.specialist_input implements them).
SPECIALIST_INPUTS = ("rgb", "lcn", "lcn_rgb")


@dataclass(frozen=True)
class Format:
    """An output format: its name (``--format``), OGR driver (None: written by geopandas),
    file suffix, what it holds, and its media type (as a STAC asset's ``type``)."""

    name: str
    driver: str | None
    suffix: str
    holds: str
    media_type: str


# The one table of output formats (the CLI, the workflow schema and the writers read it).
FORMATS = {f.name: f for f in (
    Format("gpkg", "GPKG", ".gpkg", "villages, candidates, tiles, runs and a QGIS style; a layer per year",
           "application/geopackage+sqlite3"),
    Format("geojson", "GeoJSON", ".geojson", "the villages alone, in WGS84 (RFC 7946)", "application/geo+json"),
    Format("parquet", None, ".parquet", "the villages alone (GeoParquet)", "application/vnd.apache.parquet"),
    Format("fgb", "FlatGeobuf", ".fgb", "the villages alone (FlatGeobuf)", "application/vnd.flatgeobuf"),
)}


def _check(checks: list[tuple[bool, str, str]]) -> None:
    """Raise the first failed (ok, field, problem) as a :class:`ConfigError` of its field."""
    for ok, name, problem in checks:
        if not ok:
            raise ConfigError(problem, field=name)


def default(config: type, name: str):
    """The default of field ``name`` of a config class (the CLI's defaults come from here)."""
    return config.__dataclass_fields__[name].default


@dataclass(frozen=True)
class RefineRule:
    """When the generalist's mask may replace a candidate's outline.

    ``min_predicted_iou`` and ``min_stability`` are SAM's automatic mask generator defaults
    (``pred_iou_thresh`` 0.88, ``stability_score_thresh`` 0.95 at offset 1.0);
    ``min_overlap`` is the IoU the mask must share with the specialist's candidate.
    """

    min_predicted_iou: float = 0.88
    min_stability: float = 0.95
    min_overlap: float = 0.5
    stability_offset: float = 1.0

    def __post_init__(self):
        _check([(0 <= getattr(self, name) <= 1, name, f"must be in [0, 1], got {getattr(self, name)}")
                for name in ("min_predicted_iou", "min_stability", "min_overlap")])

    def to_dict(self) -> dict:
        return asdict(self)


def _device_checks(device: str, precision: str) -> list[tuple[bool, str, str]]:
    """The spelling of ``device`` and ``precision`` (their presence is checked by uvsam.devices)."""
    return [(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device) is not None, "device",
             f"{device!r}: use auto, cpu, cuda, cuda:N or mps"),
            (precision in ("auto", "fp32", "bf16", "fp16"), "precision",
             f"{precision!r}: use auto, fp32, bf16 or fp16")]


@dataclass(frozen=True)
class PredictConfig:
    """How a scene is predicted (all sizes in pixels at the model's GSD unless named _m/_m2)."""

    tile: int = 512
    overlap: int = 256  # half a tile: measured to halve the disagreement of shifted grids (issue 5 note)
    batch_size: int | None = None  # tiles a specialist call; None: for the device (uvsam.devices.Device.tile_batch)
    threshold: float = 0.5
    refine: bool = True
    force_refine: bool = False  # refine even with a generalist whose weights are not verified official ones
    refine_min_iou: float = 0.88  # the generalist's predicted IoU a refined outline needs (uvsam.generalist)
    refine_min_stability: float = 0.95
    refine_min_overlap: float = 0.5  # IoU of the refined outline with the specialist's candidate
    window: int = 512
    window_margin: int = 32
    min_area_m2: float = 2500.0
    simplify_m: float | None = None  # None: the model's GSD
    block: int = 2048  # the mosaic is vectorised in square blocks of this many pixels (bounded memory)
    acquired: str | None = None
    grid_offset: int = 0  # shift the tile grid up-left by this many pixels (a grid-invariance check)
    pif_reference: str | None = None  # a reference year's raster: normalise each scene on pseudo-invariant pixels
    force: bool = False  # run scenes the suitability check refuses (uvsam.suitability)
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps (uvsam.devices)
    precision: str = "auto"  # auto (fp32), fp32, bf16, fp16 (autocast; uvsam.devices)
    gate: str | None = None  # a tile gate (uvsam train-gate): tiles it rejects skip the specialist and generalist
    cascade: bool = False  # PerSAM's cascaded post-refinement: two more decoder passes per village
    int8: bool = False  # the generalist's encoder in static int8 on the CPU where it measures faster and agreeing
    # compiled artefacts of the model's parts (uvsam.compiled): auto = use cached ones, build missing ones
    # for runs of at least uvsam.compiled.AUTO_MIN_PIXELS; always; never (eager PyTorch)
    compile: str = "auto"

    def __post_init__(self):
        date_ok = True
        if self.acquired is not None:
            try:
                datetime.strptime(self.acquired, "%Y-%m-%d")
            except ValueError:
                date_ok = False
        _check([(self.tile >= 32, "tile", f"must be at least 32 px, got {self.tile}"),
                (0 <= self.overlap < self.tile, "overlap", f"must be in [0, tile {self.tile}), got {self.overlap}"),
                (0 <= self.grid_offset < self.tile, "grid_offset",
                 f"must be in [0, tile {self.tile}), got {self.grid_offset}"),
                (0 < self.threshold < 1, "threshold", f"must be in (0, 1), got {self.threshold}"),
                (self.window >= 64 and self.window > 2 * self.window_margin, "window",
                 f"refinement window {self.window} px too small for its margin {self.window_margin}"),
                (self.batch_size is None or self.batch_size >= 1, "batch_size",
                 f"must be positive, got {self.batch_size}"),
                (self.block >= 1, "block", f"must be positive, got {self.block}"),
                (self.min_area_m2 >= 0, "min_area_m2", f"cannot be negative, got {self.min_area_m2}"),
                (self.simplify_m is None or self.simplify_m >= 0, "simplify_m",
                 f"cannot be negative, got {self.simplify_m}"),
                (date_ok, "acquired", f"must be a date YYYY-MM-DD, got {self.acquired!r}"),
                (self.compile in ("auto", "always", "never"), "compile",
                 f"must be auto, always or never, got {self.compile!r}"),
                *_device_checks(self.device, self.precision)]
               + [(0 <= getattr(self, name) <= 1, name, f"must be in [0, 1], got {getattr(self, name)}")
                  for name in ("refine_min_iou", "refine_min_stability", "refine_min_overlap")])
        ref = self.pif_reference  # a URL or GDAL /vsi path is checked where it is opened
        _check([(ref is None or "://" in ref or ref.startswith("/vsi") or Path(ref).is_file(), "pif_reference",
                 f"raster {ref} does not exist")])

    def to_dict(self) -> dict:
        return asdict(self)

    def identity(self) -> str:
        """The settings that shape the results, as JSON (run ids and resume keys): all but ``compile``,
        which changes how fast the same numbers come (compiled parts agree with eager ones)."""
        return json.dumps({k: v for k, v in self.to_dict().items() if k != "compile"}, sort_keys=True)

    @property
    def rule(self) -> RefineRule:
        return RefineRule(self.refine_min_iou, self.refine_min_stability, self.refine_min_overlap)


# Villages are block-scale objects: at 3.7 m (4x the 0.92 m of the UV-SAM Beijing data) the
# specialist sees the texture of whole blocks, generalises across seasons far better and trains
# 16x cheaper than at full resolution (docs/results.md).
DEFAULT_GSD_M = 3.7


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; written into the model file and checked on --resume."""

    images: str
    labels: str
    out: str
    val_images: str | None = None
    val_labels: str | None = None
    val_fraction: float = 0.0  # without --val-images: hold out this share of the training scenes
    folds: int = 0  # spatial cross-validation: the scenes in this many folds of whole footprint groups...
    fold: int = 0  # ...and this one (1-based) held out for validation (uvsam.folds)
    encoder: str = "mobile_sam"
    checkpoint: str | None = None  # the generalist's official weights; None: random (tests, demos)
    specialist: str = "mit_b0"
    mit_weights: str | None = None
    fusion: str = "mlp"
    # local contrast of each band: measured best of the recipes tried in leak-free cross-validation over the
    # eight Beijing tiles, and above a plain RGB SegFormer with colour jitter on both seasons (docs/results.md)
    specialist_input: str = "lcn_rgb"
    lcn_sigma_m: float = 15.0
    tune_decoder: bool = False
    ladder: bool = False
    # the paper's ablations: leave a prompt or an embedding out of the UV-SAM path (all on: UV-SAM)
    box_prompt: bool = True
    mask_prompt: bool = True
    sam_embedding: bool = True
    specialist_embedding: bool = True
    min_area_m2: float | None = None  # None: the official 100 x 100 px of the official data (8,390 m^2)
    gsd_m: float | None = DEFAULT_GSD_M  # None: the first training scene's native resolution
    crop: int = 128
    scale: tuple[float, float] = (0.75, 1.33)  # a view covers crop x this many px of the scene (scale augmentation)
    batch_size: int = 8
    epochs: int = 10
    steps_per_epoch: int = 40
    sam_epochs: int = 2
    views_per_scene: int = 16
    lr: float = 5e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 20
    sam_weight: float = 1.0
    ema: float = 0.98  # decay of the weight average the model file keeps (0: keep the last weights)
    # Random colour, band mixing, grey, gamma and blur of the specialist's views: off by default, it
    # lowered both the cross- and the same-season IoU over three seeds (docs/results.md, issue 9).
    photometric: bool = False
    # Train the UV-SAM path's epochs even with a generalist whose weights are not verified official
    # ones (random, or an unknown SHA-256): without it those epochs train the specialist alone.
    force_refine: bool = False
    harmonise: bool = True
    normalisation: str = "auto"
    bands: tuple[int, ...] | None = None
    labels_crs: str | None = None
    seed: int = 0
    # the frozen encoder's embeddings of the UV-SAM views kept on disk ($UVSAM_CACHE/embeddings, keyed by
    # content): a later run over the same views encodes nothing (uvsam.embedding_cache)
    cache_embeddings: bool = True
    val_window: int = 512
    device: str = "auto"  # where training runs (uvsam.devices); a resumed run may change it
    precision: str = "auto"  # autocast of the forward passes (auto: fp32; bf16 a choice)
    # the frozen encoder of the views' embeddings compiled (uvsam.compiled): auto = use a cached one, build it
    # for at least uvsam.compiled.AUTO_MIN_VIEWS views to encode; always; never (eager PyTorch)
    compile: str = "auto"

    def __post_init__(self):
        _check([
            *_device_checks(self.device, self.precision),
            (self.compile in ("auto", "always", "never"), "compile",
             f"must be auto, always or never, got {self.compile!r}"),
            (self.crop >= 32, "crop", f"must be at least 32 px, got {self.crop}"),
            (self.batch_size >= 1, "batch_size", "must be at least 1"),
            (self.epochs >= 1, "epochs", "must be at least 1"),
            (self.steps_per_epoch >= 1, "steps_per_epoch", "must be at least 1"),
            (0 <= self.sam_epochs <= self.epochs, "sam_epochs", f"must be between 0 and the epochs ({self.epochs})"),
            (self.lr > 0, "lr", "must be positive"),
            (self.weight_decay >= 0, "weight_decay", "cannot be negative"),
            (self.views_per_scene >= 1, "views_per_scene", "must be at least 1"),
            (len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1], "scale",
             f"{self.scale}: two positive factors, the smaller first"),
            (0 <= self.ema < 1, "ema", "must be in [0, 1)"),
            (0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)"),
            (self.folds == 0 or (self.folds >= 2 and 1 <= self.fold <= self.folds), "folds",
             f"fold {self.fold} of {self.folds}: need 2 or more folds and a fold in 1..folds"),
            (not (self.folds and (self.val_images or self.val_fraction)), "folds",
             "chooses the validation scenes itself: leave out the validation images and fraction"),
            (self.gsd_m is None or self.gsd_m > 0, "gsd_m", "must be positive"),
            (self.fusion in ("mlp", "add"), "fusion", f"{self.fusion!r}: use mlp or add"),
            (self.specialist_input in SPECIALIST_INPUTS, "specialist_input",
             f"{self.specialist_input!r}: use {', '.join(SPECIALIST_INPUTS)}")])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bands"] = list(self.bands) if self.bands else None
        d["scale"] = list(self.scale)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        known.setdefault("photometric", True)  # recorded before it was a setting: it was always on
        known.setdefault("force_refine", True)  # likewise: the UV-SAM path always trained
        if known.get("bands"):
            known["bands"] = tuple(known["bands"])
        if known.get("scale"):
            known["scale"] = tuple(known["scale"])
        return cls(**known)


# Settings that may change on --resume without changing what is being trained.
RESUMABLE = {"out", "val_images", "val_labels", "val_window", "checkpoint"}


@dataclass(frozen=True)
class ChangeConfig:
    """How villages are linked across years and what counts as a change."""

    min_overlap: float = 0.1  # share of the smaller village's area two villages must share to be linked
    stable_pct: float = 10.0  # one-to-one changes of area within +-this many percent are "stable"
    crs: str | None = None  # analysis CRS (projected); None: local equal-area on the data
    min_area_m2: float = 0.0  # minimum mapping unit: events whose villages are all smaller are not reported

    def __post_init__(self):
        _check([(0 < self.min_overlap <= 1, "min_overlap", f"must be in (0, 1], got {self.min_overlap}"),
                (self.stable_pct >= 0, "stable_pct", f"cannot be negative, got {self.stable_pct}"),
                (self.min_area_m2 >= 0, "min_area_m2", f"minimum mapping unit cannot be negative, got "
                 f"{self.min_area_m2} m2")])
        if self.crs is not None:
            try:
                crs = CRS.from_user_input(self.crs)
            except Exception as e:  # noqa: BLE001 - pyproj's many error types
                raise ConfigError(f"{self.crs!r} is not a CRS ({e})", field="crs") from None
            _check([(crs.is_projected, "crs", f"{self.crs!r} is geographic: areas need a projected CRS")])

    def to_dict(self) -> dict:
        return asdict(self)
