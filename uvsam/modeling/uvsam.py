"""UV-SAM: a SegFormer specialist prompts a frozen SAM-style generalist (AAAI 2024).

Data flow for one batch of (B, 3, H, W) images on the 0..255 scale:

1. the specialist gives village logits (B, 2, H, W) and its fused feature (B, 256, h, w);
2. the generalist's frozen encoder gives (B, 256, 64, 64) embeddings (cacheable: they depend
   only on the image), optionally corrected by SAM-LST's ladder side network;
3. prompts (:mod:`uvsam.modeling.prompts`): one box per predicted village, the pooled log-odds as the
   dense mask prompt, and the two semantic prompts;
4. the box tokens are fused with the semantic prompts (:class:`PromptFusion`) and the large
   villages of an image are decoded in batched mask-decoder calls (``decode_chunk`` a call);
5. :meth:`UVSAM.combine`: large villages take the generalist's mask, small ones keep the
   specialist's.

Only the specialist, the fusion head (and, as options, the ladder network and the mask
decoder) train; the generalist's image encoder and prompt encoder stay frozen.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from uvsam.modeling.fusion import LadderSideNetwork, PromptFusion
from uvsam.modeling.prompts import (
    MASK_PROMPT_SIZE,
    OFFICIAL_GSD_M,
    min_area_m2,
    semantic_prompts,
    village_boxes,
    village_log_odds,
)
from uvsam.modeling.sam import Generalist, build_generalist
from uvsam.modeling.specialist import Specialist, specialist_input

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # the specialist's input normalisation, 0..255 scale
IMAGENET_STD = (58.395, 57.12, 57.375)


# The paper's ablations: name -> the UVSAMConfig switches it sets (all on: UV-SAM itself)
ABLATIONS: dict[str, dict[str, bool]] = {
    "UV-SAM": {},
    "w/o box prompt": {"box_prompt": False},
    "w/o mask prompt": {"mask_prompt": False},
    "w/o SAM embedding": {"sam_embedding": False},
    "w/o specialist embedding": {"specialist_embedding": False},
}
SPECIALIST_ONLY = "w/o SAM (specialist alone)"  # the last row of the table: no generalist at all


@dataclass(frozen=True)
class UVSAMConfig:
    """What defines a UV-SAM model; stored in every checkpoint.

    ``gsd_m``: the ground resolution (m/px) the model was trained at; inference resamples to it.
    ``min_area_m2``: villages whose box is smaller keep the specialist's mask (default: the
    official 100 x 100 px at the official data's 0.916 m, 8,390 m^2).
    """

    encoder: str = "mobile_sam"
    specialist: str = "mit_b0"
    fusion: str = "mlp"
    tune_decoder: bool = False
    ladder: bool = False
    mask_prompt: bool = True  # the paper's ablations: each prompt and embedding can be left out
    box_prompt: bool = True  # off: the semantic prompts are the only sparse tokens, one decode per image
    sam_embedding: bool = True  # the generalist's pooled embedding in the semantic prompt (off: zeros)
    specialist_embedding: bool = True  # the specialist's pooled feature in the semantic prompt (off: zeros)
    gsd_m: float = 1.0
    min_area_m2: float | None = None
    max_villages: int = 32  # decoded per image per call; the largest first
    specialist_input: str = "rgb"  # rgb, lcn or lcn_rgb (see uvsam.modeling.specialist.specialist_input)
    lcn_sigma_m: float = 15.0  # scale of the local contrast normalisation, metres on the ground
    pixel_mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    pixel_std: tuple[float, float, float] = field(default=IMAGENET_STD)

    @property
    def min_area(self) -> float:
        return min_area_m2(OFFICIAL_GSD_M) if self.min_area_m2 is None else self.min_area_m2

    MAX_GSD_M = 100.0  # coarser than this, a village is a pixel or two

    def problems(self) -> list[str]:
        """What makes this config unusable (a damaged or hand-edited file); empty when sound."""
        out = []

        def number(name: str, value, low: float, high: float = math.inf, low_open: bool = True) -> None:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value > high or value < low or (low_open and value == low):
                bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
                out.append(f"{name} is {value!r}: it must be a number {bound}")

        number("gsd_m", self.gsd_m, 0.0, self.MAX_GSD_M)
        if self.min_area_m2 is not None:
            number("min_area_m2", self.min_area_m2, 0.0, low_open=False)
        number("max_villages", self.max_villages, 1, low_open=False)
        number("lcn_sigma_m", self.lcn_sigma_m, 0.0)
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3:
            return [*out, f"pixel_mean / pixel_std have {len(self.pixel_mean)} / {len(self.pixel_std)} values, not 3"]
        for i, (m, s) in enumerate(zip(self.pixel_mean, self.pixel_std, strict=True)):
            number(f"pixel_mean[{i}]", m, -math.inf, low_open=False)
            number(f"pixel_std[{i}]", s, 0.0)
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UVSAMConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("pixel_mean", "pixel_std"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)


@dataclass
class ImageVillages:
    """The villages of one image: ``boxes`` (N, 4) XYXY px, ``large`` (N,) bool, ``labels``
    (H, W) component ids; for the M large ones, ``mask_logits`` (M, 1, H, W) and ``iou_pred`` (M,)."""

    boxes: np.ndarray
    large: np.ndarray
    labels: np.ndarray
    mask_logits: torch.Tensor
    iou_pred: torch.Tensor

    @property
    def decoded_boxes(self) -> np.ndarray:
        return self.boxes[self.large]


@dataclass
class UVSAMOutput:
    specialist_logits: torch.Tensor  # (B, 2, H, W)
    villages: list[ImageVillages]


class UVSAM(nn.Module):
    """The whole model; see the module docstring."""

    def __init__(self, config: UVSAMConfig, specialist: Specialist, generalist: Generalist):
        super().__init__()
        self.config = config
        self.specialist = specialist
        self.generalist = generalist
        self.fusion = PromptFusion(config.fusion)
        self.ladder = LadderSideNetwork() if config.ladder else None
        self.generalist.requires_grad_(False)
        if config.tune_decoder:
            self.generalist.mask_decoder.requires_grad_(True)
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(1, -1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(1, -1, 1, 1), False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.generalist.image_encoder.eval()  # frozen: its norm statistics never move
        self.generalist.prompt_encoder.eval()
        if not self.config.tune_decoder:
            self.generalist.mask_decoder.eval()
        return self

    # Compiled stand-ins of the parts (uvsam.compiled): name -> a module with ``fits(*inputs)``, run
    # instead of the eager part where the inputs fit; "specialist" (run_specialist's inputs),
    # "encoder" (the encoder's preprocessed input), "decoder" (decode_box_chunk's inputs).
    compiled: dict[str, nn.Module] = {}

    def _compiled(self, part: str, *inputs) -> nn.Module | None:
        fn = self.compiled.get(part)
        return fn if fn is not None and not torch.is_grad_enabled() and fn.fits(*inputs) else None

    # -- the parts ---------------------------------------------------------------------------
    def run_specialist(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) 0..255 -> logits (B, 2, H, W), fused feature (B, 256, h, w)."""
        fn = self._compiled("specialist", images)
        return fn(images) if fn is not None else self.run_specialist_eager(images)

    def run_specialist_eager(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`run_specialist` in eager PyTorch. Under autocast (``--precision bf16``) only the
        network runs in reduced precision: its input (normalisation, local contrast) is computed
        in fp32, as small differences of 0..255 values would not survive bf16's 8-bit mantissa."""
        with torch.autocast(images.device.type, enabled=False):
            x = specialist_input(images.float(), self.config.specialist_input, self.pixel_mean, self.pixel_std,
                                 self.config.lcn_sigma_m / self.config.gsd_m)
        return self.specialist(x)

    @torch.no_grad()
    def frozen_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """The generalist encoder's (B, 256, 64, 64) embeddings: depend on the image only."""
        if "encoder" in self.compiled:  # the compiled encoder takes one image a call
            x = self.generalist.preprocess(images)
            if self._compiled("encoder", x[:1]) is None:
                return self.generalist.image_encoder(x)
            return torch.cat([self.compiled["encoder"](x[i : i + 1]) for i in range(len(x))])
        return self.generalist.encode(images)

    def embeddings(self, images: torch.Tensor, frozen: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.frozen_embeddings(images) if frozen is None else frozen
        if self.ladder is not None:
            emb = emb + self.ladder(self.generalist.preprocess(images))
        return emb

    def dense_prompt(self, logits: torch.Tensor) -> torch.Tensor:
        """Village log-odds (B, 2, H, W) -> SAM's (B, 1, 256, 256) mask prompt in the prompt frame.

        The prompt grid covers the encoder's padded square input: the image part is pooled from
        the log-odds, the padding reads as confident background.
        """
        h, w = logits.shape[-2:]
        nh, nw = self.generalist.input_shape(h, w)
        s = self.generalist.spec.input_size
        gh, gw = max(1, round(MASK_PROMPT_SIZE * nh / s)), max(1, round(MASK_PROMPT_SIZE * nw / s))
        x = F.adaptive_avg_pool2d(village_log_odds(logits), (gh, gw))
        return F.pad(x, (0, MASK_PROMPT_SIZE - gw, 0, MASK_PROMPT_SIZE - gh), value=-20.0)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, frozen_embeddings: torch.Tensor | None = None,
                specialist_images: torch.Tensor | None = None, gsd_m: float | None = None,
                cascade: bool = False) -> UVSAMOutput:
        """(B, 3, H, W) 0..255 images at ``gsd_m`` (default: the training GSD) -> :class:`UVSAMOutput`.

        ``frozen_embeddings``: precomputed encoder embeddings of ``images`` (the cache).
        ``specialist_images``: what the specialist sees instead of ``images`` (photometric
        augmentation that must not invalidate cached embeddings).
        ``cascade``: PerSAM's cascaded post-refinement of each village's mask (:meth:`cascade`).
        """
        logits, feature = self.run_specialist(images if specialist_images is None else specialist_images)
        emb = self.embeddings(images, frozen_embeddings)
        semantic = self.semantic_prompts(emb, feature)
        dense = self.dense_prompt(logits) if self.uses_mask_prompt else None
        pred = logits.argmax(1).cpu().numpy().astype(bool)
        gsd = self.config.gsd_m if gsd_m is None else gsd_m
        found, large_sets = [], []
        for b in range(images.shape[0]):
            vb = village_boxes(pred[b], gsd, self.config.min_area)
            large = vb.large.copy()
            if large.sum() > self.config.max_villages:  # keep the largest
                areas = (vb.boxes[:, 2] - vb.boxes[:, 0]) * (vb.boxes[:, 3] - vb.boxes[:, 1])
                keep = np.argsort(-np.where(large, areas, -1))[: self.config.max_villages]
                large = np.zeros_like(large)
                large[keep] = True
            found.append(vb)
            large_sets.append(large)
        decoded = self.decode_boxes(images.shape[-2:], logits, semantic, emb,
                                    [vb.boxes[large] for vb, large in zip(found, large_sets, strict=True)], dense,
                                    cascade)
        villages = [ImageVillages(vb.boxes, large, vb.labels, masks, iou)
                    for vb, large, (masks, iou) in zip(found, large_sets, decoded, strict=True)]
        return UVSAMOutput(logits, villages)

    decode_chunk: int = 8  # boxes per mask-decoder call: each box holds ~20 MB of activations

    def semantic_prompts(self, emb: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """(B, 2, 256) semantic prompts (:func:`semantic_prompts`), the embeddings the config
        leaves out (``sam_embedding``, ``specialist_embedding``) set to zero."""
        semantic = semantic_prompts(emb, feature)
        keep = torch.tensor([self.config.sam_embedding, self.config.specialist_embedding], dtype=semantic.dtype,
                            device=semantic.device)
        return semantic * keep.view(1, 2, 1)

    @property
    def uses_mask_prompt(self) -> bool:
        return self.config.mask_prompt and self.generalist.spec.decoder == "sam"

    def decode_boxes(self, size: tuple[int, int], logits: torch.Tensor, semantic: torch.Tensor,
                     emb: torch.Tensor, boxes: list[np.ndarray], dense: torch.Tensor | None = None,
                     cascade: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Decode the (M_b, 4) XYXY pixel boxes of each image, batched (``decode_chunk`` boxes a call);
        ``cascade``: then PerSAM's cascaded post-refinement of each mask (:meth:`cascade`).

        Returns per image the (M_b, 1, H, W) mask logits and (M_b,) predicted IoU.
        """
        h, w = size
        sx, sy = self.generalist.prompt_scale(h, w)
        scale = torch.tensor([sx, sy, sx, sy], device=emb.device)
        out = []
        for b, bx in enumerate(boxes):
            if len(bx) == 0:
                out.append((logits.new_zeros((0, 1, h, w)), logits.new_zeros(0)))
                continue
            if not self.config.box_prompt:  # no box: the semantic prompts alone, one mask for the image's villages
                low, iou = self.generalist.decode(emb[b : b + 1], sparse_extra=semantic[b : b + 1],
                                                  mask_logits=None if dense is None else dense[b : b + 1])
                mask = self.generalist.postprocess_masks(low, h, w)
                out.append((mask.expand(len(bx), -1, -1, -1), iou[:, 0].expand(len(bx))))
                continue
            t = torch.as_tensor(np.asarray(bx, np.float32), device=emb.device) * scale
            masks, ious = [], []
            for k in range(0, len(t), self.decode_chunk):  # memory grows with the boxes of a call
                chunk = t[k : k + self.decode_chunk]
                fuse = partial(self.fusion, semantic=semantic[b : b + 1])
                low, iou = self.decode_box_chunk(emb[b : b + 1], chunk, None if dense is None else dense[b : b + 1],
                                                 semantic[b : b + 1])
                if cascade and self.generalist.spec.decoder == "sam":
                    low, iou = self.cascade(emb[b : b + 1], chunk, low, fuse)
                masks.append(self.generalist.postprocess_masks(low, h, w))
                ious.append(iou[:, 0])
            out.append((torch.cat(masks), torch.cat(ious)))
        return out

    def decode_box_chunk(self, emb: torch.Tensor, boxes: torch.Tensor, dense: torch.Tensor | None,
                         semantic: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder call: (1, 256, 64, 64) embedding, (N, 4) prompt-frame boxes, the image's
        (1, 1, 256, 256) dense prompt (one for all its boxes) or None, (1, 2, 256) semantic prompts
        -> (N, 1, 256, 256) mask logits, (N, 1) predicted IoU."""
        fn = self._compiled("decoder", emb, boxes, dense, semantic)
        return fn(emb, boxes, dense, semantic) if fn is not None else self.decode_box_chunk_eager(
            emb, boxes, dense, semantic)

    def decode_box_chunk_eager(self, emb: torch.Tensor, boxes: torch.Tensor, dense: torch.Tensor | None,
                               semantic: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`decode_box_chunk` in eager PyTorch."""
        low, iou = self.generalist.decode(emb, boxes=boxes, mask_logits=dense,
                                          fuse_sparse=partial(self.fusion, semantic=semantic))
        return low[:, :1], iou[:, :1]

    def cascade(self, emb: torch.Tensor, boxes: torch.Tensor, low: torch.Tensor,
                fuse) -> tuple[torch.Tensor, torch.Tensor]:
        """PerSAM's cascaded post-refinement of (N, 1, 256, 256) mask logits ``low`` decoded for
        the (N, 4) prompt-frame ``boxes``: a pass with the masks' own logits as the mask prompt, then
        one with the box of that mask as well, each with three outputs of which the one of
        highest predicted IoU is kept (the semantic prompts stay, as PerSAM's points do). SAM's
        decoder only: EfficientSAM's takes no mask prompt, and :meth:`decode_boxes` skips it there.
        Returns (N, 1, 256, 256) logits and (N, 1) predicted IoU."""
        low, iou = self._best(self.generalist.decode(emb, boxes=boxes, mask_logits=low, multimask_output=True,
                                                     fuse_sparse=fuse))
        # the box of each mask, in the prompt frame (the low-res grid spans the prompt frame's square)
        frame = self.generalist.spec.prompt_frame / low.shape[-1]
        box = boxes.clone()
        for i, m in enumerate(low[:, 0] > 0):
            ys, xs = torch.nonzero(m, as_tuple=True)
            if len(ys):  # an empty mask keeps its box
                box[i] = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).to(box.dtype) * frame
        return self._best(self.generalist.decode(emb, boxes=box, mask_logits=low, multimask_output=True,
                                                 fuse_sparse=fuse))

    @staticmethod
    def _best(decoded: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Of (N, C, 256, 256) logits and (N, C) IoU, each prompt's output of highest predicted IoU."""
        low, iou = decoded
        k = iou.argmax(1)
        rows = torch.arange(len(k), device=k.device)
        return low[rows, k][:, None], iou[rows, k][:, None]

    def refine(self, images: torch.Tensor, boxes: list[np.ndarray],
               cascade: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The generalist's masks for given village boxes (city-scale refinement windows);
        ``cascade``: with PerSAM's cascaded post-refinement."""
        logits, feature = self.run_specialist(images)
        emb = self.embeddings(images)
        dense = self.dense_prompt(logits) if self.uses_mask_prompt else None
        return self.decode_boxes(images.shape[-2:], logits, self.semantic_prompts(emb, feature), emb, boxes, dense,
                                 cascade)

    @staticmethod
    def combine(out: UVSAMOutput) -> torch.Tensor:
        """(B, H, W) bool village masks: generalist masks for large villages, the specialist's for the rest."""
        spec = out.specialist_logits.argmax(1).bool()
        final = []
        for b, v in enumerate(out.villages):
            m = spec[b].clone()
            large_ids = np.flatnonzero(v.large) + 1
            if len(large_ids):
                m &= ~torch.from_numpy(np.isin(v.labels, large_ids)).to(m.device)
                m |= (v.mask_logits[:, 0] > 0).any(0)
            final.append(m)
        return torch.stack(final)


def build_uvsam(config: UVSAMConfig, generalist: Generalist | None = None) -> UVSAM:
    """A UV-SAM model with a fresh specialist; ``generalist`` (weights loaded) or a random one."""
    if generalist is None:
        generalist = build_generalist(config.encoder)
    return UVSAM(config, Specialist(config.specialist), generalist)
