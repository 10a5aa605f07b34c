"""The encoder table of ``uvsam encoders`` and docs/benchmarks.md: size, GFLOPs, CPU latency."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from uvsam.devices import Device, latency
from uvsam.modeling import ENCODERS, build_generalist, get_spec
from uvsam.progress import Progress
from uvsam.quantize import embedding_cosine, int8_check, quantize_encoder_static


def _sample_image(size: int, seed: int = 0) -> torch.Tensor:
    """A deterministic textured RGB image (1, 3, size, size) on the 0..255 scale."""
    g = np.random.default_rng(seed)
    base = g.random((3, size // 16, size // 16)).astype(np.float32)
    img = torch.nn.functional.interpolate(torch.from_numpy(base)[None], size=(size, size), mode="bicubic")
    img = img + 0.1 * torch.from_numpy(g.random((1, 3, size, size)).astype(np.float32))
    return (img.clamp(0, 1) * 255).round()


def encoder_rows(names: list[str] | None = None, measure: bool = True, repeats: int = 3,
                 image: torch.Tensor | None = None, int8: bool = True, device: Device = Device()) -> list[dict]:
    """One dict per encoder: params (M), GFLOPs at native input, median latency (s) of batch 1
    on ``device`` (``cpu_latency_s`` on the CPU, ``latency_s`` and the device elsewhere), and on
    the CPU for static int8 (:func:`uvsam.quantize.quantize_encoder_static`, calibrated on the
    image): latency, embedding cosine and mask IoU (a 3 x 3 grid of box prompts) against fp32."""
    rows = []
    names = names or list(ENCODERS)
    with Progress(len(names), "encoders", task="encoders") as bar:
        for name in names:
            spec = get_spec(name)
            torch.manual_seed(0)
            model = build_generalist(spec)
            enc = model.image_encoder
            row = {
                "name": spec.name,
                "family": spec.family,
                "input": spec.input_size,
                "encoder_params_m": round(sum(p.numel() for p in enc.parameters()) / 1e6, 2),
                "total_params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                "published_params_m": spec.published_params_m,
                "licence": spec.licence + (" (non-commercial)" if spec.non_commercial else ""),
            }
            if measure:
                img = image if image is not None else _sample_image(1024)
                x = model.preprocess(img)
                counter = FlopCounterMode(display=False)
                with torch.inference_mode(), counter:
                    ref = enc(x)
                row["gflops"] = round(counter.get_total_flops() / 1e9, 1)
                if device.torch.type == "cpu" and device.dtype is None:
                    row["cpu_latency_s"] = round(latency(enc, x, repeats), 3)
                    row["threads"] = torch.get_num_threads()
                else:  # on the device, in its precision; the embedding compared with the CPU's fp32
                    on = enc.to(device.torch)
                    xd = x.to(device.torch)
                    row["latency_s"] = round(latency(on, xd, repeats, device), 4)
                    row["device"] = device.describe()
                    with torch.inference_mode(), device.autocast():
                        row["cosine_vs_cpu_fp32"] = round(embedding_cosine(on(xd).float().cpu(), ref), 4)
                    if device.torch.type == "cuda":
                        row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device.torch) / 2**20)
                        torch.cuda.reset_peak_memory_stats(device.torch)
                    enc.to("cpu")
                if int8 and device == Device():  # static int8 is a CPU fp32 path, calibrated on the image
                    check = int8_check(model, quantize_encoder_static(enc, [x]), [x], repeats)
                    row["int8_cpu_latency_s"] = round(check.int8_s, 3)
                    row["int8_cosine"] = round(check.cosine, 4)
                    row["int8_mask_iou"] = round(check.mask_iou, 4)
            rows.append(row)
            del model
            bar.advance(1, encoder=spec.name)
    return rows


def format_table(rows: list[dict]) -> str:
    cols = ["name", "input", "encoder_params_m", "total_params_m", "gflops", "cpu_latency_s", "latency_s",
            "cosine_vs_cpu_fp32", "peak_gpu_mb", "int8_cpu_latency_s", "int8_cosine", "int8_mask_iou", "device",
            "licence"]
    cols = [c for c in cols if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)
