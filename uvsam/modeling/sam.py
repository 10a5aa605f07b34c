"""The generalist: an image encoder of the registry + SAM's prompt encoder and mask decoder.

The prompt encoder, two-way transformer and mask decoder are Meta's ``segment_anything``
modules, reused unchanged. The state dict, seen through :meth:`Generalist.official_state_dict`
and :meth:`Generalist.load_official_state_dict`, has the keys of each family's published file.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from uvsam.modeling.common import set_norm_eps
from uvsam.modeling.efficient_sam import EfficientSamMaskDecoder, EfficientSamPromptEncoder
from uvsam.modeling.registry import EncoderSpec, get_spec

_RESIZE: dict[tuple, torch.Tensor] = {}


def resize_matrix(n: int, steps: tuple[tuple[int, int | None], ...], dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """(m, n): the 1-D linear map of a chain of bilinear resizes (``align_corners=False``, as
    ``F.interpolate``) of a length-``n`` axis: each step ``(size, keep)`` resizes to ``size`` then
    keeps the first ``keep`` samples (None: all). Built once per chain by running the chain on the
    identity, so it equals ``F.interpolate``'s weights exactly (bilinear is separable)."""
    key = (n, steps, dtype, str(device))
    if key not in _RESIZE:
        x = torch.eye(n, dtype=dtype).view(n, 1, n, 1)  # the weights F.interpolate computes in this dtype
        for size, keep in steps:
            x = F.interpolate(x, (size, 1), mode="bilinear", align_corners=False)[:, :, :keep]
        if len(_RESIZE) > 64:
            _RESIZE.clear()
        _RESIZE[key] = x[:, 0, :, 0].T.contiguous().to(dtype=dtype, device=device)
    return _RESIZE[key]


