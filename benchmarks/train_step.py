"""Time of one UV-SAM training step per generalist, on real Beijing views, in one run.

    python benchmarks/train_step.py --encoder mobile_sam --encoder efficientvit_sam_l0 [--json]

For each encoder: a batch of views (``--batch`` x ``--crop`` px at ``--gsd`` m, rendered from
the real Beijing train tiles) goes through (a) a specialist-only step, (b) a full UV-SAM step
whose frozen-encoder embeddings come from the cache, and (c) the frozen encoder's embedding of
the batch (what a cache miss adds). Medians of ``--repeats`` timed runs after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from uvsam.augment import photometric
from uvsam.labels import IGNORE
from uvsam.losses import uvsam_loss
from uvsam.modeling.sam import build_generalist
from uvsam.modeling.specialist import Specialist
from uvsam.modeling.uvsam import UVSAM, UVSAMConfig

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "beijing-uv"


def views(batch: int, crop: int, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` crops of the train tiles, downsampled by ``factor`` (the training GSD)."""
    imgs, labs = [], []
    for p in sorted((DATA / "image/train").glob("*.png"))[:batch]:
        im = torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), np.float32)).permute(2, 0, 1)[None]
        lab = torch.from_numpy(np.asarray(Image.open(DATA / "mask/train" / p.name)))[None, None].float()
        size = im.shape[-1] // factor
        im = F.interpolate(im, (size, size), mode="bilinear", antialias=True)[..., :crop, :crop]
        lab = F.interpolate(lab, (size, size), mode="nearest")[..., :crop, :crop]
        imgs.append(im)
        labs.append(lab.to(torch.uint8))
    while len(imgs) < batch:
        imgs.append(imgs[len(imgs) % 6])
        labs.append(labs[len(labs) % 6])
    return torch.cat(imgs), torch.cat(labs)[:, 0]


def timed(fn, repeats: int) -> float:
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def measure(encoder: str, batch: int, crop: int, gsd: float, factor: int, repeats: int, lcn: bool) -> dict:
    torch.manual_seed(0)
    config = UVSAMConfig(encoder=encoder, gsd_m=gsd, specialist_input="lcn" if lcn else "rgb")
    model = UVSAM(config, Specialist("mit_b0"), build_generalist(encoder)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    images, labels = views(batch, crop, factor)
    gen = torch.Generator().manual_seed(0)
    emb = model.frozen_embeddings(images)
    decoded = []

    def specialist_step():
        logits, _ = model.run_specialist(photometric(images, gen))
        loss = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def uvsam_step():
        parts = uvsam_loss(model(images, frozen_embeddings=emb, specialist_images=photometric(images, gen)), labels)
        opt.zero_grad()
        parts["total"].backward()
        opt.step()
        decoded.append(float(parts["villages"]))

    def encode():
        model.frozen_embeddings(images)

    return {
        "encoder": encoder, "batch": batch, "crop_px": crop, "gsd_m": gsd,
        "specialist_step_s": round(timed(specialist_step, repeats), 3),
        "uvsam_step_cached_s": round(timed(uvsam_step, repeats), 3),
        "encoder_batch_s": round(timed(encode, repeats), 3),
        "villages_decoded_per_step": statistics.median(decoded),
        "threads": torch.get_num_threads(),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", action="append", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=192)
    ap.add_argument("--factor", type=int, default=2, help="downsampling of the 0.92 m tiles (2: 1.84 m)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rgb", action="store_true", help="specialist on RGB instead of local contrast")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    gsd = 0.92 * args.factor
    rows = [measure(e, args.batch, args.crop, gsd, args.factor, args.repeats, not args.rgb)
            for e in (args.encoder or ["mobile_sam", "efficientvit_sam_l0"])]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(" ".join(f"{k}={v}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
