"""What each robustness measure contributes across seasons (issue 9), in one run.

    python benchmarks/seasons.py [--work DIR] [--json]

The Beijing tiles of ../shared/data/beijing-uv: six winter train tiles of one district, two
summer val tiles of another. One winter tile is held out (the same-season test); each
configuration trains on the other five with the `uvsam train` defaults (SegFormer-B0
specialist at 3.7 m, 10 epochs x 40 steps, the last 2 through the UV-SAM path with a random
mobile_sam generalist: no published weights are reachable here) but for the one measure it
switches off, and is evaluated with `uvsam evaluate`'s code (the default inference path:
read at the model's GSD, harmonised to its training radiometry when the model says so,
overlapping windows) on the summer val tiles (cross-season) and on the held-out winter tile
(same season); the first row trains on all six, as `uvsam train` is documented. The
specialist's pixel IoU is reported: with random generalist weights the
UV-SAM path's masks measure nothing.

Measures: harmonisation (scenes matched to the training radiometry, in training and at
inference), local-contrast grey input (`--specialist-input lcn`; `rgb` without), photometric
augmentation (colour gain/offset, band mixing, grey, gamma, blur), the weight average (EMA).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "beijing-uv"

CONFIGS = {  # name -> (TrainConfig overrides, photometric augmentation on)
    "default, all six train tiles": ({}, True),  # the headline: `uvsam train` as documented
    "default": ({}, True),
    "no harmonisation": ({"harmonise": False}, True),
    "rgb input (no local contrast)": ({"specialist_input": "rgb"}, True),
    "no photometric augmentation": ({}, False),
    "no weight average": ({"ema": 0.0}, True),
    "none of them": ({"harmonise": False, "specialist_input": "rgb", "ema": 0.0}, False),
}


def prepare(work: Path) -> dict[str, Path]:
    """Georeferenced train/val tiles and the 5 + 1 split of the train tiles (symlinks)."""
    from tiles.xyz import import_xyz

    out = {}
    for part in ("train", "val"):
        dest = work / part
        if not (dest / "images").is_dir():
            import_xyz(DATA / "image" / part, 17, dest, masks_dir=DATA / "mask" / part)
        out[part] = dest
    images = sorted((work / "train/images").glob("*.tif"))
    held = images[-1].name
    for name, keep in (("train5", lambda n: n != held), ("winter1", lambda n: n == held)):
        for sub in ("images", "masks"):
            d = work / name / sub
            d.mkdir(parents=True, exist_ok=True)
            for f in sorted((work / "train" / sub).glob("*.tif")):
                link = d / f.name
                if keep(f.name) and not link.exists():
                    link.symlink_to(f.resolve())
        out[name] = work / name
    out["held_out"] = held
    return out


def run(name: str, overrides: dict, photometric: bool, split: dict, work: Path) -> dict:
    import uvsam.train as T
    from uvsam.evaluate import evaluate

    original = T.photometric
    if not photometric:
        T.photometric = lambda images, gen: images  # the one switch uvsam train has no flag for
    try:
        model = work / f"{name.split(' (')[0].replace(' ', '_').replace(',', '')}.ckpt"
        t = time.perf_counter()
        train = split["train"] if "all six" in name else split["train5"]
        T.train(T.TrainConfig(images=str(train / "images"), labels=str(train / "masks"), out=str(model), **overrides),
                log=lambda m: None)
        seconds = time.perf_counter() - t
    finally:
        T.photometric = original
    scores = {}
    tests = [("cross_season", split["val"])] + ([] if "all six" in name else [("same_season", split["winter1"])])
    for test, folder in tests:
        r = evaluate(model, folder / "images", folder / "masks", specialist_only=True)
        scores[test] = {k: round(r["specialist"][k], 3) for k in ("iou", "precision", "recall")}
    return {"config": name, "train_s": round(seconds), **scores}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "uvsam-seasons")
    ap.add_argument("--only", nargs="*", help="Run only these configurations (names as in the table).")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    split = prepare(args.work)
    rows = []
    for name, (overrides, photometric) in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        rows.append(run(name, overrides, photometric, split, args.work))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        print(json.dumps({"held_out_winter_tile": split["held_out"], "rows": rows}))
        return
    print(f"\nheld-out winter tile: {split['held_out']}\n")
    print("| configuration | cross-season IoU | precision | recall | same-season IoU | train s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        c, s = r["cross_season"], r.get("same_season", {"iou": "-"})
        print(f"| {r['config']} | {c['iou']} | {c['precision']} | {c['recall']} | {s['iou']} | {r['train_s']} |")


if __name__ == "__main__":
    main()
