"""One-shot personalisation (PerSAM and PerSAM-F): mark one object, find its kind elsewhere.

From one reference image and the mask of one object in it (an analyst marks one village):

1. **target**: the generalist's embedding of the reference, the mask resized onto its grid, the
   object's mean feature (PerSAM; PerSAM-F: the mean of the mean and the channel-wise max);
2. **location confidence**: on a new image, the cosine similarity of every location's feature to
   the target, brought to the image's pixels like a mask;
3. **point priors**: the most similar pixel as a positive point, the least similar as a negative
   one (PerSAM-F: the positive only);
4. **decoding**: PerSAM: target-guided attention and target-semantic prompting
   (:class:`uvsam.modeling.persam.PersonalisedDecoder`), then cascaded post-refinement (the
   mask's logits as a mask prompt, then its box as well, each keeping the best of three);
   PerSAM-F: two weights mixing the three scales of SAM's multimask output, fitted in seconds
   on the reference (dice + focal loss, AdamW, cosine schedule; 1000 steps as the paper), then
   the same two refinement passes.

PerSAM finds one object per image. Over a city (:func:`run_oneshot`), each window is an image:
besides the global maximum, every local maximum of the confidence map above
``min_similarity`` is a positive point of its own (decoded with the window's negative point),
and the masks go through the object-aware tiling and merge of ``uvsam everything``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from uvsam.changes.sources import read_named_layer
from uvsam.datasets import RASTER_EXT, split_layer
from uvsam.errors import InputError
from uvsam.everything import Objects, mask_boxes
from uvsam.files import check_writable
from uvsam.modeling.persam import PersonalisedDecoder, location_prior
from uvsam.objects import run_everything
from uvsam.prediction.execution import run_local
from uvsam.predictor import Predictor
from uvsam.raster import read_rgb

METHODS = ("persam", "persam-f")


@dataclass(frozen=True)
class OneShotConfig:
    method: str = "persam"
    train_steps: int = 1000  # PerSAM-F's fitting steps
    lr: float = 1e-3
    min_similarity: float = 0.8  # over a city: local maxima of the confidence map above this are points too
    peak_distance: int = 32  # px between two such points at least
    max_points: int = 16  # per window, the most similar first

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"--method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.train_steps < 1 or not self.lr > 0:
            raise InputError("PerSAM-F needs at least one training step and a positive learning rate")
        if not -1 <= self.min_similarity <= 1:
            raise InputError(f"--min-similarity is a cosine similarity in [-1, 1], not {self.min_similarity}")
        if self.peak_distance < 1 or self.max_points < 1:
            raise InputError("--peak-distance and --max-points must be at least 1")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Target:
    """What PerSAM keeps of the reference object: ``feature`` (256,) unit-norm, for the
    confidence map; ``embedding`` (256,) the mean feature, for target-semantic prompting;
    ``weights`` (3,) PerSAM-F's scale weights (None for PerSAM)."""

    feature: torch.Tensor
    embedding: torch.Tensor
    weights: torch.Tensor | None = None

    def to_dict(self) -> dict:
        return {"feature": self.feature.tolist(), "embedding": self.embedding.tolist(),
                "weights": None if self.weights is None else self.weights.tolist()}


def _check_decoder(pred: Predictor) -> None:
    if pred.model.spec.decoder != "sam":
        raise InputError(f"PerSAM needs SAM's mask decoder; {pred.model.spec.name} has EfficientSAM's "
                         "(use sam_vit_*, mobile_sam, efficientvit_sam_*, edgesam, repvit_sam, ...)")


def mask_on_grid(pred: Predictor, mask: np.ndarray, index: int = 0) -> torch.Tensor:
    """(64, 64) bool: the reference mask (H, W) brought onto the embedding grid as PerSAM does
    (resized with the image, padded, bilinear to the grid; a cell is in where the resized mask
    exceeds the threshold PerSAM's normalised 0/255 mask crosses zero at, 123.675 / 255)."""
    h, w = pred.sizes[index]
    if mask.shape != (h, w):
        raise InputError(f"the reference mask is {mask.shape[1]} x {mask.shape[0]} px, its image {w} x {h}")
    nh, nw = pred.model.input_shape(h, w)
    m = torch.from_numpy(mask.astype(np.float32))[None, None].to(pred.device)
    m = F.interpolate(m, (nh, nw), mode="bilinear", align_corners=False)
    s = pred.model.spec.input_size
    m = F.pad(m, (0, s - nw, 0, s - nh))
    grid = pred.embeddings.shape[-2:]
    return F.interpolate(m, size=tuple(grid), mode="bilinear")[0, 0] > 123.675 / 255