class Generalist(nn.Module):
    """Frozen SAM-style generalist.

    Arguments:
      spec: the variant's :class:`EncoderSpec`.
      image_encoder: (B, 3, S, S) normalised padded images -> (B, 256, 64, 64) embeddings.
      prompt_encoder, mask_decoder: Meta's modules (prompt frame ``spec.prompt_frame``).
    """

    mask_threshold: float = 0.0

    def __init__(self, spec: EncoderSpec, image_encoder: nn.Module, prompt_encoder: PromptEncoder,
                 mask_decoder: MaskDecoder):
        super().__init__()
        self.spec = spec
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(spec.pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(spec.pixel_std).view(-1, 1, 1), False)

    # -- geometry ---------------------------------------------------------------------------
    def input_shape(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the image inside the encoder's square input after resizing."""
        s = self.spec.input_size
        if self.spec.resize == "stretch":
            return s, s
        scale = s / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)

    def prompt_scale(self, height: int, width: int) -> tuple[float, float]:
        """(sx, sy): multiply pixel coordinates of the original image to get prompt-frame ones."""
        f = self.spec.prompt_frame
        if self.spec.resize == "stretch":
            return f / width, f / height
        scale = f / max(height, width)
        return scale, scale

    # -- image path ------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB on the 0..255 scale (any float or uint8) -> (B, 3, S, S) encoder input."""
        x = images.to(self.pixel_mean.dtype)
        h, w = x.shape[-2:]
        nh, nw = self.input_shape(h, w)
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
            if self.spec.resize_in_uint8:
                x = x.round().clamp(0, 255)  # the reference code resizes 8-bit images
        x = (x - self.pixel_mean) / self.pixel_std
        s = self.spec.input_size
        return F.pad(x, (0, s - nw, 0, s - nh))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) 0..255 RGB -> (B, 256, 64, 64) image embeddings."""
        return self.image_encoder(self.preprocess(images))

    # -- prompt path -----------------------------------------------------------------------
    def decode(
        self,
        embeddings: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask_logits: torch.Tensor | None = None,
        multimask_output: bool = False,
        sparse_extra: torch.Tensor | None = None,
        fuse_sparse: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode N prompts against one image embedding in one batched call.

        Arguments (coordinates in the prompt frame):
          embeddings: (1, 256, 64, 64) or (N, 256, 64, 64).
          boxes: (N, 4) XYXY. points: ((N, P, 2) XY, (N, P) labels 1/0/-1).
          mask_logits: (N, 1, 256, 256) dense mask prompts, or (1, 1, 256, 256) shared by all N.
          sparse_extra: (N, T, 256) extra sparse tokens appended.
          fuse_sparse: maps the (N, T, 256) encoded sparse prompts before decoding (UV-SAM's
            fusion of box tokens with the semantic prompts).
        Returns:
          low-res mask logits (N, C, 256, 256) and predicted IoU (N, C), C = 3 or 1.
        """
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_logits)
        if fuse_sparse is not None:
            sparse = fuse_sparse(sparse)
        if sparse_extra is not None:
            sparse = torch.cat([sparse, sparse_extra.to(sparse.dtype)], dim=1)
        pe = self.prompt_encoder.get_dense_pe()
        if embeddings.shape[0] == 1:
            # Meta's MaskDecoder repeats the one image embedding for every prompt itself.
            return self.mask_decoder(embeddings, pe, sparse, dense, multimask_output)
        if embeddings.shape[0] != sparse.shape[0]:
            raise ValueError(f"{embeddings.shape[0]} image embeddings for {sparse.shape[0]} prompts")
        shared = dense.shape[0] == 1  # one dense prompt for all
        outs = [
            self.mask_decoder(embeddings[i : i + 1], pe, sparse[i : i + 1], dense if shared else dense[i : i + 1],
                              multimask_output)
            for i in range(embeddings.shape[0])
        ]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def postprocess_masks(self, low_res: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(N, C, 256, 256) logits -> (N, C, height, width) logits on the original image grid.

        SAM's postprocessing: bilinear to the prompt frame, crop the padding, bilinear to the image
        (``stretch``: bilinear to the image). Each step is linear and separable, so the chain is
        applied as its two 1-D matrices, ``rows @ x @ cols.T`` (:func:`resize_matrix`): the same
        function up to float rounding, without the (N, C, 1024, 1024) intermediate, and a matrix
        product backward instead of the bilinear scatter (training decodes through it)."""
        nh, nw = low_res.shape[-2:]
        if self.spec.resize == "stretch":  # the low-res grid covers the whole image
            steps_h, steps_w = ((height, None),), ((width, None),)
        else:
            f = self.spec.prompt_frame
            sx, _ = self.prompt_scale(height, width)
            steps_h = ((f, int(height * sx + 0.5)), (height, None))
            steps_w = ((f, int(width * sx + 0.5)), (width, None))
        rows = resize_matrix(nh, steps_h, low_res.dtype, low_res.device)
        cols = resize_matrix(nw, steps_w, low_res.dtype, low_res.device)
        return rows @ low_res @ cols.T

    # -- official key layout -----------------------------------------------------------------
    def official_key(self, key: str) -> str:
        """The published checkpoint's name for ``key`` of this model's state dict.

        Each part (``image_encoder``, ``prompt_encoder``, ``mask_decoder``) that names its keys
        differently from the official file has an ``official_key`` method; Meta's modules have none.
        """
        part, _, rest = key.partition(".")
        mapper = getattr(getattr(self, part, None), "official_key", None)
        return f"{part}.{mapper(rest)}" if mapper is not None and rest else key

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's state dict under the keys of the family's published checkpoint."""
        return {self.official_key(k): v for k, v in self.state_dict().items()}

    def load_official_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True):
        """Load a state dict in the official layout; returns (missing, unexpected) official keys.

        With ``strict`` a key or shape mismatch raises ``KeyError``/``ValueError`` naming them.
        """
        own = self.state_dict()
        to_internal = {self.official_key(k): k for k in own}
        missing = sorted(k for k in to_internal if k not in state)
        unexpected = sorted(k for k in state if k not in to_internal)
        bad_shape = sorted(
            f"{k} {tuple(state[k].shape)} != {tuple(own[to_internal[k]].shape)}"
            for k in to_internal
            if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[to_internal[k]].shape)
        )
        if strict and (missing or unexpected or bad_shape):
            raise KeyError(_mismatch_message(missing, unexpected, bad_shape))
        if bad_shape:
            raise ValueError(_mismatch_message([], [], bad_shape))
        mapped = {to_internal[k]: v for k, v in state.items() if k in to_internal}
        self.load_state_dict(mapped, strict=False)
        return missing, unexpected


def _mismatch_message(missing: list[str], unexpected: list[str], bad_shape: list[str], limit: int = 5) -> str:
    parts = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", bad_shape)):
        if keys:
            shown = ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
            parts.append(f"{len(keys)} {label} ({shown})")
    return "; ".join(parts)


def build_generalist(name_or_spec: str | EncoderSpec) -> Generalist:
    """Build a generalist with random weights; load published ones with ``uvsam.checkpoint``."""
    spec = get_spec(name_or_spec) if isinstance(name_or_spec, str) else name_or_spec
    if spec.decoder == "efficient_sam":

        prompt_encoder = EfficientSamPromptEncoder(256, (64, 64), (spec.prompt_frame, spec.prompt_frame))
        model = Generalist(spec, spec.build_encoder(), prompt_encoder, EfficientSamMaskDecoder())
        return model.eval()
    prompt_encoder = PromptEncoder(
        embed_dim=256,
        image_embedding_size=(64, 64),
        input_image_size=(spec.prompt_frame, spec.prompt_frame),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    model = Generalist(spec, spec.build_encoder(), prompt_encoder, mask_decoder)
    if spec.norm_eps is not None:
        set_norm_eps(model, spec.norm_eps)
    return model.eval()
