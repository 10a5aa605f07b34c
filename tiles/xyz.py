"""XYZ (slippy-map) tile folders -> georeferenced GeoTIFFs in EPSG:3857 and a VRT mosaic.

A file named ``{y}_{x}.png`` holds the image whose top-left corner is XYZ tile (x, y) at zoom
``z``; one index step is 256 pixels, whatever the image's own size (a 1024-pixel image spans
4 x 4 tiles, so images whose indices differ by 2 overlap by half). With the Web Mercator
half-circumference ``H = 20037508.342789244`` m and ``step = 2H / 2**z``:

    pixel size = step / 256, top-left X = x * step - H, top-left Y = H - y * step.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from PIL import Image, UnidentifiedImageError

from tiles.errors import TilesError, write_failure
from tiles.vrt import write_vrt

HALF_CIRCUMFERENCE = 20037508.342789244
XYZ_TILE_PX = 256
_NAME = re.compile(r"^(\d+)_(\d+)$")


def xyz_transform(x: int, y: int, zoom: int) -> Affine:
    """Affine transform (EPSG:3857) of an image whose top-left is XYZ tile (x, y) at ``zoom``."""
    step = 2 * HALF_CIRCUMFERENCE / 2**zoom
    res = step / XYZ_TILE_PX
    return Affine(res, 0.0, x * step - HALF_CIRCUMFERENCE, 0.0, -res, HALF_CIRCUMFERENCE - y * step)


def parse_name(path: Path, zoom: int) -> tuple[int, int]:
    """(x, y) from ``{y}_{x}.ext``; a name that does not fit, or indices outside the zoom, is an error."""
    m = _NAME.match(path.stem)
    if not m:
        raise TilesError("file name is not {y}_{x} (XYZ tile indices)", path)
    y, x = int(m.group(1)), int(m.group(2))
    n = 2**zoom
    if not (0 <= x < n and 0 <= y < n):
        raise TilesError(f"tile indices x={x}, y={y} are outside zoom {zoom} (0..{n - 1})", path)
    return x, y


@dataclass(frozen=True)
class ImportedSet:
    images: list[Path]
    masks: list[Path]
    images_vrt: Path
    masks_vrt: Path | None


def _load(path: Path, mask: bool) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if mask:
                arr = np.asarray(im.convert("L") if im.mode not in ("L", "P", "1", "I;16", "I") else im)
                return arr[None].astype(np.uint8 if arr.max(initial=0) <= 255 else np.uint16)
            return np.moveaxis(np.asarray(im.convert("RGB")), -1, 0)
    except (UnidentifiedImageError, OSError) as e:
        raise TilesError(f"not a readable image ({e})", path) from None


def _write_geotiff(arr: np.ndarray, transform: Affine, dest: Path) -> None:
    """Write into the staging folder (the folder, not each file, is what moves into place)."""
    profile = dict(driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0],
                   dtype=arr.dtype.name, crs="EPSG:3857", transform=transform, tiled=True,
                   blockxsize=256, blockysize=256, compress="deflate")
    with rasterio.open(dest, "w", **profile) as dst:
        dst.write(arr)


def import_xyz(images_dir: str | Path, zoom: int, out_dir: str | Path, masks_dir: str | Path | None = None,
               pattern: str = "*.png", on_tile=None) -> ImportedSet:
    """Georeference every ``{y}_{x}`` image (and its same-named mask) and build VRT mosaics.

    Writes ``OUT/images/{y}_{x}.tif``, ``OUT/masks/{y}_{x}.tif``, ``OUT/images.vrt`` and
    ``OUT/masks.vrt``. All names are checked before anything is written, and the files move into
    OUT only once all of them are complete: a failure leaves OUT as it was. ``on_tile(total)``
    is called as each tile is written (progress).
    """
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    if not images_dir.is_dir():
        raise TilesError("not a folder", images_dir)
    if not 0 <= zoom <= 30:
        raise TilesError(f"zoom must be in 0..30, got {zoom}")
    images = sorted(images_dir.rglob(pattern))
    if not images:
        raise TilesError(f"no {pattern} images in the folder", images_dir)
    tiles: dict[str, tuple[Path, Affine]] = {}
    for p in images:
        x, y = parse_name(p, zoom)
        if p.stem in tiles:
            raise TilesError(f"two images for tile {p.stem} ({tiles[p.stem][0]})", p)
        tiles[p.stem] = (p, xyz_transform(x, y, zoom))
    mask_of: dict[str, Path] = {}
    if masks_dir is not None:
        masks_dir = Path(masks_dir)
        if not masks_dir.is_dir():
            raise TilesError("not a folder", masks_dir)
        for p in sorted(masks_dir.rglob(pattern)):
            if p.stem not in tiles:
                raise TilesError("mask has no image of the same name", p)
            mask_of[p.stem] = p

    # Everything is written into a staging folder next to OUT and moved in only when complete.
    stage = out_dir.parent / f".{out_dir.name}.part-{os.getpid()}"
    try:
        try:
            _write_set(tiles, mask_of, stage, on_tile)
        except (OSError, rasterio.errors.RasterioError) as e:  # a full disk, a lost mount
            raise TilesError(f"cannot write ({write_failure(e)})", out_dir) from e
        out_dir.mkdir(parents=True, exist_ok=True)
        for sub in ("images", "masks"):
            if (stage / sub).is_dir():
                (out_dir / sub).mkdir(exist_ok=True)
                for f in (stage / sub).iterdir():
                    os.replace(f, out_dir / sub / f.name)
        for vrt in ("images.vrt", "masks.vrt"):  # the mosaics last, once their sources are in place
            if (stage / vrt).exists():
                os.replace(stage / vrt, out_dir / vrt)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return ImportedSet(
        [out_dir / "images" / f"{stem}.tif" for stem in tiles], [out_dir / "masks" / f"{stem}.tif" for stem in mask_of],
        out_dir / "images.vrt", out_dir / "masks.vrt" if mask_of else None,
    )


def _write_set(tiles: dict[str, tuple[Path, Affine]], mask_of: dict[str, Path], out_dir: Path,
               on_tile=None) -> None:
    """GeoTIFFs of every image (and mask) plus their VRT mosaics, under ``out_dir``."""
    (out_dir / "images").mkdir(parents=True)
    if mask_of:
        (out_dir / "masks").mkdir()
    for stem, (path, transform) in tiles.items():
        img = _load(path, mask=False)
        _write_geotiff(img, transform, out_dir / "images" / f"{stem}.tif")
        if stem in mask_of:
            mask = _load(mask_of[stem], mask=True)
            if mask.shape[1:] != img.shape[1:]:
                raise TilesError(f"mask is {mask.shape[2]}x{mask.shape[1]} but its image is "
                                 f"{img.shape[2]}x{img.shape[1]}", mask_of[stem])
            _write_geotiff(mask, transform, out_dir / "masks" / f"{stem}.tif")
        if on_tile is not None:
            on_tile(len(tiles))
    write_vrt([out_dir / "images" / f"{stem}.tif" for stem in tiles], out_dir / "images.vrt")
    if mask_of:
        write_vrt([out_dir / "masks" / f"{stem}.tif" for stem in mask_of], out_dir / "masks.vrt")
