"""Training UV-SAM: specialist and fusion head learn, the generalist stays frozen.

Schedule: the first epochs train the specialist alone on freshly drawn random views (scale,
crop, flip, rotation, colour), which is cheap; the last ``sam_epochs`` train the whole UV-SAM
path (specialist, fusion head and the optional parts) on a fixed, seeded pool of views whose
generalist embeddings are computed once and cached, while colour augmentation still varies
what the specialist sees. AdamW with linear warm-up and cosine decay, restarted for the UV-SAM
epochs (the fusion head starts there from identity and needs a real learning rate, not the
tail of the specialist's schedule); a checkpoint after every
epoch (``--resume`` continues from it); per-epoch seeds, so a resumed run equals an
uninterrupted one; metrics to CSV (and TensorBoard when installed).
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from uvsam import __version__
from uvsam.augment import View, photometric, random_view, render
from uvsam.checkpoint import load_generalist
from uvsam.compiled import AUTO_MIN_VIEWS, COMPILED_PRECISIONS, encoder_part
from uvsam.config import TrainConfig
from uvsam.datasets import LabelledScene, SceneArrays, load_scene, native_gsd, pair_scenes
from uvsam.devices import select
from uvsam.embedding_cache import EmbeddingCache, default_root
from uvsam.errors import ConfigError, InputError
from uvsam.files import atomic_path, check_writable, sha256_file
from uvsam.folds import check_leakage, group_scenes, make_folds
from uvsam.generalist import generalist_status
from uvsam.inference import predict_scene
from uvsam.labels import IGNORE
from uvsam.losses import LossWeights, uvsam_loss
from uvsam.metrics import SegmentationCounts
from uvsam.modelfile import read_model_file, save_model
from uvsam.modeling.sam import build_generalist
from uvsam.modeling.specialist import Specialist, load_mit_weights, parse_specialist
from uvsam.modeling.uvsam import UVSAM, UVSAMConfig
from uvsam.pictures import curves
from uvsam.preprocess import InputSpec, training_radiometry
from uvsam.progress import Progress

# Settings that may change on --resume without changing what is being trained.
RESUMABLE = {"out", "val_images", "val_labels", "val_window", "checkpoint", "device", "precision", "cache_embeddings",
             "compile"}


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def phase_lr_factor(step: int, warmup: int, total: int, sam_steps: int) -> float:
    """:func:`lr_factor` over the specialist steps, then again (warm restart) over the last ``sam_steps``."""
    first = total - sam_steps
    if step < first or sam_steps == 0:
        return lr_factor(step, warmup, first)
    return lr_factor(step - first, min(warmup, max(1, sam_steps // 4)), sam_steps)


@dataclass
class PreparedData:
    train: list[SceneArrays]
    val: list[SceneArrays]
    inputs: InputSpec  # what the model will record: GSD, bands, normalisation, training radiometry

    @property
    def gsd_m(self) -> float:
        return self.inputs.gsd_m

    @property
    def stretch(self) -> list[dict]:
        return [s.stretch.to_dict() for s in self.train]


def split_scenes(cfg: TrainConfig, pairs: list[LabelledScene], log=print) -> tuple[list, list]:
    """(training, validation) scenes; validation never overlaps or touches training (uvsam.folds)."""
    if cfg.folds:
        held = set(make_folds([p.image for p in pairs], cfg.folds)[cfg.fold - 1])
    elif cfg.val_images:
        if not cfg.val_labels:
            raise ConfigError("are needed with the validation images", field="val_labels")
        val_pairs = pair_scenes(cfg.val_images, cfg.val_labels)
        check_leakage([p.image for p in pairs], [p.image for p in val_pairs])
        return pairs, val_pairs
    elif cfg.val_fraction > 0:
        groups = group_scenes([p.image for p in pairs])
        if len(groups) < 2:
            raise ConfigError("cannot hold out a scene: every training scene overlaps or touches another "
                              "(give validation images from elsewhere)", cfg.images, field="val_fraction")
        n_val = min(len(pairs) - 1, max(1, round(cfg.val_fraction * len(pairs))))
        held: set[int] = set()
        for g in np.random.default_rng([cfg.seed, 11]).permutation(len(groups)).tolist():
            if len(held) + len(groups[g]) <= n_val:  # whole groups, never more scenes than asked
                held.update(groups[g])
        if not held:  # every group is larger than the share asked: the smallest one
            held.update(min(groups, key=len))
    else:
        return pairs, []
    val_pairs = [p for i, p in enumerate(pairs) if i in held]
    log("validation scenes held out: " + ", ".join(p.image.name for p in val_pairs))
    return [p for i, p in enumerate(pairs) if i not in held], val_pairs


def prepare_data(cfg: TrainConfig, log=print) -> PreparedData:
    pairs = pair_scenes(cfg.images, cfg.labels)
    gsd = cfg.gsd_m or native_gsd(pairs[0].image)

    pairs, val_pairs = split_scenes(cfg, pairs, log)
    # the training radiometry first (every scene is matched to it), from the overviews predict reads too
    base = InputSpec(gsd, cfg.bands, cfg.normalisation, cfg.harmonise)
    spec = replace(base, radiometry=training_radiometry([p.image for p in pairs], base))
    train = [load_scene(p, spec, cfg.labels_crs) for p in pairs]
    val = [load_scene(p, spec, cfg.labels_crs) for p in val_pairs]
    labelled = sum(int((s.labels != IGNORE).sum()) for s in train)
    village = sum(int((s.labels == 1).sum()) for s in train)
    if village == 0:
        raise InputError("the training labels hold no village pixel", cfg.labels)
    log(f"training on {len(train)} scenes ({labelled / 1e6:.2f} Mpx labelled, {100 * village / max(labelled, 1):.1f}% "
        f"village) at {gsd:.3f} m/px; {len(val)} validation scenes")
    return PreparedData(train, val, spec)


def check_specialist(name: str) -> None:
    """A specialist name (:func:`~uvsam.modeling.specialist.parse_specialist`) or a ConfigError, before any work."""
    try:
        parse_specialist(name)
    except ValueError as e:
        raise ConfigError(str(e), field="specialist") from None


def build_model(cfg: TrainConfig, gsd_m: float, log=print, generalist=None) -> tuple[UVSAM, dict]:
    """The model to train; ``generalist``: the official one, already loaded from ``cfg.checkpoint``."""
    if cfg.checkpoint:
        generalist = generalist or load_generalist(cfg.encoder, cfg.checkpoint)
        digest = sha256_file(cfg.checkpoint)
        generalist.weights_sha256 = digest
        source = {"encoder": cfg.encoder, "sha256": digest, "source": "file", "file": Path(cfg.checkpoint).name}
    else:
        log(f"warning: no --checkpoint: the {cfg.encoder} generalist has random weights; the UV-SAM path is "
            "only meaningful with its official weights")
        torch.manual_seed(cfg.seed)
        generalist = build_generalist(cfg.encoder)
        source = {"encoder": cfg.encoder, "sha256": None, "source": "random", "file": None}
    config = UVSAMConfig(encoder=cfg.encoder, specialist=cfg.specialist, fusion=cfg.fusion,
                         specialist_input=cfg.specialist_input, lcn_sigma_m=cfg.lcn_sigma_m,
                         tune_decoder=cfg.tune_decoder, ladder=cfg.ladder, gsd_m=gsd_m,
                         min_area_m2=cfg.min_area_m2, box_prompt=cfg.box_prompt, mask_prompt=cfg.mask_prompt,
                         sam_embedding=cfg.sam_embedding, specialist_embedding=cfg.specialist_embedding)
    torch.manual_seed(cfg.seed)
    specialist = Specialist(cfg.specialist)
    if cfg.mit_weights:
        load_mit_weights(specialist, cfg.mit_weights)
    return UVSAM(config, specialist, generalist), source


class WeightAverage:
    """Exponential moving average of the trainable weights (norm statistics stay the live ones).

    Across a season or sensor shift the last weights of a small model swing from step to
    step; their running average is a flatter, steadier solution. Validation and the model
    file use the average; resuming restores both.
    """

    def __init__(self, model: UVSAM, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: UVSAM) -> None:
        params = dict(model.named_parameters())
        for n in self.names:
            self.shadow[n].lerp_(params[n].detach(), 1 - self.decay)

    def swap(self, model: UVSAM) -> None:
        """Exchange the model's weights with the average (call twice to restore)."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n in self.names:
                tmp = params[n].detach().clone()
                params[n].copy_(self.shadow[n])
                self.shadow[n] = tmp


