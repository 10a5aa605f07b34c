"""The change report: one self-contained HTML file a planner can open offline and hand on.

Everything is inside the file (inline SVG maps and charts, PNG thumbnails as data URIs, no
scripts, fonts or styles from the network): a change map per pair of years coloured by
lifecycle, before/after thumbnails of the largest changes with the villages outlined (when
the years' imagery is given), charts of village area and count per year, where the villages are
(a distribution map, cumulative count and area against distance from a centre, per ring and per
belt), the tables, and the run's metadata.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import shapely
from affine import Affine
from PIL import Image, ImageDraw
from pyproj import Transformer
from rasterio.warp import transform_bounds

from tiles.reader import RasterSource
from uvsam.changes.accuracy import CHANGE_CLASSES, GAINED, LOST
from uvsam.changes.summaries import equidistant_crs
from uvsam.changes.track import LIFECYCLE_COLOURS as COLOURS
from uvsam.changes.track import ChangeResult
from uvsam.errors import InputError
from uvsam.files import atomic_path
from uvsam.raster import to_rgb

THUMB = 240  # px, longest side of a thumbnail


# -- SVG --------------------------------------------------------------------------------------
def _path(geom, x0: float, y1: float, scale: float) -> str:
    """SVG path data of a (multi)polygon, in a frame whose origin is the map's top-left."""
    parts = []
    for poly in shapely.get_parts(geom):
        if poly.geom_type != "Polygon":
            continue
        for ring in [poly.exterior, *poly.interiors]:
            xy = np.asarray(ring.coords)
            pts = " ".join(f"{(x - x0) * scale:.1f},{(y1 - y) * scale:.1f}" for x, y in xy)
            parts.append(f"M{pts}Z")
    return "".join(parts)


def _frame(bounds, width: int) -> tuple[float, float, float, int]:
    """(x0, y1, scale, height) of a map ``width`` px wide over ``bounds`` with a 3 % margin."""
    x0, y0, x1, y1 = bounds
    pad = 0.03 * max(x1 - x0, y1 - y0, 1.0)
    x0, y0, x1, y1 = x0 - pad, y0 - pad, x1 + pad, y1 + pad
    scale = width / (x1 - x0)
    return x0, y1, scale, int(np.ceil((y1 - y0) * scale))


def _map_svg(parts: list[str], width: int, height: int, scale: float) -> str:
    """The map's SVG: its ``parts`` over a light ground, a 1-2-5 km scale bar below."""
    km = _nice(0.25 * width / scale / 1000)
    bar = km * 1000 * scale
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 24}" '
            f'viewBox="0 0 {width} {height + 24}" role="img"><rect width="100%" height="{height}" fill="#f7f7f2"/>'
            + "".join(parts)
            + f'<rect x="10" y="{height + 8}" width="{bar:.1f}" height="5" fill="#222"/>'
            f'<text x="{bar + 16:.1f}" y="{height + 15}" font-size="11">{km:g} km</text></svg>')


def change_map(changes, width: int = 640) -> str:
    """An SVG map of the events of one pair of years, coloured by lifecycle."""
    if len(changes) == 0:
        return "<p>No villages in either year.</p>"
    x0, y1, scale, height = _frame(changes.total_bounds, width)
    shapes = []
    for _, row in changes.iterrows():
        colour = COLOURS[row["lifecycle"]]
        title = html.escape(f"{row['lifecycle']}: {row['uids_from'] or '-'} -> {row['uids_to'] or '-'}, "
                            f"{row['area_from_m2']:.0f} -> {row['area_to_m2']:.0f} m2")
        shapes.append(f'<path d="{_path(row.geometry, x0, y1, scale)}" fill="{colour}" fill-opacity="0.75" '
                      f'stroke="#222" stroke-width="0.6" fill-rule="evenodd"><title>{title}</title></path>')
    return _map_svg(shapes, width, height, scale)


def _nice(v: float) -> float:
    """The 1-2-5 number nearest below ``v`` (scale bars, chart ticks)."""
    if v <= 0:
        return 1.0
    e = 10 ** np.floor(np.log10(v))
    return float(max(m * e for m in (1, 2, 5) if m * e <= v))


