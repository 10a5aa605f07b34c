"""The model as prediction's workers need it: a small picklable :class:`ModelInfo`, and the
network loaded once per process (:func:`get_model`; a Dask worker plugin preloads it).

Both come from one read of the model file (:class:`uvsam.modelfile.ModelFile`, cached per
process) and one hash of the generalist's weights file (:func:`uvsam.files.sha256_file`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from uvsam.compiled import Build, Shapes, compile_model
from uvsam.config import PredictConfig
from uvsam.devices import Device, select
from uvsam.errors import CheckpointError
from uvsam.gatefile import GateFile
from uvsam.modelfile import ModelFile, generalist_file, load_model
from uvsam.preprocess import InputSpec
from uvsam.progress import stage


@dataclass(frozen=True)
class GateInfo:
    """The tile gate as workers need it (picklable): its file, threshold and window."""

    path: str
    sha256: str
    crop: int
    threshold: float


@dataclass(frozen=True)
class ModelInfo:
    """What the workers need to know of the model to prepare inputs (picklable, small)."""

    path: str
    checkpoint: str | None
    sha256: str
    inputs: InputSpec
    min_area_m2: float
    generalist_verified: bool = False
    generalist_note: str = ""
    training_gsd_m: float | None = None  # native resolution of the training imagery (None: recorded before it was)
    device: Device = Device()  # where the networks run, resolved once (uvsam.devices)
    gate: GateInfo | None = None  # the tile gate predict runs first (uvsam.gate), if any
    int8: bool = False  # the process's model gets a static int8 encoder (run.py installs it after measuring)
    compiled: CompilePlan | None = None  # compiled parts for these shapes (uvsam.compiled), None: eager

    @property
    def gsd_m(self) -> float:
        return self.inputs.gsd_m


@dataclass(frozen=True)
class CompilePlan:
    """Which compiled parts a run's workers install (:func:`uvsam.compiled.compile_model`): for
    these shapes, ``refine`` whether the generalist runs, ``build`` whether missing artefacts are
    built (else only cached ones are used)."""

    shapes: Shapes
    refine: bool
    build: bool


_MODELS: dict[tuple[str, str | None, str], object] = {}


_BUILDS: list[Build] = []  # what compile_model did for the process's model


def get_model(info: ModelInfo):
    """The model, loaded once per process (a Dask worker plugin preloads it), with the compiled
    parts ``info.compiled`` asks for (from the cache, or built: see :func:`compile_builds`)."""
    key = (info.path, info.checkpoint, info.sha256, info.device.name, info.int8, info.compiled)
    if key not in _MODELS:
        _MODELS.clear()  # one model a process: a new one replaces the last
        _BUILDS.clear()
        model_file = ModelFile.read(info.path)
        if model_file.sha256 != info.sha256:  # a worker that sees another file under the run's path
            raise CheckpointError(f"is not the run's model here (SHA-256 {model_file.sha256[:12]}..., the run's is "
                                  f"{info.sha256[:12]}...): every Dask worker must see the same model file",
                                  info.path)
        model = load_model(model_file, info.checkpoint)[0].to(info.device.torch)
        if info.compiled is not None:
            plan = info.compiled
            with stage("compile"):
                _BUILDS.extend(compile_model(model, plan.shapes, info.device.torch, plan.build, plan.refine,
                                             precision=info.device.precision))
        _MODELS[key] = model
    return _MODELS[key]


def compile_builds() -> list[Build]:
    """What installing the compiled parts of this process's model did (:class:`uvsam.compiled.Build`)."""
    return list(_BUILDS)


_GATES: dict[tuple[str, str, str], object] = {}


def get_gate(info: ModelInfo):
    """The gate's network, loaded once per process."""
    key = (info.gate.path, info.gate.sha256, info.device.name)
    if key not in _GATES:
        _GATES.clear()
        _GATES[key] = GateFile.read(info.gate.path).network.to(info.device.torch)
    return _GATES[key]


def gate_info(path: str | Path, model: str | Path) -> GateInfo:
    """The gate file's :class:`GateInfo`, after checking it was trained for ``model``'s inputs."""
    gate = GateFile.read(path)
    gate.check_inputs(ModelFile.read(model))
    return GateInfo(str(Path(path).resolve()), gate.sha256, gate.crop, gate.threshold)


def model_info(path: str | Path, checkpoint: str | Path | None = None, device: str = "auto",
               precision: str = "auto") -> ModelInfo:
    """The model file's :class:`ModelInfo`; the device is resolved (:func:`uvsam.devices.select`)
    and the generalist's weights are checked (by SHA-256) first."""
    place = select(device, precision)
    model = ModelFile.read(path)
    model.check_weights()
    generalist_file(model, checkpoint)  # the right weights are there, before any work
    status = model.status
    # absolute paths: a Dask worker started elsewhere opens the same files, whatever its folder
    return ModelInfo(str(Path(path).resolve()), str(Path(checkpoint).resolve()) if checkpoint else None,
                     model.sha256, model.inputs,
                     model.config.min_area, status.verified, status.note, model.source_gsd_m, place)


def refines(cfg: PredictConfig, info: ModelInfo) -> bool:
    """Whether the generalist redraws candidates: asked for, and verified weights or forced."""
    return cfg.refine and (info.generalist_verified or cfg.force_refine)