class EmbeddingStore:
    """The frozen generalist's embeddings of the fixed views: in memory for the run and, with
    ``disk``, in the content-keyed :class:`~uvsam.embedding_cache.EmbeddingCache` (float16), so a later
    run over the same views (another seed of the specialist, a resumed or repeated run, another
    recipe) encodes nothing again. A view's embedding is the same whether it came from disk or not."""

    def __init__(self, disk: EmbeddingCache | None = None, prepare: Callable[[], None] | None = None):
        self.store: dict[str, torch.Tensor] = {}
        self.disk = disk
        self.prepare = prepare  # called once, before the first view is encoded (installs a compiled encoder)
        self.hits = self.misses = 0

    def get(self, model: UVSAM, views: list[View], images: torch.Tensor) -> torch.Tensor:
        todo = [i for i, v in enumerate(views) if v.key() not in self.store]
        self.misses += len(todo)
        self.hits += len(views) - len(todo)
        if todo:
            if self.disk is not None:
                fresh = self.disk.embed(model.generalist, images[todo], encode=lambda x: self._encoder(model)(x))
            else:
                fresh = self._encoder(model)(images[todo])
            for i, e in zip(todo, fresh, strict=True):
                self.store[views[i].key()] = e.to(torch.bfloat16)  # half the memory, ample precision
        return torch.stack([self.store[v.key()].float() for v in views]).to(images.device)

    def _encoder(self, model: UVSAM) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.prepare is not None:
            self.prepare, prepare = None, self.prepare
            prepare()
        return model.frozen_embeddings


