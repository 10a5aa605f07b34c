"""Distilling a fast generalist encoder from a large one, on the user's own imagery.

``uvsam distill`` makes a student encoder of any registered family imitate a teacher (SAM ViT-H,
say) on the imagery it will serve, so that a planning office can specialise a fast encoder on
satellite roofs, far from SA-1B's photographs. Recipes (``--recipe``), the seeds' own:

- ``embedding``: MobileSAM's decoupled distillation, which is also EfficientViT-SAM's first
  stage: the student's image encoder regresses the teacher's image embedding, mean squared error
  on the (256, 64, 64) embedding; the teacher runs once per view (embeddings cached on disk).
- ``full-stage``: TinySAM's full-stage distillation, L = L_embedding + lambda_1 L_token +
  lambda_2 L_output: the embedding as above, the mask decoder's output tokens (IoU and mask
  tokens, MSE) and its outputs (the mask probabilities, binary KL divergence from the teacher's;
  the predicted IoUs, MSE) for prompts from the teacher's masks, with online hard prompt sampling:
  of twice as many candidate prompts the student gets the ones it agrees least with the teacher
  on, and each later decoder pass adds a point where the two masks' probabilities differ most.
  The student's image encoder and mask decoder learn (the decoder at a tenth of the rate).
- ``layerwise``: SAM-Lightening's dynamic layer-wise distillation, L = L_P + lambda L_output,
  between plain ViT encoders (SAM ViT, SAM-Lightening, EfficientSAM: one token grid, layers that
  correspond): L_P matches each student layer to its teacher layer (see
  :class:`uvsam.distill_losses.LayerMatch`), switched on layer after layer; L_output is the
  embedding MSE plus the decoder's mask outputs (binary KL divergence) for prompts from the teacher's masks.
- ``prompt-in-loop``: EdgeSAM's prompt-in-the-loop distillation of the decoder outputs: box or
  point prompts (one or the other per view, at random) from the teacher's masks, then
  ``refine_iters - 1`` more decoder passes, each adding a point drawn in the region where the
  student's and the teacher's masks disagree (positive where the teacher's is); BCE + dice to the
  teacher's binary masks over every pass (weights 5 and 5, EdgeSAM's), image encoder and mask
  decoder (at a tenth of the rate) learning. EdgeSAM runs it after an ``embedding`` stage: give
  that student as ``--student-checkpoint``.

The training data are views of the rasters: windows of ``crop`` px (the whole raster when it is
smaller), each in ``views`` of the eight flips and quarter turns (the augmentation; each view's
teacher embedding cached), drawn at random in batches of ``batch_size``. AdamW with linear
warm-up and cosine decay; after every epoch the student is written in its family's official
checkpoint layout (so ``uvsam segment --checkpoint``, ``uvsam train --checkpoint`` and
:func:`uvsam.checkpoint.load_generalist` take it like a published file), with a JSON record
beside it (``OUT.json``: teacher name and SHA-256, recipe, configuration, per-epoch losses), the
per-step losses and their parts (``OUT.losses.csv``) and the optimiser's state (``OUT.resume.pt``)
for ``--resume``. The student's prompt encoder and mask decoder start as the teacher's where the
two families share that architecture (MobileSAM's practice), else as its own.

Several GPUs: launched with ``torchrun --nproc-per-node N -m uvsam distill ...`` each process
takes one GPU (or CPU cores, with gloo), computes its share of the teacher's embeddings, draws its
own batches and averages the gradients with the others (data parallel, the effective batch N times
``batch_size``); the first process writes the files, its own losses in ``OUT.losses.csv``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from uvsam import __version__
from uvsam.checkpoint import load_generalist, read_state_dict, save_official
from uvsam.datasets import RASTER_EXT, find_files
from uvsam.devices import Device, select
from uvsam.distill_losses import (
    PLAIN_VIT_FAMILIES,
    DecoderTokens,
    LayerMatch,
    Objects,
    block_outputs,
    error_points,
    hardest,
    mask_bce_dice,
    mask_kd,
    teacher_objects,
    width,
)
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

RECIPES = ("embedding", "full-stage", "layerwise", "prompt-in-loop")
PARTS = {  # the loss's parts per recipe, columns of OUT.losses.csv
    "embedding": ("embedding",),
    "full-stage": ("embedding", "tokens", "masks", "iou"),
    "layerwise": ("layers", "embedding", "masks"),
    "prompt-in-loop": ("bce", "dice"),
}
RESUMABLE = {"out", "cache", "device", "precision", "epochs"}  # may differ on --resume
EDGESAM_BCE = EDGESAM_DICE = 5.0  # EdgeSAM's decoder loss weights
DECODER_LR = 0.1  # the mask decoder's learning rate, relative to the encoder's


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
    prompts: int = 8  # prompts per view and step (full-stage, layerwise, prompt-in-loop)
    refine_iters: int = 2  # decoder passes per prompt, each after the first adding a corrective point
    token_weight: float = 1.0  # TinySAM's lambda_1 (full-stage)
    output_weight: float = 1.0  # TinySAM's lambda_2 (full-stage), SAM-Lightening's lambda (layerwise)
    layer_step: int = 0  # SAM-Lightening's dt in steps (0: the layers all on by half of the steps)
    focus_layers: tuple[int, ...] = (-1,)  # student layers weighing focus_weight (negative: from the last)
    focus_weight: float = 2.0
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
        if self.recipe == "layerwise":
            for field, name in (("teacher", self.teacher), ("student", self.student)):
                if ENCODERS[name].family not in PLAIN_VIT_FAMILIES:
                    plain = ", ".join(n for n, s in ENCODERS.items() if s.family in PLAIN_VIT_FAMILIES)
                    raise ConfigError(f"{name!r} is not a plain ViT, whose layers the layerwise recipe matches "
                                      f"({plain})", field=field)
        if not self.images:
            raise ConfigError("give at least one raster, folder or glob", field="images")
        for field in ("crop", "views", "epochs", "steps_per_epoch", "batch_size", "prompts", "refine_iters"):
            if getattr(self, field) < 1:
                raise ConfigError(f"must be at least 1, got {getattr(self, field)}", field=field)
        if self.views > 8:
            raise ConfigError(f"a window has 8 flips and quarter turns, not {self.views}", field="views")
        if self.refine_iters > 5:  # EfficientSAM's decoder takes six points, a box counting as two
            raise ConfigError(f"at most 5 decoder passes, got {self.refine_iters}", field="refine_iters")
        if not self.lr > 0:
            raise ConfigError(f"must be positive, got {self.lr}", field="lr")
        for field in ("token_weight", "output_weight", "focus_weight", "layer_step"):
            if getattr(self, field) < 0:
                raise ConfigError(f"must not be negative, got {getattr(self, field)}", field=field)

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


class _World:
    """This process's place among ``torchrun``'s (one process, rank 0, without it)."""

    def __init__(self, place: Device):
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.place = place
        if self.size > 1 and not dist.is_initialized():
            if place.torch.type == "cuda":
                local = int(os.environ.get("LOCAL_RANK", "0"))
                torch.cuda.set_device(local)
                self.place = Device(f"cuda:{local}", place.precision)
            dist.init_process_group("nccl" if self.place.torch.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        if self.size > 1:
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.size


class _Step:
    """One recipe's loss for a batch of views: ``step(x, targets, gen, t) -> (loss, parts)``."""

    def __init__(self, cfg: DistillConfig, student: Generalist, teacher: Generalist):
        self.cfg, self.student, self.teacher = cfg, student, teacher
        self.layers: LayerMatch | None = None
        if cfg.recipe == "layerwise":
            s_enc, t_enc = student.image_encoder, teacher.image_encoder
            dt = cfg.layer_step or max(1, cfg.epochs * cfg.steps_per_epoch // (2 * len(s_enc.blocks)))
            self.layers = LayerMatch(len(s_enc.blocks), len(t_enc.blocks), width(s_enc), width(t_enc), dt,
                                     cfg.focus_layers, cfg.focus_weight)
        self.scale = student.spec.prompt_frame / teacher.spec.prompt_frame

    def trainable(self) -> list[dict]:
        """The parameter groups the recipe trains: the image encoder, plus the mask decoder where the
        decoder's outputs are distilled with the decoder free (TinySAM, EdgeSAM) at a tenth of the
        learning rate (it starts trained, as the teacher's or a published one), plus the layer
        projectors (SAM-Lightening)."""
        groups = [{"params": list(self.student.image_encoder.parameters())}]
        if self.cfg.recipe in ("full-stage", "prompt-in-loop"):
            groups.append({"params": list(self.student.mask_decoder.parameters()), "lr": self.cfg.lr * DECODER_LR})
        if self.layers is not None:
            groups.append({"params": list(self.layers.parameters())})
        return groups

    def __call__(self, x: torch.Tensor, targets: torch.Tensor | None, gen: torch.Generator,
                 t: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, student = self.cfg, self.student
        parts: dict[str, torch.Tensor] = {}
        if cfg.recipe == "layerwise":
            with block_outputs(student.image_encoder) as s_feats:
                emb = student.image_encoder(student.preprocess(x))
            with torch.no_grad(), block_outputs(self.teacher.image_encoder) as t_feats:
                targets = self.teacher.image_encoder(self.teacher.preprocess(x)).float()
            parts["layers"] = self.layers(s_feats, t_feats, t)
        else:
            emb = student.image_encoder(student.preprocess(x))
        if cfg.recipe != "prompt-in-loop":
            parts["embedding"] = F.mse_loss(emb.float(), targets)
        if cfg.recipe != "embedding":
            per_view = [self.prompts(emb[b:b + 1], targets[b:b + 1], gen) for b in range(len(x))]
            for key in PARTS[cfg.recipe]:
                if key not in parts:
                    parts[key] = torch.stack([p[key] for p in per_view]).mean()
        if cfg.recipe == "embedding":
            loss = parts["embedding"]
        elif cfg.recipe == "full-stage":
            loss = parts["embedding"] + cfg.token_weight * parts["tokens"] + cfg.output_weight * (
                parts["masks"] + parts["iou"])
        elif cfg.recipe == "layerwise":
            loss = parts["layers"] + cfg.output_weight * (parts["embedding"] + parts["masks"])
        else:
            loss = EDGESAM_BCE * parts["bce"] + EDGESAM_DICE * parts["dice"]
        return loss, {k: float(v.detach()) for k, v in parts.items()}

    def prompts(self, emb: torch.Tensor, target: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """The decoder-level losses of one view: (1, 256, 64, 64) student and teacher embeddings."""
        cfg, student, teacher = self.cfg, self.student, self.teacher
        hard = cfg.recipe == "full-stage"
        objs = teacher_objects(teacher, target, cfg.prompts * (2 if hard else 1), gen)
        zero = emb.float().sum() * 0  # keeps the graph when the teacher finds no object
        if not len(objs):
            return {k: zero for k in PARTS[cfg.recipe]}
        use_box = bool(torch.rand((), generator=gen) < 0.5)
        multimask = not use_box  # EdgeSAM: several masks for points, one for a box
        if hard and len(objs) > cfg.prompts:
            with torch.no_grad():  # TinySAM's online hard prompts: those the student gets most wrong
                s_low, _ = self._decode(student, emb.detach(), objs, use_box, None, multimask, self.scale)
                t_low, t_iou = self._decode(teacher, target, objs, use_box, None, multimask, 1.0)
                rows, best = torch.arange(len(objs), device=emb.device), t_iou.argmax(1)
                objs = objs.take(hardest(s_low[rows, best], t_low[rows, best], cfg.prompts))
        sums = {k: zero for k in PARTS[cfg.recipe] if k not in ("embedding", "layers")}
        clicks = None
        for it in range(cfg.refine_iters):
            with torch.no_grad(), DecoderTokens(teacher) as t_tok:
                t_low, t_iou = self._decode(teacher, target, objs, use_box, clicks, multimask, 1.0)
            with DecoderTokens(student) as s_tok:
                s_low, s_iou = self._decode(student, emb, objs, use_box, clicks, multimask, self.scale)
            if cfg.recipe == "prompt-in-loop":
                bce, dice = mask_bce_dice(s_low, t_low)
                sums["bce"], sums["dice"] = sums["bce"] + bce, sums["dice"] + dice
            else:
                sums["masks"] = sums["masks"] + mask_kd(s_low, t_low)
            if "iou" in sums:
                sums["iou"] = sums["iou"] + F.mse_loss(s_iou.float(), t_iou.float())
            if "tokens" in sums:
                sums["tokens"] = sums["tokens"] + F.mse_loss(s_tok.tokens.float(), t_tok.tokens.float())
            if it + 1 < cfg.refine_iters:
                best = t_iou.argmax(1)
                rows = torch.arange(len(best), device=best.device)
                xy, lab = error_points(s_low[rows, best].detach(), t_low[rows, best], gen,
                                       teacher.spec.prompt_frame, uniform=not hard)
                clicks = (xy, lab) if clicks is None else (torch.cat([clicks[0], xy], 1),
                                                           torch.cat([clicks[1], lab], 1))
        return {k: v / cfg.refine_iters for k, v in sums.items()}

    @staticmethod
    def _decode(model: Generalist, emb: torch.Tensor, objs: Objects, use_box: bool,
                clicks: tuple[torch.Tensor, torch.Tensor] | None, multimask: bool,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode the objects' box (or point) prompts plus the corrective clicks so far."""
        n = len(objs)
        pts = None if use_box else (objs.points[:, None], torch.ones(n, 1, device=emb.device))
        if clicks is not None:
            pts = clicks if pts is None else (torch.cat([pts[0], clicks[0]], 1), torch.cat([pts[1], clicks[1]], 1))
        if pts is not None:
            pts = (pts[0] * scale, pts[1])
        return model.decode(emb, boxes=objs.boxes * scale if use_box else None, points=pts,
                            multimask_output=multimask)


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
    world = _World(select(cfg.device, cfg.precision))
    place = world.place
    say = log if world.main else (lambda _msg: None)
    teacher, teacher_file, teacher_sha = teacher_model(cfg)
    teacher_status = generalist_status({"generalist": {"sha256": teacher_sha}}, cfg.teacher)
    if not teacher_status.verified:
        say(f"note: {teacher_status.note}: the student learns these weights as they are")
    student, took_decoder = student_model(cfg, teacher)
    if resume:
        student.load_official_state_dict(read_state_dict(out))
    paths = [p for spec in cfg.images for p in find_files(spec, RASTER_EXT, "rasters")]
    rasters = [read_rgb(p).pixels for p in paths]
    views = [View(i, win, t) for i, px in enumerate(rasters) for win in windows(*px.shape[:2], cfg.crop)
             for t in range(cfg.views)]
    teacher, student = teacher.to(place.torch).eval(), student.to(place.torch)
    for p in teacher.parameters():
        p.requires_grad_(False)
    cached = cfg.recipe != "layerwise"  # layerwise runs the teacher at every step for its layers
    cache = EmbeddingCache(cfg.cache or out.with_name(out.name + ".cache")) if cached else None

    def target(v: View) -> torch.Tensor:
        """The teacher's embedding of a view: computed once, ever, then read from the cache."""
        with torch.no_grad(), place.autocast():
            return cache.embed(teacher, render_view(rasters[v.image], v)[None].to(place.torch))[0].float()

    if cached:
        mine = views[world.rank::world.size]
        with Progress(len(mine), "views", task="distill: teacher") as bar:
            for v in mine:  # all up front: the steps then read embeddings from disk, memory stays bounded
                target(v)
                bar.advance()
        world.barrier()
    say(f"distill: {cfg.recipe} recipe, {len(views)} views of {len(paths)} raster(s); teacher {cfg.teacher} "
        f"({Path(teacher_file).name}), student {cfg.student}"
        + (" with the teacher's prompt encoder and mask decoder" if took_decoder else "")
        + (f"; {world.size} processes" if world.size > 1 else ""))
    for p in student.parameters():
        p.requires_grad_(False)
    step_fn = _Step(cfg, student, teacher)
    if step_fn.layers is not None:
        step_fn.layers.to(place.torch)
    groups = step_fn.trainable()
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * cfg.steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup_steps, total))
    if resume:
        state = torch.load(state_path, map_location=place.torch, weights_only=True)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if step_fn.layers is not None:
            step_fn.layers.load_state_dict(state["layers"])
    rows = []
    with Progress(total if world.main else 0, "step", done=done_epochs * cfg.steps_per_epoch,
                  task="distill") as bar:
        for epoch in range(done_epochs, cfg.epochs):
            student.image_encoder.train()
            # per epoch and process: a resumed run draws the same batches and prompts
            rng = np.random.default_rng([cfg.seed, epoch, world.rank])
            t0, losses, epoch_parts = time.perf_counter(), [], []
            for step in range(cfg.steps_per_epoch):
                t = epoch * cfg.steps_per_epoch + step
                idx = rng.integers(0, len(views), cfg.batch_size)
                x = torch.stack([render_view(rasters[views[i].image], views[i]) for i in idx]).to(place.torch)
                y = torch.stack([target(views[i]) for i in idx]) if cached else None
                gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
                with place.autocast():
                    loss, parts = step_fn(x, y, gen, t)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                world.average_gradients(params)
                opt.step()
                sched.step()
                losses.append(float(loss))
                epoch_parts.append(parts)
                rows.append({"epoch": epoch + 1, "step": t + 1, "loss": round(float(loss), 6),
                             "lr": sched.get_last_lr()[0]} | {k: round(v, 6) for k, v in parts.items()})
                bar.advance(loss=f"{float(loss):.4g}")
            history.append({"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 6)}
                           | {k: round(float(np.mean([p[k] for p in epoch_parts])), 6) for k in PARTS[cfg.recipe]}
                           | {"seconds": round(time.perf_counter() - t0, 1)})
            if world.main:
                _save(out, student, opt, sched, step_fn.layers, cfg, history, rows, teacher_file, teacher_sha,
                      teacher_status.verified, took_decoder, resume, world.size)
            world.barrier()
            rows = []
            resume = True  # later epochs append to the losses file
            say(f"distill: epoch {epoch + 1}/{cfg.epochs}, loss {history[-1]['loss']:.5g} ("
                + ", ".join(f"{k} {history[-1][k]:.4g}" for k in PARTS[cfg.recipe]) + ")")
    return json.loads(record_path.read_text())


def _save(out: Path, student: Generalist, opt, sched, layers: LayerMatch | None, cfg: DistillConfig,
          history: list[dict], rows: list[dict], teacher_file: str, teacher_sha: str, teacher_verified: bool,
          took_decoder: bool, append: bool, processes: int = 1) -> None:
    """The student (official layout), the record, the losses and the optimiser state, each atomically."""
    save_official(student, out)
    losses = out.with_name(out.name + ".losses.csv")
    old = losses.read_text() if append and losses.exists() else ""
    with atomic_path(losses) as tmp:
        with tmp.open("w", newline="") as f:
            if old:
                f.write(old)
            writer = csv.DictWriter(f, fieldnames=["epoch", "step", "loss", "lr", *PARTS[cfg.recipe]])
            if not old:
                writer.writeheader()
            writer.writerows(rows)
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    if layers is not None:
        state["layers"] = layers.state_dict()
    with atomic_path(out.with_name(out.name + ".resume.pt")) as tmp:
        torch.save(state, tmp)
    record = {"format": "uvsam-distilled-encoder", "uvsam_version": __version__, "student": cfg.student,
              "teacher": cfg.teacher, "teacher_file": teacher_file, "teacher_sha256": teacher_sha,
              "teacher_verified": teacher_verified,
              "recipe": cfg.recipe, "decoder_from_teacher": took_decoder,
              "decoder_trained": cfg.recipe in ("full-stage", "prompt-in-loop"), "processes": processes,
              "config": cfg.to_dict(),
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
