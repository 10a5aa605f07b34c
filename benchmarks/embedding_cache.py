"""Speed-up of the embedding cache: encode the Beijing tiles cold, then again from the cache.

    python benchmarks/embedding_cache.py --encoder mobile_sam [--json]

Prints the cold and warm wall times and their ratio, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from uvsam.embedding_cache import EmbeddingCache
from uvsam.modeling import build_generalist
from uvsam.predictor import Predictor

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "beijing-uv" / "image"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", default="mobile_sam")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tiles = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(DATA.glob("*/*.png"))]
    torch.manual_seed(0)
    model = build_generalist(args.encoder)
    with tempfile.TemporaryDirectory() as d:
        cache = EmbeddingCache(d)
        pred = Predictor(model, embedder=cache, batch_size=1)
        t = time.perf_counter()
        cold = pred.set_images(tiles).clone()
        t_cold = time.perf_counter() - t
        t = time.perf_counter()
        warm = pred.set_images(tiles)
        t_warm = time.perf_counter() - t
    assert torch.equal(cold, warm)
    result = {
        "encoder": args.encoder, "tiles": len(tiles), "cold_s": round(t_cold, 3), "warm_s": round(t_warm, 3),
        "speedup": round(t_cold / t_warm, 1), "threads": torch.get_num_threads(),
    }
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
