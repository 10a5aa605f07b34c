"""Compiled inference: the model's parts as ahead-of-time compiled artefacts, built once per
(architecture, input shapes, machine) and reused from a disk cache.

A part (the specialist with its input normalisation, the generalist's image encoder, UV-SAM's box
decoder) is exported with :func:`torch.export.export` for the shapes prediction feeds it and
compiled by AOTInductor (:func:`torch._inductor.aoti_compile_and_package`) into a ``.pt2``
package of kernels generated for this machine's instruction set. The package holds no weights:
loaded, it computes with the eager module's own parameters and buffers (AOTInductor's
user-managed constants: shared, not copied, so memory does not grow), which also lets a retrained
model of the same architecture reuse it. Loading takes well under a second, so a run that finds its
artefacts in the cache pays no compilation at all (``torch.compile`` recompiles in every process).

The cache lives in ``$UVSAM_CACHE/compiled`` (default ``~/.cache/uvsam/compiled``); an artefact's
name is the digest of a :class:`CompileKey`: what the part computes (its code and the settings its
code reads), the names, shapes and dtypes of its tensors, its input shapes, dtype, device, torch's
version, the CPU's model and instruction set and the thread count the kernels were generated for.
A new architecture, shape or machine builds anew and never reuses a wrong artefact.

Shape discipline: tiles and refinement windows have one size in a run; the specialist's batch (up to
the run's tile batch) and the box decoder's number of boxes (up to the decoding chunk) are each one
dynamic dimension of their artefact. Any other
input runs the eager module, and any failure to build or load (no C++ compiler, an operator
export does not know) leaves the eager module in place with a note: compilation changes speed,
never results (outputs agree with eager to float rounding; tests/test_compiled.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from uvsam.devices import PRECISIONS
from uvsam.files import atomic_path, cache_home

# "auto" builds missing artefacts only for runs of at least this many pixels at the model's GSD (a
# 2000 x 2000 px scene, 55 km2 at 3.7 m): building takes 1-2 minutes on 2 cores, more than a small run
# lasts; cached artefacts are used whatever the size
AUTO_MIN_PIXELS = 4_000_000
# ... and a training run's encoder for at least this many views to encode (mobile_sam: built in ~40 s, then
# 0.6 s a view instead of 1.2 s; the artefact is the one prediction's windows use)
AUTO_MIN_VIEWS = 64
# what compiled parts compute in (fp16, a GPU autocast, runs eager: no GPU here to check its artefacts on)
COMPILED_PRECISIONS = ("fp32", "bf16")


def cache_root() -> Path:
    """``$UVSAM_CACHE/compiled`` (default ``~/.cache/uvsam/compiled``)."""
    return cache_home() / "compiled"


def machine_signature(device: torch.device) -> str:
    """What generated kernels depend on: the processor (model and instruction-set flags) or the GPU."""
    if device.type == "cuda":
        i = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(i)
        return f"cuda:{props.name}:{props.major}.{props.minor}:{torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text()
        lines = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in info.splitlines()[:40])}
        cpu = f"{lines.get('model name', cpu)}|{hashlib.sha256(lines.get('flags', '').encode()).hexdigest()[:16]}"
    return f"{platform.machine()}:{cpu}"


def schema_digest(module: nn.Module) -> str:
    """SHA-256 of the names, shapes and dtypes of a module's parameters and buffers: what a compiled
    artefact is specific to. Not their values: an artefact holds no weights (it runs on the module's
    own tensors, :func:`compiled_part`), so a retrained model of the same architecture reuses it."""
    h = hashlib.sha256()
    for name, t in sorted(_tensors(module).items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by name (non-persistent buffers included), detached."""
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    return {n: t.detach() for n, t in named}


@dataclass(frozen=True)
class CompileKey:
    """Everything a compiled artefact depends on; its :meth:`digest` names the cache file."""

    part: str  # what the part computes (its name and the settings its code reads)
    schema: str  # schema_digest of the exported module
    shapes: tuple[tuple[int, ...], ...]  # the example inputs' shapes (the dynamic dimension at its maximum)
    dynamic: str  # which input dimensions are dynamic ("" none)
    dtype: str
    device: str
    threads: int  # the kernels' OpenMP thread count is fixed when they are generated
    machine: str
    torch: str

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]


