"""A GDAL VRT mosaic of rasters that share a CRS and a pixel grid (what ``gdalbuildvrt`` does).

The VRT carries a dataset mask built from each source's own mask, so pixels that no source
covers read as invalid, not as black.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple
from xml.sax.saxutils import escape

import rasterio
from affine import Affine
from rasterio.dtypes import _gdal_typename

from tiles.errors import TilesError


class _Meta(NamedTuple):
    path: Path
    crs: object
    transform: Affine
    width: int
    height: int
    count: int
    dtype: str
    nodata: float | None
    colorinterp: tuple


def _meta(path: Path) -> _Meta:
    with rasterio.open(path) as ds:
        return _Meta(Path(path), ds.crs, ds.transform, ds.width, ds.height, ds.count, ds.dtypes[0], ds.nodata,
                     ds.colorinterp)


def write_vrt(paths: list[Path], dest: str | Path) -> Path:
    """Mosaic ``paths`` (same CRS, resolution, bands and dtype; aligned grids) into ``dest``.

    Later sources are drawn over earlier ones where they overlap. Paths are stored relative to
    the VRT. The file is written atomically.
    """
    dest = Path(dest)
    if not paths:
        raise TilesError("no rasters to mosaic", dest)
    metas = [_meta(p) for p in paths]
    first = metas[0]
    res_x, res_y = first.transform.a, first.transform.e
    for m in metas:
        t = m.transform
        if m.crs != first.crs:
            raise TilesError(f"CRS {m.crs} differs from {first.crs} of {first.path.name}", m.path)
        if (m.count, m.dtype) != (first.count, first.dtype):
            raise TilesError(f"{m.count} bands of {m.dtype} differ from {first.count} of {first.dtype} in "
                             f"{first.path.name}", m.path)
        if abs(t.a - res_x) > 1e-9 * abs(res_x) or abs(t.e - res_y) > 1e-9 * abs(res_y) or t.b or t.d:
            raise TilesError(f"pixel grid {tuple(t)[:6]} differs from {tuple(first.transform)[:6]}", m.path)
    left = min(m.transform.c for m in metas)
    top = max(m.transform.f for m in metas)
    right = max(m.transform.c + m.width * res_x for m in metas)
    bottom = min(m.transform.f + m.height * res_y for m in metas)
    width, height = round((right - left) / res_x), round((bottom - top) / res_y)

    def offset(m: _Meta) -> tuple[int, int]:
        fx, fy = (m.transform.c - left) / res_x, (m.transform.f - top) / res_y
        if abs(fx - round(fx)) > 1e-6 or abs(fy - round(fy)) > 1e-6:
            raise TilesError("not aligned with the other rasters' pixel grid", m.path)
        return round(fx), round(fy)

    placed = [(m.path, offset(m), m.width, m.height) for m in metas]
    crs, count, dtype, nodata, colorinterp = first.crs, first.count, first.dtype, first.nodata, first.colorinterp
    gdal_type = _gdal_typename(dtype)
    lines = [f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">',
             f"  <SRS>{escape(crs.to_wkt())}</SRS>",
             f"  <GeoTransform>{left!r}, {res_x!r}, 0.0, {top!r}, 0.0, {res_y!r}</GeoTransform>"]

    def sources(band: str, tag: str = "SimpleSource") -> list[str]:
        out = []
        for p, (x, y), w, h in placed:
            rel = os.path.relpath(p.resolve(), dest.parent.resolve())
            out += [f"    <{tag}>",
                    f'      <SourceFilename relativeToVRT="1">{escape(rel)}</SourceFilename>',
                    f"      <SourceBand>{band}</SourceBand>",
                    f'      <SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>',
                    f'      <DstRect xOff="{x}" yOff="{y}" xSize="{w}" ySize="{h}"/>',
                    f"    </{tag}>"]
        return out

    for b in range(1, count + 1):
        lines.append(f'  <VRTRasterBand dataType="{gdal_type}" band="{b}">')
        if nodata is not None:
            lines.append(f"    <NoDataValue>{nodata!r}</NoDataValue>")
        lines.append(f"    <ColorInterp>{colorinterp[b - 1].name.capitalize()}</ColorInterp>")
        lines += sources(str(b))
        lines.append("  </VRTRasterBand>")
    if nodata is None:
        lines += ["  <MaskBand>", '    <VRTRasterBand dataType="Byte">']
        lines += ["  " + s for s in sources("mask,1")]
        lines += ["    </VRTRasterBand>", "  </MaskBand>"]
    lines.append("</VRTDataset>")
    tmp = dest.with_name(f".{dest.name}.part")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(dest)
    return dest


# -- what a VRT someone else wrote may read ---------------------------------------------------------------
SOURCES_ENV = "UVSAM_VRT_SOURCES"  # inside (default), local or any: how far a user's VRT may reach
POLICIES = ("inside", "local", "any")
REMOTE_PREFIXES = ("/vsicurl", "/vsis3", "/vsigs", "/vsiaz", "/vsiadls", "/vsioss", "/vsiswift", "/vsiwebhdfs",
                   "/vsihdfs", "http://", "https://", "ftp://", "s3://", "gs://")
_FILENAME_TAGS = ("SourceFilename", "SourceDataset", "Filename")


def vrt_sources(path: Path) -> list[tuple[str, bool]]:
    """(file name as written, relative to the VRT) of every source a VRT file names."""
    from xml.etree import ElementTree

    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, OSError) as e:
        raise TilesError(f"not a readable VRT ({str(e)[:120]})", path) from None
    out = []
    for el in root.iter():
        if el.tag in _FILENAME_TAGS and el.text and el.text.strip():
            out.append((el.text.strip(), el.get("relativeToVRT", el.get("relativetoVRT", "0")) == "1"))
    return out


def check_vrt_sources(path: str | Path, policy: str | None = None, depth: int = 0) -> None:
    """Refuse a VRT whose sources reach further than ``policy`` allows (default: the
    ``UVSAM_VRT_SOURCES`` environment variable, else ``inside``): ``inside``, local files in the
    VRT's folder or under it (what GDAL allows raw VRT bands by default); ``local``, any local
    file; ``any``, URLs and cloud paths too. A VRT is a file of paths: one from elsewhere could
    otherwise make a run read ``/etc/passwd`` or fetch from any server. Nested VRTs are followed."""
    path = Path(path)
    policy = policy or os.environ.get(SOURCES_ENV, "inside")
    if policy not in POLICIES:
        raise TilesError(f"{SOURCES_ENV}={policy!r}: use one of {', '.join(POLICIES)}")
    if policy == "any" or depth > 8:
        return
    folder = path.resolve().parent
    for name, relative in vrt_sources(path):
        if name.lower().startswith(REMOTE_PREFIXES):
            raise TilesError(f"names a remote source ({name[:100]}); uvsam reads a VRT's remote sources only when "
                             "asked to: give --allow-remote-sources", path)
        inner = name
        for prefix in ("/vsizip/", "/vsigzip/", "/vsitar/", "/vsi7z/", "/vsirar/"):  # an archive: where it lies
            inner = inner.removeprefix(prefix)
        source = ((folder / inner) if relative else Path(inner)).resolve()  # not relative to the VRT: to the cwd
        if policy == "inside" and folder not in (source, *source.parents):
            raise TilesError(f"names a source outside its folder ({name[:100]}); uvsam reads a VRT's sources in or "
                             "under its folder unless asked to: give --allow-outside-sources", path)
        if source.suffix.lower() == ".vrt" and source.is_file():
            check_vrt_sources(source, policy, depth + 1)
