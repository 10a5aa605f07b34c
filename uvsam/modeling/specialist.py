"""The specialist: a segmentation network that segments villages.

By default a SegFormer (MiT-B0..B5 encoder + all-MLP decoder, segmentation-models-pytorch's
``Segformer``, built offline). Its MiT encoder has the key layout of the original SegFormer
release (NVlabs, mmsegmentation 0.x); :func:`load_mit_weights` also reads ImageNet-pretrained MiT
files in the layouts of mmsegmentation 1.x (``mit2mmseg``) and Hugging Face (``nvidia/mit-b0``),
so a user with a local pretrained file starts from it instead of from scratch.

"Every baseline can serve as the specialist" (the UV-SAM paper): any segmentation-models-pytorch
architecture with any of its encoders is named ``ARCH[:ENCODER]`` (``deeplabv3plus:resnet50``,
``unet:efficientnet-b0``, ``fpn``; encoder default ``resnet34``). The semantic prompt's fused
feature is then the decoder's output (what its segmentation head reads), brought to SAM's 256
channels by a 1 x 1 convolution where its width differs (UNet's 16, FPN's 128, PSPNet's 512).
Pretrained encoder weights in the timm / torchvision layout load with :func:`load_mit_weights`
as well (the name is historical: it loads any encoder's weights).
"""

from __future__ import annotations

import re
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from uvsam.errors import CheckpointError

VARIANTS = ("mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5")
ARCHITECTURES = ("unet", "unetplusplus", "manet", "linknet", "fpn", "pspnet", "deeplabv3", "deeplabv3plus", "pan",
                 "upernet", "segformer")
DEFAULT_ENCODER = "resnet34"
FEATURE_CHANNELS = 256  # SegFormer's fused decoder width, = SAM's embedding width
_STRIDE = 32


def parse_specialist(name: str) -> tuple[str, str]:
    """``(architecture, encoder)`` of a specialist name: ``mit_bN`` -> ``("segformer", "mit_bN")``,
    ``ARCH[:ENCODER]`` -> smp's architecture and encoder; ValueError naming the choices otherwise."""
    if name in VARIANTS:
        return "segformer", name
    arch, _, encoder = name.lower().partition(":")
    encoder = encoder or DEFAULT_ENCODER
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown specialist {name!r}: give mit_b0 .. mit_b5 (SegFormer) or ARCH[:ENCODER] with "
                         f"ARCH one of {', '.join(ARCHITECTURES)}")
    if encoder not in smp.encoders.encoders and not encoder.startswith("tu-"):
        raise ValueError(f"unknown encoder {encoder!r} in specialist {name!r}: any segmentation-models-pytorch "
                         "encoder (resnet50, efficientnet-b0, mit_b2, ...) or tu-NAME for a timm one")
    return arch, encoder


