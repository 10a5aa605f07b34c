"""Where the networks run: ``--device auto|cpu|cuda[:N]|mps`` and ``--precision auto|fp32|bf16|fp16``.

``auto`` takes CUDA when PyTorch sees a GPU, else Apple's MPS, else the CPU. Precision ``auto``
is fp32 everywhere for now: bf16 autocast is a choice (``--precision bf16``), not the default,
because its villages differ measurably from fp32's (union IoU 0.89 on the Beijing val mosaic,
CPU bf16, README "Devices"); on a CUDA GPU fp32 matrix products use TF32 tensor cores. A device
that is asked for and absent is a :class:`~uvsam.errors.ConfigError` naming the option, before
any work.

:class:`Device` is a small picklable record (what a Dask worker needs to place the model the
same way); :meth:`Device.autocast` wraps a forward pass, and outputs come back to the CPU in
float32 whatever ran.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import time
from dataclasses import dataclass

import torch

from uvsam.errors import ConfigError

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Device:
    """A resolved device (``cpu``, ``cuda:0``, ``mps``) and precision (``fp32``, ``bf16``, ``fp16``)."""

    name: str = "cpu"
    precision: str = "fp32"

    @property
    def torch(self) -> torch.device:
        return torch.device(self.name)

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (None: plain fp32)."""
        return PRECISIONS[self.precision]

    def autocast(self):
        """A context in which forward passes run in this precision (nothing for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.torch.type, dtype=self.dtype)

    def synchronize(self) -> None:
        """Wait for queued GPU work (timings)."""
        if self.torch.type == "cuda":
            torch.cuda.synchronize(self.torch)

    def tile_batch(self, tile_px: int) -> int:
        """Tiles per specialist call when the user did not say: 2 on a CPU (as fast per tile as 1
        or 4 there, docs/benchmarks.md) or MPS; on a CUDA GPU as many as a quarter of its free
        memory holds at ~150 float32 activations per input pixel (SegFormer and the fusion head,
        an estimate), from 2 to 64."""
        if self.torch.type != "cuda":
            return 2
        free, _ = torch.cuda.mem_get_info(self.torch)
        per_tile = tile_px * tile_px * 4 * 150 * (0.5 if self.precision != "fp32" else 1.0)
        return int(max(2, min(64, 0.25 * free // per_tile)))

    def describe(self) -> str:
        """For the runs table and benchmarks: ``cuda:0 (NVIDIA H200), bf16``."""
        what = torch.cuda.get_device_name(self.torch) if self.torch.type == "cuda" else self.name
        return f"{self.name} ({what}), {self.precision}" if what != self.name else f"{self.name}, {self.precision}"


def latency(fn, x: torch.Tensor, repeats: int = 3, device: Device = Device()) -> float:
    """Median seconds of ``fn(x)`` on ``device`` (in its precision), after one warm-up."""
    with torch.inference_mode(), device.autocast():
        fn(x)
        device.synchronize()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(x)
            device.synchronize()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def select(device: str = "auto", precision: str = "auto") -> Device:
    """The :class:`Device` for the options ``--device`` and ``--precision``."""
    device = (device or "auto").strip().lower()
    if not DEVICE_PATTERN.fullmatch(device):
        raise ConfigError(f"{device!r}: use auto, cpu, cuda, cuda:N or mps", field="device")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else ("mps" if _mps() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{device}: PyTorch sees no CUDA GPU here (torch {torch.__version__}); use cpu or auto",
                              field="device")
        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{device}: there are {torch.cuda.device_count()} CUDA GPU(s) (cuda:0..)",
                              field="device")
        device = f"cuda:{index}"
    if device == "mps" and not _mps():
        raise ConfigError("mps: PyTorch sees no Apple GPU here; use cpu or auto", field="device")
    precision = (precision or "auto").strip().lower()
    if precision == "auto":
        precision = "fp32"
        if device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if precision not in PRECISIONS:
        raise ConfigError(f"{precision!r}: use auto, fp32, bf16 or fp16", field="precision")
    if precision == "fp16" and device == "cpu":
        raise ConfigError("fp16 on the CPU is slower and less exact than fp32: use fp32 or bf16", field="precision")
    return Device(device, precision)


def gpus_for(device: str) -> list[int]:
    """The GPUs a local Dask cluster gives a worker each (:mod:`uvsam.prediction.distributed`):
    every GPU for ``auto``/``cuda`` where PyTorch sees some, none otherwise (``cuda:N`` runs on
    the one GPU it names; the CPU and MPS need no layout)."""
    if (device or "auto").strip().lower() in ("auto", "cuda") and torch.cuda.is_available():
        return list(range(torch.cuda.device_count()))
    return []


def _mps() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
