"""Distilling a fast generalist encoder from a large one, on the user's own imagery.

``uvsam distill`` makes a student encoder of any registered family imitate a teacher (SAM ViT-H,
say) on the imagery it will serve, so that a planning office can specialise a fast encoder on
satellite roofs, far from SA-1B's photographs. Recipes (``--recipe``):

- ``embedding``: MobileSAM's decoupled distillation, which is also EfficientViT-SAM's first
  stage: the student's image encoder regresses the teacher's image embedding, mean squared error
  on the (256, 64, 64) embedding; the teacher runs once per view (embeddings cached on disk).

The training data are views of the rasters: windows of ``crop`` px (the whole raster when it is
smaller), each in ``views`` of the eight flips and quarter turns (the augmentation; each view's
teacher embedding cached), drawn at random in batches of ``batch_size``. AdamW with linear
warm-up and cosine decay; after every epoch the student is written in its family's official
checkpoint layout (so ``uvsam segment --checkpoint``, ``uvsam train --checkpoint`` and
:func:`uvsam.checkpoint.load_generalist` take it like a published file), with a JSON record
beside it (``OUT.json``: teacher name and SHA-256, recipe, configuration, per-epoch losses), the
per-step losses (``OUT.losses.csv``) and the optimiser's state (``OUT.resume.pt``) for
``--resume``. The student's prompt encoder and mask decoder are the teacher's where the two
families share that architecture (MobileSAM's practice), else its own.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from uvsam import __version__
from uvsam.checkpoint import load_generalist, read_state_dict, save_official
from uvsam.datasets import RASTER_EXT, find_files
from uvsam.devices import select
from uvsam.embedding_cache import EmbeddingCache
from uvsam.errors import ConfigError
from uvsam.files import atomic_path, check_writable, sha256_file
from uvsam.generalist import generalist_status
from uvsam.modeling.registry import ENCODERS
from uvsam.modeling.sam import Generalist, build_generalist
from uvsam.progress import Progress
from uvsam.raster import read_rgb
from uvsam.training import lr_factor
from uvsam.weights import resolve

RECIPES = ("embedding",)
RESUMABLE = {"out", "cache", "device", "precision", "epochs"}  # may differ on --resume


@dataclass(frozen=True)
class DistillConfig:
    """What ``uvsam distill`` needs; validated when made."""

    teacher: str
    student: str
    images: tuple[str, ...]
    out: str
    teacher_checkpoint: str | None = None  # None: the verified official file from the weights cache
    student_checkpoint: str | None = None  # start from these weights (else a fresh student)
    recipe: str = "embedding"
    crop: int = 1024  # px of a training window at the rasters' own resolution
    views: int = 8  # of the eight flips and quarter turns of each window
    epochs: int = 8
    steps_per_epoch: int = 50
    batch_size: int = 2
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    cache: str | None = None  # teacher embeddings (default: OUT.cache/ beside the output)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"

    def __post_init__(self):
        for field, name in (("teacher", self.teacher), ("student", self.student)):
            if name not in ENCODERS:
                raise ConfigError(f"{name!r} is not a registered encoder (see `uvsam encoders`)", field=field)
        if self.recipe not in RECIPES:
            raise ConfigError(f"{self.recipe!r} is not a recipe ({', '.join(RECIPES)})", field="recipe")
        if not self.images:
            raise ConfigError("give at least one raster, folder or glob", field="images")
        for field in ("crop", "views", "epochs", "steps_per_epoch", "batch_size"):
            if getattr(self, field) < 1:
                raise ConfigError(f"must be at least 1, got {getattr(self, field)}", field=field)
        if self.views > 8:
            raise ConfigError(f"a window has 8 flips and quarter turns, not {self.views}", field="views")
        if not self.lr > 0:
            raise ConfigError(f"must be positive, got {self.lr}", field="lr")

    def to_dict(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


@dataclass(frozen=True)
class View:
    """Window ``window`` (col, row, size) of raster ``image`` in transform ``turn`` (quarter turns
    0-3, plus 4 for a flip)."""

    image: int
    window: tuple[int, int, int]
    turn: int


def windows(h: int, w: int, crop: int) -> list[tuple[int, int, int]]:
    """Square windows of ``crop`` px covering an h x w raster (the last ones flush with its edge);
    one window of the shorter side when the raster is smaller."""
    size = min(crop, h, w)
    rows = sorted({*range(0, h - size + 1, size), h - size})
    cols = sorted({*range(0, w - size + 1, size), w - size})
    return [(c, r, size) for r in rows for c in cols]


def render_view(pixels: np.ndarray, view: View) -> torch.Tensor:
    """(3, S, S) float 0..255 of a view of an (H, W, 3) raster."""
    c, r, s = view.window
    x = torch.from_numpy(np.ascontiguousarray(pixels[r:r + s, c:c + s])).permute(2, 0, 1).float()
    if view.turn >= 4:
        x = x.flip(-1)
    return torch.rot90(x, view.turn % 4, (-2, -1))


def teacher_model(cfg: DistillConfig) -> tuple[Generalist, str, str]:
    """(teacher, its weights file, SHA-256): ``teacher_checkpoint`` or the cached official file."""
    path = Path(cfg.teacher_checkpoint) if cfg.teacher_checkpoint else resolve(cfg.teacher)
    model = load_generalist(cfg.teacher, path)
    return model, str(path), model.weights_sha256


def student_model(cfg: DistillConfig, teacher: Generalist) -> tuple[Generalist, bool]:
    """(student, whether it took the teacher's prompt encoder and mask decoder)."""
    if cfg.student_checkpoint:
        student = load_generalist(cfg.student, cfg.student_checkpoint)
    else:
        torch.manual_seed(cfg.seed)
        student = build_generalist(cfg.student)
    own = {k: v for k, v in student.state_dict().items() if not k.startswith("image_encoder.")}
    theirs = {k: v for k, v in teacher.state_dict().items() if not k.startswith("image_encoder.")}
    shared = own.keys() == theirs.keys() and all(own[k].shape == theirs[k].shape for k in own)
    if shared and not cfg.student_checkpoint:
        student.load_state_dict(theirs, strict=False)
    return student, shared and not cfg.student_checkpoint


def distill(cfg: DistillConfig, resume: bool = False, log=print) -> dict:
    """Run (or resume) a distillation; returns the record written beside the student."""
    out = check_writable(cfg.out)
    record_path, losses_path, state_path = (out.with_name(out.name + s) for s in (".json", ".losses.csv",
                                                                                  ".resume.pt"))
    done_epochs, history = 0, []
    if resume:
        if not (record_path.is_file() and state_path.is_file() and out.is_file()):
            raise ConfigError("there is no distillation to resume (OUT, OUT.json and OUT.resume.pt)", out,
                              field="resume")
        record = json.loads(record_path.read_text())
        changed = sorted(k for k, v in cfg.to_dict().items()
                         if k not in RESUMABLE and record["config"].get(k) != v)
        if changed:
            raise ConfigError(f"differs from the run it resumes in {', '.join(changed)}", out, field="resume")
        done_epochs, history = record["epochs_done"], record["history"]
    place = select(cfg.device, cfg.precision)
    teacher, teacher_file, teacher_sha = teacher_model(cfg)
    teacher_status = generalist_status({"generalist": {"sha256": teacher_sha}}, cfg.teacher)
    if not teacher_status.verified:
        log(f"note: {teacher_status.note}: the student learns these weights as they are")
    student, took_decoder = student_model(cfg, teacher)
    if resume:
        student.load_official_state_dict(read_state_dict(out))
    paths = [p for spec in cfg.images for p in find_files(spec, RASTER_EXT, "rasters")]
    rasters = [read_rgb(p).pixels for p in paths]
    views = [View(i, win, t) for i, px in enumerate(rasters) for win in windows(*px.shape[:2], cfg.crop)
             for t in range(cfg.views)]
    teacher, student = teacher.to(place.torch).eval(), student.to(place.torch)
    cache = EmbeddingCache(cfg.cache or out.with_name(out.name + ".cache"))

    def target(v: View) -> torch.Tensor:
        """The teacher's embedding of a view: computed once, ever, then read from the cache."""
        with torch.inference_mode(), place.autocast():
            return cache.embed(teacher, render_view(rasters[v.image], v)[None].to(place.torch))[0].float().clone()

    with Progress(len(views), "views", task="distill: teacher") as bar:
        for v in views:  # all up front: the steps then read embeddings from disk, memory stays bounded
            target(v)
            bar.advance()
    log(f"distill: {cfg.recipe} recipe, {len(views)} views of {len(paths)} raster(s); teacher {cfg.teacher} "
        f"({Path(teacher_file).name}), student {cfg.student}"
        + (" with the teacher's prompt encoder and mask decoder" if took_decoder else ""))
    for p in student.parameters():
        p.requires_grad_(False)
    params = list(student.image_encoder.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * cfg.steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup_steps, total))
    if resume:
        state = torch.load(state_path, map_location=place.torch, weights_only=True)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    rows = []
    with Progress(total, "step", done=done_epochs * cfg.steps_per_epoch, task="distill") as bar:
        for epoch in range(done_epochs, cfg.epochs):
            student.image_encoder.train()
            rng = np.random.default_rng([cfg.seed, epoch])  # per epoch: a resumed run draws the same batches
            t0, losses = time.perf_counter(), []
            for step in range(cfg.steps_per_epoch):
                idx = rng.integers(0, len(views), cfg.batch_size)
                x = torch.stack([render_view(rasters[views[i].image], views[i]) for i in idx]).to(place.torch)
                y = torch.stack([target(views[i]) for i in idx])
                with place.autocast():
                    pred = student.image_encoder(student.preprocess(x))
                loss = F.mse_loss(pred.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss))
                rows.append({"epoch": epoch + 1, "step": epoch * cfg.steps_per_epoch + step + 1,
                             "loss": round(float(loss), 6), "lr": sched.get_last_lr()[0]})
                bar.advance(loss=f"{float(loss):.4g}")
            history.append({"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 6),
                            "seconds": round(time.perf_counter() - t0, 1)})
            _save(out, student, opt, sched, cfg, history, rows, teacher_file, teacher_sha, teacher_status.verified,
                  took_decoder, resume)
            rows = []
            resume = True  # later epochs append to the losses file
            log(f"distill: epoch {epoch + 1}/{cfg.epochs}, embedding MSE {history[-1]['loss']:.5g}")
    return json.loads(record_path.read_text())


