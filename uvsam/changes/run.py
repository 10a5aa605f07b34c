"""``uvsam change``: read the years, track, summarise, check the imagery, write (and report)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from statistics import NormalDist

import pandas as pd

from uvsam import __version__, weights
from uvsam.changes.accuracy import CHANGE_CLASSES, Accuracy, assess
from uvsam.changes.imagery import check_consistency, coregistration
from uvsam.changes.outputs import parse_crs, write_outputs
from uvsam.changes.propagate import PropagateConfig, propagate_changes
from uvsam.changes.report import write_report
from uvsam.changes.sources import parse_images, read_belts, read_layer
from uvsam.changes.summaries import belts_from, by_belt, by_distance, by_district, by_ring
from uvsam.changes.track import LIFECYCLES, ChangeConfig, track
from uvsam.errors import ConfigError, InputError
from uvsam.files import check_writable, read_features
from uvsam.modeling.registry import get_spec
from uvsam.progress import Progress


def run_change(specs: list[str], out: str | Path, cfg: ChangeConfig = ChangeConfig(),
               districts: str | Path | None = None, district_field: str | None = None,
               centre: tuple[float, float] | None = None, ring_km: float = 2.0, crs: str | None = None,
               report: str | Path | None = None, images: list[str] | None = None, max_shift_m: float = 5.0,
               accuracy: list[str] | None = None, belts: str | None = None, belt_field: str | None = None,
               step_km: float = 0.5, map_year: str | None = None, log=print, propagate=None,
               propagate_cfg=None) -> dict:
    """``uvsam change``: read the years, track, aggregate, write (and report); returns a summary.

    ``images``: ``YEAR=RASTER`` specs: their co-registration is checked for consecutive years
    (a warning through ``log`` above ``max_shift_m``) and the report's thumbnails show them.
    ``accuracy``: ``YEAR=SAMPLE`` specs, labelled samples of ``uvsam sample``: each year's
    error-adjusted areas and accuracies with 95 % confidence intervals (the ``accuracy`` table,
    and the report beside the mapped areas); ``EARLIER-LATER=SAMPLE`` for a change sample
    (``uvsam sample EARLIER --later LATER``): the same per change class (village lost, gained...).
    Where the villages are: with ``centre`` (lon, lat) the ``rings`` table (every ``ring_km``) and
    the ``distance`` table (cumulative count and area every ``step_km``); with ``belts``
    (``FILE[:LAYER]`` of ring roads or areas, named by ``belt_field``) the ``belts`` table; the
    report maps ``map_year`` (default the last) with them. ``propagate``: a generalist
    (:class:`uvsam.objects.GeneralistRef`): SAM-PT's check of every event against the later year's
    imagery (:mod:`uvsam.changes.propagate`; ``propagated_iou`` and ``confirmed`` on each event).
    """
    if crs is not None:
        parse_crs(crs)  # a wrong --crs is refused before any work
    for field, value in (("ring_km", ring_km), ("step_km", step_km)):
        if not value > 0:
            raise ConfigError(f"must be a positive distance in km, got {value}", field=field)
    with Progress(len(specs) + 3 + (report is not None), "steps", task="change") as bar:
        layers = []
        for s in specs:
            layers.append(read_layer(s))
            bar.advance(1, step=f"read {layers[-1].year}")
        pictures = parse_images(images or [], [ly.year for ly in layers])
        assessed = parse_accuracy(accuracy or [], [ly.year for ly in layers])
        if map_year is not None and map_year not in [ly.year for ly in layers]:
            raise ConfigError(f"{map_year!r} is not one of the years ({', '.join(ly.year for ly in layers)})",
                              field="map_year")
        belt_areas = belts_from(read_belts(belts), belt_field, belts) if belts is not None else None
        check_writable(out)
        if report is not None:
            check_writable(report)
        result = track(layers, cfg)
        bar.advance(1, step="tracked")
        tables: dict[str, pd.DataFrame] = {}
        if districts is not None:
            if not Path(districts).is_file():
                raise InputError("districts file does not exist", districts)
            tables["districts"] = by_district(result.villages, read_features(districts), district_field)
        if centre is not None:
            tables["rings"] = by_ring(result.villages, centre, ring_km)
            tables["distance"] = by_distance(result.villages, centre, step_km)
        if belt_areas is not None:
            tables["belts"] = by_belt(result.villages, belt_areas)
        if assessed:
            tables["accuracy"] = accuracy_table(assessed)
        coreg = coregistration(pictures, [ly.year for ly in layers], result.crs, max_shift_m, log)
        propagation = None
        if propagate is not None:
            pcfg = propagate_cfg or PropagateConfig()
            shifts = {(r["from"], r["to"]): (r["east_m"], r["north_m"]) for r in coreg if r.get("reliable")}
            tables["propagation"] = pd.DataFrame(propagate_changes(result, pictures, shifts, propagate, pcfg, log),
                                                 columns=["village_uid", "year_from", "year_to", "lifecycle", "found",
                                                          "predicted_iou", "propagated_iou", "confirmed"])

            official = weights.expected_sha256(get_spec(propagate.encoder)) == propagate.sha256
            propagation = {"encoder": propagate.encoder, "checkpoint": propagate.checkpoint,
                           "sha256": propagate.sha256, **pcfg.to_dict(),
                           "weights_note": f"Generalist: {propagate.encoder}, "
                           + ("its official weights." if official else
                              f"weights that are not its official ones (SHA-256 {propagate.sha256[:12]}...): the "
                              "propagated masks are only as good as those weights.")}
        consistency = check_consistency(result, pictures, log)
        bar.advance(1, step="imagery checked")
        counts = result.changes["lifecycle"].value_counts().to_dict() if len(result.changes) else {}
        run = {"years": [ly.year for ly in layers], "sources": [ly.source for ly in layers], "config": cfg.to_dict(),
               "analysis_crs": result.crs.to_wkt(), "districts": str(districts) if districts else None,
               "centre": list(centre) if centre else None, "ring_km": ring_km if centre else None,
               "step_km": step_km if centre else None, "belts": belts, "belt_field": belt_field,
               "map_year": map_year,
               "images": {y: str(p) for y, p in pictures.items()},
               "accuracy_samples": {y: str(s) for y, (s, _) in assessed.items()}, "coregistration": coreg,
               "consistency": consistency, "propagation": propagation,
               "uvsam_version": __version__, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        files = write_outputs(out, result, tables, run, crs, [ly.villages.crs for ly in layers])
        bar.advance(1, step="written")
        if report is not None:
            files.append(write_report(report, result, tables, run, pictures, belt_areas))
            bar.advance(1, step="report")
    return {"out": str(out), "files": [str(f) for f in files], "years": run["years"], "coregistration": coreg,
            "consistency": consistency, "lifecycles": {k: int(counts.get(k, 0)) for k in LIFECYCLES}}


def parse_accuracy(specs: list[str], years: list[str]) -> dict[str, tuple[str, Accuracy]]:
    """``YEAR=SAMPLE`` (a sample of one year's map) and ``EARLIER-LATER=SAMPLE`` (a change sample of
    ``uvsam sample EARLIER --later LATER``) specs -> {key: (sample file, its Accuracy)}; a sample
    given under the wrong kind of key is refused naming it."""
    out = {}
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(f"{spec!r}: give YEAR=SAMPLE.gpkg or EARLIER-LATER=SAMPLE.gpkg (a labelled "
                              "`uvsam sample`)", field="accuracy")
        key, path = spec.split("=", 1)
        period = _period(key, years)
        if key not in years and period is None:
            raise ConfigError(f"{spec!r}: {key!r} is neither one of the years ({', '.join(years)}) nor two of them "
                              "as EARLIER-LATER", field="accuracy")
        acc = assess(path)
        change = acc.classes == list(CHANGE_CLASSES)
        if period is not None and not change:
            raise InputError(f"is a sample of one year's map ({' / '.join(acc.classes)}): give it as YEAR=SAMPLE",
                             path)
        if period is None and change:
            raise InputError("is a sample of the change between two maps: give it as EARLIER-LATER=SAMPLE", path)
        out[key] = (path, acc)
    return out


def _period(key: str, years: list[str]) -> tuple[str, str] | None:
    """``EARLIER-LATER`` -> (earlier, later) where both are years in order (year labels may hold dashes)."""
    for i, ch in enumerate(key):
        a, b = key[:i], key[i + 1:]
        if ch == "-" and a in years and b in years and years.index(a) < years.index(b):
            return a, b
    return None


def accuracy_table(assessed: dict[str, tuple[str, Accuracy]]) -> pd.DataFrame:
    """One row per year and class: mapped and error-adjusted area with its interval, user's and
    producer's accuracy with theirs, the year's overall accuracy, the sample's size."""
    frames = []
    for year, (_, acc) in assessed.items():
        t = acc.table()
        t.insert(0, "year", year)
        t["overall_accuracy"], t["overall_accuracy_ci"] = acc.overall.value, acc.overall.ci
        t["confidence"] = round(2 * NormalDist().cdf(acc.z) - 1, 4)
        frames.append(t)
    return pd.concat(frames, ignore_index=True)
