"""A corpus of bad and unusual inputs, generated on disk from the real data.

:func:`build` writes every case into a folder and returns them by name. Rasters are cut from a
real Beijing tile (with its real georeferencing) so that only the property under test is odd.
``BAD`` cases must be refused with one line; ``UNUSUAL`` ones are valid and must be handled.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from PIL import Image
from rasterio.enums import ColorInterp

BAD_RASTERS = ("zero_byte", "truncated", "not_a_raster", "no_crs", "all_nodata", "nan_filled", "huge_header")
UNUSUAL_RASTERS = ("rotated", "sheared", "bands1", "bands2", "bands4", "bands8", "uint16", "int16", "float32",
                   "float64")
BAD_LABELS = ("labels_no_crs_member", "labels_outside", "labels_all_empty")
BAD_CHECKPOINTS = ("ckpt_wrong_family", "ckpt_truncated", "ckpt_pickled_model", "ckpt_text")


def _rgb(data_dir: Path, size: int = 512) -> tuple[np.ndarray, Affine]:
    """A real Beijing tile, its bottom-right ``size`` px (mostly village: the test model finds villages
    there), with its real Web Mercator transform."""
    from tiles.xyz import xyz_transform

    img = np.asarray(Image.open(data_dir / "beijing-uv/image/train/49566_107866.png").convert("RGB"))
    h, w = img.shape[:2]
    return (img[h - size :, w - size :].transpose(2, 0, 1).copy(),
            xyz_transform(107866, 49566, 17) @ Affine.translation(w - size, h - size))


def _write(path: Path, data: np.ndarray, transform: Affine | None, crs: str | None = "EPSG:3857",
           nodata=None, **extra) -> Path:
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                   dtype=data.dtype.name, crs=crs, transform=transform or Affine.identity(), nodata=nodata, **extra)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    return path


def _huge_header(src: Path, dest: Path, side: int = 2_000_000) -> Path:
    """``src`` (an uncompressed striped little-endian TIFF) with ImageWidth/ImageLength patched
    to ``side``: the header claims 2e6 x 2e6 px, the file holds a few hundred KB."""
    buf = bytearray(src.read_bytes())
    assert buf[:4] == b"II*\x00", "expected a classic little-endian TIFF"
    (ifd,) = struct.unpack_from("<I", buf, 4)
    (n,) = struct.unpack_from("<H", buf, ifd)
    for k in range(n):
        at = ifd + 2 + 12 * k
        tag, typ = struct.unpack_from("<HH", buf, at)
        if tag in (256, 257):  # ImageWidth, ImageLength
            if typ == 3:  # SHORT cannot hold it: make it LONG
                struct.pack_into("<HHII", buf, at, tag, 4, 1, side)
            else:
                struct.pack_into("<I", buf, at + 8, side)
    dest.write_bytes(bytes(buf))
    return dest


def build(root: Path, data_dir: Path) -> dict[str, Path]:
    """Write the corpus under ``root``; returns {case name: path}."""
    root.mkdir(parents=True, exist_ok=True)
    rgb, t = _rgb(data_dir)
    c: dict[str, Path] = {}
    c["good"] = _write(root / "good.tif", rgb, t)
    # --- bad rasters
    (root / "zero_byte.tif").write_bytes(b"")
    c["zero_byte"] = root / "zero_byte.tif"
    c["truncated"] = root / "truncated.tif"
    c["truncated"].write_bytes(c["good"].read_bytes()[: c["good"].stat().st_size // 2])
    c["not_a_raster"] = root / "not_a_raster.tif"
    c["not_a_raster"].write_text("id,name\n1,this is a CSV file with a .tif name\n")
    c["no_crs"] = _write(root / "no_crs.tif", rgb, None, crs=None)
    c["all_nodata"] = _write(root / "all_nodata.tif", np.zeros_like(rgb), t, nodata=0)
    c["nan_filled"] = _write(root / "nan_filled.tif", np.full(rgb.shape, np.nan, np.float32), t)
    c["huge_header"] = _huge_header(c["good"], root / "huge_header.tif")
    # --- unusual but valid rasters
    x0, y0 = t.c, t.f
    rot = Affine.translation(x0, y0) @ Affine.rotation(20) @ Affine.scale(t.a, t.e)
    c["rotated"] = _write(root / "rotated.tif", rgb, rot)
    c["sheared"] = _write(root / "sheared.tif", rgb, Affine.translation(x0, y0) @ Affine.shear(10, 0)
                          @ Affine.scale(t.a, t.e))
    grey = rgb.mean(axis=0, keepdims=True).astype(np.uint8)
    c["bands1"] = _write(root / "bands1.tif", grey, t)
    c["bands2"] = _write(root / "bands2.tif", np.concatenate([grey, np.full_like(grey, 255)]), t)  # grey + alpha
    with rasterio.open(c["bands2"], "r+") as ds:
        ds.colorinterp = [ColorInterp.gray, ColorInterp.alpha]
    nir = (255 - rgb[0:1] // 2).astype(np.uint8)
    c["bands4"] = _write(root / "bands4.tif", np.concatenate([rgb, nir]), t)
    c["bands8"] = _write(root / "bands8.tif", np.concatenate([rgb, nir, rgb[::-1], nir]), t)
    wide = rgb.astype(np.float64) * 8 + 150  # a 12-bit-like range
    c["uint16"] = _write(root / "uint16.tif", wide.astype(np.uint16), t)
    c["int16"] = _write(root / "int16.tif", (wide - 1200).astype(np.int16), t, nodata=-9999)
    c["float32"] = _write(root / "float32.tif", (rgb / 255.0).astype(np.float32), t)
    c["float64"] = _write(root / "float64.tif", (rgb / 255.0 * 0.3).astype(np.float64), t)
    # --- labels
    mask = np.zeros((1, *rgb.shape[1:]), np.uint8)
    mask[0, 100:300, 120:360] = 1
    (root / "masks").mkdir(exist_ok=True)
    c["mask"] = _write(root / "masks" / "good.tif", mask, t)
    c["labels_no_crs_member"] = data_dir / "odd-inputs/fields_albers_no_crs_member.geojson"
    bounds = rasterio.open(c["good"]).bounds
    far = {"type": "Polygon", "coordinates": [[[bounds.left - 5e4 + dx, bounds.top + dy] for dx, dy in
                                               ((0, 0), (300, 0), (300, 300), (0, 300), (0, 0))]]}
    _geojson(root / "labels_outside.geojson", [far], "EPSG:3857")
    c["labels_outside"] = root / "labels_outside.geojson"
    x, y = bounds.left, bounds.top
    bowtie = {"type": "Polygon", "coordinates": [[[x + 50, y - 50], [x + 300, y - 300], [x + 300, y - 50],
                                                  [x + 50, y - 300], [x + 50, y - 50]]]}
    _geojson(root / "labels_invalid.geojson", [bowtie, None], "EPSG:3857")
    c["labels_invalid"] = root / "labels_invalid.geojson"
    _geojson(root / "labels_all_empty.geojson", [None, {"type": "Polygon", "coordinates": []}], "EPSG:3857")
    c["labels_all_empty"] = root / "labels_all_empty.geojson"
    # --- workflow YAML
    c["bad_yaml"] = root / "bad.yaml"
    c["bad_yaml"].write_text("name: city\nyears:\n  - year: 2020\n    scenes: [a.tif\n  model: m.ckpt\n")
    c["yaml_code"] = root / "code.yaml"
    c["yaml_code"].write_text("!!python/object/apply:os.system ['touch pwned']\n")
    return c


def _geojson(path: Path, geoms: list, crs: str) -> None:
    feats = [{"type": "Feature", "properties": {"class": 1}, "geometry": g} for g in geoms]
    path.write_text(json.dumps({"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": crs}},
                                "features": feats}))
