"""City-scale prediction: a scene on disk -> village polygons, object-aware so no village is cut.

A package of its steps, in the order data flows (each imports only what comes before it;
its configuration is :class:`uvsam.config.PredictConfig`):

=================  =====================================================================
:mod:`.model`      the model as workers need it (:class:`ModelInfo`, :func:`get_model`)
:mod:`.scene`      a scene found, checked, tiled and preprocessed once; windows read from it
:mod:`.execution`  runners (in process or Dask) and the journal-aware task loop
:mod:`.journal`    finished tasks on disk, so an interrupted run resumes
:mod:`.specialist` 1. village probabilities of tile batches, stitched into a mosaic
:mod:`.candidates` 2. the thresholded mosaic polygonised in blocks
:mod:`.refine`     3. the generalist's outline of each candidate, judged
:mod:`.assemble`   4. outlines cleaned, merged and measured into villages
:mod:`.pipeline`   one scene through the four steps
:mod:`.distributed` the Dask cluster and its model-loading worker plugin
:mod:`.run`        ``uvsam predict``: scenes -> layers, and the dry run
=================  =====================================================================
"""

from uvsam.config import PredictConfig
from uvsam.prediction.assemble import SceneResult, mean_probability, village_id
from uvsam.prediction.candidates import candidates_from_mosaic, drop_specks
from uvsam.prediction.execution import LOCAL_CLUSTER_MIN_CORES, Runner, run_journaled, run_local, runs_in_process
from uvsam.prediction.model import ModelInfo, get_model, model_info, refines
from uvsam.prediction.pipeline import predict_scene
from uvsam.prediction.refine import RefineWindow, judge_candidate, plan_windows, refine_candidates, refine_window
from uvsam.prediction.run import dry_run, run_prediction
from uvsam.prediction.scene import (
                                 ScenePrep,
                                 close_sources,
                                 find_scenes,
                                 harmonisation_record,
                                 open_source,
                                 prepare_scene,
                                 read_tile,
                                 scene_row,
                                 scene_tiling,
)
from uvsam.prediction.specialist import specialist_batch, specialist_mosaic, tile_windows

__all__ = ["LOCAL_CLUSTER_MIN_CORES", "ModelInfo", "PredictConfig", "RefineWindow", "Runner", "ScenePrep",
           "SceneResult", "candidates_from_mosaic", "close_sources", "drop_specks", "dry_run", "find_scenes",
           "get_model", "harmonisation_record", "judge_candidate", "mean_probability", "model_info", "open_source",
           "plan_windows", "predict_scene", "prepare_scene", "read_tile", "refine_candidates", "refine_window",
           "refines", "run_journaled", "run_local", "run_prediction", "runs_in_process", "scene_row", "scene_tiling",
           "specialist_batch", "specialist_mosaic", "tile_windows", "village_id"]