def _nice_up(v: float) -> float:
    """The 1-2-5 number nearest above ``v`` (a tick step that leaves room for its labels)."""
    e = 10 ** np.floor(np.log10(v))
    return float(next(m * e for m in (1, 2, 5, 10) if m * e >= v * (1 - 1e-12)))


def _axis(highest: float) -> tuple[float, int]:
    """A value axis for data up to ``highest``: its top and tick count, ticks at a 1-2-5 step."""
    if not highest > 0:
        return 1.0, 4
    step = 10 ** np.floor(np.log10(highest / 4))
    step = float(next(m * step for m in (1, 2, 5, 10) if m * step * 4 >= highest - 1e-12))
    ticks = max(1, math.ceil(highest / step - 1e-9))
    return step * ticks, ticks


TOP_PAD = 24  # px above a chart's plot area: its unit label sits there, clear of the top tick
LABEL_PX = 13  # px a label at font-size 10 needs across its baseline, with a little air
PALETTE = ("#4575b4", "#fc8d59", "#1a9850", "#984ea3", "#d73027", "#9e9e9e")  # series of the charts


def bar_chart(labels: list[str], series: dict[str, list[float]], unit: str, width: int = 520) -> str:
    """Grouped bars (one group per label, one bar per series) as SVG."""
    widest = max((len(lab) for lab in labels), default=1) * 6.0  # px of the longest label at font-size 10
    n, k = len(labels), max(1, len(series))
    group = (width - 56 - 10) / max(1, n)
    # labels that would overlap are slanted (40 degrees), or set upright when slanted ones would
    # still touch, and then only every ``every``-th is written when even upright ones would
    angle = 0 if widest <= 0.9 * group else (40 if group * math.sin(math.radians(40)) >= LABEL_PX else 90)
    every = max(1, math.ceil(LABEL_PX / group)) if angle == 90 else 1
    drop = int(widest * math.sin(math.radians(angle))) + 4 if angle else 0
    height, left, bottom = 220 + drop, 56, 40 + drop
    top, ticks = _axis(max((max(v) for v in series.values() if v), default=0.0))
    bw = 0.8 * group / k
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    for t in range(ticks + 1):
        v = top * t / ticks
        y = height - bottom - (height - bottom - TOP_PAD) * t / ticks
        out.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{number(v)}</text>')
    for s, (name, values) in enumerate(series.items()):
        for i, v in enumerate(values):
            h = (height - bottom - TOP_PAD) * v / top
            x = left + i * group + 0.1 * group + s * bw
            out.append(f'<rect x="{x:.1f}" y="{height - bottom - h:.1f}" width="{bw:.1f}" height="{h:.1f}" '
                       f'fill="{PALETTE[s % len(PALETTE)]}"><title>{html.escape(name)} {html.escape(labels[i])}: '
                       f'{number(v)} {unit}</title></rect>')
    for i, lab in enumerate(labels):
        if i % every:
            continue
        x, y = left + (i + 0.5) * group, height - bottom + 14
        turn = f' transform="rotate(-{angle} {x:.1f} {y})"' if angle else ""
        out.append(f'<text x="{x:.1f}" y="{y}" font-size="10" text-anchor="{"end" if angle else "middle"}"{turn}>'
                   f"{html.escape(lab)}</text>")
    out.append(f'<text x="8" y="12" font-size="10">{html.escape(unit)}</text>')
    if len(series) > 1:
        for s, name in enumerate(series):
            out.append(f'<rect x="{left + s * 90}" y="{height - 14}" width="10" height="10" '
                       f'fill="{PALETTE[s % len(PALETTE)]}"/><text x="{left + s * 90 + 14}" y="{height - 5}" '
                       f'font-size="10">{html.escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _legend(names: list[str], x0: float, y: float, width: float) -> tuple[list[str], float]:
    """Legend swatches in rows that never run into each other; returns the SVG parts and the y
    below the last row."""
    out, x = [], x0
    for s, name in enumerate(names):
        w = 14 + 6.0 * len(name) + 16  # swatch, text at ~6 px a character (font-size 10), a gap
        if x > x0 and x + w > width:
            x, y = x0, y + 16
        out.append(f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="10" height="10" fill="{PALETTE[s % len(PALETTE)]}"/>'
                   f'<text x="{x + 14:.1f}" y="{y:.1f}" font-size="10">{html.escape(name)}</text>')
        x += w
    return out, y + 8


def line_chart(xs: list[float], series: dict[str, list[float]], x_title: str, unit: str, width: int = 520) -> str:
    """Lines (one per series) over a shared x axis, as SVG: the cumulative curves."""
    left, right, height_plot = 56, 14, 180
    x_max = max(xs) if xs else 1.0
    top, y_ticks = _axis(max((max(v) for v in series.values() if v), default=0.0))
    plot_w = width - left - right
    # x ticks: a 1-2-5 step that leaves room for the widest label
    label_w = 6.0 * max(len(number(x_max)), 3) + 12
    step = _nice_up(x_max * label_w / plot_w) if x_max > 0 else 1.0
    ticks = [k * step for k in range(int(x_max / step + 1e-9) + 1)]
    y_axis = TOP_PAD + height_plot

    def px(x: float, y: float) -> tuple[float, float]:
        return left + plot_w * x / x_max, y_axis - height_plot * y / top

    out = []
    for t in range(y_ticks + 1):
        v = top * t / y_ticks
        _, y = px(0, v)
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{number(v)}</text>')
    for t in ticks:
        x, _ = px(t, 0)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y_axis}" y2="{y_axis + 4}" stroke="#888"/>'
                   f'<text x="{x:.1f}" y="{y_axis + 15}" font-size="10" text-anchor="middle">{number(t)}</text>')
    for s, (name, values) in enumerate(series.items()):
        pts = " ".join("{:.1f},{:.1f}".format(*px(x, y)) for x, y in zip(xs, values, strict=True))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{PALETTE[s % len(PALETTE)]}" stroke-width="2">'
                   f"<title>{html.escape(name)}</title></polyline>")
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{y_axis + 31}" font-size="10" text-anchor="middle">'
               f"{html.escape(x_title)}</text>")
    legend, bottom = _legend(list(series), left, y_axis + 49, width) if len(series) > 1 else ([], y_axis + 38)
    out += legend
    out.append(f'<text x="8" y="12" font-size="10">{html.escape(unit)}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{bottom:.0f}" role="img">'
            + "".join(out) + "</svg>")


