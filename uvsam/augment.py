"""Training views and augmentation.

A :class:`View` is a square window of a scene at a random scale, flipped and rotated, fully
determined by a seed: the same view gives the same pixels, so the frozen generalist's
embedding of it can be cached and reused every epoch. Photometric augmentation
(:func:`photometric`) changes only what the specialist sees, so it never invalidates a cached
embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from uvsam.datasets import SceneArrays
from uvsam.labels import IGNORE
from uvsam.modeling.specialist import gaussian_blur


@dataclass(frozen=True)
class View:
    """Window (row, col, side) of scene ``scene`` resized to the crop size, then flipped/rotated."""

    scene: int
    row: int
    col: int
    side: int
    flip: bool
    rot: int

    def key(self) -> str:
        return f"{self.scene}:{self.row}:{self.col}:{self.side}:{int(self.flip)}:{self.rot}"


def random_view(rng: np.random.Generator, scenes: list[SceneArrays], crop: int,
                scale: tuple[float, float] = (0.75, 1.33), max_tries: int = 20) -> View:
    """A random view; scenes are drawn in proportion to their labelled area, windows must be
    at least half labelled."""
    weights = np.array([(s.labels != IGNORE).sum() for s in scenes], float)
    k = int(rng.choice(len(scenes), p=weights / weights.sum()))
    h, w = scenes[k].shape
    for _ in range(max_tries):
        side = int(round(crop * rng.uniform(*scale)))
        side = max(8, min(side, h, w))
        r, c = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        view = View(k, r, c, side, bool(rng.integers(2)), int(rng.integers(4)))
        if (scenes[k].labels[r : r + side, c : c + side] != IGNORE).mean() >= 0.5:
            return view
    return view


def render(view: View, scenes: list[SceneArrays], crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, crop, crop) float 0..255 image and (crop, crop) uint8 labels of a view."""
    s = scenes[view.scene]
    sl = (slice(view.row, view.row + view.side), slice(view.col, view.col + view.side))
    img = torch.from_numpy(np.ascontiguousarray(s.image[:, sl[0], sl[1]]))[None]
    lab = torch.from_numpy(np.ascontiguousarray(s.labels[sl]))[None, None]
    if view.side != crop:
        img = F.interpolate(img, (crop, crop), mode="bilinear", align_corners=False, antialias=view.side > crop)
        lab = F.interpolate(lab.float(), (crop, crop), mode="nearest").to(torch.uint8)
    img, lab = img[0], lab[0, 0]
    if view.flip:
        img, lab = img.flip(-1), lab.flip(-1)
    if view.rot:
        img, lab = torch.rot90(img, view.rot, (-2, -1)), torch.rot90(lab, view.rot, (-2, -1))
    return img.contiguous(), lab.contiguous()


@dataclass(frozen=True)
class Photometric:
    """Ranges of the colour augmentation (0 disables a part)."""

    gain: float = 0.3  # per-band multiplicative jitter
    bias: float = 0.15  # per-band additive jitter, fraction of 255
    mix: float = 0.25  # band mixing (hue and sensor response shifts)
    grey: float = 0.3  # probability of a grey-level image
    gamma: float = 0.35
    blur: float = 0.3  # probability of a Gaussian blur (resolution jitter)


def photometric(images: torch.Tensor, gen: torch.Generator, p: Photometric = Photometric()) -> torch.Tensor:
    """Random colour, band-mixing, grey-level, gamma and blur changes of (B, 3, H, W) 0..255 images."""
    b = images.shape[0]

    def u(*shape, lo, hi):
        return torch.rand(*shape, generator=gen) * (hi - lo) + lo

    x = images / 255.0
    x = x * u(b, 3, 1, 1, lo=1 - p.gain, hi=1 + p.gain) + u(b, 3, 1, 1, lo=-p.bias, hi=p.bias)
    mix = torch.eye(3) + u(b, 3, 3, lo=-p.mix, hi=p.mix)
    x = torch.einsum("bij,bjhw->bihw", mix, x)
    grey = (torch.rand(b, 1, 1, 1, generator=gen) < p.grey).float()
    x = grey * x.mean(1, keepdim=True) + (1 - grey) * x
    x = x.clamp(0, 1) ** u(b, 1, 1, 1, lo=1 - p.gamma, hi=1 + p.gamma)
    if p.blur > 0:
        blur = torch.rand(b, generator=gen) < p.blur
        if blur.any():
            x = x.clone()
            x[blur] = gaussian_blur(x[blur], float(u(1, lo=0.5, hi=1.5)))
    return x * 255.0
