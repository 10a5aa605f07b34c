"""How much the predicted villages depend on where the tile grid falls, in one run.

    python benchmarks/grid_invariance.py SCENE --model MODEL.ckpt [--tile 256 --overlap 128]
        [--offset 128 --offset 64 --offset 37] [--no-refine] [--json]

The scene is predicted once with the grid as planned and once per ``--offset`` with the grid
shifted up-left by that many pixels (at the model's GSD). For each shift: the union IoU of
the candidate polygons (specialist) and of the final villages, and the village counts.
Shifts by whole grid steps (half a tile at half-tile overlap) give the same tiles by design;
other shifts measure the specialist's own sensitivity to its tile context.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import shapely

from uvsam.prediction import PredictConfig, model_info, predict_scene


def union_iou(a: list, b: list) -> float:
    ua, ub = shapely.union_all(a), shapely.union_all(b)
    union = ua.union(ub).area
    return 1.0 if union == 0 else ua.intersection(ub).area / union


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scene")
    ap.add_argument("--model", required=True)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=128)
    ap.add_argument("--offset", type=int, action="append")
    ap.add_argument("--no-refine", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    info = model_info(args.model)
    cfg = PredictConfig(tile=args.tile, overlap=args.overlap, refine=not args.no_refine)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        def run(offset: int):
            t = time.perf_counter()
            res = predict_scene(args.scene, info, replace(cfg, grid_offset=offset), Path(tmp) / str(offset))
            return res, time.perf_counter() - t

        base, t0 = run(0)
        for off in args.offset or [args.tile // 2]:
            res, t = run(off)
            rows.append({"offset": off, "aligned": off % (args.tile - args.overlap) == 0,
                         "candidates_iou": round(union_iou(base.candidates, res.candidates), 4),
                         "villages_iou": round(union_iou(base.villages, res.villages), 4),
                         "villages": [len(base.villages), len(res.villages)], "seconds": round(t, 1)})
    out = {"scene": args.scene, "tile": args.tile, "overlap": args.overlap, "refine": cfg.refine,
           "tiles": len(base.tiles), "base_seconds": round(t0, 1), "shifts": rows}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{args.scene}: {out['tiles']} tiles of {args.tile} px, overlap {args.overlap}, refine={cfg.refine}")
    print("offset  aligned  candidates IoU  villages IoU  villages (base, shifted)")
    for r in rows:
        print(f"{r['offset']:>6}  {r['aligned']!s:>7}  {r['candidates_iou']:>14}  {r['villages_iou']:>12}  "
              f"{r['villages']}")


if __name__ == "__main__":
    main()