class CompiledPart(nn.Module):
    """A compiled artefact standing in for a part of the model: ``runner`` computes what the eager
    part computes for the inputs ``fits`` accepts (the model asks before calling it). ``name``: the
    part (``specialist``, ``encoder``, ``decoder``); ``calls`` counts the calls it took."""

    def __init__(self, name: str, runner: Callable, fits: Callable[..., bool]):
        super().__init__()
        self.name, self.runner, self.fits, self.calls = name, runner, fits, 0

    def forward(self, *args):
        self.calls += 1
        return self.runner(*args)


@dataclass
class Build:
    """What :func:`compiled_part` did for one part: ``hit`` (loaded from the cache), ``built``
    (compiled now, seconds), ``skipped`` (not in the cache and not asked to build) or ``failed``."""

    part: str
    status: str
    seconds: float = 0.0
    note: str = ""


def _export_and_compile(module: nn.Module, example: tuple, dynamic_shapes, dest: Path) -> None:
    """Export ``module`` and compile it into the package ``dest`` without its weights, and its lifted
    tensor constants (tensors made in ``forward``, not weights) beside it (``dest`` + ``.constants``)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, example, dynamic_shapes=dynamic_shapes, strict=False)
        # the package takes its name last (the inner file first): a reader never sees half an artefact
        with atomic_path(dest) as part, atomic_path(_constants_path(dest)) as side:
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(part), inductor_configs={"aot_inductor.package_constants_in_so": False})
            torch.save({k: v.detach().cpu() for k, v in program.constants.items() if isinstance(v, torch.Tensor)}, side)


def _constants_path(package: Path) -> Path:
    return package.with_suffix(".constants")


def _load(package: Path, module: nn.Module, device: torch.device) -> Callable:
    """The package's runner, computing with ``module``'s own parameters and buffers (shared, not copied)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner = torch._inductor.aoti_load_package(str(package))
    tensors = _tensors(module)
    extra = torch.load(_constants_path(package), map_location=device, weights_only=True)
    names = runner.get_constant_fqns()
    missing = [n for n in names if n not in tensors and n not in extra]
    if missing:
        raise RuntimeError(f"the artefact needs tensors the module does not have: {', '.join(missing[:3])}")
    runner.load_constants({n: tensors[n] if n in tensors else extra[n] for n in names}, check_full_update=True,
                          user_managed=True)
    runner.keep = (module, extra)  # the tensors it computes with live as long as it does
    return runner


def compiled_part(module: nn.Module, example: tuple, key: CompileKey, build: bool, dynamic_shapes=None,
                  root: Path | None = None) -> tuple[Callable | None, Build]:
    """The artefact of ``module`` for ``key``, loaded to compute with ``module``'s own weights (built
    now from ``example`` inputs when absent and ``build``), and what happened. Two processes building
    the same artefact wait for one another (a file lock), so the second loads what the first built."""
    from filelock import FileLock

    root = root or cache_root()
    dest = root / f"{key.part.split(':')[0]}-{key.digest()}.pt2"
    t = time.perf_counter()
    try:
        status = "hit"
        if not dest.exists():
            if not build:
                return None, Build(key.part, "skipped")
            root.mkdir(parents=True, exist_ok=True)
            with FileLock(str(dest) + ".lock"):
                if not dest.exists():
                    _export_and_compile(module, example, dynamic_shapes, dest)
                    (root / f"{dest.stem}.json").write_text(json.dumps(asdict(key), indent=1))
                    status = "built"
        runner = _load(dest, module, example[0].device)
        return runner, Build(key.part, status, time.perf_counter() - t)
    except Exception as e:  # noqa: BLE001 - any failure leaves the eager module, with the reason
        return None, Build(key.part, "failed", time.perf_counter() - t, f"{type(e).__name__}: {str(e)[:200]}")


