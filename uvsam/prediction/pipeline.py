"""One scene through prediction's steps, in the order data flows:

1. **specialist** (:mod:`.specialist`): overlapping tiles at the model's GSD, read and
   preprocessed as in training, their village probabilities blended into a mosaic (a COG);
2. **candidates** (:mod:`.candidates`): the thresholded mosaic polygonised in square blocks;
3. **generalist** (:mod:`.refine`): each candidate large enough redrawn in a window centred on
   it, the outline judged against the candidate;
4. **polygons** (:mod:`.assemble`): cleaned, merged, measured.

Tasks (tile batches, refinement windows) run through a runner (:mod:`.execution`: in process or
on Dask) and are journaled (:mod:`.journal`), so an interrupted run resumes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tiles.remote import location
from uvsam.config import PredictConfig
from uvsam.errors import InputError
from uvsam.prediction.assemble import SceneResult, assemble, mean_probability
from uvsam.prediction.candidates import candidates_from_mosaic
from uvsam.prediction.execution import Runner, run_local
from uvsam.prediction.journal import Journal, scene_identity
from uvsam.prediction.model import ModelInfo, refines
from uvsam.prediction.refine import refine_candidates
from uvsam.prediction.scene import close_sources, prepare_scene
from uvsam.prediction.specialist import specialist_mosaic
from uvsam.progress import stage


def predict_scene(path: str | Path, info: ModelInfo, cfg: PredictConfig, workdir: Path,
                  runner: Runner = run_local, progress: Callable[[str, int], None] | None = None,
                  prepared: tuple | None = None, name: str | None = None,
                  log: Callable[[str], None] | None = None) -> SceneResult:
    """Run the four steps on one scene; the probability mosaic is written into ``workdir``.

    Finished tasks are journaled in ``workdir``: an interrupted run, run again, skips them.
    ``progress(stage, n)`` is called as tiles and windows finish. ``prepared``: the scene's
    :func:`~uvsam.prediction.scene.prepare_scene` when the caller has it already (its ``version``, what
    its pixels come from, names the journal); ``name``: what the scene goes by in the run
    (its files in ``workdir``), default its file name; ``log``: where a note goes that an earlier
    run's journal of this scene no longer applies (its scene, model or options changed).
    """
    path = location(path)
    scene, prep = prepared if prepared is not None else prepare_scene(path, info, cfg)
    journal = Journal(workdir / "journal", scene=name or path.name, content=prep.version or scene_identity(path),
                      model=info.sha256 + (f"+gate:{info.gate.sha256}" if info.gate else ""),
                      options=cfg.identity())
    if journal.replaced and log is not None:
        log(f"note: {name or path.name}: the finished work of an earlier run is not reused "
            f"({'; '.join(dict.fromkeys(journal.replaced))}): starting this scene afresh")
    if prep.crs is None:
        raise InputError("raster has no CRS; village polygons need georeferenced imagery", path)
    mosaic = workdir / f"{Path(name).stem if name else path.stem}.probability.tif"
    tile_rows = specialist_mosaic(scene, prep, info, cfg, mosaic, runner, journal, progress)
    # a speck under half the minimum village area cannot become a village (clean() drops it)
    with stage("vectorise"):
        candidates = candidates_from_mosaic(mosaic, cfg.threshold, cfg.block,
                                            int(0.5 * cfg.min_area_m2 / info.gsd_m**2))
    outlines, reasons, scores = refine_candidates(candidates, prep, info, cfg, runner, journal, progress)
    simplify = info.gsd_m if cfg.simplify_m is None else cfg.simplify_m
    with stage("vectorise"):
        villages, refined, why, ious = assemble(candidates, outlines, reasons, scores, prep.crs, prep.affine,
                                                info.gsd_m, cfg.min_area_m2, simplify)
        mean_prob = mean_probability(mosaic, villages)
    close_sources()  # tasks run in this thread keep the scene open until here
    return SceneResult(villages, refined, candidates, mean_prob, tile_rows, prep.crs, mosaic, journal.root, why, ious,
                       refines(cfg, info))
