"""The UV-SAM paper's ablations: what each prompt and the generalist bring.

Two ways, as the paper's table and as a check of one model:

- :func:`ablate` (``uvsam ablate``) trains one model per variant (UV-SAM; without the box
  prompt, the mask prompt, the generalist's embedding or the specialist's embedding) with
  otherwise identical settings and seed, scores each on the validation scenes, and adds the
  specialist alone ("w/o SAM"); one table (CSV and Markdown) and JSON.

The UV-SAM rows are the paper's combination: every (non-empty) generalist mask replaces its
village's outline, without the acceptance rule ``uvsam predict`` applies (which would keep the
specialist's outline wherever the generalist is unsure, and with a random generalist everywhere).
- the same switches at inference time on one trained model is ``uvsam evaluate
  --ablations`` (:func:`uvsam.evaluation.evaluate_pairs`): nothing trained, each path scored
  side by side.

With a generalist whose weights are not verified official ones (random here, no weights being
reachable offline) the prompt paths are trained and scored anyway (``force_refine``), and the
table says so: its differences then measure the mechanics, not SAM.
"""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

from uvsam.config import PredictConfig, TrainConfig
from uvsam.evaluation import evaluate
from uvsam.files import atomic_path, check_writable
from uvsam.modeling.uvsam import ABLATIONS, SPECIALIST_ONLY
from uvsam.training import train

VARIANTS = ABLATIONS  # name -> the switches it sets, in training (TrainConfig) and in the model (UVSAMConfig)
COLUMNS = ("iou", "f1", "precision", "recall", "object_f1")


def ablate(cfg: TrainConfig, val_images: str, val_labels: str, out_dir: str | Path, log=print) -> dict:
    """Train each of :data:`VARIANTS` from ``cfg`` (its ``out`` ignored) into ``out_dir``, score
    each on the validation scenes; writes ``ablations.csv`` and ``ablations.md`` there."""
    out_dir = check_writable(Path(out_dir) / "ablations.csv", folder=True).parent
    rows, generalist = [], None
    for name, switches in VARIANTS.items():
        model = out_dir / (name.replace("/", "").replace(" ", "_").lower() + ".ckpt")
        log(f"ablate: training {name}")
        train(replace(cfg, out=str(model), force_refine=True, **switches), log=lambda m: None)
        scores = evaluate(model, val_images, val_labels, cfg.checkpoint, ablations=True,
                          predict_config=PredictConfig(force_refine=True, device=cfg.device,
                                                       precision=cfg.precision))
        generalist = scores["refinement"]
        # the model as trained (its own switches), every generalist mask accepted as in the paper
        rows.append({"variant": name, **{k: scores["ablations"]["UV-SAM"][k] for k in COLUMNS},
                     "model": model.name})
        if not switches:  # the specialist alone: the same training's specialist, no generalist
            rows.append({"variant": SPECIALIST_ONLY, **{k: scores["ablations"][SPECIALIST_ONLY][k] for k in COLUMNS},
                         "model": model.name})
    verified = bool(cfg.checkpoint) and generalist == "on"
    note = ("generalist: official weights" if verified else
            "generalist with random weights (no official weights given): the prompt paths are trained and "
            "scored anyway; differences measure the mechanics, not SAM")
    write_table(rows, out_dir, note, cfg)
    return {"rows": rows, "note": note, "csv": str(out_dir / "ablations.csv"),
            "markdown": str(out_dir / "ablations.md")}


def write_table(rows: list[dict], out_dir: Path, note: str, cfg: TrainConfig) -> None:
    """``ablations.csv`` and ``ablations.md`` (the table, what it is, the training settings)."""
    with atomic_path(out_dir / "ablations.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, ["variant", *COLUMNS, "model"])
        w.writeheader()
        w.writerows(rows)
    lines = ["| variant | IoU | F1 | precision | recall | object F1 |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | " + " | ".join(f"{r[k]:.3f}" if r[k] is not None else "-" for k in COLUMNS) + " |"
              for r in rows]
    text = "\n".join(lines) + f"\n\n{note}. Training: {json.dumps(cfg.to_dict() | {'out': None})}\n"
    with atomic_path(out_dir / "ablations.md") as tmp:
        tmp.write_text(text)
