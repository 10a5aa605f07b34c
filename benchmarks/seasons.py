"""Training recipes compared by leak-free cross-validation over the eight Beijing tiles (issue 18).

    python benchmarks/seasons.py [--work DIR] [--seeds 0 1 2] [--only NAME ...] [--rows rows.jsonl] [--json]

The eight tiles of ../shared/data/beijing-uv form two spatially separate groups: the six
winter (leaf-off) "train" tiles of one district, which overlap or touch one another, and the
two summer (leaf-on) "val" tiles 30 km east, which overlap each other. `uvsam.folds` groups
overlapping and touching tiles, so leave-one-area-out cross-validation has two folds: train on
the winter district and score the summer one, and the other way round. Each fold is a new
district AND a new season. Every configuration runs `uvsam train --folds 2` (the `uvsam train`
defaults but for what its name changes; random mobile_sam generalist: no published weights
are reachable here, so the UV-SAM path's epochs train the specialist alone) and is scored
through `uvsam evaluate`'s path: predict's pipeline, the shipped polygons rasterised on the
label grid. Reported: polygon IoU per held-out season, their mean, and the spread over seeds.

The recipe chosen as the default was chosen on these same folds: its numbers here are
optimistic for it; tiles the project never sees are the honest test.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "beijing-uv"

BASELINE = "plain SegFormer-B0: RGB, colour jitter"
CONFIGS = {  # name -> TrainConfig overrides
    BASELINE: {"specialist_input": "rgb", "photometric": True, "harmonise": False, "ema": 0.0},
    "default": {},  # `uvsam train` as documented
    "grey local contrast (the default before)": {"specialist_input": "lcn"},
    "grey local contrast, colour jitter": {"specialist_input": "lcn", "photometric": True},
    "grey local contrast, 20 epochs": {"specialist_input": "lcn", "epochs": 20},
    "colour local contrast, colour jitter": {"specialist_input": "lcn_rgb", "photometric": True},
    "colour local contrast, scale 0.5-2": {"specialist_input": "lcn_rgb", "scale": (0.5, 2.0)},
    "colour local contrast, 20 epochs": {"specialist_input": "lcn_rgb", "epochs": 20},
}
SEASONS = {"winter": "train", "summer": "val"}  # held-out fold -> the data folder its tiles come from


def prepare(work: Path) -> Path:
    """The eight tiles georeferenced (`uvsam import-xyz`) into one folder of images and masks."""
    from tiles.xyz import import_xyz

    every = work / "all"
    for part in ("train", "val"):
        dest = work / part
        if not (dest / "images").is_dir():
            import_xyz(DATA / "image" / part, 17, dest, masks_dir=DATA / "mask" / part)
        for sub in ("images", "masks"):
            (every / sub).mkdir(parents=True, exist_ok=True)
            for f in sorted((dest / sub).glob("*.tif")):
                link = every / sub / f.name
                if not link.exists():
                    link.symlink_to(f.resolve())
    return every


def run(name: str, overrides: dict, seed: int, every: Path, work: Path) -> dict:
    from uvsam.crossval import cross_validate
    from uvsam.training import TrainConfig

    stem = "".join(c if c.isalnum() else "_" for c in name)
    t = time.perf_counter()
    cfg = TrainConfig(images=str(every / "images"), labels=str(every / "masks"), out=str(work / f"{stem}-s{seed}.ckpt"),
                      folds=2, fold=1, seed=seed, **overrides)
    cv = cross_validate(cfg, log=lambda m: None, resume=True)
    row = {"config": name, "seed": seed, "seconds": round(time.perf_counter() - t)}
    for fold in cv["folds"]:
        season = "summer" if any(s.startswith("49554_") for s in fold["scenes"]) else "winter"
        row[season] = {k: round(fold["polygons"][k], 3) for k in ("iou", "precision", "recall", "object_precision",
                                                                  "object_recall", "object_f1")}
        row[season].update({k: fold["polygons"][k] for k in ("boundary_mean_m", "boundary_p95_m")})
        row[season]["specialist_iou"] = round(fold["specialist"]["iou"], 3)
    row["mean_iou"] = round((row["winter"]["iou"] + row["summer"]["iou"]) / 2, 3)
    return row


def summary(rows: list[dict]) -> list[dict]:
    """Per configuration: mean and spread (min..max over seeds) of each held-out season's IoU and their mean."""
    out = []
    for name in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == name]
        row = {"config": name, "seeds": [r["seed"] for r in mine]}
        for key, get in (("winter", lambda r: r["winter"]["iou"]), ("summer", lambda r: r["summer"]["iou"]),
                         ("mean", lambda r: r["mean_iou"])):
            vals = [get(r) for r in mine]
            row[key] = {"mean": round(sum(vals) / len(vals), 3), "min": min(vals), "max": max(vals)}
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "uvsam-seasons")
    ap.add_argument("--only", nargs="*", help="Run only these configurations (names as in the table).")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="Training seeds; each configuration is cross-validated once per seed (default 0).")
    ap.add_argument("--rows", type=Path, help="Append each finished row to this JSON-lines file; rows already "
                    "in it are not run again (resume), and all of them enter the table.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    every = prepare(args.work)
    rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()] \
        if args.rows and args.rows.exists() else []
    done = {(r["config"], r["seed"]) for r in rows}
    for seed in args.seeds:
        for name, overrides in CONFIGS.items():
            if (args.only and name not in args.only) or (name, seed) in done:
                continue
            rows.append(run(name, overrides, seed, every, args.work))
            print(json.dumps(rows[-1]), flush=True)
            if args.rows:
                with args.rows.open("a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
    table = summary([r for r in rows if (not args.only or r["config"] in args.only)])
    if args.json:
        print(json.dumps({"rows": rows, "summary": table}))
        return
    print("\n| recipe | seeds | winter held out (train summer) | summer held out (train winter) | mean of folds |")
    print("|---|---|---|---|---|")
    for r in table:
        cells = [f"{r[k]['mean']:.3f}" if r[k]["min"] == r[k]["max"]
                 else f"{r[k]['mean']:.3f} ({r[k]['min']:.3f}-{r[k]['max']:.3f})" for k in ("winter", "summer", "mean")]
        print(f"| {r['config']} | {len(r['seeds'])} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