def install_encoder(model: UVSAM, cfg: TrainConfig, place, views: int, log=print) -> None:
    """The compiled generalist encoder for the views' embeddings (:func:`uvsam.compiled.encoder_part`,
    the artefact prediction's windows use), per ``cfg.compile``: ``auto`` builds it when at least
    :data:`~uvsam.compiled.AUTO_MIN_VIEWS` views are to be encoded, else uses a cached one; in the
    run's precision (fp32, or bf16 with an artefact of its own; fp16 is refused for training). The
    embeddings agree with the eager encoder's to rounding; any failure leaves it eager."""
    if cfg.compile == "never" or place.precision not in COMPILED_PRECISIONS:
        return
    part, b = encoder_part(model.generalist, place.torch, cfg.compile == "always" or views >= AUTO_MIN_VIEWS,
                           precision=place.precision)
    if part is not None:
        model.compiled = {**model.compiled, "encoder": part}
    if b.status == "built":
        log(f"compiled the {cfg.encoder} encoder for this machine in {b.seconds:.0f} s (cached: later runs, and "
            "predict, load it at once)")
    elif b.status == "failed":
        log(f"note: the compiled encoder is not used ({b.note}): it runs eager")


def validate(model: UVSAM, scenes: list[SceneArrays], full: bool, window: int) -> dict[str, dict]:
    counts = {"specialist": SegmentationCounts()}
    if full:
        counts["uvsam"] = SegmentationCounts()
    for s in scenes:
        pred = predict_scene(model, s.image, s.labels != IGNORE, window=window, full=full)
        counts["specialist"].update(pred.specialist, s.labels)
        if full:
            counts["uvsam"].update(pred.uvsam, s.labels)
    return {k: c.summary() for k, c in counts.items()}


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _flatten(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}_{k}": v for k, v in metrics.items() if isinstance(v, float | int)}


