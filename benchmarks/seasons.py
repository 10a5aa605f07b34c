"""What each robustness measure contributes across seasons (issue 9), in one run.

    python benchmarks/seasons.py [--work DIR] [--seeds 0 1 2] [--only NAME ...] [--rows rows.jsonl] [--json]

The Beijing tiles of ../shared/data/beijing-uv: six winter train tiles of one district, two
summer val tiles of another. One winter tile is held out (the same-season test); each
configuration trains on the other five with the `uvsam train` defaults (SegFormer-B0
specialist at 3.7 m, 10 epochs x 40 steps, the last 2 through the UV-SAM path with a random
mobile_sam generalist: no published weights are reachable here) but for what its name
changes, and is evaluated with `uvsam evaluate`'s code (the default inference path:
read at the model's GSD, harmonised to its training radiometry when the model says so,
overlapping windows) on the summer val tiles (cross-season) and on the held-out winter tile
(same season); the first row trains on all six, as `uvsam train` is documented. The
specialist's pixel IoU is reported: with random generalist weights the
UV-SAM path's masks measure nothing.

Measures: harmonisation (scenes matched to the training radiometry, in training and at
inference), local-contrast grey input (`--specialist-input lcn`; `rgb` without), photometric
augmentation (colour gain/offset, band mixing, grey, gamma, blur; `--photometric`, off by
default since these runs), the weight average (EMA). `--curve` measures early stopping.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "beijing-uv"

CONFIGS = {  # name -> TrainConfig overrides
    "default, all six train tiles": {},  # the headline: `uvsam train` as documented
    "default": {},
    "photometric augmentation (the default before)": {"photometric": True},
    "photometric augmentation, no harmonisation": {"photometric": True, "harmonise": False},
    "photometric augmentation, no weight average": {"photometric": True, "ema": 0.0},
    "photometric augmentation, rgb input (no local contrast)": {"photometric": True, "specialist_input": "rgb"},
    "no harmonisation": {"harmonise": False},
    "no weight average": {"ema": 0.0},
    "rgb input (no local contrast)": {"specialist_input": "rgb"},
    "none of them": {"harmonise": False, "specialist_input": "rgb", "ema": 0.0},
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


def run(name: str, overrides: dict, seed: int, split: dict, work: Path) -> dict:
    from uvsam.evaluate import evaluate
    from uvsam.train import TrainConfig, train

    stem = "".join(c if c.isalnum() else "_" for c in name.split(" (")[0])
    model = work / f"{stem}-seed{seed}.ckpt"
    t = time.perf_counter()
    data = split["train"] if "all six" in name else split["train5"]
    train(TrainConfig(images=str(data / "images"), labels=str(data / "masks"), out=str(model), seed=seed,
                      **overrides), log=lambda m: None)
    seconds = time.perf_counter() - t
    scores = {}
    tests = [("cross_season", split["val"])] + ([] if "all six" in name else [("same_season", split["winter1"])])
    for test, folder in tests:
        r = evaluate(model, folder / "images", folder / "masks", specialist_only=True)
        scores[test] = {k: round(r["specialist"][k], 3) for k in ("iou", "precision", "recall")}
    return {"config": name, "seed": seed, "train_s": round(seconds), **scores}


def curve(seed: int, split: dict, work: Path) -> dict:
    """Early stopping, measured: the default training on the five winter tiles, stopped after each
    epoch (``train(stop_after=...)`` then ``--resume``: the same run as an uninterrupted one) and
    scored on the held-out winter tile (the validation split early stopping would watch) and on
    the summer val tiles (what it is meant to protect)."""
    from uvsam.evaluate import evaluate
    from uvsam.train import TrainConfig, train

    model = work / f"curve-seed{seed}.ckpt"
    data = split["train5"]
    cfg = TrainConfig(images=str(data / "images"), labels=str(data / "masks"), out=str(model), seed=seed)
    epochs = []
    for epoch in range(1, cfg.epochs + 1):
        train(cfg, resume=epoch > 1, stop_after=epoch, log=lambda m: None)
        row = {"epoch": epoch}
        for test, folder in (("same_season", split["winter1"]), ("cross_season", split["val"])):
            row[test] = round(evaluate(model, folder / "images", folder / "masks", specialist_only=True)
                              ["specialist"]["iou"], 3)
        epochs.append(row)
        print(json.dumps({"seed": seed, **row}), flush=True)
    best = max(epochs, key=lambda r: r["same_season"])  # the epoch a validation split would keep
    stop, waited = epochs[0], 0  # patience 2: stop after two epochs without a better validation IoU
    for r in epochs[1:]:
        stop, waited = (r, 0) if r["same_season"] > stop["same_season"] else (stop, waited + 1)
        if waited == 2:
            break
    return {"seed": seed, "epochs": epochs, "last": epochs[-1], "best_on_validation": best,
            "patience_2": stop}


def summary(rows: list[dict]) -> list[dict]:
    """Per configuration: mean and spread (min..max) of each IoU over the seeds run."""
    out = []
    for name in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == name]
        timed = [r["train_s"] for r in mine if r.get("train_s") is not None]
        seconds = round(sum(timed) / len(timed)) if timed else None
        row = {"config": name, "seeds": [r["seed"] for r in mine], "train_s": seconds}
        for test in ("cross_season", "same_season"):
            ious = [r[test]["iou"] for r in mine if test in r]
            if ious:
                row[test] = {"mean": round(sum(ious) / len(ious), 3), "min": min(ious), "max": max(ious)}
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "uvsam-seasons")
    ap.add_argument("--only", nargs="*", help="Run only these configurations (names as in the table).")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="Training seeds; each configuration is trained once per seed (default 0 1 2).")
    ap.add_argument("--rows", type=Path, help="Append each finished row to this JSON-lines file; rows already "
                    "in it are not run again (resume), and all of them enter the table.")
    ap.add_argument("--curve", action="store_true", help="Measure early stopping instead: score the default "
                    "training after every epoch on the held-out winter tile (validation) and the summer tiles.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    split = prepare(args.work)
    if args.curve:
        results = [curve(seed, split, args.work) for seed in args.seeds]
        print("\n| seed | cross-season IoU: last epoch | best epoch on validation | patience 2 |")
        print("|---|---|---|---|")
        for r in results:
            b, p = r["best_on_validation"], r["patience_2"]
            print(f"| {r['seed']} | {r['last']['cross_season']:.3f} | {b['cross_season']:.3f} (epoch {b['epoch']}) "
                  f"| {p['cross_season']:.3f} (epoch {p['epoch']}) |")
        if args.json:
            print(json.dumps(results))
        return
    rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()] \
        if args.rows and args.rows.exists() else []
    done = {(r["config"], r["seed"]) for r in rows}
    for seed in args.seeds:
        for name, overrides in CONFIGS.items():
            if (args.only and name not in args.only) or (name, seed) in done:
                continue
            rows.append(run(name, overrides, seed, split, args.work))
            print(json.dumps(rows[-1]), flush=True)
            if args.rows:
                with args.rows.open("a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
    table = summary([r for r in rows if r["seed"] in args.seeds and (not args.only or r["config"] in args.only)])
    if args.json:
        print(json.dumps({"held_out_winter_tile": split["held_out"], "rows": rows, "summary": table}))
        return
    print(f"\nheld-out winter tile: {split['held_out']}\n")
    print("| configuration | seeds | cross-season IoU, mean (min-max) | same-season IoU, mean (min-max) | train s |")
    print("|---|---|---|---|---|")
    for r in table:
        cells = []
        for test in ("cross_season", "same_season"):
            t = r.get(test)
            cells.append("-" if not t else f"{t['mean']:.3f}" if t["min"] == t["max"]
                         else f"{t['mean']:.3f} ({t['min']:.3f}-{t['max']:.3f})")
        print(f"| {r['config']} | {len(r['seeds'])} | {cells[0]} | {cells[1]} | {r['train_s'] or '-'} |")


if __name__ == "__main__":
    main()
