"""Static int8 per encoder family, measured: CPU latency against fp32 and mask agreement on real tiles.

    python benchmarks/int8.py --train bj/train/images --val bj/val [--encoders sam_vit_b,mobile_sam,...]
        [--threads 2] [--json]

``bj/`` comes from ``uvsam import-xyz`` of the Beijing tiles. Each encoder (weights drawn at random,
seed 0: no official weights can be downloaded here) is quantised with
:func:`uvsam.quantize.quantize_encoder_static`, calibrated on four Beijing train tiles; then, on
held-out images (the Beijing val tiles with box prompts of their villages, SpaceNet Atlanta with
box prompts of its building footprints), the masks of the fp32 and the int8 encoder through the
same decoder (three a prompt, the best by predicted IoU, on the decoder's 256 x 256 grid) are
compared (mean IoU), with the embeddings' cosine, and batch-1 latency is the median of two runs
after a warm-up, fp32 and int8 in one process. ``keep`` says whether `--int8` would use it: faster at mask IoU >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distillation import held_out  # noqa: E402

from uvsam.devices import latency  # noqa: E402
from uvsam.modeling import build_generalist  # noqa: E402
from uvsam.prompt_bench import iou  # noqa: E402
from uvsam.quantize import MIN_MASK_IOU, embedding_cosine, quantize_encoder_static  # noqa: E402
from uvsam.raster import read_rgb  # noqa: E402

FAMILIES = "sam_vit_b,mobile_sam,efficientvit_sam_l0,efficientvit_sam_xl0,efficientsam_ti,edgesam,repvit_sam," \
           "sam_lightening"


def best_masks(model, emb: torch.Tensor, boxes: np.ndarray, h: int, w: int) -> torch.Tensor:
    """(N, 256, 256) bool: each box's best mask (of three, by predicted IoU) on the decoder's grid."""
    sx, sy = model.prompt_scale(h, w)
    b = torch.from_numpy(boxes * np.array([sx, sy, sx, sy], np.float32))
    out = []
    with torch.inference_mode():
        for i in range(0, len(b), 16):
            low, pred = model.decode(emb, boxes=b[i:i + 16], multimask_output=True)
            out.append(low[torch.arange(len(low)), pred.argmax(1)] > model.mask_threshold)
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True, type=Path)
    ap.add_argument("--val", required=True, type=Path)
    ap.add_argument("--encoders", default=FAMILIES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    images = held_out(args.val)
    calib_px = [read_rgb(p).pixels for p in sorted(args.train.glob("*.tif"))[:4]]
    rows = []
    for name in args.encoders.split(","):
        torch.manual_seed(0)
        model = build_generalist(name).eval()
        calib = [model.preprocess(torch.from_numpy(px).permute(2, 0, 1)[None].float()) for px in calib_px]
        quantized = quantize_encoder_static(model.image_encoder, calib)
        fp32_s = latency(model.image_encoder, calib[0], repeats=2)
        int8_s = latency(quantized, calib[0], repeats=2)
        cos, ious = [], []
        for _, pixels, boxes in images:
            x = model.preprocess(torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None].float())
            with torch.inference_mode():
                a, b = model.image_encoder(x), quantized(x)
            cos.append(embedding_cosine(a, b))
            h, w = pixels.shape[:2]
            ref, got = best_masks(model, a, boxes, h, w), best_masks(model, b, boxes, h, w)
            ious += [iou(r.numpy(), g.numpy()) for r, g in zip(ref, got, strict=True)]
        mask_iou = float(np.mean(ious))
        rows.append({"encoder": name, "family": model.spec.family, "fp32_s": round(fp32_s, 3),
                     "int8_s": round(int8_s, 3), "speedup": round(fp32_s / int8_s, 2),
                     "cosine": round(statistics.fmean(cos), 4), "mask_iou": round(mask_iou, 4),
                     "prompts": len(ious), "keep": bool(int8_s < fp32_s and mask_iou >= MIN_MASK_IOU),
                     "threads": torch.get_num_threads()})
        if not args.json:
            print(rows[-1], flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
