"""Workflows: a YAML file naming the scenes of each year, the model and the output layers.

    uvsam run workflows/single_city.yaml

A workflow is validated as a whole before anything runs (every error at once, each with its
place in the file), paths are relative to the file's folder, and each year is one
``uvsam predict`` into its own layer of the same GeoPackage, on one Dask cluster. Runs resume
like ``uvsam predict``: run the file again after an interruption and finished work is skipped.
The workflow's own text is stored in the output's ``runs`` table with every year's run.
"""

from __future__ import annotations

import os
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import get_type_hints

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from tiles.remote import is_remote
from uvsam.config import FORMATS, PredictConfig
from uvsam.devices import gpus_for
from uvsam.errors import InputError, OutputError, UvsamError
from uvsam.files import check_writable
from uvsam.layers import layer_problem
from uvsam.prediction import dry_run as estimate
from uvsam.prediction import find_scenes, model_info, prepare_scene, run_prediction, runs_in_process
from uvsam.prediction.distributed import dask_runner, make_client, register_model
from uvsam.stac.items import collection_path, write_collection
from uvsam.stac.scenes import StacQuery, find_stac_scenes

_HINTS = get_type_hints(PredictConfig)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StacSource(Strict):
    """A year's scenes from STAC (``uvsam predict --stac``): a catalogue, item(s) or API, with the
    asset, area and dates to take."""

    source: str
    asset: str | None = None
    bbox: tuple[float, float, float, float] | None = None
    datetime: str | None = None

    @model_validator(mode="after")
    def _query(self):
        try:
            self.query()
        except UvsamError as e:
            raise ValueError(str(e)) from None
        return self

    def query(self, base: Path | None = None) -> StacQuery:
        source = self.source
        if base is not None and not is_remote(source) and not Path(source).is_absolute():
            source = str(base / source)
        return StacQuery(source, self.asset, self.bbox, self.datetime)


class Year(Strict):
    """One year (or date) of imagery and the layer its villages go to: scenes, a STAC source, or both."""

    layer: str
    scenes: list[str] = []
    stac: StacSource | None = None
    acquired: str | None = Field(default=None, description="YYYY-MM-DD; stored with every village")

    @model_validator(mode="after")
    def _imagery(self):
        if not self.scenes and self.stac is None:
            raise ValueError("give scenes, a stac source, or both")
        if self.stac is not None and self.acquired is not None and not self.scenes:
            raise ValueError("acquired with only a stac source: the items' dates are the acquisition dates")
        return self

    @field_validator("layer")
    @classmethod
    def _layer(cls, v: str) -> str:
        problem = layer_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("acquired", mode="before")
    @classmethod
    def _date(cls, v):
        if v is None:
            return None
        v = str(v)
        try:
            datetime.strptime(v, "%Y-%m-%d")
        except ValueError:
            raise ValueError(f"acquired must be a date YYYY-MM-DD, got {v!r}") from None
        return v


class Execution(Strict):
    """Where the work runs: this process, a local Dask cluster, or an existing scheduler."""

    local: bool | None = None  # None: as `uvsam predict` decides (uvsam.prediction.runs_in_process)
    workers: int | None = Field(default=None, ge=1)
    scheduler: str | None = Field(default=None, pattern=r"^(tcp|tls|inproc|ws|wss)://")


# The ``uvsam predict`` options a workflow may set: every PredictConfig field but the per-year
# date, with its type and default (one source of truth: the schema cannot drift from the command).
PredictOptions = create_model(
    "PredictOptions", __base__=Strict,
    **{f.name: (_HINTS[f.name], f.default) for f in fields(PredictConfig) if f.name != "acquired"})


class Workflow(Strict):
    """A whole workflow file."""

    name: str
    model: Path
    checkpoint: Path | None = None
    out: Path
    format: str | None = None  # one of uvsam.config.FORMATS; None: from the extension of out
    crs: str | None = None
    predict: PredictOptions = PredictOptions()
    execution: Execution = Execution()
    years: list[Year] = Field(min_length=1)

    @field_validator("format")
    @classmethod
    def _format(cls, v: str | None) -> str | None:
        if v is not None and v not in FORMATS:
            raise ValueError(f"{v!r}: use {', '.join(FORMATS)}")
        return v

    @model_validator(mode="after")
    def _layers(self):
        layers = [y.layer for y in self.years]
        dupes = sorted({x for x in layers if layers.count(x) > 1})
        if dupes:
            raise ValueError(f"layer(s) {', '.join(dupes)} named by more than one year")
        fmt = self.format or next((f.name for f in FORMATS.values() if f.suffix == self.out.suffix.lower()), "gpkg")
        if fmt != "gpkg" and len(self.years) > 1:
            raise ValueError(f"{fmt} holds one layer: several years need format gpkg")
        return self

    def config(self, year: Year) -> PredictConfig:
        return PredictConfig(**self.predict.model_dump(), acquired=year.acquired)


class _DatesAsText(yaml.SafeLoader):
    """YAML's safe loader with dates left as text: a workflow checks them itself, so ``2020-13-45``
    is one clear line rather than the parser's error."""


