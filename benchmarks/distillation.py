"""`uvsam distill` measured: how close students come to their teacher, before and after, against time.

    python benchmarks/distillation.py --train bj/train/images --val bj/val
        [--runs mobile_sam:embedding,mobile_sam:full-stage,...] [--epochs 2] [--steps 10] [--views 2]
        [--prompts 4] [--json]

``bj/train/images`` and ``bj/val`` come from ``uvsam import-xyz`` of the Beijing tiles (``bj/val``
holds ``images/`` and ``masks/``). The teacher is ``sam_vit_b`` with weights drawn at random
(seed 0) and saved in the official layout: no official weights can be downloaded here, so this
measures the recipe's mechanics (can a student learn to reproduce a teacher's embeddings and masks
on this imagery, at what cost), not SAM's quality. Held out from distillation: the Beijing val
tiles (box prompts: their villages, from the masks) and SpaceNet Atlanta (box prompts: the
building footprints). For each student: the mean cosine similarity of its embeddings to the
teacher's, and the mean IoU of its masks to the teacher's masks for the same box prompts (three
masks a prompt, the best by predicted IoU, as `uvsam bench-prompts`), before distillation (a
fresh student with the teacher's decoder) and after, with the wall time of the distillation.
Every run of one invocation has the same steps, views and prompts and shares the teacher's
embedding cache (filled by the first run, whose time includes it). The layerwise recipe matches
the layers of plain ViTs only, so its student is SAM-Lightening (the family it was made for);
MobileSAM's TinyViT and EfficientViT are hierarchical.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import torch
from scipy.ndimage import find_objects, label

from uvsam.checkpoint import load_generalist, save_official
from uvsam.distill import DistillConfig, distill, embedding_agreement, student_model
from uvsam.modeling.sam import build_generalist
from uvsam.predictor import Predictor
from uvsam.prompt_bench import iou, object_masks
from uvsam.raster import read_rgb

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def held_out(val: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, (H, W, 3) pixels, (N, 4) boxes) of the held-out images."""
    out = []
    for image in sorted((val / "images").glob("*.tif")):
        with rasterio.open(val / "masks" / image.name) as src:
            lab, _ = label(src.read(1) == 1)
        boxes = [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in find_objects(lab)
                 if (s[0].stop - s[0].start) * (s[1].stop - s[1].start) >= 100]
        out.append((image.name, read_rgb(image).pixels, np.asarray(boxes, np.float32)))
    atlanta = DATA / "spacenet-atlanta/atlanta_pan_uint16.tif"
    img = read_rgb(atlanta)
    labels, _ = object_masks(gpd.read_file(DATA / "spacenet-atlanta/atlanta_buildings.geojson"), img.profile["crs"],
                             img.profile["transform"], img.valid.shape)
    boxes = [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in find_objects(labels) if s is not None]
    out.append((atlanta.name, img.pixels, np.asarray(boxes, np.float32)))
    return out


def masks(model, images) -> list[np.ndarray]:
    """Each held-out image's best masks for its boxes, (N, H, W) bool."""
    out = []
    pred = Predictor(model)
    for _, pixels, boxes in images:
        pred.set_image(pixels)
        p = pred.predict(boxes=boxes, multimask_output=True)
        out.append(p.masks[np.arange(len(boxes)), p.iou.argmax(1)])
    return out


def agreement(student, teacher, images, teacher_masks) -> dict:
    cos = embedding_agreement(student, teacher, [torch.from_numpy(px).permute(2, 0, 1).float()
                                                 for _, px, _ in images])
    ious = [iou(a, b) for s, t in zip(masks(student, images), teacher_masks, strict=True)
            for a, b in zip(s, t, strict=True)]
    return {"cosine": round(cos, 4), "mask_iou": round(float(np.mean(ious)), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True)
    ap.add_argument("--val", required=True, type=Path)
    ap.add_argument("--runs", default=",".join(f"{s}:{r}" for s in ("mobile_sam", "efficientvit_sam_l0")
                                               for r in ("embedding", "full-stage", "prompt-in-loop"))
                    + ",sam_lightening:layerwise", help="student:recipe pairs")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    images = held_out(args.val)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher_file = Path(tmp) / "sam_vit_b_seed0.pt"
        torch.manual_seed(0)
        save_official(build_generalist("sam_vit_b"), teacher_file)
        teacher = load_generalist("sam_vit_b", teacher_file)
        teacher_masks = masks(teacher, images)
        for run in args.runs.split(","):
            student_name, recipe = run.split(":")
            cfg = DistillConfig(teacher="sam_vit_b", student=student_name, images=(args.train,), recipe=recipe,
                                out=str(Path(tmp) / f"{student_name}-{recipe}.pt"),
                                teacher_checkpoint=str(teacher_file), epochs=args.epochs, steps_per_epoch=args.steps,
                                views=args.views, prompts=args.prompts, warmup_steps=max(1, args.steps // 2),
                                cache=str(Path(tmp) / "cache"), device="cpu")
            before = agreement(student_model(cfg, teacher)[0].eval(), teacher, images, teacher_masks)
            t = time.perf_counter()
            record = distill(cfg, log=lambda m: None)
            seconds = time.perf_counter() - t
            after = agreement(load_generalist(student_name, cfg.out), teacher, images, teacher_masks)
            rows.append({"student": student_name, "recipe": recipe, "steps": args.epochs * args.steps,
                         "views": args.views, "prompts": args.prompts, "before": before, "after": after,
                         "loss_first_epoch": record["history"][0]["loss"],
                         "loss_last_epoch": record["history"][-1]["loss"], "seconds": round(seconds, 1)})
            if not args.json:
                print(rows[-1], flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
