"""Step 2, candidates (the prompts of the generalist): the thresholded probability mosaic
polygonised in square blocks (bounded memory), specks too small to become a village dropped
first, pieces merged across blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window
from scipy import ndimage

from uvsam.polygons import merge, polygonise


def candidates_from_mosaic(mosaic: Path, threshold: float, block: int, min_pixels: int = 0) -> list:
    """Polygons (scene CRS) of the mosaic's pixels >= threshold, extracted in square blocks and merged.

    Connected pieces of fewer than ``min_pixels`` pixels are dropped before polygonising (a
    mosaic holds thousands of specks no village can grow from), except where they touch a
    block's edge and may continue in the next block.
    """
    pieces = []
    with rasterio.open(mosaic) as ds:
        for r0 in range(0, ds.height, block):
            for c0 in range(0, ds.width, block):
                # one more row and column than the block: pixels touching only by a corner across
                # a block edge are then in one block together, and their pieces overlap to merge
                win = Window(c0, r0, min(block + 1, ds.width - c0), min(block + 1, ds.height - r0))
                mask = ds.read(1, window=win) >= threshold  # NaN (no data) compares False
                if min_pixels > 1:
                    mask = drop_specks(mask, min_pixels)
                pieces += polygonise(mask, ds.transform @ Affine.translation(c0, r0))
    return merge(pieces)


def drop_specks(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """``mask`` without its 8-connected pieces of fewer than ``min_pixels`` pixels that do not touch its edge."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    keep = np.bincount(labels.ravel(), minlength=n + 1) >= min_pixels
    keep[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = True
    keep[0] = False
    return keep[labels]
