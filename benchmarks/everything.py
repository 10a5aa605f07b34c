"""Everything mode: TinySAM's hierarchical strategy against the dense grid, on one real tile.

Decoder calls (point prompts decoded), decoding time (the image embedding excluded, as it is
shared) and objects of each, and the mask recall of the dense result: the fraction of the dense
grid's objects the hierarchical result also has at mask IoU >= 0.5 and >= 0.9.

    python benchmarks/everything.py --checkpoint sam_vit_b_01ec64.pth --encoder sam_vit_b --json

Without --checkpoint: sam_vit_b with random weights (seed 0, its mask and IoU heads' last layers
x100 as in tests/test_everything.py): mechanics and cost only, the masks mean nothing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from uvsam.checkpoint import load_generalist
from uvsam.everything import EverythingConfig, generate
from uvsam.predictor import Predictor

TILE = Path(__file__).resolve().parents[1].parent / "shared/data/beijing-uv/image/train/49566_107866.png"


def random_sam_b(folder: Path) -> Path:
    from segment_anything import build_sam_vit_b

    torch.manual_seed(0)
    ref = build_sam_vit_b().eval()
    with torch.no_grad():
        for mlp in [*ref.mask_decoder.output_hypernetworks_mlps, ref.mask_decoder.iou_prediction_head]:
            mlp.layers[-1].weight.mul_(100)
    path = folder / "sam_vit_b_random.pt"
    torch.save(ref.state_dict(), path)
    return path


def recall(dense, other, at: float) -> float:
    if len(dense) == 0:
        return float("nan")
    a = dense.masks.reshape(len(dense), -1).astype(np.float32)
    b = other.masks.reshape(len(other), -1).astype(np.float32)
    if len(other) == 0:
        return 0.0
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None] - inter
    return float(((inter / np.maximum(union, 1)).max(1) >= at).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="sam_vit_b")
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--image", type=Path, default=TILE)
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--pred-iou-thresh", type=float, default=0.88)
    ap.add_argument("--stability-thresh", type=float, default=0.95)
    ap.add_argument("--high-score-thresh", type=float, default=8.5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or random_sam_b(Path(tmp))
        pred = Predictor(load_generalist(args.encoder, ckpt))
        image = np.asarray(Image.open(args.image).convert("RGB"))
        pred.set_image(image)
        base = dict(points_per_side=args.points_per_side, pred_iou_thresh=args.pred_iou_thresh,
                    stability_score_thresh=args.stability_thresh, high_score_thresh=args.high_score_thresh)
        generate(pred, EverythingConfig(**{**base, "points_per_side": 4}))  # warm-up
        dense = generate(pred, EverythingConfig(**base))
        hier = generate(pred, EverythingConfig(**base, hierarchical=True))
    rows = [{"mode": m, "decoded": o.decoded, "passes": o.passes, "seconds": round(o.seconds, 2), "objects": len(o)}
            for m, o in (("dense", dense), ("hierarchical", hier))]
    result = {"encoder": args.encoder, "weights": "given" if args.checkpoint else "random (seed 0, heads x100)",
              "image": str(args.image.name), "settings": base, "rows": rows,
              "recall_iou50": round(recall(dense, hier, 0.5), 3), "recall_iou90": round(recall(dense, hier, 0.9), 3),
              "decoder_call_ratio": round(hier.decoded / dense.decoded, 3),
              "time_ratio": round(hier.seconds / max(dense.seconds, 1e-9), 3)}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for r in rows:
            print(f"{r['mode']:<13} {r['decoded']:>5} prompts {r['seconds']:>7.2f} s {r['objects']:>4} objects")
        print(f"recall of dense at IoU 0.5 / 0.9: {result['recall_iou50']} / {result['recall_iou90']}")


if __name__ == "__main__":
    main()
