"""Property-based tests (hypothesis, issue 7): tile geometry, vectorisation and CRS round trips
hold for any input the strategies can draw, not just the cases written by hand."""

from __future__ import annotations

import numpy as np
import shapely
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyproj import CRS, Transformer

from tiles.grid import TileGrid
from uvsam.polygons import clean, measure, polygonise

PROPS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def grids(draw):
    size = draw(st.integers(1, 96))
    return TileGrid(draw(st.integers(1, 400)), draw(st.integers(1, 400)), size, draw(st.integers(0, size - 1)),
                    Affine(draw(st.sampled_from([0.5, 1.0, 3.7])), 0, 1000, 0, -1.0, 5000),
                    draw(st.integers(0, size - 1)), draw(st.sampled_from(["pad", "inside"])))


@PROPS
@given(grids())
def test_tiles_cover_every_pixel_with_the_promised_overlap(g):
    cover = np.zeros((g.height, g.width), np.int32)
    rows, cols = set(), set()
    for t in g:
        r0, c0, r1, c1 = t.bounds_px
        assert (r1 - r0, c1 - c0) == (g.size, g.size)  # every tile has the full size
        if g.edges == "inside":  # inside the scene wherever the scene is at least one tile large
            assert (r0 >= 0 and r1 <= g.height) or g.height < g.size
            assert (c0 >= 0 and c1 <= g.width) or g.width < g.size
        cover[max(r0, 0):max(min(r1, g.height), 0), max(c0, 0):max(min(c1, g.width), 0)] += 1
        rows.add(r0)
        cols.add(c0)
        assert t.transform == g.transform @ Affine.translation(c0, r0)  # the tile's own georeference
    assert cover.min() >= 1  # no pixel left out
    for starts in (sorted(rows), sorted(cols)):
        gaps = np.diff(starts)
        assert (gaps <= g.step).all() and (gaps > 0).all()  # neighbours overlap by at least `overlap`
    assert len(g) == len(rows) * len(cols)


@st.composite
def masks(draw):
    h, w = draw(st.integers(8, 64)), draw(st.integers(8, 64))
    m = np.zeros((h, w), bool)
    for _ in range(draw(st.integers(1, 6))):
        r, c = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        m[r:r + draw(st.integers(1, 30)), c:c + draw(st.integers(1, 30))] = True
    for _ in range(draw(st.integers(0, 3))):  # holes and notches
        r, c = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        m[r:r + draw(st.integers(1, 5)), c:c + draw(st.integers(1, 5))] = False
    return m


@PROPS
@given(masks(), st.sampled_from([1.0, 2.0, 0.5]))
def test_vectorising_preserves_area_within_the_simplification_tolerance(mask, pixel):
    """Polygons of a mask cover exactly its pixels; after simplification by tolerance t the area
    moves by at most t times the boundary length (each vertex moves at most t)."""
    t = Affine(pixel, 0, 500_000, 0, -pixel, 4_400_000)  # UTM 50N, metres
    polys = polygonise(mask, t)
    assert sum(p.area for p in polys) == mask.sum() * pixel**2  # (pixels touching at a corner may
    # give a ring that touches itself: `clean` makes every polygon valid)
    tol = pixel
    kept = clean(polys, "EPSG:32650", min_area_m2=0.0, simplify_m=tol)
    union = shapely.union_all(polys)
    assert all(p.is_valid for p in kept)
    assert abs(sum(p.area for p in kept) - union.area) <= tol * union.length + 1e-6


@st.composite
def places(draw):
    lat = draw(st.floats(-70, 70))
    lon = draw(st.floats(-179, 179))
    return lon, lat


@PROPS
@given(places(), st.floats(-5000, 5000), st.floats(-5000, 5000))
def test_crs_round_trips_are_exact_to_the_centimetre(place, dx, dy):
    """Geographic -> its UTM zone / Web Mercator / a local equal-area CRS and back."""
    lon, lat = place
    zone = int((lon + 180) // 6) + 1
    utm = CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)
    laea = CRS.from_proj4(f"+proj=laea +lat_0={lat} +lon_0={lon} +datum=WGS84 +units=m")
    for crs in (utm, CRS.from_epsg(3857), laea):
        fwd = Transformer.from_crs(4326, crs, always_xy=True)
        back = Transformer.from_crs(crs, 4326, always_xy=True)
        x, y = fwd.transform(lon, lat)
        x2, y2 = fwd.transform(*back.transform(x + dx, y + dy))
        assert abs(x2 - x - dx) < 1e-2 and abs(y2 - y - dy) < 1e-2


@PROPS
@given(places(), st.floats(20, 2000), st.floats(20, 2000))
def test_areas_do_not_depend_on_the_crs_they_are_given_in(place, w, h):
    """A w x h m rectangle in its UTM zone measures the same in UTM, in degrees and in Web
    Mercator (whose own units inflate areas by 1/cos^2(lat))."""
    lon, lat = place
    zone = int((lon + 180) // 6) + 1
    utm = CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)
    x, y = Transformer.from_crs(4326, utm, always_xy=True).transform(lon, lat)
    rect = shapely.box(x, y, x + w, y + h)
    ref = measure([rect], utm)[0][0]
    for crs in ("EPSG:4326", "EPSG:3857"):
        tr = Transformer.from_crs(utm, crs, always_xy=True)
        moved = shapely.transform(shapely.segmentize(rect, max(w, h) / 16),
                                  lambda xy, tr=tr: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))
        assert abs(measure([moved], crs)[0][0] - ref) <= 5e-3 * ref
