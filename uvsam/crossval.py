"""Spatial cross-validation: ``uvsam train --folds K`` and ``uvsam evaluate --cv``.

``train --folds K --out M.ckpt`` trains one model per fold, ``M.fold1.ckpt`` .. ``M.foldK.ckpt``,
each on the scenes of the other folds (folds of whole footprint groups, :mod:`uvsam.folds`),
then scores each on its held-out fold through ``uvsam evaluate``'s path (what predict ships)
and writes ``M.cv.json``: per fold and mean, spread, min and max over folds. ``evaluate --cv
--model M.ckpt`` recomputes the same from the fold models (each records its fold).
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import replace
from pathlib import Path

from uvsam.datasets import pair_scenes
from uvsam.errors import ConfigError, InputError
from uvsam.evaluation import evaluate_pairs
from uvsam.files import atomic_path
from uvsam.modelfile import ModelFile
from uvsam.training import TrainConfig, split_scenes, train

KEYS = ("specialist", "polygons", "uvsam")


def fold_path(out: str | Path, fold: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.fold{fold}{out.suffix or '.ckpt'}")


def cross_validate(cfg, log=print, resume: bool = False, predict_config=None) -> dict:
    """Train the ``cfg.folds`` fold models of ``cfg`` (a :class:`uvsam.training.TrainConfig` with
    ``folds`` set) and score them; returns (and writes beside ``cfg.out``) the summary."""
    if cfg.folds < 2:
        raise ConfigError(f"{cfg.folds}: cross-validation needs at least 2 folds", field="folds")
    split_scenes(replace(cfg, fold=1), pair_scenes(cfg.images, cfg.labels), log=lambda m: None)  # folds possible?
    for k in range(1, cfg.folds + 1):
        path = fold_path(cfg.out, k)
        if path.exists() and resume:
            done = _epochs_done(path)
            if done >= cfg.epochs:
                log(f"fold {k}/{cfg.folds}: {path.name} is trained; kept")
                continue
        log(f"fold {k}/{cfg.folds}: training {path.name}")
        train(replace(cfg, out=str(path), fold=k), resume=resume and path.exists(), log=log)
    return evaluate_cv(cfg.out, log=log, predict_config=predict_config)


def _epochs_done(path: Path) -> int:
    return int(ModelFile.read(path).meta.get("epoch") or 0)


def fold_models(out: str | Path) -> list[Path]:
    """The fold models written by ``train --folds`` for ``out``, in fold order."""
    out = Path(out)
    pattern = re.compile(re.escape(out.stem) + r"\.fold(\d+)" + re.escape(out.suffix or ".ckpt") + "$")
    found = sorted((int(m.group(1)), f) for f in out.parent.glob(f"{out.stem}.fold*")
                   if (m := pattern.match(f.name)))
    if not found:
        raise InputError(f"no fold models {out.stem}.fold1{out.suffix} ... beside it; train them with "
                         "`uvsam train --folds K`", out)
    return [f for _, f in found]


def evaluate_cv(out: str | Path, checkpoint: str | Path | None = None, log=print, predict_config=None) -> dict:
    """Score every fold model of ``out`` on the scenes its training held out; write ``OUT.cv.json``."""
    rows = []
    for path in fold_models(out):
        cfg = TrainConfig.from_dict(ModelFile.read(path).meta["train_config"])
        if not cfg.folds:
            raise InputError("not a fold model (trained without --folds)", path)
        _, held = split_scenes(cfg, pair_scenes(cfg.images, cfg.labels), log=lambda m: None)
        result = evaluate_pairs(path, held, checkpoint, labels_crs=cfg.labels_crs, specialist_only=True,
                                predict_config=predict_config)
        row = {"fold": cfg.fold, "model": path.name, "scenes": [p.image.name for p in held],
               **{k: result[k] for k in KEYS if k in result}}
        rows.append(row)
        log(f"fold {cfg.fold}: " + ", ".join(f"{k} IoU {row[k]['iou']:.3f}" for k in KEYS if k in row)
            + f" on {len(held)} held-out scenes")
    summary = {"folds": rows, "summary": {}}
    for k in KEYS:
        vals = [r[k]["iou"] for r in rows if k in r]
        if vals:
            summary["summary"][k] = {"mean_iou": round(statistics.fmean(vals), 4),
                                     "std_iou": round(statistics.pstdev(vals), 4),
                                     "min_iou": round(min(vals), 4), "max_iou": round(max(vals), 4)}
    dest = Path(out).with_suffix(".cv.json")
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    summary["file"] = str(dest)
    return summary