def train(cfg: TrainConfig, resume: bool = False, log=print, stop_after: int | None = None) -> dict:
    """Run (or resume) a training; returns the last epoch's row of metrics.

    ``stop_after``: return after that many epochs (as an interrupted run would).
    """
    check_specialist(cfg.specialist)
    out = check_writable(cfg.out)
    payload = None
    if resume:
        if not out.exists():
            raise ConfigError("there is no model file to resume", out, field="resume")
        payload = read_model_file(out)
        if "training" not in payload:
            raise ConfigError("the model file holds no training state", out, field="resume")
        before = TrainConfig.from_dict(payload["training"]["config"])
        changed = [f.name for f in fields(cfg) if f.name not in RESUMABLE
                   and getattr(before, f.name) != getattr(cfg, f.name)]
        if changed:
            raise ConfigError(f"with different settings ({', '.join(changed)}); start a new run instead", out,
                              field="resume")
    elif out.exists():
        raise InputError("exists; give --resume to continue its training, or another --out", out)

    place = select(cfg.device, cfg.precision)  # an absent GPU is refused before any work
    if place.precision == "fp16":
        raise ConfigError("fp16 training would need loss scaling: use bf16 or fp32", field="precision")
    generalist = None
    if cfg.checkpoint:  # a wrong or broken weights file is refused before the data are read
        generalist = load_generalist(cfg.encoder, cfg.checkpoint)
    data = prepare_data(cfg, log)
    model, generalist_meta = build_model(cfg, data.gsd_m, log, generalist)
    model.to(place.torch)
    sam_epochs = uvsam_path_epochs(cfg, generalist_meta, log)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * cfg.steps_per_epoch
    sam_steps = sam_epochs * cfg.steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: phase_lr_factor(s, cfg.warmup_steps, total, sam_steps))
    history: list[dict] = []
    step_rows: list[dict] = []
    start = 0
    if payload is not None:
        model.load_state_dict(payload["state"], strict=False)
        if "raw" in payload["training"]:  # the file's weights are the average; training goes on from these
            model.load_state_dict(payload["training"]["raw"], strict=False)
        opt.load_state_dict(payload["training"]["optimizer"])
        sched.load_state_dict(payload["training"]["scheduler"])
        history = list(payload["training"]["history"])
        step_rows = list(payload["training"].get("steps", []))
        start = int(payload["training"]["epoch"]) + 1
        log(f"resuming at epoch {start + 1}/{cfg.epochs}")
    metrics_csv = out.with_suffix(".metrics.csv")
    steps_csv = out.with_suffix(".steps.csv")
    tb = _tensorboard(out)

    n_pool = cfg.views_per_scene * len(data.train)
    pool_rng = np.random.default_rng([cfg.seed, 7])
    pool = [random_view(pool_rng, data.train, cfg.crop, cfg.scale) for _ in range(n_pool)]
    store = EmbeddingStore(EmbeddingCache(default_root(), "float16") if cfg.cache_embeddings and sam_epochs else None,
                           prepare=lambda: install_encoder(model, cfg, place, n_pool, log))
    average = WeightAverage(model, cfg.ema) if cfg.ema > 0 else None
    if average is not None and payload is not None and "average" in payload["training"]:
        average.shadow = {k: v.to(place.torch) for k, v in payload["training"]["average"].items()}
    weights = LossWeights(sam=cfg.sam_weight)
    progress = Progress(total, "step", done=start * cfg.steps_per_epoch, task="train")
    meta = {"generalist": generalist_meta,  # the GSD is the config's (UVSAMConfig.gsd_m), stored once
            "source_gsd_m": float(np.median([native_gsd(s.path) for s in data.train])),
            "radiometry": data.inputs.radiometry.to_dict(),
            "harmonise": cfg.harmonise, "normalisation": cfg.normalisation, "stretch": data.stretch,
            "preprocessing": [{"scene": s.path.name, **s.preprocessing.to_dict()} for s in data.train],
            "bands": list(cfg.bands) if cfg.bands else None, "uvsam_version": __version__,
            "torch_version": str(torch.__version__), "train_config": cfg.to_dict()}

    try:
        for epoch in range(start, cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)):
            rng = np.random.default_rng([cfg.seed, epoch])
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout / drop-path
            sam_on = epoch >= cfg.epochs - sam_epochs
            model.train()
            t0 = time.monotonic()
            sums: dict[str, float] = {}
            for step in range(cfg.steps_per_epoch):
                t_step, encoded = time.monotonic(), 0.0
                if sam_on:
                    views = [pool[i] for i in rng.integers(len(pool), size=cfg.batch_size)]
                else:
                    views = [random_view(rng, data.train, cfg.crop, cfg.scale) for _ in range(cfg.batch_size)]
                rendered = [render(v, data.train, cfg.crop) for v in views]
                images = torch.stack([r[0] for r in rendered])
                labels = torch.stack([r[1] for r in rendered]).to(place.torch)
                spec_images = photometric(images, gen) if cfg.photometric else images  # CPU generator
                images, spec_images = images.to(place.torch), spec_images.to(place.torch)
                with place.autocast():  # losses run in fp32 under autocast's own rules
                    if sam_on:
                        t_enc = time.monotonic()
                        emb = store.get(model, views, images)
                        encoded = time.monotonic() - t_enc
                        out_ = model(images, frozen_embeddings=emb, specialist_images=spec_images)
                        parts = uvsam_loss(out_, labels, weights)
                    else:
                        logits, _ = model.run_specialist(spec_images)
                        ce = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE)
                        parts = {"total": ce, "ce": ce}
                if not torch.isfinite(parts["total"]):
                    raise RuntimeError(f"training diverged at epoch {epoch + 1} step {step + 1} "
                                       f"(loss {parts['total']})")
                opt.zero_grad(set_to_none=True)
                parts["total"].backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                if average is not None:
                    average.update(model)
                row = {k: float(v.detach()) for k, v in parts.items()}
                for k, v in row.items():
                    sums[k] = sums.get(k, 0.0) + v
                gstep = epoch * cfg.steps_per_epoch + step
                step_rows.append({"epoch": epoch + 1, "step": gstep + 1, "lr": sched.get_last_lr()[0],
                                  "seconds": round(time.monotonic() - t_step, 4), "encode_seconds": round(encoded, 4),
                                  "sam_path": int(sam_on), **{f"loss_{k}": v for k, v in row.items()}})
                if tb is not None:
                    tb.add_scalar("loss/total", row["total"], gstep)
                progress.advance(1, epoch=epoch + 1, loss=row["total"])
            epoch_row = {"epoch": epoch + 1, "sam_path": int(sam_on), "seconds": round(time.monotonic() - t0, 2),
                         "lr": sched.get_last_lr()[0],
                         **{f"train_{k}": v / cfg.steps_per_epoch for k, v in sums.items()},
                         "embeddings_cached": len(store.store)}
            if average is not None:
                average.swap(model)  # validate and save the average
            if data.val:
                results = validate(model, data.val, full=sam_on, window=cfg.val_window)
                for name, m in results.items():
                    epoch_row.update(_flatten(f"val_{name}", m))
                    if tb is not None:
                        tb.add_scalar(f"val/{name}_iou", m["iou"], epoch + 1)
            history.append(epoch_row)
            log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in epoch_row.items()
                         if k in ("epoch", "seconds", "train_total", "train_ce", "train_sam", "val_specialist_iou",
                                  "val_uvsam_iou")))
            training = {"epoch": epoch, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "history": json.loads(json.dumps(history)), "steps": step_rows, "config": cfg.to_dict()}
            if average is not None:
                average.swap(model)  # back to the raw weights, which training (and --resume) continues
                training["raw"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                training["average"] = {n: v.clone() for n, v in average.shadow.items()}
                average.swap(model)
            save_model(out, model, {**meta, "epoch": epoch + 1, "history": history}, training=training)
            if average is not None:
                average.swap(model)
            _write_csv(metrics_csv, history)
            curves(out.with_suffix(".curves.png"), history)
            _write_csv(steps_csv, step_rows)
    except BaseException:
        progress.close(failed=True)
        raise
    progress.close()
    if tb is not None:
        tb.close()
    return history[-1] if history else {}


def uvsam_path_epochs(cfg: TrainConfig, generalist_meta: dict, log=print) -> int:
    """How many of the last epochs train the whole UV-SAM path: ``cfg.sam_epochs``, or none when
    the generalist has no verified official weights (they would cost most of the training time
    and teach the fusion head to prompt noise) unless ``cfg.force_refine``; none without a loss."""
    if cfg.sam_weight <= 0 or cfg.sam_epochs == 0:
        return 0
    status = generalist_status({"generalist": generalist_meta}, cfg.encoder)
    if status.verified or cfg.force_refine:
        return cfg.sam_epochs
    log(f"note: {status.note}: the last {cfg.sam_epochs} epochs train the specialist alone instead of the "
        "UV-SAM path (--force-refine trains it anyway)")
    return 0


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out.with_suffix(".tb")))