# -- UV-SAM's parts -----------------------------------------------------------------------------
class InPrecision(nn.Module):
    """``module`` under autocast to ``precision`` (``bf16``; :mod:`uvsam.devices`), its outputs
    returned in fp32: what a part computes in a run with ``--precision bf16``, exported as such."""

    def __init__(self, module: nn.Module, precision: str):
        super().__init__()
        self.module, self.precision = module, precision

    def forward(self, *args):
        with torch.autocast(args[0].device.type, dtype=PRECISIONS[self.precision]):
            out = self.module(*args)
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


def _in(module: nn.Module, precision: str) -> nn.Module:
    return module if precision == "fp32" else InPrecision(module, precision)


def _dynamic(module: nn.Module, shapes: tuple) -> tuple:
    """``shapes`` (one entry per input) for ``module``'s forward: an :class:`InPrecision` takes its
    inputs as one ``*args`` tuple."""
    return (tuple(shapes),) if isinstance(module, InPrecision) else shapes


class SpecialistStep(nn.Module):
    """The specialist with its input preparation: (B, 3, H, W) 0..255 -> logits (B, 2, H, W), fused
    feature (B, 256, h, w); what :meth:`uvsam.modeling.uvsam.UVSAM.run_specialist` computes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.run_specialist_eager(images)


class BoxDecoder(nn.Module):
    """UV-SAM's box decoding (:meth:`uvsam.modeling.uvsam.UVSAM.decode_box_chunk`): (1, 256, 64, 64)
    embedding, (N, 4) prompt-frame boxes, (1, 1, 256, 256) dense prompt, (1, 2, 256) semantic
    prompts -> (N, 1, 256, 256) mask logits, (N, 1) predicted IoU."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, emb, boxes, dense, semantic):
        return self.model.decode_box_chunk_eager(emb, boxes, dense, semantic)


@dataclass(frozen=True)
class Shapes:
    """The input shapes a run feeds the model: ``tile`` px tiles ``batch`` a specialist call,
    ``window`` px refinement windows, up to ``boxes`` boxes a decoder call."""

    tile: int
    batch: int
    window: int
    boxes: int


