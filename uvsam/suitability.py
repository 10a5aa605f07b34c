"""Does a scene suit the model? Checked on the scene's header before any work.

A model learnt villages at one ground resolution from imagery of another; a 300 m Landsat
scene has no village to see (and resampled to 3.7 m it would be planned as tens of thousands
of tiles), a 7.7 cm drone scene shrinks to a few model pixels, a 0.3 m scene is read far finer
than anything in training. Each check gives one line: a *problem* stops the run unless forced
(``--force``), a *warning* is printed and recorded in the runs table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from uvsam.errors import InputError

REFUSE_FACTOR = 8.0  # scene GSD this many times finer or coarser than the training imagery: refused
WARN_FACTOR = 2.0  # ... this many times: a warning
MIN_SIDE_PX = 64  # the scene at the model's GSD: the specialist's coarsest features are 1/32 of it
RADIOMETRY_WARN_LEVELS = 40.0  # mean distance of the per-band quantiles to training's, 0..255


@dataclass
class Suitability:
    """The checks of one scene: ``problems`` refuse it (unless forced), ``warnings`` do not."""

    scene: str
    scene_gsd_m: float | None
    training_gsd_m: float
    model_gsd_m: float
    size_px: tuple[int, int]  # (height, width) at the model's GSD
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    forced: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def raise_if_unsuitable(self) -> None:
        if self.problems and not self.forced:
            raise InputError("; ".join(self.problems) + " (--force runs it anyway)", self.scene)


def check_resolution(path: str | Path, scene_gsd: float | None, height: int, width: int, training_gsd: float,
                     model_gsd: float, bands: int, forced: bool = False) -> Suitability:
    """Resolution, size and band checks from the scene's header (native ``height`` x ``width`` px
    of ``scene_gsd`` metres, ``bands`` bands read)."""
    scale = (scene_gsd / model_gsd) if scene_gsd else 1.0
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    s = Suitability(str(path), scene_gsd, training_gsd, model_gsd, size, forced=forced)
    if scene_gsd:
        factor = max(scene_gsd / training_gsd, training_gsd / scene_gsd)
        finer = scene_gsd < training_gsd
        what = (f"ground resolution {_m(scene_gsd)} is {factor:.0f}x {'finer' if finer else 'coarser'} than the "
                f"model's training imagery ({_m(training_gsd)})")
        if factor > REFUSE_FACTOR:
            s.problems.append(what + (": the model cannot see villages there" if not finer else
                                      ": villages look nothing like what the model learnt"))
        elif factor > WARN_FACTOR:
            s.warnings.append(what + ": check the villages before use")
    if min(size) < MIN_SIDE_PX:
        s.problems.append(f"the scene is {size[1]} x {size[0]} px at the model's {_m(model_gsd)}: too small for it "
                          f"(at least {MIN_SIDE_PX} px a side, {_m(MIN_SIDE_PX * model_gsd)})")
    if bands == 1:
        s.warnings.append("one band, read as grey: the model was trained on colour imagery")
    return s


def check_radiometry(s: Suitability, scene_quantiles, training_quantiles) -> None:
    """Warn when the scene's colours are far from training's (they are harmonised, but a large
    distance means another sensor, season or processing than the model knows)."""
    a = np.asarray(scene_quantiles, float)[:3]
    b = np.asarray(training_quantiles, float)[: len(a)]
    distance = float(np.abs(a - b).mean())
    if distance > RADIOMETRY_WARN_LEVELS:
        s.warnings.append(f"colours far from the training imagery (quantiles {distance:.0f} levels apart on 0..255): "
                          "harmonised, but check the villages before use")


def _m(metres: float) -> str:
    return f"{metres * 100:.1f} cm" if metres < 1 else f"{metres:.2f} m" if metres < 100 else f"{metres:.0f} m"