@torch.inference_mode()
def learn_target(pred: Predictor, mask: np.ndarray, method: str = "persam", index: int = 0) -> Target:
    """The reference object's :class:`Target` (image ``index`` of ``pred`` is the reference)."""
    _check_decoder(pred)
    on = mask_on_grid(pred, mask, index)
    if not on.any():
        raise InputError("the reference mask covers no cell of the generalist's 64 x 64 grid: mark a larger object")
    feat = pred.embeddings[index].permute(1, 2, 0)[on].float()  # (K, 256)
    mean = feat.mean(0)
    target = (feat.max(0).values / 2 + mean / 2) if method == "persam-f" else mean
    return Target(target / target.norm(), mean)


@torch.inference_mode()
def confidence_map(pred: Predictor, target: Target, index: int = 0) -> torch.Tensor:
    """(H, W) cosine similarity of each location's feature to the target, on the image's pixels."""
    emb = pred.embeddings[index].float()
    c, gh, gw = emb.shape
    feat = emb / emb.norm(dim=0, keepdim=True)
    sim = (target.feature.to(feat.device) @ feat.reshape(c, gh * gw)).reshape(1, 1, gh, gw)
    sim = F.interpolate(sim, scale_factor=4, mode="bilinear")
    h, w = pred.sizes[index]
    return pred.model.postprocess_masks(sim, h, w)[0, 0]


