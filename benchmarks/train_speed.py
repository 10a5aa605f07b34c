"""Wall time of a default `uvsam train` on the Beijing tiles, this code against an earlier commit, in one run.

    python benchmarks/train_speed.py [--work DIR] [--before REV] [--force-refine] [--seed 0]
                                     [--precision bf16] [--json]

Each version trains with the `uvsam train` defaults on the six winter train tiles, validated on
the two summer val tiles (the cross-season test of docs/results.md), in a child process of its
own with a fresh cache folder (UVSAM_CACHE: no embedding, no compiled encoder); this code then trains
again with that cache warm (the UV-SAM views' embeddings come from disk: what a second run over the
same data pays), and once more without the embeddings but with the compiled encoder the first run
built (what a run over new views pays on a machine that built it once). ``--before``
checks the commit out into WORK (git worktree) and trains with it the same way. ``--force-refine``
trains the UV-SAM path's epochs with the random generalist, as they run with official weights
(without it they train the specialist alone). Reported per run: wall seconds, seconds per step of
each phase (specialist-only and UV-SAM steps, from the steps/metrics CSVs), seconds spent encoding
views, and the last epoch's validation IoU (specialist, and UV-SAM when its epochs ran).
``--precision``: this code's runs train in that precision (the opt-in ``bf16``); the earlier
commit trains with its defaults.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "beijing-uv"

CHILD = """
import json, sys
from uvsam.training import TrainConfig, train
cfg = TrainConfig(images=sys.argv[1] + "/train/images", labels=sys.argv[1] + "/train/masks",
                  val_images=sys.argv[1] + "/val/images", val_labels=sys.argv[1] + "/val/masks", out=sys.argv[2],
                  force_refine=sys.argv[3] == "1", seed=int(sys.argv[4]),
                  **({"precision": sys.argv[5]} if len(sys.argv) > 5 else {}))
train(cfg, log=lambda m: None)
"""


def prepare(work: Path) -> Path:
    from tiles.xyz import import_xyz

    data = work / "beijing"
    for split in ("train", "val"):
        if not (data / split / "images").is_dir():
            import_xyz(DATA / "image" / split, 17, data / split, masks_dir=DATA / "mask" / split)
    return data


def checkout(work: Path, rev: str) -> Path:
    """``rev`` checked out under WORK (a git worktree of this repository), once."""
    dest = work / f"rev-{rev}"
    if not dest.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(dest), rev], check=True,
                       capture_output=True)
        (dest.parent / "shared").exists() or (dest.parent / "shared").symlink_to(ROOT.parent / "shared")
    return dest


def run(code: Path, data: Path, out: Path, cache: Path, force: bool, seed: int, precision: str | None = None) -> dict:
    """One training in a child process importing ``code`` (in ``precision``, None: the default); its
    wall time and what its CSVs say."""
    env = {**os.environ, "PYTHONPATH": str(code), "UVSAM_CACHE": str(cache), "UVSAM_PROGRESS_SECONDS": "3600"}
    out.unlink(missing_ok=True)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(data), str(out), "1" if force else "0", str(seed),
                           *([precision] if precision else [])],
                          env=env, capture_output=True, text=True, cwd=code)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"training with {code} failed:\n{proc.stderr[-3000:]}")
    with open(out.with_suffix(".metrics.csv")) as f:
        epochs = list(csv.DictReader(f))
    with open(out.with_suffix(".steps.csv")) as f:
        steps = list(csv.DictReader(f))
    per_phase = {}
    for phase, flag in (("specialist", "0"), ("uvsam", "1")):
        rows = [e for e in epochs if e["sam_path"] == flag]
        n = sum(1 for s in steps if s["sam_path"] == flag)
        if rows and n:
            per_phase[f"{phase}_step_s"] = round(sum(float(e["seconds"]) for e in rows) / n, 4)
    encode = round(sum(float(s.get("encode_seconds") or 0) for s in steps), 1) if "encode_seconds" in steps[0] else None
    last = epochs[-1]
    return {"wall_s": round(wall, 1), **per_phase, "encode_s": encode,
            "val_specialist_iou": round(float(last["val_specialist_iou"]), 4),
            "val_uvsam_iou": round(float(last["val_uvsam_iou"]), 4) if last.get("val_uvsam_iou") else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "uvsam-train-speed")
    ap.add_argument("--before", default=None, help="A commit to compare with (checked out into WORK).")
    ap.add_argument("--force-refine", action="store_true", help="Train the UV-SAM path's epochs too.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default=None, help="This code's runs in this precision (e.g. bf16).")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = prepare(args.work)
    versions = [("now", ROOT)] + ([(args.before, checkout(args.work, args.before))] if args.before else [])
    result = {"force_refine": args.force_refine, "seed": args.seed, "precision": args.precision}
    for name, code in versions:
        cache = args.work / f"cache-{name}"
        shutil.rmtree(cache, ignore_errors=True)
        p = args.precision if name == "now" else None
        result[name] = {"first": run(code, data, args.work / f"{name}.ckpt", cache, args.force_refine, args.seed, p)}
        if name == "now":
            result[name]["warm"] = run(code, data, args.work / f"{name}.ckpt", cache, args.force_refine, args.seed, p)
            # new views (no embedding on disk) on a machine whose compiled encoder is built: what a first run
            # pays once any earlier run (a training, a predict of the same generalist) built it
            shutil.rmtree(cache / "embeddings", ignore_errors=True)
            result[name]["new_views"] = run(code, data, args.work / f"{name}.ckpt", cache, args.force_refine,
                                            args.seed, p)
    if args.before:
        before = result[args.before]["first"]["wall_s"]
        result["speedup_first"] = round(before / result["now"]["first"]["wall_s"], 2)
        result["speedup_warm"] = round(before / result["now"]["warm"]["wall_s"], 2)
        result["speedup_new_views"] = round(before / result["now"]["new_views"]["wall_s"], 2)
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