def _example(device: torch.device, *shape: int) -> torch.Tensor:
    """A normal random example input of ``shape`` from a generator of its own: exporting a part never
    moves the global random state (a training run's dropout and drop-path draw from it)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device)


def _common(device: torch.device, precision: str = "fp32") -> dict:
    """The parts of a :class:`CompileKey` the machine, process and precision decide."""
    if precision not in COMPILED_PRECISIONS:
        raise ValueError(f"compiled parts run in {' or '.join(COMPILED_PRECISIONS)}, not {precision}")
    dtype = str(torch.float32) if precision == "fp32" else f"{precision} autocast"  # fp32 keys as before
    return dict(dtype=dtype, device=device.type, threads=torch.get_num_threads(),
                machine=machine_signature(device), torch=torch.__version__)


def encoder_part(generalist, device: torch.device, build: bool, root: Path | None = None,
                 precision: str = "fp32") -> tuple[CompiledPart | None, Build]:
    """The compiled image encoder of ``generalist`` (one preprocessed fp32 (1, 3, S, S) input, computing
    in ``precision``) and what happened; shared by prediction's windows and training's views (the
    same artefact)."""
    enc, s = _in(generalist.image_encoder, precision), generalist.spec.input_size
    key = CompileKey(f"encoder:{generalist.spec.name}", schema_digest(enc), ((1, 3, s, s),), "",
                     **_common(device, precision))
    runner, b = compiled_part(enc, (_example(device, 1, 3, s, s),), key, build, root=root)
    if runner is None:
        return None, b
    return CompiledPart("encoder", runner, lambda x: tuple(x.shape) == (1, 3, s, s) and x.dtype == torch.float32
                        and x.device == device), b


def compile_model(model, shapes: Shapes, device: torch.device, build: bool, refine: bool = True,
                  root: Path | None = None, precision: str = "fp32") -> list[Build]:
    """Install compiled artefacts of ``model``'s parts for ``shapes`` (from the cache, or built now
    when ``build``) as ``model.compiled``, which :class:`uvsam.modeling.uvsam.UVSAM` runs instead of
    the eager part where the inputs fit (inference; fp32 inputs and outputs). ``precision``: what
    the parts compute in, ``fp32`` or ``bf16`` (autocast inside the artefact, as the eager model
    computes under ``--precision bf16``; its own artefacts).

    Parts: the specialist for tiles (and windows when ``refine``) of 1..batch images, the generalist's
    encoder at its input size, and the box decoder for 1..``boxes`` boxes (when ``refine`` and
    the generalist has SAM's decoder with box and mask prompts). Returns what happened to each (a
    part that failed runs eager; the caller says so).
    """
    model.eval()
    dtype, dev = torch.float32, torch.device(device)
    common = _common(dev, precision)
    cfg, gen = model.config, model.generalist
    installed: dict[str, nn.Module] = {}
    builds: list[Build] = []

    # the specialist with its input preparation: one artefact per tile size a run feeds it (tiles, windows),
    # its batch one dynamic dimension (a short last batch and a single window run as they are; measured as
    # fast as fixed-batch artefacts, and one build instead of two)
    step = _in(SpecialistStep(model), precision)
    code = (f"specialist:{cfg.specialist}:{cfg.specialist_input}:{cfg.lcn_sigma_m / cfg.gsd_m:.6g}:"
            f"{model.specialist.reordered}")
    sizes = {shapes.tile: shapes.batch}
    if refine:
        sizes[shapes.window] = max(sizes.get(shapes.window, 1), 1)
    runners: dict[int, tuple[int, Callable]] = {}
    for size, most in sorted(sizes.items()):
        most = max(2, most)
        key = CompileKey(code, schema_digest(step), ((most, 3, size, size),), f"batch 1..{most}", **common)
        runner, b = compiled_part(step, (_example(dev, 2, 3, size, size).abs() * 64,), key, build,
                                  dynamic_shapes=_dynamic(step, ({0: torch.export.Dim("batch", min=1, max=most)},)),
                                  root=root)
        builds.append(b)
        if runner is not None:
            runners[size] = (most, runner)
    if runners:
        def fits(images, _r=runners):
            r = _r.get(images.shape[-1])
            return (r is not None and images.dim() == 4 and images.shape[-2] == images.shape[-1]
                    and images.shape[0] <= r[0] and images.dtype == dtype and images.device == dev)

        installed["specialist"] = CompiledPart("specialist", lambda images, _r=runners: _r[images.shape[-1]][1](
            images), fits)

    if refine:  # the generalist's encoder, on its preprocessed square input
        part, b = encoder_part(gen, dev, build, root, precision)
        builds.append(b)
        if part is not None:
            installed["encoder"] = part

    if refine and gen.spec.decoder == "sam" and cfg.box_prompt and model.uses_mask_prompt:
        dec, f = _in(BoxDecoder(model), precision), gen.spec.prompt_frame
        example = (_example(dev, 1, 256, 64, 64), torch.tensor([[0.1, 0.1, 0.5, 0.6]] * 2, device=dev) * f,
                   _example(dev, 1, 1, 256, 256), _example(dev, 1, 2, 256))
        key = CompileKey(f"decoder:{gen.spec.name}:{cfg.fusion}",
                         schema_digest(dec),
                         tuple(tuple(t.shape) for t in example), f"boxes 1..{shapes.boxes}", **common)
        boxes = torch.export.Dim("boxes", min=1, max=max(2, shapes.boxes))
        runner, b = compiled_part(dec, example, key, build, root=root,
                                  dynamic_shapes=_dynamic(dec, (None, {0: boxes}, None, None)))
        builds.append(b)
        if runner is not None:
            def fits_decoder(emb, boxes, dense, semantic, _k=shapes.boxes):
                return (dense is not None and tuple(emb.shape) == (1, 256, 64, 64) and 1 <= boxes.shape[0] <= _k
                        and tuple(dense.shape) == (1, 1, 256, 256) and emb.dtype == dtype and emb.device == dev)

            installed["decoder"] = CompiledPart("decoder", runner, fits_decoder)
    model.compiled = installed
    return builds


__all__ = ["AUTO_MIN_PIXELS", "AUTO_MIN_VIEWS", "COMPILED_PRECISIONS", "BoxDecoder", "Build", "CompileKey",
           "CompiledPart", "InPrecision", "Shapes",
           "SpecialistStep", "cache_root", "compile_model", "compiled_part", "encoder_part", "machine_signature",
           "schema_digest"]
