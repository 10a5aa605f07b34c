"""A GDAL VRT mosaic of rasters that share a CRS and a pixel grid (what ``gdalbuildvrt`` does).

The VRT carries a dataset mask built from each source's own mask, so pixels that no source
covers read as invalid, not as black.
"""

from __future__ import annotations

import os
from pathlib import Path
from xml.sax.saxutils import escape

import rasterio
from rasterio.dtypes import _gdal_typename

from tiles.errors import TilesError


def write_vrt(paths: list[Path], dest: str | Path) -> Path:
    """Mosaic ``paths`` (same CRS, resolution, bands and dtype; aligned grids) into ``dest``.

    Later sources are drawn over earlier ones where they overlap. Paths are stored relative to
    the VRT. The file is written atomically.
    """
    dest = Path(dest)
    if not paths:
        raise TilesError("no rasters to mosaic", dest)
    metas = []
    for p in paths:
        with rasterio.open(p) as ds:
            metas.append((p, ds.crs, ds.transform, ds.width, ds.height, ds.count, ds.dtypes[0], ds.nodata,
                          ds.colorinterp))
    _, crs, t0, *_ , count, dtype, nodata, colorinterp = metas[0]
    res_x, res_y = t0.a, t0.e
    for p, c, t, _w, _h, n, d, _nd, _ci in metas:
        if c != crs:
            raise TilesError(f"CRS {c} differs from {crs} of {metas[0][0].name}", p)
        if (n, d) != (count, dtype):
            raise TilesError(f"{n} bands of {d} differ from {count} of {dtype} in {metas[0][0].name}", p)
        if abs(t.a - res_x) > 1e-9 * abs(res_x) or abs(t.e - res_y) > 1e-9 * abs(res_y) or t.b or t.d:
            raise TilesError(f"pixel grid {tuple(t)[:6]} differs from {tuple(t0)[:6]}", p)
    left = min(t.c for _, _, t, *_ in metas)
    top = max(t.f for _, _, t, *_ in metas)
    right = max(t.c + w * res_x for _, _, t, w, *_ in metas)
    bottom = min(t.f + h * res_y for _, _, t, _w, h, *_ in metas)
    width, height = round((right - left) / res_x), round((bottom - top) / res_y)

    def offset(p, t):
        fx, fy = (t.c - left) / res_x, (t.f - top) / res_y
        if abs(fx - round(fx)) > 1e-6 or abs(fy - round(fy)) > 1e-6:
            raise TilesError("not aligned with the other rasters' pixel grid", p)
        return round(fx), round(fy)

    placed = [(p, offset(p, t), w, h) for p, _, t, w, h, *_ in metas]
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