def distribution_map(villages, year: str, crs, centre: tuple[float, float] | None = None,
                     ring_km: float | None = None, belts=None, width: int = 640) -> str:
    """An SVG map of one year's villages, with the centre and its distance rings or the belts."""
    mine = villages[villages["year"] == year]
    if not len(mine):
        return f"<p>No villages in {html.escape(year)}.</p>"
    outlines, labels = [], []
    here = None
    if centre is not None:
        aeqd = equidistant_crs(centre)
        here = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(*centre)
        reach = float(np.hypot(*np.abs(mine.to_crs(aeqd).total_bounds.reshape(2, 2)).max(axis=0)))
        if ring_km:
            n = max(1, math.ceil(reach / (ring_km * 1000)))
            every = math.ceil(n / 10)  # at most ten circles drawn
            to_map = Transformer.from_crs(aeqd, crs, always_xy=True)
            for k in range(every, n + every, every):
                circle = shapely.Point(0, 0).buffer(k * ring_km * 1000, 64)
                outlines.append(shapely.transform(circle, lambda xy: np.column_stack(to_map.transform(*xy.T))))
                labels.append(f"{k * ring_km:g} km")
    if belts is not None and len(belts):  # the belts rather than the circles: one set of lines on the map
        outlines = list(belts.to_crs(crs).geometry.values)
        labels = [""] * len(outlines)
    frame = shapely.union_all([shapely.box(*mine.total_bounds), *(shapely.envelope(g) for g in outlines)]
                              + ([shapely.Point(here)] if here else []))
    x0, y1, scale, height = _frame(frame.bounds, width)
    out = []
    for k, g in enumerate(outlines):
        shade = "#e8e8e0" if k % 2 else "none"
        out.append(f'<path d="{_path(g, x0, y1, scale)}" fill="{shade}" stroke="#888" stroke-width="0.8" '
                   'fill-rule="evenodd"/>')
    for _, row in mine.iterrows():
        out.append(f'<path d="{_path(row.geometry, x0, y1, scale)}" fill="#b2182b" stroke="#67001f" '
                   f'stroke-width="0.5" fill-rule="evenodd"><title>{html.escape(str(row.get("village_uid", "")))}'
                   "</title></path>")
    if here:
        cx, cy = (here[0] - x0) * scale, (y1 - here[1]) * scale
        out.append(f'<path d="M{cx - 6:.1f},{cy:.1f}H{cx + 6:.1f}M{cx:.1f},{cy - 6:.1f}V{cy + 6:.1f}" '
                   'stroke="#000" stroke-width="2"><title>centre</title></path>')
        last = cy  # ring labels just inside each circle's top, where they stand clear of the one below
        for g, lab in zip(outlines, labels, strict=True):
            ty = (y1 - g.bounds[3]) * scale + 11
            if lab and last - ty >= 14 and 11 < ty < height:
                out.append(f'<text x="{cx + 4:.1f}" y="{ty:.1f}" font-size="10" fill="#555">{lab}</text>')
                last = ty
    return _map_svg(out, width, height, scale)


