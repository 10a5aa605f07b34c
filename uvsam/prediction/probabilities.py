"""The village probability raster as an output (``--probabilities FILE.tif``): the scene's
mosaic resampled onto the exact grid of the model's GSD.

Within 1 % of the model's GSD a scene is read as it is (:data:`tiles.reader.GSD_TOLERANCE`),
so the working mosaic's pixel can be 1.99926 m for a 2 m model; the output's pixel spans
exactly the model's GSD on the ground at the scene's centre, along both axes (bilinear; NaN
where no tile saw valid data). A Cloud-Optimised GeoTIFF, float32, 0..1, with overviews.
"""

from __future__ import annotations

from pathlib import Path

import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.shutil import copy as raster_copy
from rasterio.vrt import WarpedVRT

from tiles.reader import ground_resolution
from uvsam.files import atomic_path


def exact_grid(crs, transform: Affine, width: int, height: int, gsd_m: float) -> tuple[Affine, int, int]:
    """(transform, width, height) covering the same ground whose pixel spans ``gsd_m`` metres
    on the ground at the grid's centre, along x and y."""
    t, w, h = transform, width, height
    for _ in range(4):  # the centre moves with the size: a few rounds settle it to float precision
        gx, gy = ground_resolution(crs, t, w, h)
        fx, fy = gsd_m / gx, gsd_m / gy
        if abs(fx - 1) < 1e-9 and abs(fy - 1) < 1e-9:
            break
        t = t @ Affine.scale(fx, fy)
        # the same ground to within half a pixel (no mostly-empty extra row or column)
        w = max(1, round(width * abs(transform.a) / abs(t.a)))
        h = max(1, round(height * abs(transform.e) / abs(t.e)))
    return t, w, h


def scene_output(target: Path, scene: Path, n_scenes: int) -> Path:
    """Where one scene's probabilities go: ``target`` for a single scene, else
    ``TARGET-STEM_SCENE-STEM.tif`` beside it."""
    return target if n_scenes == 1 else target.with_name(f"{target.stem}_{Path(scene).stem}{target.suffix}")


def write_probabilities(mosaic: Path, target: Path, gsd_m: float) -> Path:
    """The mosaic on the exact ``gsd_m`` grid as a COG at ``target`` (replaced atomically);
    streamed by GDAL (a warped view copied block by block), so memory stays bounded."""
    with rasterio.open(mosaic) as src:
        transform, width, height = exact_grid(src.crs, src.transform, src.width, src.height, gsd_m)
        with WarpedVRT(src, crs=src.crs, transform=transform, width=width, height=height,
                       resampling=Resampling.bilinear, src_nodata=float("nan"), nodata=float("nan")) as vrt:
            with atomic_path(target) as tmp:
                raster_copy(vrt, tmp, driver="COG", COMPRESS="DEFLATE", PREDICTOR="YES", BLOCKSIZE=512,
                            OVERVIEW_RESAMPLING="AVERAGE", BIGTIFF="IF_SAFER")
    return target