_DatesAsText.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def load(path: str | Path) -> tuple[Workflow, str]:
    """The validated workflow (paths resolved against the file's folder) and its text.

    Raises :class:`InputError` naming the file and every problem found, with its place.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("workflow file does not exist", path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"not a text file (byte {e.start} is not UTF-8)", path) from None
    try:
        loader = _DatesAsText(text)  # a SafeLoader: plain data only
        try:
            raw = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"not valid YAML{where} ({getattr(e, 'problem', None) or e})", path) from None
    if not isinstance(raw, dict):
        raise InputError("a workflow is a YAML mapping (name, model, out, years, ...)", path)
    try:
        wf = Workflow.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"]) or "workflow"
            problems.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
        raise InputError("; ".join(problems), path) from None
    base = path.parent
    ref = wf.predict.pif_reference
    if ref is not None and not is_remote(ref) and not Path(ref).is_absolute():
        wf = wf.model_copy(update={"predict": wf.predict.model_copy(update={"pif_reference": str(base / ref)})})
    try:
        [wf.config(y) for y in wf.years]  # the prediction options checked together
    except UvsamError as e:
        raise InputError(f"predict: {e}", path) from None  # with the file it names, if any

    def resolve(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else base / p)

    def scene(s: str) -> str:
        return s if is_remote(s) or Path(s).is_absolute() else str(base / s)

    years = [y.model_copy(update={"scenes": [scene(s) for s in y.scenes],
                                  "stac": y.stac.model_copy(update={"source": y.stac.query(base).source})
                                  if y.stac else None}) for y in wf.years]
    wf = wf.model_copy(update={"model": resolve(wf.model), "checkpoint": resolve(wf.checkpoint),
                               "out": resolve(wf.out), "years": years})
    if not wf.model.is_file():
        raise InputError(f"model: {wf.model} does not exist", path)
    if wf.checkpoint is not None and not wf.checkpoint.is_file():
        raise InputError(f"checkpoint: {wf.checkpoint} does not exist", path)
    return wf, text


def outside_files(wf: Workflow, base: Path) -> list[str]:
    """The local files a loaded workflow names outside its own folder (``..``, absolute paths; a
    symlink placed in the folder counts as in it): model, checkpoint, output, PIF reference, scenes."""
    root = os.path.normpath(os.path.abspath(base))
    named = [wf.model, wf.checkpoint, wf.out, wf.predict.pif_reference, *(s for y in wf.years for s in y.scenes)]
    out = []
    for f in named:
        if f is None or is_remote(str(f)):
            continue
        full = os.path.normpath(os.path.abspath(f))
        if os.path.commonpath([root, full]) != root and str(f) not in out:
            out.append(str(f))
    return out


def run(path: str | Path, log=print, dry_run: bool = False, local: bool | None = None,
        workers: int | None = None, scheduler: str | None = None) -> list[dict]:
    """Run every year of a workflow; returns one summary per year (or the estimates with ``dry_run``).

    ``local``, ``workers`` and ``scheduler`` override the file's ``execution`` section.
    """
    wf, text = load(path)
    specs = [y.scenes + (find_stac_scenes(y.stac.query()) if y.stac else []) for y in wf.years]
    first = wf.config(wf.years[0])
    info = model_info(wf.model, wf.checkpoint, first.device, first.precision)
    found = [find_scenes(s, info.gsd_m) for s in specs]  # every scene of every year is found,
    prepared = [[prepare_scene(p, info, wf.config(y)) for p in paths]  # then opened and checked, before any
                for y, paths in zip(wf.years, found, strict=True)]  # year runs (and not prepared again)
    if dry_run:
        outside = outside_files(wf, Path(path).parent)
        if outside:  # allowed (a shared model, a data drive), but said before anything runs
            log(f"note: {Path(path).name} names {len(outside)} file(s) outside its folder: {', '.join(outside)}")
        return [{"layer": y.layer, **estimate(s, wf.model, wf.config(y), wf.checkpoint, prepared=scenes)}
                for y, s, scenes in zip(wf.years, specs, prepared, strict=True)]
    ex = wf.execution
    gpus = gpus_for(first.device)  # a worker per GPU when Dask runs locally
    local = runs_in_process(ex.local if local is None else local, scheduler or ex.scheduler, workers or ex.workers,
                            len(gpus))
    try:
        if not wf.out.parent.exists():
            wf.out.parent.mkdir(parents=True)  # a workflow names its output folder: create it
    except OSError as e:
        raise OutputError(f"cannot create the output folder ({e.strerror})", wf.out.parent) from None
    check_writable(wf.out)
    extra = {"workflow": wf.name, "workflow_yaml": text}

    def each(runner=None) -> list[dict]:
        out = []
        for y, s, scenes in zip(wf.years, specs, prepared, strict=True):
            log(f"{wf.name}: {y.layer} ({len(scenes)} scene(s))")
            kwargs = {"runner": runner} if runner is not None else {}
            out.append(run_prediction(s, wf.model, wf.out, wf.config(y), y.layer, wf.format, wf.crs,
                                      wf.checkpoint, log=log, run_extra=extra, prepared=scenes, **kwargs))
        return out

    if local:
        summaries = each()
    else:
        with make_client(scheduler or ex.scheduler, workers or ex.workers, gpus=gpus) as client:
            register_model(client, info)
            summaries = each(dask_runner(client))
    collection = write_collection(collection_path(wf.out), wf.name, [Path(s["stac_item"]) for s in summaries],
                                  f"Urban villages mapped by uvsam, workflow {wf.name}: "
                                  + ", ".join(y.layer for y in wf.years))
    return [{**s, "stac_collection": str(collection)} for s in summaries]