class Specialist(nn.Module):
    """The village segmenter: SegFormer (``mit_b0`` .. ``mit_b5``) or any smp ``ARCH[:ENCODER]``.

    forward: (B, 3, H, W) normalised image -> logits (B, 2, H, W), fused decoder feature
    (B, 256, h, w), the map the segmentation head reads (SegFormer: 1/4 resolution; DeepLabV3+:
    1/4; UNet: full), projected to 256 channels where the decoder is narrower or wider.
    Inputs of any size are padded to a multiple of 32 and the logits cropped back.
    """

    def __init__(self, variant: str = "mit_b0", classes: int = 2):
        super().__init__()
        arch, encoder = parse_specialist(variant)
        self.variant = variant
        if variant in VARIANTS:
            self.net = smp.Segformer(variant, encoder_weights=None, classes=classes,
                                     decoder_segmentation_channels=FEATURE_CHANNELS)
        else:
            self.net = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, classes=classes)
        self.reordered = variant in VARIANTS  # SegFormer: fuse the stages by :func:`fuse_features`
        width = self.net.segmentation_head[0].in_channels
        self.feature_proj = (nn.Identity() if width == FEATURE_CHANNELS
                             else nn.Conv2d(width, FEATURE_CHANNELS, kernel_size=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = x.shape[-2:]
        ph, pw = -h % _STRIDE, -w % _STRIDE
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
        features = self.net.encoder(x)
        fused = fuse_features(self.net.decoder, features) if self.reordered else self.net.decoder(features)
        logits = self.net.segmentation_head(fused)
        return logits[..., :h, :w], self.feature_proj(fused)


def fuse_features(decoder: nn.Module, features: list[torch.Tensor]) -> torch.Tensor:
    """smp's ``SegformerDecoder.forward``, computed in another order with the same weights.

    The decoder maps each stage's features to 256 channels (a linear layer), upsamples them to
    1/4 of the input, concatenates the four and mixes them with a 1x1 convolution. A 1x1
    convolution commutes with bilinear upsampling (both are linear, one across channels, the
    other across pixels), so each stage's linear layer and its quarter of the convolution are
    applied as one at the stage's own resolution, then upsampled and summed. The same function
    up to rounding, at about half the specialist's FLOPs and without the (B, 1024, H/4, W/4)
    concatenation in memory (docs/benchmarks.md); gradients reach the same weights.
    """
    size = [d // 4 for d in features[0].shape[2:]]
    stages = (features[2:] if features[1].size(1) == 0 else features[1:])[::-1]
    conv, norm, act = decoder.fuse_stage[0], decoder.fuse_stage[1], decoder.fuse_stage[2]
    weight = conv.weight[:, :, 0, 0]
    width = weight.shape[0]
    fused = None
    for i, (mlp, x) in enumerate(zip(decoder.mlp_stage, stages, strict=True)):
        part = weight[:, i * width : (i + 1) * width]
        y = F.conv2d(x, (part @ mlp.linear.weight)[:, :, None, None], part @ mlp.linear.bias)
        if list(y.shape[2:]) != size:
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        fused = y if fused is None else fused.add_(y) if not torch.is_grad_enabled() else fused + y
    if conv.bias is not None:
        fused = fused + conv.bias[:, None, None]
    return act(norm(fused))


# -- what the specialist sees ----------------------------------------------------------------
INPUTS = ("rgb", "lcn", "lcn_rgb")


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W), reflected at the borders (replicated if too small)."""
    radius = max(1, int(3 * sigma + 0.5))
    k = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-(k**2) / (2 * sigma**2))
    g = (g / g.sum()).view(1, 1, 1, -1).repeat(x.shape[1], 1, 1, 1)
    mode = "reflect" if min(x.shape[-2:]) > radius else "replicate"
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode=mode), g, groups=x.shape[1])
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode=mode), g.transpose(-1, -2), groups=x.shape[1])


def local_contrast(x: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Local contrast normalisation: subtract the Gaussian local mean, divide by the local
    standard deviation (floored at half the image's mean one). What remains is texture and
    edges - the dense small-roof pattern of a village - not colour or illumination, which
    change with season and sensor."""
    detail = x - gaussian_blur(x, sigma_px)
    local_std = gaussian_blur(detail * detail, sigma_px).clamp_min(0).sqrt()
    floor = 0.5 * local_std.mean(dim=(-2, -1), keepdim=True)
    return detail / (local_std + floor + 1e-6)


def specialist_input(images: torch.Tensor, mode: str, mean: torch.Tensor, std: torch.Tensor,
                     sigma_px: float) -> torch.Tensor:
    """(B, 3, H, W) 0..255 images -> the specialist's input.

    ``rgb``: normalised with ``mean``/``std``; ``lcn``: grey level after local contrast
    normalisation (repeated to 3 channels, so pretrained RGB weights still fit); ``lcn_rgb``:
    local contrast normalisation of each band.
    """
    if mode == "rgb":
        return (images - mean) / std
    if mode == "lcn":
        return local_contrast(images.mean(1, keepdim=True) / 255.0, sigma_px).expand(-1, 3, -1, -1)
    if mode == "lcn_rgb":
        return local_contrast(images / 255.0, sigma_px)
    raise ValueError(f"unknown specialist input {mode!r}; choose one of {', '.join(INPUTS)}")


# -- pretrained MiT weights from local files -------------------------------------------------
def _from_hf(key: str) -> str | None:
    """Hugging Face ``SegformerModel`` name -> original name (key/value handled by the caller)."""
    key = re.sub(r"^(segformer\.)?encoder\.", "", key)
    rules = [
        (r"^patch_embeddings\.(\d)\.proj\.", lambda m: f"patch_embed{int(m[1]) + 1}.proj."),
        (r"^patch_embeddings\.(\d)\.layer_norm\.", lambda m: f"patch_embed{int(m[1]) + 1}.norm."),
        (r"^layer_norm\.(\d)\.", lambda m: f"norm{int(m[1]) + 1}."),
        (r"^block\.(\d)\.(\d+)\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}."),
    ]
    for pattern, repl in rules:
        key, n = re.subn(pattern, repl, key)
        if n and not pattern.startswith(r"^block"):
            return key
    if not key.startswith("block"):
        return None
    for old, new in (("layer_norm_1.", "norm1."), ("layer_norm_2.", "norm2."), ("attention.self.query.", "attn.q."),
                     ("attention.self.sr.", "attn.sr."), ("attention.self.layer_norm.", "attn.norm."),
                     ("attention.output.dense.", "attn.proj."), ("mlp.dense1.", "mlp.fc1."),
                     ("mlp.dense2.", "mlp.fc2.")):
        key = key.replace(old, new)
    return key


def _from_mmseg1(key: str) -> str | None:
    """mmsegmentation 1.x ``MixVisionTransformer`` name -> original name (see ``mit2mmseg``)."""
    m = re.match(r"^layers\.(\d)\.(\d)\.(.*)$", key)
    if not m:
        return None
    stage, part, rest = int(m[1]) + 1, int(m[2]), m[3]
    if part == 0:
        return f"patch_embed{stage}." + rest.replace("projection.", "proj.")
    if part == 2:
        return f"norm{stage}.{rest}"
    block, _, rest = rest.partition(".")
    for old, new in (("attn.attn.out_proj.", "attn.proj."), ("ffn.layers.0.", "mlp.fc1."),
                     ("ffn.layers.1.", "mlp.dwconv.dwconv."), ("ffn.layers.4.", "mlp.fc2.")):
        rest = rest.replace(old, new)
    return f"block{stage}.{block}.{rest}"


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    """'segformer' (original, = smp), 'mmseg1', 'huggingface' or 'unknown'."""
    keys = [k.removeprefix("backbone.") for k in state]
    if any(k.startswith(("encoder.block.", "segformer.encoder.")) for k in keys):
        return "huggingface"
    if any(re.match(r"^layers\.\d\.\d\.", k) for k in keys):
        return "mmseg1"
    if any(k.startswith("block1.") for k in keys):
        return "segformer"
    return "unknown"


def to_original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A MiT state dict in any supported layout -> the original SegFormer layout (smp's)."""
    state = {k.removeprefix("backbone."): v for k, v in state.items()}
    layout = detect_layout(state)
    out: dict[str, torch.Tensor] = {}
    if layout == "segformer":
        return {k: v for k, v in state.items() if not k.startswith(("head.", "decode_head."))}
    if layout == "huggingface":
        for k, v in state.items():
            if ".attention.self.key." in k or ".attention.self.value." in k:
                continue
            new = _from_hf(k)
            if new is None:
                continue  # classifier / decode head
            if ".attention.self.query." in k:
                kv = [state[k.replace(".query.", f".{n}.")] for n in ("key", "value")]
                out[new.replace("attn.q.", "attn.kv.")] = torch.cat(kv, 0)
            out[new] = v
        return out
    if layout == "mmseg1":
        for k, v in state.items():
            new = _from_mmseg1(k)
            if new is None:
                continue
            if ".attn.attn.in_proj_" in k:  # q and kv stacked along dim 0 (nn.MultiheadAttention)
                c = v.shape[0] // 3
                base = new.replace("attn.attn.in_proj_", "attn.")
                out[base.replace("attn.", "attn.q.", 1)] = v[:c]
                out[base.replace("attn.", "attn.kv.", 1)] = v[c:]
                continue
            if (".mlp.fc1." in new or ".mlp.fc2." in new) and v.ndim == 4:
                v = v.flatten(1)  # 1x1 conv -> linear
            out[new] = v
        return out
    raise CheckpointError("not a MiT (SegFormer encoder) state dict in the SegFormer, mmsegmentation 1.x "
                          "or Hugging Face layout")


def load_mit_weights(specialist: Specialist, path: str | Path) -> dict:
    """Load ImageNet-pretrained MiT weights from a local file into the specialist's encoder.

    Read with ``weights_only=True``. Returns a summary (layout, tensors loaded). Missing or
    unexpected encoder keys, or wrong shapes (a B2 file for a B0 model), are errors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("file does not exist", path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable or unsafe file is one user error
        raise CheckpointError(f"not a readable weights file ({str(e).splitlines()[0][:160]})", path) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(raw, dict) and isinstance(raw.get(wrapper), dict):
            raw = raw[wrapper]
    if not isinstance(raw, dict):
        raise CheckpointError("does not hold a state dict", path)
    if specialist.variant not in VARIANTS:  # an smp encoder: timm / torchvision keys, the classifier left out
        return _load_encoder_weights(specialist, raw, path)
    layout = detect_layout(raw)
    try:
        state = to_original_layout(raw)
    except CheckpointError as e:
        raise CheckpointError(e.problem, path) from None
    _fit_encoder(specialist, state, path, f"MiT weights ({layout} layout)")
    return {"layout": layout, "tensors": len(state), "file": str(path)}


def _fit_encoder(specialist: Specialist, state: dict, path: Path, what: str) -> None:
    """Load ``state`` into the specialist's encoder, or a CheckpointError naming the missing,
    unexpected and wrongly shaped keys (a B2 file for a B0 model, a ResNet-50 for a ResNet-18)."""
    own = specialist.net.encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or wrong:
        detail = "; ".join(f"{len(v)} {n} ({', '.join(v[:3])})" for n, v in
                           (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if v)
        raise CheckpointError(f"{what} do not fit {specialist.variant}: {detail}", path)
    specialist.net.encoder.load_state_dict(state)


def _load_encoder_weights(specialist: Specialist, raw: dict, path: Path) -> dict:
    """ImageNet weights of an smp specialist's encoder (the torchvision / timm layout smp's
    encoders keep; a classifier head, which smp's encoders drop, is ignored)."""
    own = specialist.net.encoder.state_dict()
    state = {k.removeprefix("encoder."): v for k, v in raw.items()}
    state = {k: v for k, v in state.items() if k in own or not k.startswith(("fc.", "classifier.", "head."))}
    _fit_encoder(specialist, state, path, "encoder weights")
    return {"layout": "encoder", "tensors": len(state), "file": str(path)}
