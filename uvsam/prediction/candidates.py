"""Step 2, candidates (the prompts of the generalist): the thresholded probability mosaic
polygonised in square blocks (bounded memory), specks too small to become a village dropped
first, pieces merged across blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.windows import Window
from scipy import ndimage

from uvsam.polygons import merge, polygonise, valid_polygons


def candidates_from_mosaic(mosaic: Path, threshold: float, block: int, min_pixels: int = 0) -> list:
    """Polygons (scene CRS) of the mosaic's pixels >= threshold, extracted in square blocks and merged.

    Connected pieces of fewer than ``min_pixels`` pixels are dropped before polygonising (a
    mosaic holds thousands of specks no village can grow from), except where they touch a
    block's edge and may continue in the next block.
    """
    pieces, seam = [], []  # pieces that touch a block's edge inside the mosaic may continue in the next block
    with rasterio.open(mosaic) as ds:
        for r0 in range(0, ds.height, block):
            for c0 in range(0, ds.width, block):
                # one more row and column than the block: pixels touching only by a corner across
                # a block edge are then in one block together, and their pieces overlap to merge
                win = Window(c0, r0, min(block + 1, ds.width - c0), min(block + 1, ds.height - r0))
                mask = ds.read(1, window=win) >= threshold  # NaN (no data) compares False
                transform = ds.transform @ Affine.translation(c0, r0)
                edges = (r0 > 0, win.row_off + win.height < ds.height, c0 > 0, win.col_off + win.width < ds.width)
                inner, crossing = split_pieces(mask, min_pixels, edges)
                pieces += polygonise(inner, transform)
                seam += polygonise(crossing, transform)
    # only pieces at a block edge need the union (costly on thousands of staircase outlines); the rest
    # are whole already: 8-connected pieces of one block never touch
    return reading_order(valid_polygons(pieces) + merge(seam))


def reading_order(polygons: list) -> list:
    """``polygons`` in normal form (:func:`shapely.normalize`: rings start at one corner and turn one
    way), sorted top to bottom, then left to right (by their bounds; the larger first at a tie): what
    follows (window planning, simplification, village ids) does not depend on how they were found."""
    if not polygons:
        return polygons
    geoms = shapely.normalize(np.asarray(polygons, dtype=object))
    b = shapely.bounds(geoms)
    return list(geoms[np.lexsort((-shapely.area(geoms), b[:, 0], -b[:, 3]))])


def split_pieces(mask: np.ndarray, min_pixels: int,
                 edges: tuple[bool, bool, bool, bool]) -> tuple[np.ndarray, np.ndarray]:
    """``mask``'s 8-connected pieces, labelled once, as (those touching none of ``edges``, those
    touching one): ``edges`` says which of the top, bottom, left and right edges count. Pieces of
    fewer than ``min_pixels`` pixels that touch no edge of the mask at all are dropped first."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask, np.zeros_like(mask)
    sides = (labels[0], labels[-1], labels[:, 0], labels[:, -1])
    keep = np.bincount(labels.ravel(), minlength=n + 1) >= max(min_pixels, 1)
    keep[np.unique(np.concatenate(sides))] = True  # may go on in the next block
    crossing = np.zeros(n + 1, bool)
    if any(edges):
        crossing[np.unique(np.concatenate([side for side, on in zip(sides, edges, strict=True) if on]))] = True
    keep[0] = crossing[0] = False
    return keep[labels] & ~crossing[labels], crossing[labels]


def drop_specks(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """``mask`` without its 8-connected pieces of fewer than ``min_pixels`` pixels that do not touch its edge."""
    return split_pieces(mask, min_pixels, (False, False, False, False))[0]
