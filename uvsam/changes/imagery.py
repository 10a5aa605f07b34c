"""What the imagery says about a change analysis: co-registration between consecutive years,
and whether the villages disagree where the imagery changed only in colour."""

from __future__ import annotations

from pathlib import Path

from uvsam.changes.summaries import disagreement, village_area_iou
from uvsam.changes.track import ChangeResult
from uvsam.consistency import assess
from uvsam.coregister import estimate_shift


def coregistration(images: dict[str, Path], years: list[str], crs, max_shift_m: float, log=print) -> list[dict]:
    """The imagery shift between consecutive years that both have imagery; warns above ``max_shift_m``."""
    rows = []
    for y0, y1 in zip(years, years[1:], strict=False):
        if y0 not in images or y1 not in images:
            continue
        shift = estimate_shift(images[y0], images[y1], crs)
        if shift is None:
            rows.append({"from": y0, "to": y1, "shift_m": None, "note": "images share too little ground"})
            continue
        row = {"from": y0, "to": y1, "east_m": round(shift.east_m, 2), "north_m": round(shift.north_m, 2),
               "shift_m": round(shift.metres, 2), "grid_m": round(shift.pixel_m, 2), "peak": round(shift.peak, 3),
               "psr": round(shift.psr, 1), "second": round(shift.second, 2),
               "windows_agreeing": f"{shift.support}/{shift.windows}", "reliable": shift.reliable,
               "warning": shift.reliable and shift.metres > max_shift_m}
        if not shift.reliable:
            row["note"] = "not measurable: too little unchanged structure between the images"
            log(f"note: the shift of the {y1} imagery against {y0} is not measurable ({shift.why_not}): "
                "too little ground looks alike in both")
        if row["warning"]:
            log(f"warning: the {y1} imagery is shifted {shift.metres:.1f} m against {y0} ({shift.east_m:+.1f} m east, "
                f"{shift.north_m:+.1f} m north): village edges will show change that is misregistration")
        rows.append(row)
    return rows


def check_consistency(result: ChangeResult, images: dict[str, Path], log=print) -> list[dict]:
    """Per pair of consecutive years: do the villages disagree massively while the imagery
    changed only in colour? (:mod:`uvsam.consistency`); flagged pairs are logged as warnings."""
    years = list(result.years["year"])
    pairs = list(zip(years, years[1:], strict=False))
    ious = [village_area_iou(result.villages, y0, y1) for y0, y1 in pairs]
    checks = assess(years, ious, images, result.crs, [disagreement(result.villages, y0, y1) for y0, y1 in pairs])
    for c in checks:
        if c.note:
            log(f"warning: {c.note}")
    return [c.to_dict() for c in checks]