def _save(out: Path, student: Generalist, opt, sched, cfg: DistillConfig, history: list[dict], rows: list[dict],
          teacher_file: str, teacher_sha: str, teacher_verified: bool, took_decoder: bool, append: bool) -> None:
    """The student (official layout), the record, the losses and the optimiser state, each atomically."""
    save_official(student, out)
    losses = out.with_name(out.name + ".losses.csv")
    old = losses.read_text() if append and losses.exists() else ""
    with atomic_path(losses) as tmp:
        with tmp.open("w", newline="") as f:
            if old:
                f.write(old)
            writer = csv.DictWriter(f, fieldnames=["epoch", "step", "loss", "lr"])
            if not old:
                writer.writeheader()
            writer.writerows(rows)
    with atomic_path(out.with_name(out.name + ".resume.pt")) as tmp:
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp)
    record = {"format": "uvsam-distilled-encoder", "uvsam_version": __version__, "student": cfg.student,
              "teacher": cfg.teacher, "teacher_file": teacher_file, "teacher_sha256": teacher_sha,
              "teacher_verified": teacher_verified,
              "recipe": cfg.recipe, "decoder_from_teacher": took_decoder, "config": cfg.to_dict(),
              "epochs_done": len(history), "history": history, "student_sha256": sha256_file(out)}
    with atomic_path(out.with_name(out.name + ".json")) as tmp:
        tmp.write_text(json.dumps(record, indent=1))


def embedding_agreement(student: Generalist, teacher: Generalist, images: list[torch.Tensor]) -> float:
    """Mean cosine similarity of the student's and the teacher's embeddings (per pixel of the
    64 x 64 grid, over the 256 channels) of (3, H, W) 0..255 ``images``."""
    sims = []
    with torch.inference_mode():
        for x in images:
            a, b = student.encode(x[None]).float(), teacher.encode(x[None]).float()
            sims.append(float(F.cosine_similarity(a, b, dim=1).mean()))
    return float(np.mean(sims)) if sims else math.nan


__all__ = ["RECIPES", "DistillConfig", "View", "distill", "embedding_agreement", "render_view", "windows"]