# -- thumbnails -------------------------------------------------------------------------------
def thumbnail(image: Path, bounds, crs, outlines: list, colour: tuple[int, int, int]) -> str | None:
    """A PNG data URI of ``image`` over ``bounds`` (in ``crs``) with ``outlines`` drawn, or None
    where the image does not cover the place. Read through the one reader (bands by colour
    interpretation, validity from the image's own mask)."""
    with RasterSource(image) as src:
        if src.crs is None:
            raise InputError("image has no CRS", image)
        image_crs = src.crs
        b = transform_bounds(crs, image_crs, *bounds)
        w_px, h_px = (b[2] - b[0]) / abs(src.transform.a), (b[3] - b[1]) / abs(src.transform.e)
        f = max(w_px, h_px) / THUMB
        if f <= 0:
            return None
        h, w = max(1, round(h_px / f)), max(1, round(w_px / f))
        grid = Affine((b[2] - b[0]) / w, 0, b[0], 0, -(b[3] - b[1]) / h, b[3])
        data, valid = src.read_on_grid(image_crs, grid, w, h, resampling="bilinear")
    if not valid.any():
        return None
    data = to_rgb(data, image)
    lo, hi = np.percentile(data[:, valid], [2, 98])
    rgb = np.clip((data - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    rgb[:, ~valid] = 235  # outside the imagery: light grey, not black ground
    img = Image.fromarray(np.moveaxis(rgb, 0, -1))
    draw = ImageDraw.Draw(img)
    inv = ~grid
    to_img = Transformer.from_crs(crs, image_crs, always_xy=True)
    for geom in outlines:
        for poly in shapely.get_parts(geom):
            for ring in [poly.exterior, *poly.interiors]:
                xs, ys = to_img.transform(*np.asarray(ring.coords).T)
                pts = [tuple(np.array(inv @ (x, y))) for x, y in zip(xs, ys, strict=True)]
                draw.line(pts, fill=colour, width=2)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def largest_changes(result: ChangeResult, n: int) -> pd.DataFrame:
    ch = result.changes[result.changes["lifecycle"] != "stable"].copy()
    ch["size"] = ch["change_m2"].abs()
    return ch.sort_values("size", ascending=False).head(n)


# -- the page ---------------------------------------------------------------------------------
def number(v) -> str:
    """A figure as a reader wants it: thousands separated, no exponent, decimals by size."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool | np.bool_) or not isinstance(v, int | float | np.integer | np.floating):
        return str(v)
    if float(v).is_integer() and (abs(v) >= 1 or v == 0):
        return f"{int(v):,}"
    a = abs(float(v))
    return f"{v:,.0f}" if a >= 1000 else f"{v:,.1f}" if a >= 10 else f"{v:,.2f}" if a >= 0.01 or a == 0 else f"{v:.2g}"


def _table(df: pd.DataFrame) -> str:
    numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]
    return df.to_html(index=False, border=0, classes="t", na_rep="-", formatters=dict.fromkeys(numeric, number))


def _value(v) -> str:
    """A run record's value for a table cell: lists joined, mappings as key: value pairs."""
    if isinstance(v, dict):
        return "; ".join(f"{k}: {_value(x)}" for k, x in v.items()) or "-"
    if isinstance(v, list | tuple):
        return ", ".join(_value(x) for x in v) or "-"
    return "-" if v is None else (number(v) if isinstance(v, int | float) and not isinstance(v, bool) else str(v))


def half_within(distance: pd.DataFrame, year: str) -> float | None:
    """The distance (km) within which half of ``year``'s village area lies, interpolated on the
    cumulative curve; None without villages."""
    d = distance[distance["year"] == year].sort_values("distance_km")
    if not len(d) or d["area_pct"].iloc[-1] <= 0:
        return None
    return float(np.interp(50.0, [0.0, *d["area_pct"]], [0.0, *d["distance_km"]]))


def summary(result: ChangeResult, warnings: list[str], accuracy: pd.DataFrame | None = None,
            distance: pd.DataFrame | None = None) -> str:
    """What a decision maker reads first: villages and area at the first and last year, the
    changes by kind, the largest one, the estimated areas where an accuracy sample was labelled,
    and whether anything needs checking."""
    y = result.years
    first, last = y.iloc[0], y.iloc[-1]
    counts = result.changes["lifecycle"].value_counts() if len(result.changes) else pd.Series(dtype=int)
    kinds = ", ".join(f"{int(counts[k])} {k}" for k in COLOURS if counts.get(k, 0)) or "no change"
    items = [f"<li><strong>{number(int(first['villages']))}</strong> villages covering <strong>"
             f"{number(float(first['area_km2']))} km&sup2;</strong> in {html.escape(str(first['year']))}; "
             f"<strong>{number(int(last['villages']))}</strong> covering <strong>{number(float(last['area_km2']))} "
             f"km&sup2;</strong> in {html.escape(str(last['year']))} "
             f"({'+' if last['area_km2'] >= first['area_km2'] else ''}"
             f"{number(float(last['area_km2'] - first['area_km2']))} km&sup2;).</li>",
             f"<li>Changes between consecutive years: {html.escape(kinds)}.</li>"]
    top = result.changes.loc[result.changes["change_m2"].abs().idxmax()] if len(result.changes) else None
    if top is not None and top["change_m2"] != 0:
        items.append(f"<li>Largest change: {html.escape(str(top['lifecycle']))} "
                     f"{html.escape(str(top['year_from']))} &rarr; {html.escape(str(top['year_to']))}, "
                     f"{number(float(top['change_m2']) / 1e4)} ha.</li>")
    if accuracy is not None:
        for _, r in accuracy[accuracy["class"].isin(["village", LOST, GAINED])].iterrows():
            what = ("village area " + str(r["year"]) if r["class"] == "village" else
                    f"{r['class'].split()[1]} village area {str(r['year']).replace('-', ' → ', 1)}")
            items.append(f"<li>Estimated {html.escape(what)} (labelled sample): "
                         f"<strong>{number(r['estimated_m2'] / 1e6)} &plusmn; {number(r['estimated_m2_ci'] / 1e6)} "
                         f"km&sup2;</strong> ({100 * r['confidence']:g} % confidence; mapped "
                         f"{number(r['mapped_m2'] / 1e6)} km&sup2;).</li>")
    if distance is not None:
        halves = [(y, half_within(distance, y)) for y in (str(first["year"]), str(last["year"]))]
        halves = [(y, h) for y, h in dict(halves).items() if h is not None]
        if halves:
            items.append("<li>Half of the village area lies within " + "; ".join(
                f"<strong>{number(h)} km</strong> of the centre in {html.escape(y)}" for y, h in halves) + ".</li>")
    items.append(f"<li>{len(warnings)} warning(s) below: read them before using the figures.</li>" if warnings
                 else "<li>No warning from the imagery checks.</li>")
    return "<section class='summary' id='summary'><h2>Summary</h2><ul>" + "".join(items) + "</ul></section>"


def accuracy_section(acc: pd.DataFrame) -> str:
    """Mapped area beside the error-adjusted estimate and its confidence interval, with user's,
    producer's and overall accuracy: the village class per year that has a labelled sample, and
    every change class of each pair of years that has a labelled change sample."""
    level = f"{100 * float(acc['confidence'].iloc[0]):g} %"

    def rows(frame: pd.DataFrame, first: str) -> str:
        return "".join(
            f"<tr><td>{html.escape(str(r[first]))}</td><td>{r['mapped_m2'] / 1e6:,.3f}</td>"
            f"<td><strong>{r['estimated_m2'] / 1e6:,.3f}</strong> &plusmn; {r['estimated_m2_ci'] / 1e6:,.3f}</td>"
            f"<td>{r['estimated_m2_low'] / 1e6:,.3f} - {r['estimated_m2_high'] / 1e6:,.3f}</td>"
            f"<td>{_accuracy(r['users_accuracy'], r['users_accuracy_ci'])}</td>"
            f"<td>{_accuracy(r['producers_accuracy'], r['producers_accuracy_ci'])}</td>"
            f"<td>{r['overall_accuracy']:.3f} &plusmn; {r['overall_accuracy_ci']:.3f}</td>"
            f"<td>{int(acc[acc['year'] == r['year']]['points'].sum()):,}</td></tr>" for _, r in frame.iterrows())

    def head(first: str) -> str:
        return (f"<table class='t'><tr><th>{first}</th><th>mapped km&sup2;</th><th>estimated km&sup2;</th>"
                f"<th>{level} interval km&sup2;</th><th>user's accuracy</th><th>producer's accuracy</th>"
                "<th>overall accuracy</th><th>points</th></tr>")

    out = ["<h2>Accuracy and estimated village area</h2><p>From a stratified random sample of points labelled by "
           "an analyst (<code>uvsam sample</code>, <code>uvsam accuracy</code>; Olofsson et al. 2014): the mapped "
           f"area corrected for the map's errors, with its {level} confidence interval.</p>"]
    village = acc[acc["class"] == "village"]
    if len(village):
        out.append(head("year") + rows(village, "year") + "</table>")
    for period, frame in acc[acc["class"].isin(CHANGE_CLASSES)].groupby("year", sort=False):
        out.append(f"<h3>Change {html.escape(str(period).replace('-', ' → ', 1))}, estimated</h3>"
                   "<p>The sample was stratified by the change between the two maps; each change class's mapped "
                   "area beside its error-adjusted estimate.</p>"
                   + head("change class") + rows(frame.set_index("class", drop=False), "class") + "</table>")
    return "".join(out)


def _accuracy(value: float, ci: float) -> str:
    return "-" if value != value else f"{value:.2f} &plusmn; {ci:.2f}"


def spatial_sections(result: ChangeResult, tables: dict[str, pd.DataFrame], run: dict, belts=None) -> list[str]:
    """Where the villages are: a distribution map of one year with the centre's rings or the
    belts, cumulative count and area against distance, and area and count per ring and belt."""
    years = list(result.years["year"])
    out = []
    centre = tuple(run["centre"]) if run.get("centre") else None
    if centre is None and belts is None:
        return out
    year = run.get("map_year") or years[-1]
    out.append(f"<h2>Where the villages are, {html.escape(year)}</h2>"
               + distribution_map(result.villages, year, result.crs, centre, run.get("ring_km"), belts))
    if "distance" in tables:
        d = tables["distance"]
        xs = sorted(set(d["distance_km"]))
        area = {y: list(d[d["year"] == y].sort_values("distance_km")["area_km2"]) for y in years}
        count = {y: [float(c) for c in d[d["year"] == y].sort_values("distance_km")["villages"]] for y in years}
        out.append("<h2>Villages within a distance of the centre</h2><p>Cumulative: each curve at distance d "
                   "counts the villages whose centre lies within d, and the village area within d (the table "
                   "<code>distance</code>, every " f"{number(xs[0])} km).</p><div class='row'>"
                   + line_chart([0.0, *xs], {y: [0.0, *v] for y, v in area.items()}, "distance from the centre (km)",
                                "km2 within")
                   + line_chart([0.0, *xs], {y: [0.0, *v] for y, v in count.items()},
                                "distance from the centre (km)", "villages within") + "</div>")
    if "rings" in tables:
        r = tables["rings"]
        labels = [f"{a:g}-{b:g}" for a, b in r.drop_duplicates(["ring_from_km"])[["ring_from_km", "ring_to_km"]]
                  .itertuples(index=False)]
        series = {y: list(r[r["year"] == y]["area_km2"]) for y in years}
        out.append("<h2>Village area by distance from the centre (km)</h2>" + bar_chart(labels, series, "km2")
                   + _table(r))
    if "belts" in tables:
        b = tables["belts"]
        names = list(dict.fromkeys(b["belt"]))
        area = {y: [float(b[(b["year"] == y) & (b["belt"] == n)]["area_km2"].sum()) for n in names] for y in years}
        count = {y: [float(b[(b["year"] == y) & (b["belt"] == n)]["villages"].sum()) for n in names] for y in years}
        out.append("<h2>Villages per belt</h2><p>Area split exactly at the belts' edges; each village counted "
                   "in the belt holding it.</p><div class='row'>" + bar_chart(names, area, "km2")
                   + bar_chart(names, count, "villages") + "</div>" + _table(b))
    return out


def propagation_section(changes: pd.DataFrame, settings: dict) -> str:
    """What the generalist's propagated masks say of each kind of event (SAM-PT, ``--propagate``)."""
    done = changes[changes["confirmed"].notna()]
    rows = []
    for kind, frame in done.groupby("lifecycle", sort=False):
        ok = int((frame["confirmed"] == True).sum())  # noqa: E712 - a column of True/False/None
        rows.append({"lifecycle": kind, "events": len(frame), "confirmed": ok, "questioned": len(frame) - ok,
                     "median propagated IoU": round(float(frame["propagated_iou"].median()), 3)})
    weights = settings.get("weights_note", "")
    text = ("<h2>Propagation check</h2><p>Each village of the earlier year was carried into the later year's "
            "imagery (through the measured co-registration shift) as SAM-PT's points — K-medoids inside, "
            "points just outside — and redrawn there by the generalist. A demolition is <em>confirmed</em> when "
            "the generalist no longer finds the village; a persisting village when its redrawn outline agrees "
            "with the one detected (IoU at least the threshold). Questioned events deserve a look at the "
            f"imagery. {html.escape(weights)}</p>")
    if not rows:
        return text + "<p>No event had imagery of its later year: nothing was propagated.</p>"
    return text + _table(pd.DataFrame(rows))


def render(result: ChangeResult, tables: dict[str, pd.DataFrame], run: dict,
           images: dict[str, Path] | None = None, largest: int = 6, belts=None) -> str:
    """The report's HTML text (``belts``: the belts' polygons, drawn on the distribution map)."""
    years = list(result.years["year"])
    sections = [f"<h1>Urban villages: change {html.escape(years[0])} - {html.escape(years[-1])}</h1>"]
    warnings = [c["note"] for c in run.get("consistency", []) if c.get("note")]
    sections.append(summary(result, warnings, tables.get("accuracy"), tables.get("distance")))
    if warnings:  # before any figure: a radiometric change must not be read as mass demolition
        sections.append("<div class='warn' role='alert'><strong>Check before use:</strong><ul>"
                        + "".join(f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul></div>")
    counts = result.changes["lifecycle"].value_counts() if len(result.changes) else pd.Series(dtype=int)
    legend = " ".join(f'<span class="k" style="background:{c}"></span>{name} ({int(counts.get(name, 0))})'
                      for name, c in COLOURS.items())
    sections.append(f"<p class='legend'>{legend}</p>")
    sections.append("<h2>Villages per year</h2><div class='row'>"
                    + bar_chart(years, {"area": list(result.years["area_km2"])}, "km2")
                    + bar_chart(years, {"villages": [float(v) for v in result.years["villages"]]}, "villages")
                    + "</div>" + _table(result.years))
    if "accuracy" in tables:
        sections.append(accuracy_section(tables["accuracy"]))
    for y0, y1 in zip(years, years[1:], strict=False):
        pair = result.changes[(result.changes["year_from"] == y0) & (result.changes["year_to"] == y1)]
        sections.append(f"<h2>Changes {html.escape(y0)} -> {html.escape(y1)}</h2>" + change_map(pair))
    top = largest_changes(result, largest)
    if len(top):
        sections.append("<h2>Largest changes</h2>")
        if not images:
            sections.append("<p>No imagery was given (<code>--image YEAR=RASTER</code>): thumbnails omitted.</p>")
        cards = []
        v = result.villages
        for _, row in top.iterrows():
            x0, y0_, x1, y1_ = row.geometry.bounds
            m = 0.25 * max(x1 - x0, y1_ - y0_, 50.0)
            box = (x0 - m, y0_ - m, x1 + m, y1_ + m)
            pics = []
            for year, colour in ((row["year_from"], (255, 215, 0)), (row["year_to"], (0, 229, 255))):
                if images and year in images:
                    near = v[(v["year"] == year) & v.intersects(shapely.box(*box))].geometry.tolist()
                    uri = thumbnail(images[year], box, result.crs, near, colour)
                    pics.append(f"<figure><img src='{uri}' alt='{html.escape(year)}'><figcaption>{html.escape(year)}"
                                "</figcaption></figure>" if uri else f"<figure><p>{html.escape(year)}: no imagery "
                                "here</p></figure>")
            pct = "new" if row["lifecycle"] == "new" else f"{row['change_pct']:+.0f} %"
            what = f"{row['lifecycle']}: {row['uids_from'] or '-'} -> {row['uids_to'] or '-'}"
            cards.append(f"<div class='card'><h3>{html.escape(what)}</h3><p>{row['area_from_m2']:,.0f} -> "
                         f"{row['area_to_m2']:,.0f} m&sup2; ({pct})</p>{''.join(pics)}</div>")
        sections.append("<div class='cards'>" + "".join(cards) + "</div>")
    sections += spatial_sections(result, tables, run, belts)
    if "districts" in tables:
        sections.append("<h2>Districts</h2>" + _table(tables["districts"]))
    coreg = run.get("coregistration", [])
    if coreg:
        sections.append("<h2>Co-registration of the imagery</h2><p>Shift of each year's imagery against the year "
                        "before, by phase correlation agreed between overlapping windows; psr is how far the "
                        "peak stands above the correlation noise, second how close the next peak comes. A shift "
                        "is measured (reliable) only with a clear, unambiguous peak that several windows find on "
                        "their own; otherwise the images share too little unchanged ground to measure it.</p>"
                        + _table(pd.DataFrame(coreg).fillna("")))
    table_cols = ["year_from", "year_to", "lifecycle", "uids_from", "uids_to", "area_from_m2", "area_to_m2",
                  "change_pct"]
    if "confirmed" in result.changes.columns:
        sections.append(propagation_section(result.changes, run.get("propagation") or {}))
        table_cols += ["propagated_iou", "confirmed"]
    sections.append("<h2>All changes</h2>" + _table(result.changes[table_cols]))
    meta = "".join(f"<tr><th>{html.escape(str(k).replace('_', ' '))}</th><td>{html.escape(_value(v))}</td></tr>"
                   for k, v in run.items() if k != "analysis_crs")
    sections.append(f"<h2>Run</h2><table class='t'>{meta}</table>")
    style = ("body{font:14px/1.4 system-ui,sans-serif;margin:24px;max-width:1100px;color:#222}"
             ".t{border-collapse:collapse;font-size:12px}.t td,.t th{border-bottom:1px solid #ddd;padding:2px 8px;"
             "text-align:left}.k{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px}"
             ".row{display:flex;gap:16px;flex-wrap:wrap}.cards{display:flex;flex-wrap:wrap;gap:12px}"
             ".card{border:1px solid #ddd;padding:8px}.card h3{font-size:13px;margin:0}"
             "figure{display:inline-block;margin:4px}figcaption{font-size:11px;text-align:center}"
             ".warn{border:2px solid #c62828;background:#fff3f3;padding:4px 12px;margin:12px 0}"
             ".summary{border:1px solid #9e9e9e;background:#f7f7f7;padding:2px 16px;margin:12px 0}")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>uvsam change report</title>"
            f"<style>{style}</style></head><body>{''.join(sections)}</body></html>")


def write_report(path: str | Path, result: ChangeResult, tables: dict[str, pd.DataFrame], run: dict,
                 images: dict[str, Path] | None = None, belts=None) -> Path:
    """Write the report atomically."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError("report folder does not exist", path.parent)
    text = render(result, tables, run, images, belts=belts)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