def point_priors(similarity: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
    """((x, y) of the most similar pixel, (x, y) of the least similar): PerSAM's positive and
    negative points (the first of equals, row-major, as ``topk``)."""
    flat = similarity.flatten()
    w = similarity.shape[1]
    hi, lo = int(flat.argmax()), int(flat.argmin())
    return (hi % w, hi // w), (lo % w, lo // w)


def peaks(similarity: np.ndarray, threshold: float, distance: int, limit: int) -> np.ndarray:
    """(K, 2) XY of local maxima of ``similarity`` above ``threshold``, at least ``distance`` px
    apart (greedy, most similar first), at most ``limit``."""
    local = similarity == ndimage.maximum_filter(similarity, size=2 * distance + 1, mode="nearest")
    ys, xs = np.nonzero(local & (similarity > threshold))
    order = np.argsort(-similarity[ys, xs], kind="stable")
    out: list[tuple[int, int]] = []
    for k in order:
        x, y = int(xs[k]), int(ys[k])
        if all(max(abs(x - a), abs(y - b)) >= distance for a, b in out):
            out.append((x, y))
            if len(out) == limit:
                break
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def _prompt(pred: Predictor, points: np.ndarray, labels: np.ndarray, index: int):
    h, w = pred.sizes[index]
    sx, sy = pred.model.prompt_scale(h, w)
    c = torch.as_tensor(np.asarray(points, np.float32), device=pred.device).reshape(-1, len(labels), 2)
    c = c * torch.tensor([sx, sy], device=pred.device)
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.int, device=pred.device)[None].expand(c.shape[0], -1)
    return c, lab


def _box_of(pred: Predictor, low: torch.Tensor, index: int) -> torch.Tensor | None:
    """The box of a (1, 1, 256, 256) mask's full-resolution mask, as PerSAM takes it (pixel
    min and max, inclusive), in the prompt frame; None if the mask is empty."""
    h, w = pred.sizes[index]
    ys, xs = torch.nonzero(pred.model.postprocess_masks(low, h, w)[0, 0] > pred.model.mask_threshold, as_tuple=True)
    if not len(ys):
        return None
    sx, sy = pred.model.prompt_scale(h, w)
    return torch.stack([xs.min() * sx, ys.min() * sy, xs.max() * sx, ys.max() * sy]).float()


def _best(low: torch.Tensor, iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = iou.argmax(1)
    rows = torch.arange(len(k), device=k.device)
    return low[rows, k][:, None], iou[rows, k]


def _cascade(pred: Predictor, coords, labels, low: torch.Tensor, index: int, with_box_first: bool = False):
    """PerSAM's cascaded post-refinement of (N, 1, 256, 256) logits: a pass with them as the mask
    prompt (PerSAM-F: with their box too), then one with the new mask's box as well; each keeps
    the best of three. Returns (N, 1, 256, 256) logits and (N,) predicted IoU."""
    model = pred.model
    emb = pred.embeddings[index : index + 1]
    out_low, out_iou = [], []
    for i in range(len(low)):
        pts = (coords[i : i + 1], labels[i : i + 1])
        cur = low[i : i + 1]
        for with_box in (with_box_first, True):
            box = _box_of(pred, cur, index) if with_box else None
            cur, iou = _best(*model.decode(emb, points=pts, boxes=None if box is None else box[None],
                                           mask_logits=cur, multimask_output=True))
        out_low.append(cur)
        out_iou.append(iou)
    return torch.cat(out_low), torch.cat(out_iou)


@torch.inference_mode()
def persam_masks(pred: Predictor, target: Target, positives: np.ndarray, negative: tuple[int, int] | None,
                 similarity: torch.Tensor, index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """PerSAM's mask for each positive point (pixels, (K, 2)), each with the negative point:
    target-guided attention and target-semantic prompting, then the cascade.
    Returns (K, H, W) logits and (K,) predicted IoU."""
    _check_decoder(pred)
    model = pred.model
    emb = pred.embeddings[index : index + 1]
    pts = np.asarray(positives, np.float32).reshape(-1, 1, 2)
    if negative is not None:
        pts = np.concatenate([pts, np.broadcast_to(np.asarray(negative, np.float32), (len(pts), 1, 2))], 1)
    labels = np.array([1, 0] if negative is not None else [1])
    coords, lab = _prompt(pred, pts, labels, index)
    sparse, dense = model.prompt_encoder(points=(coords, lab), boxes=None, masks=None)
    decoder = PersonalisedDecoder(model.mask_decoder)
    attn = location_prior(similarity.float(), emb.shape[-1]).to(emb.dtype)
    low, _ = decoder(emb, model.prompt_encoder.get_dense_pe(), sparse, dense, False, attn,
                     target.embedding.to(emb.device, emb.dtype)[None, None])
    low, iou = _cascade(pred, coords, lab, low, index)
    h, w = pred.sizes[index]
    return model.postprocess_masks(low, h, w)[:, 0], iou


def fit_scale_weights(pred: Predictor, target: Target, mask: np.ndarray, steps: int = 1000, lr: float = 1e-3,
                      index: int = 0) -> torch.Tensor:
    """PerSAM-F: the weights (3,) of the multimask output's three scales, fitted on the reference
    image (its positive point, dice + focal loss against the mask). SAM stays frozen: its three
    logits are decoded once and only the two free weights learn (the third is 1 minus both)."""
    sim = confidence_map(pred, target, index)
    pos, _ = point_priors(sim)
    coords, lab = _prompt(pred, np.asarray([pos], np.float32), np.array([1]), index)
    h, w = pred.sizes[index]
    with torch.inference_mode():
        low, _ = pred.model.decode(pred.embeddings[index : index + 1], points=(coords, lab), multimask_output=True)
        logits = pred.model.postprocess_masks(low, h, w)[0].flatten(1).float()  # (3, H*W)
    logits = logits.clone()
    gt = torch.from_numpy(mask.astype(np.float32)).to(logits.device).flatten()[None]
    free = torch.nn.Parameter(torch.ones(2, 1, device=logits.device) / 3)
    opt = torch.optim.AdamW([free], lr=lr, eps=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        weights = torch.cat([1 - free.sum(0, keepdim=True), free])
        mixed = (logits * weights).sum(0, keepdim=True)
        loss = dice_loss(mixed, gt) + focal_loss(mixed, gt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return torch.cat([1 - free.sum(0, keepdim=True), free]).detach()[:, 0]


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = logits.sigmoid().flatten(1)
    return (1 - (2 * (p * target).sum(-1) + 1) / (p.sum(-1) + target.sum(-1) + 1)).sum()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    pt = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - pt) ** gamma * (alpha * target + (1 - alpha) * (1 - target))
    return loss.mean(1).sum()


@torch.inference_mode()
def persam_f_masks(pred: Predictor, target: Target, positives: np.ndarray, index: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """PerSAM-F's mask for each positive point (pixels, (K, 2)): the three scales mixed by the
    target's weights, then the two refinement passes. Returns (K, H, W) logits, (K,) IoU."""
    if target.weights is None:
        raise ValueError("PerSAM-F needs the target's fitted scale weights (fit_scale_weights)")
    model = pred.model
    emb = pred.embeddings[index : index + 1]
    coords, lab = _prompt(pred, np.asarray(positives, np.float32).reshape(-1, 1, 2), np.array([1]), index)
    low, _ = model.decode(emb, points=(coords, lab), multimask_output=True)
    wts = target.weights.to(low.device, low.dtype)[None, :, None, None]
    mixed = (low * wts).sum(1, keepdim=True)
    low, iou = _cascade(pred, coords, lab, mixed, index, with_box_first=True)
    h, w = pred.sizes[index]
    return model.postprocess_masks(low, h, w)[:, 0], iou


def reference_target(pred: Predictor, mask: np.ndarray, cfg: OneShotConfig) -> Target:
    """The target of image 0 of ``pred`` and its object ``mask`` under ``cfg.method``."""
    target = learn_target(pred, mask, cfg.method)
    if cfg.method == "persam-f":
        target.weights = fit_scale_weights(pred, target, mask, cfg.train_steps, cfg.lr)
    return target


def segment_like(pred: Predictor, target: Target, cfg: OneShotConfig, index: int = 0, many: bool = False,
                 region: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Masks of the target's kind in image ``index``: ``masks`` (K, H, W) bool, ``iou`` (K,),
    ``points`` (K, 2) XY, ``similarity`` (H, W). One mask (PerSAM's own behaviour) unless
    ``many``: then one per local maximum of the confidence map above ``cfg.min_similarity``
    (only those in ``region``, XY from (2,) inclusive to (2,) exclusive, when given)."""
    sim = confidence_map(pred, target, index)
    pos, neg = point_priors(sim)
    points = np.asarray([pos])
    if many:
        found = peaks(sim.cpu().numpy(), cfg.min_similarity, cfg.peak_distance, cfg.max_points)
        if region is not None:
            found = found[((found >= region[0]) & (found < region[1])).all(1)]
        if not len(found):
            return {"masks": np.zeros((0, *sim.shape), bool), "iou": np.zeros(0, np.float32),
                    "points": found, "similarity": sim.cpu().numpy()}
        points = found
    if cfg.method == "persam-f":
        logits, iou = persam_f_masks(pred, target, points, index)
    else:
        logits, iou = persam_masks(pred, target, points, neg, sim, index)
    return {"masks": (logits > pred.model.mask_threshold).cpu().numpy(), "iou": iou.float().cpu().numpy(),
            "points": points, "similarity": sim.cpu().numpy()}


def read_reference(image: str | Path, mask_spec: str) -> tuple[np.ndarray, np.ndarray, object]:
    """(RGB (H, W, 3) uint8, object mask (H, W) bool, the raster's profile) of the reference:
    ``mask_spec`` a polygon layer (``FILE[:LAYER]``, any CRS, rasterised on the image's grid) or
    a mask raster on the image's grid (non-zero: the object)."""
    import rasterio
    from rasterio.features import rasterize

    img = read_rgb(image)
    h, w = img.valid.shape
    path, layer = split_layer(mask_spec)
    if not path.is_file():
        raise InputError("reference mask not found", path)
    if path.suffix.lower() in RASTER_EXT:
        with rasterio.open(path) as src:
            if (src.height, src.width) != (h, w):
                raise InputError(f"is {src.width} x {src.height} px; the reference image is {w} x {h}", path)
            mask = src.read(1) > 0
    else:
        layer, frame = read_named_layer(path, layer, lambda n: n not in ("runs", "layer_styles"), f"{path}:LAYER")
        crs = img.profile.get("crs")
        if crs is None:
            raise InputError("the reference image has no CRS to place the mask's polygons on", image)
        frame = frame.to_crs(crs)
        mask = rasterize([(g, 1) for g in frame.geometry if g is not None and not g.is_empty], (h, w),
                         transform=img.profile["transform"], dtype="uint8").astype(bool)
    mask &= img.valid
    if not mask.any():
        raise InputError("the reference mask marks no pixel of the reference image", path)
    return img.pixels, mask, img.profile


class OneShotSegmenter:
    """PerSAM in the windows of ``uvsam everything``'s tiling (:mod:`uvsam.objects`): the
    objects of a window are the masks of its confidence map's peaks inside the window's own part
    of the scene (the lattice points it owns span it); a cut object is decoded again from its
    point in a window centred on it. Picklable; ``load()`` loads the generalist once per process."""

    def __init__(self, generalist, target: Target, cfg: OneShotConfig):
        import hashlib
        import json

        self.generalist, self.target, self.cfg = generalist, target, cfg
        self.sha256 = hashlib.sha256(json.dumps([generalist.sha256, target.to_dict(), cfg.to_dict()]).encode()
                                     ).hexdigest()

    def load(self):
        self._pred = self.generalist.load().predictor
        return self

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_pred"}

    def _embed(self, image: np.ndarray):
        with self.generalist.device.autocast():
            self._pred.set_image(image)

    def find(self, image: np.ndarray, points: np.ndarray, cfg, stride):
        self._embed(image)
        points = np.asarray(points, float).reshape(-1, 2)
        if not len(points):  # the window owns no part of the scene
            region = (np.zeros(2), np.zeros(2))
        else:  # only the peaks in this window's own part of the scene (its lattice points span it)
            region = (points.min(0) - np.asarray(stride) / 2, points.max(0) + np.asarray(stride) / 2)
        found = segment_like(self._pred, self.target, self.cfg, many=True, region=region)
        pts, masks, iou, sim = found["points"], found["masks"], found["iou"], found["similarity"]
        score = np.asarray([sim[y, x] for x, y in pts], np.float32)
        return Objects(masks, mask_boxes(torch.from_numpy(masks)).numpy().astype(np.float32), iou, score,
                       pts.astype(float), np.zeros(len(masks), int), len(pts))

    def redecode(self, image: np.ndarray, points: np.ndarray, which: np.ndarray, cfg):
        self._embed(image)
        sim = confidence_map(self._pred, self.target)
        pts = np.asarray(points).round().astype(int)
        if self.cfg.method == "persam-f":
            logits, iou = persam_f_masks(self._pred, self.target, pts)
        else:
            logits, iou = persam_masks(self._pred, self.target, pts, point_priors(sim)[1], sim)
        h, w = sim.shape
        score = np.asarray([float(sim[min(y, h - 1), min(x, w - 1)]) for x, y in pts], np.float32)
        return (logits > self._pred.model.mask_threshold).cpu().numpy(), iou.float().cpu().numpy(), score


def run_oneshot(scenes: list[str], reference: str | Path, reference_mask: str, generalist, out: str | Path,
                objects_cfg, cfg: OneShotConfig = OneShotConfig(), layer: str = "oneshot", runner=None,
                crs: str | None = None) -> dict:
    """``uvsam oneshot``: learn the target from the reference (in this process), then find its
    kind in every scene with :func:`uvsam.objects.run_everything`'s tiling, merge and output
    (``similarity``: each object's confidence-map value at its point)."""
    if check_writable(out).suffix.lower() != ".gpkg":  # before the reference is learnt
        raise InputError("objects are written to a GeoPackage: give --out NAME.gpkg", out)
    image, mask, _ = read_reference(reference, reference_mask)
    pred = generalist.load().predictor
    with generalist.device.autocast():
        pred.set_image(image)
    target = reference_target(pred, mask, cfg)
    seg = OneShotSegmenter(generalist, target, cfg)
    extra = {"reference": str(reference), "reference_mask": str(reference_mask), "method": cfg.method,
             "oneshot": cfg.to_dict(), "scale_weights": None if target.weights is None else target.weights.tolist()}
    return run_everything(scenes, seg, out, objects_cfg, layer, runner or run_local, crs=crs, command="oneshot",
                          run_extra=extra, score="similarity")
