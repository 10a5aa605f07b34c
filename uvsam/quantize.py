"""Post-training int8 quantisation of an image encoder for the CPU (TinySAM's PTQ, static form).

:func:`quantize_encoder_static` quantises weights **and** activations of every convolution and
linear layer, calibrated on the user's own imagery: weights int8 per output channel, activations
int8 per tensor with ranges observed (histogram observer) while the encoder runs on calibration
inputs. Each layer runs as quantise -> int8 kernel (fbgemm / oneDNN) -> dequantise, so the
encoder keeps its fp32 interface and every family works unchanged (attention products, norms and
activations stay fp32). Batch norms that directly follow a convolution are folded into it first
(kept unfolded if folding changes the encoder's output), as deployment toolchains do.

:func:`int8_check` measures what the quantised encoder costs and gives: latency against fp32 on
the same inputs and the agreement of the masks it yields for the same box prompts (IoU). It is
used only where it is faster and its masks agree at IoU >= 0.95 (:data:`MIN_MASK_IOU`): the
measurement decides, on the user's tiles, never an assumption.

:func:`quantize_encoder_int8` is the older dynamic form (int8 weights of linear layers only,
activations quantised on the fly): a no-op on convolutional encoders (EfficientViT-SAM, RepViT-SAM,
EdgeSAM have no linear layer), kept for comparison in the encoder table.
"""

from __future__ import annotations

import copy
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from uvsam.devices import latency

MIN_MASK_IOU = 0.95


def quantize_encoder_int8(encoder: nn.Module) -> nn.Module:
    """A copy of ``encoder`` with int8 dynamic quantisation of every ``nn.Linear`` (CPU only)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        return quantize_dynamic(copy.deepcopy(encoder).eval().cpu(), {nn.Linear}, dtype=torch.qint8)


def embedding_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images and positions of the cosine similarity of (B, C, H, W) embeddings."""
    return F.cosine_similarity(a.float(), b.float(), dim=1).mean().item()


class Int8Layer(nn.Module):
    """A convolution or linear layer run in int8: quantise its input, int8 kernel, dequantise."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant, self.layer, self.dequant = QuantStub(), layer, DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.layer(self.quant(x)))


def fold_batch_norms(module: nn.Module) -> int:
    """Fold each eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` among a module's
    children into the convolution (the norm becomes ``Identity``); returns how many were folded."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for parent in list(module.modules()):
        kids = list(parent.named_children())
        for (name_a, a), (name_b, b) in zip(kids, kids[1:], strict=False):
            if (isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d) and b.track_running_stats
                    and b.num_features == a.out_channels):
                setattr(parent, name_a, fuse_conv_bn_eval(a, b))
                setattr(parent, name_b, nn.Identity())
                folded += 1
    return folded


def _wrap(module: nn.Module, qconfig) -> int:
    """Replace every quantisable conv / linear below ``module`` by an :class:`Int8Layer`."""
    n = 0
    for name, child in module.named_children():
        if (isinstance(child, nn.Conv2d) and child.padding_mode == "zeros") or type(child) is nn.Linear:
            wrapped = Int8Layer(child)
            wrapped.qconfig = qconfig
            setattr(module, name, wrapped)
            n += 1
        elif not isinstance(child, Int8Layer):
            n += _wrap(child, qconfig)
    return n


def quantize_encoder_static(encoder: nn.Module, calibration: Sequence[torch.Tensor]) -> nn.Module:
    """A CPU copy of ``encoder`` with static int8 convolutions and linear layers.

    ``calibration``: preprocessed encoder inputs, (B, 3, S, S), from the imagery the encoder will
    see (a handful suffices: the observers keep the activations' range).
    """
    from torch.ao.quantization import convert, get_default_qconfig, prepare

    if not calibration:
        raise ValueError("static int8 needs at least one calibration input")
    engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "qnnpack"
    torch.backends.quantized.engine = engine
    model = copy.deepcopy(encoder).eval().cpu()
    with torch.inference_mode():
        ref = model(calibration[0])
        folded = copy.deepcopy(model)
        if fold_batch_norms(folded) and embedding_cosine(folded(calibration[0]), ref) > 0.99999:
            model = folded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        _wrap(model, get_default_qconfig(engine))
        prepare(model, inplace=True)
        with torch.inference_mode():
            for x in calibration:
                model(x)
        convert(model, inplace=True)
    return model


@dataclass(frozen=True)
class Int8Check:
    """What static int8 measured on some inputs: fp32 and int8 latency (s, median), the mean
    embedding cosine and the mean IoU of the masks for the same box prompts."""

    fp32_s: float
    int8_s: float
    cosine: float
    mask_iou: float

    @property
    def speedup(self) -> float:
        return self.fp32_s / self.int8_s

    @property
    def worth_it(self) -> bool:
        """Faster, with masks agreeing at IoU >= :data:`MIN_MASK_IOU`."""
        return self.int8_s < self.fp32_s and self.mask_iou >= MIN_MASK_IOU

    def describe(self) -> str:
        return (f"int8 encoder {self.int8_s:.3g} s against fp32 {self.fp32_s:.3g} s ({self.speedup:.2f}x), "
                f"masks agree at IoU {self.mask_iou:.3f}")


def grid_boxes(frame: int, n: int = 3) -> torch.Tensor:
    """(n * n, 4) XYXY boxes of an n x n grid over a square ``frame`` (box prompts for a check)."""
    step = frame / n
    return torch.tensor([[c * step, r * step, (c + 1) * step, (r + 1) * step] for r in range(n) for c in range(n)])


def int8_check(model, quantized: nn.Module, inputs: Sequence[torch.Tensor], repeats: int = 2) -> Int8Check:
    """Compare ``quantized`` with ``model.image_encoder`` (fp32, CPU) on preprocessed ``inputs``:
    latency, embedding cosine, and the masks of ``model``'s decoder for a 3 x 3 grid of boxes
    (the best of three masks by predicted IoU, as the seeds evaluate)."""
    enc = model.image_encoder
    fp32_s = latency(enc, inputs[0], repeats)
    int8_s = latency(quantized, inputs[0], repeats)
    cos, ious = [], []
    boxes = grid_boxes(model.spec.prompt_frame)
    with torch.inference_mode():
        for x in inputs:
            a, b = enc(x), quantized(x)
            cos.append(embedding_cosine(a, b))
            for e in range(len(x)):
                masks = []
                for emb in (a[e:e + 1], b[e:e + 1]):
                    low, iou = model.decode(emb, boxes=boxes, multimask_output=True)
                    masks.append(low[torch.arange(len(boxes)), iou.argmax(1)] > model.mask_threshold)
                inter = (masks[0] & masks[1]).flatten(1).sum(1).float()
                union = (masks[0] | masks[1]).flatten(1).sum(1).float()
                ious += torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter)).tolist()
    return Int8Check(fp32_s, int8_s, statistics.fmean(cos), statistics.fmean(ious))


__all__ = ["MIN_MASK_IOU", "Int8Check", "Int8Layer", "embedding_cosine", "fold_batch_norms", "grid_boxes",
           "int8_check", "quantize_encoder_int8", "quantize_encoder_static"]
