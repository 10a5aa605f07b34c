"""Can the gate tell imagery unlike its training tiles? Distances in two feature spaces.

    python benchmarks/gate_familiarity.py --gate gate.pt --model villages.ckpt \
        --train bj/train --val bj/val [--dims 16] [--json]

``bj/train`` and ``bj/val`` hold ``images/`` and ``masks/`` (``uvsam import-xyz`` of the Beijing
tiles). Tiles of the gate's crop are cut as ``uvsam train-gate`` cuts them: the training tiles
(the southern strip held out), the held-out strip, the summer val tiles, and every tile of the
scenes without villages (``spacenet-atlanta``, ``odd-inputs``' Rotterdam scenes). Each tile gives
two feature vectors: the gate's own (its backbone's pooled features) and the specialist's (its
encoder's stages, mean- and max-pooled). Fitted on the training tiles (standardised, the first
``--dims`` principal components), each tile's Mahalanobis distance says how unlike the training
tiles it is: a familiarity check could reject a scene only if its tiles lie beyond every val
tile, since the val tiles, 30 km away and in another season, must keep their villages.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from uvsam.augment import View, render
from uvsam.datasets import load_scene, pair_scenes
from uvsam.gate import grid_tiles, negative_scene, strip_split
from uvsam.gatefile import GateFile
from uvsam.modelfile import ModelFile, load_model
from uvsam.modeling.specialist import specialist_input

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WITHOUT = ["spacenet-atlanta/atlanta_pan_uint16.tif", "odd-inputs/rotterdam_pan_uint16.tif",
           "odd-inputs/rotterdam_ms4_float64.tif", "odd-inputs/rotterdam_rgb.tif"]


def features(gate, model, scenes, tiles) -> tuple[np.ndarray, np.ndarray]:
    """(gate features, specialist features) of ``tiles``, one row each."""
    g, s = [], []
    for i in range(0, len(tiles), 32):
        x = torch.stack([render(View(t.scene, t.row, t.col, t.side, False, 0), scenes, t.side)[0]
                         for t in tiles[i:i + 32]])
        with torch.inference_mode():
            z = specialist_input(x, gate.input_mode, gate.mean, gate.std, gate.lcn_sigma_px)
            g.append(gate.backbone.forward_head(gate.backbone.forward_features(z), pre_logits=True).numpy())
            z = specialist_input(x, model.config.specialist_input, model.pixel_mean, model.pixel_std,
                                 model.config.lcn_sigma_m / model.config.gsd_m)
            z = torch.nn.functional.pad(z, (0, -z.shape[-1] % 32, 0, -z.shape[-2] % 32), mode="reflect")
            stages = [f for f in model.specialist.net.encoder(z) if f.shape[1] > 3]
            s.append(torch.cat([torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1) for f in stages], 1).numpy())
    return np.concatenate(g), np.concatenate(s)


def distances(train: np.ndarray, others: dict[str, np.ndarray], dims: int) -> dict[str, np.ndarray]:
    mu, sd = train.mean(0), train.std(0) + 1e-6
    _, sv, vt = np.linalg.svd((train - mu) / sd, full_matrices=False)
    var = sv[:dims] ** 2 / (len(train) - 1)
    return {k: np.sqrt(((((x - mu) / sd) @ vt[:dims].T) ** 2 / var).sum(1)) for k, x in others.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gate", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--train", required=True, type=Path)
    ap.add_argument("--val", required=True, type=Path)
    ap.add_argument("--dims", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    gate = GateFile.read(args.gate)
    net = gate.network.eval()
    model, _ = load_model(args.model)
    model.eval()
    spec = ModelFile.read(args.model).inputs
    crop = gate.crop
    train = [load_scene(p, spec) for p in pair_scenes(args.train / "images", args.train / "masks")]
    train_keep, held_keep = strip_split(train, 0.2, "south")
    sets = {"train": (train, grid_tiles(train, crop, crop // 2, train_keep, 0.02)),
            "held-out strip": (train, grid_tiles(train, crop, crop // 2, held_keep, 0.02))}
    val = [load_scene(p, spec) for p in pair_scenes(args.val / "images", args.val / "masks")]
    sets["val (summer, 30 km away)"] = (val, grid_tiles(val, crop, crop // 2, lambda *a: True, 0.02))
    for name in WITHOUT:
        scene = [negative_scene(DATA / name, spec)]
        sets[Path(name).name] = (scene, grid_tiles(scene, crop, crop // 2, lambda *a: True, 0.02))
    feats = {k: features(net, model, scenes, tiles) for k, (scenes, tiles) in sets.items()}
    report = {}
    for space, i in (("gate", 0), ("specialist", 1)):
        d = distances(feats["train"][i], {k: v[i] for k, v in feats.items()}, args.dims)
        report[space] = {k: {"tiles": len(v), "median": round(float(np.median(v)), 2), "min": round(float(v.min()), 2),
                             "max": round(float(v.max()), 2)} for k, v in d.items()}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    for space, rows in report.items():
        print(f"{space} features, Mahalanobis distance to the training tiles ({args.dims} components):")
        for k, r in rows.items():
            print(f"  {k:28s} {r['tiles']:4d} tiles  median {r['median']:5.2f}  min {r['min']:5.2f}  "
                  f"max {r['max']:5.2f}")


if __name__ == "__main__":
    main()
