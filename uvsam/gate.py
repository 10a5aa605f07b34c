"""The pre-classification gate (UV-SAM paper, city-wide analyses): a tile classifier run before
segmentation, so that the specialist and the generalist spend nothing on tiles without villages.

``uvsam train-gate`` trains it from the labelled scenes a model is trained on, read exactly as
that model's specialist reads them at predict time (the model's :class:`~uvsam.preprocess.InputSpec`;
the gate file records it and ``predict --gate`` refuses a gate made for other inputs):

- **tiles**: windows of ``tile_m`` metres (at least 32 px) at the model's GSD, positive when at least
  ``min_village`` of their labelled pixels are village, negative when none are (tiles between
  the two, a sliver of village at an edge, are neither); drawn 1:1 in every batch, flipped and
  rotated, with the colour augmentation the specialist trains with;
- **network**: a timm backbone with one logit (ResNet-50 as in the paper; ``resnet18``,
  ``mobilenetv3_large_100``, ``efficientnet_b0`` ... for speed), Adam at 1e-4, batch 32,
  cosine annealing, as the paper trains it;
- **threshold, chosen for recall**: the score that keeps ``recall`` of the village tiles of a
  strip of the training area held out of training (the eastern ``holdout`` of the scenes'
  union, with a buffer of one tile; the western, southern or northern strip if the eastern has
  no village tile), so
  that the threshold is never chosen on the tiles it was trained on; with ``--val-images`` the
  AUC, recall, precision and F1 are also measured there, on tiles neither step saw;
- **negatives**: scenes known to hold no village (other districts, other cities; ``--negatives``)
  add their tiles to the negatives: with the labelled scenes alone the gate learns village
  against the rest of one city, and imagery unlike all of it is a guess.

At predict time a tile is scored by its best ``crop`` window (half-overlapping): a village
anywhere in it lets it through.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rasterio.warp import transform_bounds

from tiles.reader import RasterSource
from uvsam.augment import View, photometric, render
from uvsam.checkpoint import read_state_dict
from uvsam.datasets import RASTER_EXT, SceneArrays, find_files, load_scene, pair_scenes, read_image
from uvsam.devices import select
from uvsam.errors import ConfigError, InputError
from uvsam.files import atomic_path, check_writable, sha256_file
from uvsam.folds import check_leakage
from uvsam.gatefile import FORMAT, VERSION
from uvsam.labels import IGNORE
from uvsam.modelfile import ModelFile
from uvsam.modeling.gate import TileGate
from uvsam.progress import Progress


@dataclass(frozen=True)
class GateConfig:
    """What ``uvsam train-gate`` needs; validated when made."""

    images: str
    labels: str
    model: str  # the model file whose specialist the gate serves (its inputs are the gate's)
    out: str
    backbone: str = "resnet50"
    tile_m: float = 240.0  # side of a gate tile on the ground (a block of a village and its surroundings)
    epochs: int = 10
    steps_per_epoch: int = 40
    batch_size: int = 32
    lr: float = 1e-4
    min_village: float = 0.02  # share of a tile's labelled pixels that makes it a village tile
    recall: float = 0.99  # of held-out village tiles kept by the threshold
    holdout: float = 0.2  # share of the training area's width held out to choose the threshold
    val_images: str | None = None
    val_labels: str | None = None
    negatives: str | None = None  # scenes known to hold no village (file, folder, glob): every tile negative
    backbone_weights: str | None = None  # pretrained weights of the backbone (e.g. ImageNet ResNet-50), a local file
    input_mode: str | None = None  # rgb, lcn or lcn_rgb; None: the specialist's
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        import timm

        checks = [(self.tile_m > 0, "tile_m", f"must be positive, got {self.tile_m}"),
                  (self.epochs >= 1, "epochs", f"must be positive, got {self.epochs}"),
                  (self.steps_per_epoch >= 1, "steps_per_epoch", f"must be positive, got {self.steps_per_epoch}"),
                  (self.batch_size >= 2 and self.batch_size % 2 == 0, "batch_size",
                   f"must be even (half village tiles, half not) and at least 2, got {self.batch_size}"),
                  (self.lr > 0, "lr", f"must be positive, got {self.lr}"),
                  (0 < self.min_village <= 1, "min_village", f"must be in (0, 1], got {self.min_village}"),
                  (0 < self.recall <= 1, "recall", f"must be in (0, 1], got {self.recall}"),
                  (0 < self.holdout < 0.5, "holdout", f"must be in (0, 0.5), got {self.holdout}"),
                  ((self.val_images is None) == (self.val_labels is None), "val_labels",
                   "give --val-images and --val-labels together"),
                  (self.input_mode in (None, "rgb", "lcn", "lcn_rgb"), "input_mode",
                   f"{self.input_mode!r}: use rgb, lcn or lcn_rgb"),
                  (bool(timm.list_models(self.backbone)), "backbone",
                   f"{self.backbone!r} is not a timm model (e.g. resnet50, resnet18, efficientnet_b0)")]
        for ok, name, why in checks:
            if not ok:
                raise ConfigError(why, field=name)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Tile:
    """A ``side`` window of scene ``scene`` at (row, col) and whether it holds a village."""

    scene: int
    row: int
    col: int
    side: int
    village: bool


def grid_tiles(scenes: list[SceneArrays], crop: int, step: int, keep, min_village: float) -> list[Tile]:
    """Windows of ``crop`` every ``step`` px that ``keep(scene, row, col, crop)`` accepts, at
    least 90 % labelled, labelled village or not (ambiguous windows left out)."""
    out = []
    for k, s in enumerate(scenes):
        h, w = s.shape
        if h < crop or w < crop:
            continue
        for c in sorted({*range(0, w - crop + 1, step), w - crop}):
            for r in sorted({*range(0, h - crop + 1, step), h - crop}):
                if not keep(k, r, c, crop):
                    continue
                lab = s.labels[r:r + crop, c:c + crop]
                labelled = lab != IGNORE
                if labelled.mean() < 0.9:
                    continue
                share = float((lab == 1).sum() / labelled.sum())
                if share >= min_village or share == 0:
                    out.append(Tile(k, r, c, crop, share >= min_village))
    return out


SIDES = ("east", "west", "south", "north")
MIN_HELD = 10  # village tiles a held-out strip needs to choose the threshold on


def strip_split(scenes: list[SceneArrays], holdout: float, side: str):
    """``(train_keep, held_keep)``: tile filters (scene, row, col, side) for a strip of the
    scenes' union held out (its ``side`` edge, ``holdout`` of its width or height, in degrees of
    longitude or latitude) and the training area beyond a buffer of one tile."""
    boxes = []
    for s in scenes:
        with RasterSource(s.path) as src:
            (xa, ya), (xb, yb) = src.transform @ (0, 0), src.transform @ (src.width, src.height)
            lon0, lat0, lon1, lat1 = transform_bounds(src.crs, "EPSG:4326", min(xa, xb), min(ya, yb), max(xa, xb),
                                                      max(ya, yb))
        h, w = s.shape
        boxes.append((lon0, lat1, (lon1 - lon0) / w, (lat1 - lat0) / h))  # west, north, degrees per column, row
    axis = 0 if side in ("east", "west") else 1
    lo = min(b[0] for b in boxes) if axis == 0 else min(b[1] - b[3] * s.shape[0] for b, s in zip(boxes, scenes,
                                                                                                   strict=True))
    hi = (max(b[0] + b[2] * s.shape[1] for b, s in zip(boxes, scenes, strict=True)) if axis == 0
          else max(b[1] for b in boxes))
    high = side in ("east", "north")
    cut = hi - holdout * (hi - lo) if high else lo + holdout * (hi - lo)

    def span(k: int, r: int, c: int, n: int) -> tuple[float, float, float]:
        """(start, end, one tile) of a tile along the axis, in degrees."""
        west, north, dx, dy = boxes[k]
        if axis == 0:
            return west + dx * c, west + dx * (c + n), dx * n
        return north - dy * (r + n), north - dy * r, dy * n

    def held(k, r, c, n):
        a, b, _ = span(k, r, c, n)
        return a >= cut if high else b <= cut

    def train(k, r, c, n):
        a, b, one = span(k, r, c, n)
        return b <= cut - one if high else a >= cut + one

    return train, held


def negative_scene(path: Path, spec) -> SceneArrays:
    """A scene known to hold no village, read as the model's specialist reads it: every valid pixel 0."""
    img, valid, src, prep = read_image(path, spec)
    return SceneArrays(path, img, np.where(valid, 0, IGNORE).astype(np.uint8), float(np.mean(src.ground_res)), prep)


def scores(net: TileGate, scenes: list[SceneArrays], tiles: list[Tile], device, batch: int = 16) -> np.ndarray:
    """Probabilities the gate gives ``tiles`` (as predict scores a tile: its best window)."""
    out = []
    net.eval()
    for i in range(0, len(tiles), batch):
        x = torch.stack([render(View(t.scene, t.row, t.col, t.side, False, 0), scenes, t.side)[0]
                         for t in tiles[i:i + batch]])
        out.append(net.tile_scores(x.to(device), tiles[0].side).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def auc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve (the Mann-Whitney statistic, ties counted half); NaN without both classes."""
    from scipy.stats import rankdata

    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def classification(y: np.ndarray, s: np.ndarray, threshold: float) -> dict:
    """AUC, recall, precision, F1 and the counts of tiles at ``threshold``."""
    hit = s >= threshold
    tp, fp, fn = int((hit & y).sum()), int((hit & ~y).sum()), int((~hit & y).sum())
    recall = tp / (tp + fn) if tp + fn else float("nan")
    precision = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    return {"tiles": int(len(y)), "village_tiles": int(y.sum()), "auc": round(auc(y, s), 4),
            "recall": round(recall, 4), "precision": round(precision, 4), "f1": round(f1, 4),
            "passed": int(hit.sum())}


def recall_threshold(village_scores: np.ndarray, recall: float) -> float:
    """The highest threshold that keeps at least ``recall`` of the village tiles."""
    ordered = np.sort(village_scores)
    k = int(math.floor(len(ordered) * (1 - recall) + 1e-9))
    return float(ordered[min(k, len(ordered) - 1)])


def train_gate(cfg: GateConfig, log=print) -> dict:
    """Train, choose the threshold, measure; write the gate file atomically. Returns its record."""
    out = check_writable(cfg.out)  # before minutes of training
    model = ModelFile.read(cfg.model)
    spec = model.inputs
    mode = cfg.input_mode or model.config.specialist_input  # default: what the specialist sees
    net = TileGate(cfg.backbone, mode)  # the weights checked before any data is read
    pretrained = None
    if cfg.backbone_weights:
        state = read_state_dict(cfg.backbone_weights)  # a missing or unreadable file: one line naming it
        pretrained = {"file": str(cfg.backbone_weights), "sha256": sha256_file(cfg.backbone_weights)}
        try:
            missing = net.load_backbone(state)
        except ValueError as e:
            raise InputError(f"not weights of {cfg.backbone}: {e}", cfg.backbone_weights) from None
        if missing:
            raise InputError(f"not weights of {cfg.backbone}: {len(missing)} of its tensors missing "
                             f"(e.g. {missing[0]})", cfg.backbone_weights)
        log(f"gate: {cfg.backbone} starts from {Path(cfg.backbone_weights).name}")
    pairs = pair_scenes(cfg.images, cfg.labels)
    val_pairs = pair_scenes(cfg.val_images, cfg.val_labels) if cfg.val_images else []
    if val_pairs:  # tiles the gate trained on, or their neighbours, would flatter it
        check_leakage([p.image for p in pairs], [p.image for p in val_pairs])
    scenes = [load_scene(p, spec) for p in pairs]
    crop = max(32, int(round(cfg.tile_m / float(np.mean([s.gsd_m for s in scenes])))))
    step = max(4, crop // 4)
    strips = {}
    for side in SIDES:  # the first edge strip with MIN_HELD village tiles, else the one with the most
        train_keep, held_keep = strip_split(scenes, cfg.holdout, side)
        strips[side] = (train_keep, held_keep, grid_tiles(scenes, crop, crop // 2, held_keep, cfg.min_village))
        if sum(t.village for t in strips[side][2]) >= MIN_HELD:
            break
    counts = {k: sum(t.village for t in v[2]) for k, v in strips.items()}
    side = next((k for k in strips if counts[k] >= MIN_HELD), max(counts, key=counts.get))
    train_keep, held_keep, held = strips[side]
    if not any(t.village for t in held):
        raise InputError(f"no village tile of {crop} px in any edge strip ({cfg.holdout:.0%} of the area) to "
                         "choose the threshold on: label more villages, lower --tile-m or raise --holdout",
                         cfg.labels)
    labelled = len(scenes)
    scenes = scenes + [negative_scene(p, spec) for p in
                       (find_files(cfg.negatives, RASTER_EXT, "rasters") if cfg.negatives else [])]
    train_tiles = grid_tiles(scenes, crop, step, lambda k, *a: k >= labelled or train_keep(k, *a), cfg.min_village)
    pos = [t for t in train_tiles if t.village]
    neg = [t for t in train_tiles if not t.village]
    if not pos or not neg:
        raise InputError(f"the training area needs tiles of {crop} px with and without villages "
                         f"(found {len(pos)} and {len(neg)})", cfg.labels)
    log(f"gate: {len(pos)} village and {len(neg)} other training tiles"
        + (f" ({sum(t.scene >= labelled for t in neg)} from {len(scenes) - labelled} scenes without villages)"
           if len(scenes) > labelled else "") + f"; threshold chosen on the {side}ern "
        f"{cfg.holdout:.0%} of the area ({sum(t.village for t in held)} village, "
        f"{sum(not t.village for t in held)} other tiles)")

    device = select(cfg.device).torch
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    net.lcn_sigma_px = model.config.lcn_sigma_m / float(np.mean([s.gsd_m for s in scenes]))
    net = net.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    total = cfg.epochs * cfg.steps_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    half = cfg.batch_size // 2
    history = []
    with Progress(total, "step", task="train-gate") as bar:
        for epoch in range(cfg.epochs):
            net.train()
            losses = []
            for _ in range(cfg.steps_per_epoch):
                chosen = [pos[i] for i in rng.integers(0, len(pos), half)] + \
                         [neg[i] for i in rng.integers(0, len(neg), half)]
                views = [View(t.scene, t.row, t.col, t.side, bool(rng.integers(2)), int(rng.integers(4)))
                         for t in chosen]
                x = photometric(torch.stack([render(v, scenes, crop)[0] for v in views]), gen)
                y = torch.tensor([1.0] * half + [0.0] * half)
                loss = loss_fn(net(x.to(device)).float(), y.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                bar.advance(1, epoch=epoch + 1, loss=round(losses[-1], 3))
            history.append({"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 4)})

    held_y = np.array([t.village for t in held])
    held_s = scores(net, scenes, held, device)
    threshold = recall_threshold(held_s[held_y], cfg.recall)
    metrics = {"threshold_set": {"strip": side, **classification(held_y, held_s, threshold)}}
    if val_pairs:
        val = [load_scene(p, spec) for p in val_pairs]
        tiles = grid_tiles(val, crop, crop // 2, lambda *_: True, cfg.min_village)
        y = np.array([t.village for t in tiles])
        metrics["validation"] = classification(y, scores(net, val, tiles, device), threshold)
    record = {"format": FORMAT, "version": VERSION, "backbone": cfg.backbone, "crop": crop, "input_mode": mode,
              "lcn_sigma_px": net.lcn_sigma_px, "pretrained": pretrained,
              "threshold": threshold, "recall_target": cfg.recall, "inputs": spec.to_dict(),
              "model": model.path.name, "model_sha256": model.sha256, "gsd_m": spec.gsd_m,
              "metrics": metrics, "history": history, "config": cfg.to_dict()}
    with atomic_path(out) as tmp:
        torch.save({**record, "state_dict": {k: v.cpu() for k, v in net.state_dict().items()}}, tmp)
    return record
