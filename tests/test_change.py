"""Multi-year change (issue 6): lifecycles with known answers built from the real Beijing
village masks, persistent ids through a split and a merge, areas that add up, the same
changes whatever CRS the years come in, and summaries by district and distance ring."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import shapely
from PIL import Image

from tests.conftest import run_cli
from uvsam.changes import ChangeConfig, YearLayer, by_district, by_ring, track


def _years(v: gpd.GeoDataFrame) -> list[YearLayer]:
    """2018: the five real villages. 2020: the largest split in two by a 40 m corridor, the second
    demolished, the third shrunk and the fourth grown by 30 m (on the ground), the fifth unchanged,
    and a new village (the demolished one's outline moved 3 km east). 2022: the two pieces merged
    back into one, everything else as in 2020."""
    utm = v.estimate_utm_crs()
    g = list(v.to_crs(utm).geometry)
    big = g[0]
    c = big.centroid
    corridor = shapely.box(c.x - 20, big.bounds[1] - 1, c.x + 20, big.bounds[3] + 1)
    pieces = list(shapely.get_parts(big.difference(corridor)))
    pieces = sorted(pieces, key=lambda p: -p.area)[:2]
    new = shapely.affinity.translate(g[1], 3000, 0)
    y2020 = [*pieces, g[2].buffer(-30), g[3].buffer(30), g[4], new]
    y2022 = [shapely.union_all(pieces).buffer(25).buffer(-25), g[2].buffer(-30), g[3].buffer(30), g[4], new]

    def layer(year, geoms):
        return YearLayer(year, f"test:{year}", gpd.GeoDataFrame(geometry=geoms, crs=utm).to_crs(v.crs))

    return [layer("2018", g), layer("2020", y2020), layer("2022", y2022)]


def _write_years(villages, path, n: int = 3):
    """The first ``n`` years as layers villages_YEAR of one GeoPackage."""
    for y in _years(villages)[:n]:
        pyogrio.write_dataframe(y.villages, path, layer=f"villages_{y.year}")
    return path


def _events(result, year_from):
    ch = result.changes[result.changes["year_from"] == year_from]
    return sorted(zip(ch["lifecycle"], ch["uids_from"], ch["uids_to"], strict=True))


def test_every_lifecycle_is_classified_with_persistent_ids(villages):
    result = track(_years(villages))
    first = result.villages[result.villages["year"] == "2018"].reset_index(drop=True)
    uid = dict(zip(range(5), first["village_uid"], strict=True))  # in the fixture's (area) order
    assert sorted(uid.values()) == ["V0001", "V0002", "V0003", "V0004", "V0005"]
    e = _events(result, "2018")
    assert ("split", uid[0], f"{uid[0]},{uid[0]}.2") in e  # the larger piece keeps the id
    assert ("demolished", uid[1], "") in e
    assert ("shrunk", uid[2], uid[2]) in e
    assert ("expanded", uid[3], uid[3]) in e
    assert ("stable", uid[4], uid[4]) in e
    assert ("new", "", "V0006") in e and len(e) == 6
    e2 = _events(result, "2020")
    assert ("merged", f"{uid[0]},{uid[0]}.2", uid[0]) in e2  # merged back under the original id
    assert sorted(x[0] for x in e2) == ["merged", "stable", "stable", "stable", "stable"]
    assert {lc for lc, *_ in e + e2} == {"new", "demolished", "stable", "expanded", "shrunk", "split", "merged"}


def test_areas_add_up(villages):
    result = track(_years(villages))
    v, ch = result.villages, result.changes
    for year, total in zip(result.years["year"], result.years["area_km2"], strict=True):
        assert v.loc[v["year"] == year, "area_m2"].sum() / 1e6 == pytest.approx(total, rel=1e-6)
    for (y0, y1), events in ch.groupby(["year_from", "year_to"]):
        assert events["area_from_m2"].sum() == pytest.approx(v.loc[v["year"] == y0, "area_m2"].sum(), abs=1)
        assert events["area_to_m2"].sum() == pytest.approx(v.loc[v["year"] == y1, "area_m2"].sum(), abs=1)
    grown = ch[(ch["lifecycle"] == "expanded")].iloc[0]
    assert grown["change_m2"] == pytest.approx(grown["area_to_m2"] - grown["area_from_m2"], abs=0.2)
    assert grown["change_pct"] > 10
    # ground areas, not Web Mercator's inflated ones (about 1.7x at Beijing's latitude)
    src = _years(villages)[0].villages
    assert v.loc[v["year"] == "2018", "area_m2"].sum() == pytest.approx(
        src.to_crs(src.estimate_utm_crs()).area.sum(), rel=2e-3)


def test_events_under_the_minimum_mapping_unit_are_not_reported(villages):
    years = _years(villages)
    every = track(years)
    first = every.changes[every.changes["year_from"] == "2018"]
    unit = float(np.median(first["area_from_m2"][first["area_from_m2"] > 0]))  # half the events are smaller
    mapped = track(years, ChangeConfig(min_area_m2=unit)).changes
    kept = every.changes[[max(a, b) >= unit for a, b in zip(every.changes["area_from_m2"], every.changes["area_to_m2"],
                                                          strict=True)]]
    assert 0 < len(mapped) < len(every.changes)
    assert sorted(zip(mapped["year_from"], mapped["lifecycle"], mapped["uids_from"], strict=True)) == sorted(
        zip(kept["year_from"], kept["lifecycle"], kept["uids_from"], strict=True))
    assert len(track(years, ChangeConfig(min_area_m2=unit)).villages) == len(every.villages)  # all still tracked


def test_the_same_layers_in_another_crs_give_the_same_changes(villages):
    years = _years(villages)
    a = track(years)
    b = track([YearLayer(y.year, y.source, y.villages.to_crs(4326)) for y in years])
    cols = ["year_from", "year_to", "lifecycle", "uids_from", "uids_to", "n_from", "n_to"]
    assert a.changes[cols].equals(b.changes[cols])
    np.testing.assert_allclose(a.changes["area_to_m2"], b.changes["area_to_m2"], rtol=1e-5)
    assert list(a.villages["village_uid"]) == list(b.villages["village_uid"])


def test_districts_and_rings_split_areas_exactly(villages):
    result = track(_years(villages))
    v = result.villages
    x0, y0, x1, y1 = v.to_crs(3857).total_bounds
    xm = (x0 + x1) / 2
    districts = gpd.GeoDataFrame({"name": ["west", "east"]},
                                 geometry=[shapely.box(x0 - 10, y0 - 10, xm, y1 + 10),
                                           shapely.box(xm, y0 - 10, x1 + 10, y1 + 10)], crs=3857)
    d = by_district(v, districts)
    lon, lat = gpd.GeoSeries([shapely.Point(xm, (y0 + y1) / 2)], crs=3857).to_crs(4326).iloc[0].coords[0]
    r = by_ring(v, (lon, lat), 2.0)
    for year, total in zip(result.years["year"], result.years["area_km2"], strict=True):
        assert d.loc[d["year"] == year, "area_km2"].sum() == pytest.approx(total, rel=1e-4)
        assert r.loc[r["year"] == year, "area_km2"].sum() == pytest.approx(total, rel=1e-4)
    assert set(d["district"]) == {"west", "east"} and (r["ring_to_km"] - r["ring_from_km"] == 2.0).all()


def _ring_roads(centre, radii_m, path, drop: int | None = None):
    """Ring roads around ``centre`` (lon, lat) as a road layer has them: each ring four line
    segments (the last one, ``drop``, missing when asked), in WGS 84."""
    from uvsam.changes.summaries import equidistant_crs

    lines, names = [], []
    for k, radius in enumerate(radii_m):
        coords = np.asarray(shapely.Point(0, 0).buffer(radius, 256).exterior.coords)
        q = (len(coords) - 1) // 4
        for part in range(4):
            if k == drop and part == 3:
                continue
            lines.append(shapely.LineString(coords[part * q:(part + 1) * q + 1]))
            names.append(f"ring {k + 2}")
    roads = gpd.GeoDataFrame({"name": names, "lanes": 4}, geometry=lines, crs=equidistant_crs(centre)).to_crs(4326)
    pyogrio.write_dataframe(roads, path)
    return path


def test_cumulative_curves_and_belts_add_up(villages, tmp_path):
    """The paper's spatial analyses: the cumulative area at d equals the rings' areas summed out to
    d (the same circles, drawn independently), the curves never fall and end at each year's totals;
    ring roads given as line segments close into nested belts whose areas and counts add up to the
    totals and match the cumulative curve at the roads' radii."""
    from uvsam.changes import belts_from, by_belt, by_distance, by_ring
    from uvsam.changes.sources import read_belts

    result = track(_years(villages))
    v, totals = result.villages, result.years.set_index("year")
    centre = v.to_crs(4326).geometry.iloc[0].centroid.coords[0]
    d, r = by_distance(v, centre, 0.5), by_ring(v, centre, 2.0)
    for year, curve in d.groupby("year"):
        assert curve["area_km2"].is_monotonic_increasing and curve["villages"].is_monotonic_increasing
        assert curve["area_km2"].iloc[-1] == pytest.approx(totals.loc[year, "area_km2"], rel=1e-6)
        assert curve["villages"].iloc[-1] == totals.loc[year, "villages"] and curve["area_pct"].iloc[-1] == 100
        rings = r[r["year"] == year].set_index("ring_to_km")["area_km2"].cumsum()
        at = curve.set_index("distance_km")["area_km2"]
        for km in rings.index[rings.index <= at.index.max()]:
            assert at[km] == pytest.approx(rings[km], abs=1e-5)  # km2, both rounded to 1e-6 per row
    roads = read_belts(str(_ring_roads(centre, [1000, 4000, 12000], tmp_path / "roads.gpkg")))
    belts = belts_from(roads, "name")
    assert list(belts["name"]) == ["within ring 2", "ring 2 - ring 3", "ring 3 - ring 4"]
    b = by_belt(v, belts)
    assert b["belt"].iloc[-1] == "beyond ring 4"
    for year, rows in b.groupby("year"):
        assert rows["area_km2"].sum() == pytest.approx(totals.loc[year, "area_km2"], rel=1e-6)
        assert rows["villages"].sum() == totals.loc[year, "villages"]
        at = d[d["year"] == year].set_index("distance_km")["area_km2"]
        assert rows["area_km2"].iloc[0] == pytest.approx(at[1.0], rel=1e-3)  # within the 1 km ring road
    assert b[b["year"] == "2018"]["villages"].iloc[0] >= 1  # the centre's village is in the first belt
    with pytest.raises(Exception, match="roads2.gpkg: belt 'ring 3': its lines enclose no area"):
        belts_from(read_belts(str(_ring_roads(centre, [1000, 4000], tmp_path / "roads2.gpkg", drop=1))), "name",
                   str(tmp_path / "roads2.gpkg"))


def test_change_command_writes_layers_tables_and_csv(villages, tmp_path, capsys):
    src = _write_years(villages, tmp_path / "years.gpkg")
    out = tmp_path / "changes.gpkg"
    args = ["change", *(f"{y}={src}:villages_{y}" for y in ("2018", "2020", "2022")), "--out", out,
            "--centre", "116.6,39.9", "--ring-km", "5"]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    layers = {n for n, _ in pyogrio.list_layers(out)}
    assert {"changes", "villages_tracked", "years", "rings", "distance", "runs"} <= layers
    assert (tmp_path / "changes_years.csv").read_text().startswith("year,villages,area_km2")
    assert (tmp_path / "changes_changes.csv").is_file() and (tmp_path / "changes_rings.csv").is_file()
    ch = pyogrio.read_dataframe(out, layer="changes")
    assert set(ch["lifecycle"]) == {"new", "demolished", "stable", "expanded", "shrunk", "split", "merged"}
    assert '"split": 1' in stdout and '"merged": 1' in stdout


def test_years_without_any_village_give_an_empty_analysis(villages, tmp_path, capsys):
    """A district with no villages in either year is an answer, not an error: empty changes in
    the layers' own projected CRS. Geographic layers give no CRS to measure in: one line."""
    empty = villages.iloc[:0]
    src = tmp_path / "empty.gpkg"
    for year in ("2018", "2020"):
        pyogrio.write_dataframe(empty, src, layer=f"villages_{year}", driver="GPKG")
    code, stdout, err = run_cli(["change", f"2018={src}:villages_2018", f"2020={src}:villages_2020", "--out",
                                 tmp_path / "c.gpkg", "--report", tmp_path / "r.html"], capsys)
    assert code == 0, err
    assert len(pyogrio.read_dataframe(tmp_path / "c.gpkg", layer="changes")) == 0
    assert pyogrio.read_info(tmp_path / "c.gpkg", layer="changes")["crs"] == f"EPSG:{villages.crs.to_epsg()}"
    years = pyogrio.read_dataframe(tmp_path / "c.gpkg", layer="years")
    assert list(years["villages"]) == [0, 0] and (tmp_path / "r.html").is_file()
    geo = tmp_path / "geo.gpkg"
    for year in ("2018", "2020"):
        pyogrio.write_dataframe(empty.to_crs(4326), geo, layer=f"v{year}", driver="GPKG")
    code, _, err = run_cli(["change", f"2018={geo}:v2018", f"2020={geo}:v2020", "--out", tmp_path / "g.gpkg"], capsys)
    assert code == 2 and "pass --analysis-crs" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g.gpkg").exists()


@pytest.mark.parametrize("args,expected", [
    (["2018=nowhere.gpkg:y"], "nowhere.gpkg: file does not exist"),
    (["2018"], "give YEAR=FILE"),
    (["2018={src}:villages_2018", "2018={src}:villages_2020"], "year labels repeat"),
    (["2018={src}:villages_2018"], "at least two years"),
    (["2018={src}:nope", "2020={src}:villages_2020"], "has no layer 'nope'"),
    (["2018={src}", "2020={src}:villages_2020"], "name one as"),
    (["2018={src}:villages_2018", "2020={src}:villages_2020", "--belts", "{src}:villages_2018", "--belt-field", "x"],
     "belts have no field 'x'"),
    (["2018={src}:villages_2018", "2020={src}:villages_2020", "--map-year", "2019"], "--map-year '2019' is not one"),
    (["2018={src}:villages_2018", "2020={src}:villages_2020", "--centre", "116,40", "--step-km", "0"],
     "--step-km must be a positive"),
])
def test_bad_change_inputs_are_refused_in_one_line(villages, tmp_path, capsys, args, expected):
    src = _write_years(villages, tmp_path / "years.gpkg", 2)
    out = tmp_path / "c.gpkg"
    code, _, err = run_cli(["change", *(a.format(src=src) for a in args), "--out", out], capsys)
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert not out.exists()


def test_change_config_is_validated():
    with pytest.raises(Exception, match="geographic"):
        ChangeConfig(crs="EPSG:4326")
    with pytest.raises(Exception, match="min_overlap"):
        ChangeConfig(min_overlap=0)


@pytest.fixture(scope="module")
def report(villages, beijing, tmp_path_factory):
    """`uvsam change --report` over the three years, with the real imagery for thumbnails."""
    from uvsam.cli import main

    tmp = tmp_path_factory.mktemp("report")
    src = _write_years(villages, tmp / "years.gpkg")
    out = tmp / "report.html"
    imagery = [f"--image={y}={beijing / 'train/images.vrt'}" for y in ("2018", "2020", "2022")]
    assert main(["change", *(f"{y}={src}:villages_{y}" for y in ("2018", "2020", "2022")), "--out",
                 str(tmp / "c.gpkg"), "--report", str(out), "--centre", "116.6,39.9", *imagery]) == 0
    return out


def test_report_is_self_contained_with_maps_charts_and_thumbnails(report):
    """The HTML report needs nothing from the network; its thumbnails show the real imagery."""
    import base64
    import io
    import re

    text = report.read_text()
    assert "<svg" in text and text.count("<h2>Changes") == 2 and "Largest changes" in text
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", text)  # nothing fetched when viewed
    uris = re.findall(r"src='data:image/png;base64,([^']+)'", text)
    assert len(uris) >= 4  # before/after pairs where the imagery covers the change
    for uri in uris:
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri))).convert("RGB"))
        assert img.std() > 10  # real imagery, not a blank square


def test_coregistration_shift_is_measured_in_metres_and_warned_about(villages, beijing, tmp_path, capsys):
    """The 2020 imagery is a real Beijing tile georeferenced 6 m east and 4 m south of the truth:
    the shift is measured within half a metre and reported as a warning."""
    import rasterio
    from affine import Affine

    from uvsam.coregister import estimate_shift

    tile = beijing / "train/images/49566_107866.tif"
    shifted = tmp_path / "shifted.tif"
    with rasterio.open(tile) as ds:
        k = 1 / np.cos(np.radians(39.95))  # Web Mercator metres per ground metre at Beijing
        profile = dict(ds.profile, transform=Affine.translation(6 * k, -4 * k) @ ds.transform)
        with rasterio.open(shifted, "w", **profile) as out:
            out.write(ds.read())
    shift = estimate_shift(tile, shifted, "+proj=laea +lat_0=39.9 +lon_0=116.4 +datum=WGS84 +units=m")
    assert shift.east_m == pytest.approx(6, abs=0.5) and shift.north_m == pytest.approx(-4, abs=0.5)
    same = estimate_shift(tile, beijing / "train/images/49566_107868.tif", "EPSG:32650")  # overlapping tiles
    assert same.metres < 0.5

    src = _write_years(villages, tmp_path / "years.gpkg", 2)
    code, stdout, err = run_cli(["change", f"2018={src}:villages_2018", f"2020={src}:villages_2020", "--out",
                                 tmp_path / "c.gpkg", "--image", f"2018={tile}", "--image", f"2020={shifted}"], capsys)
    assert code == 0, err
    assert "warning: the 2020 imagery is shifted 7." in err
    assert '"warning": true' in stdout


def test_report_reads_as_a_summary_first_with_plain_numbers(report):
    """What a decision maker reads first is the summary (before any chart or table); figures have
    thousands separators and no exponent; no "nan"; the run is a table of words, not JSON."""
    import re

    text = re.sub(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+", "", report.read_text())  # the thumbnails' bytes
    headings = re.findall(r"<h2>(.*?)</h2>", text)
    assert headings[0] == "Summary"
    summary = text[text.index("id='summary'"):text.index("</section>")]
    assert "villages covering" in summary and "km&sup2;" in summary and "Largest change" in summary
    assert not re.search(r"\d\.\d+e[+-]\d", text)  # no 3.251e+05
    assert not re.search(r"\bnan\b", text.lower())
    run = text[text.index("<h2>Run</h2>"):]
    assert "{" not in run and "<th>uvsam version</th>" in run


def test_change_pct_is_defined_for_new_villages(villages):
    result = track(_years(villages))
    new = result.changes[result.changes["lifecycle"] == "new"]
    assert len(new) and (new["change_pct"] == 100.0).all()
    assert result.changes["change_pct"].notna().all()


def test_no_chart_text_overlaps_in_the_rendered_report(villages, beijing, tmp_path, capsys):
    """Opened in headless Chromium, with rings 250 m wide (many long labels) and ring-road belts:
    the summary is the first section, the spatial analyses are there, and no two texts of any
    chart or map overlap on screen (each text's box through its own rotation, as drawn)."""
    from tests.browser import render

    src = _write_years(villages, tmp_path / "years.gpkg")
    report = tmp_path / "report.html"
    centre = villages.to_crs(4326).geometry.iloc[0].centroid.coords[0]
    roads = _ring_roads(centre, [1000, 4000, 12000], tmp_path / "roads.gpkg")
    code, _, err = run_cli(["change", *(f"{y}={src}:villages_{y}" for y in ("2018", "2020", "2022")), "--out",
                            tmp_path / "c.gpkg", "--report", report, "--centre", "{},{}".format(*centre),
                            "--ring-km", "0.25", "--belts", roads, "--map-year", "2020"], capsys)
    assert code == 0, err
    page = render(report)
    assert page.headings[0] == "Summary" and not page.errors
    assert {"Where the villages are, 2020", "Villages within a distance of the centre", "Villages per belt"} <= set(
        page.headings)
    texts = 0
    for svg in page.svg_texts:
        boxes = [(s, shapely.Polygon(c)) for s, c in svg if s.strip()]
        texts += len(boxes)
        for i, (a, pa) in enumerate(boxes):
            for b, pb in boxes[i + 1:]:
                assert pa.intersection(pb).area < 1.0, (a, b)  # px2: touching, never overlapping
    assert texts > 40  # the charts' ticks and labels were all looked at


def test_crowded_chart_labels_are_slanted_not_overlapping():
    from uvsam.changes.report import bar_chart

    few = bar_chart(["2018", "2020"], {"area": [1.0, 2.0]}, "km2")
    many = bar_chart([f"{a}-{a + 2} km" for a in range(0, 40, 2)], {"area": [1.0] * 20}, "km2")
    assert "rotate(" not in few and many.count("rotate(-40") == 20


def test_report_renders_in_headless_chromium(report):
    """Opened in a real browser: it renders, every image loads, no console errors, the page is not blank."""
    from tests.browser import render

    page = render(report)
    assert not page.errors, page.errors
    assert page.network == []  # nothing from the network
    assert len(page.images) >= 4 and all(done and width > 0 for done, width in page.images)
    assert len(page.svg_widths) >= 4 and min(page.svg_widths) > 100
    assert page.screenshot.std() > 20 and (page.screenshot < 128).mean() > 0.02  # ink, not a blank screen


def test_change_layers_are_written_in_a_crs_with_an_authority_code(villages, tmp_path, capsys):
    """Years in different CRSs (one of them a custom equal-area projection QGIS calls "unknown")
    give layers in the area's UTM zone (Beijing: EPSG:32650), areas unchanged; --crs chooses;
    a --crs that is not one is refused in one line before any work."""
    src = tmp_path / "years.gpkg"
    years = _years(villages)[:2]
    laea = "+proj=laea +lat_0=40 +lon_0=116.3 +datum=WGS84 +units=m +no_defs"
    pyogrio.write_dataframe(years[0].villages.to_crs(laea), src, layer="v2018")
    pyogrio.write_dataframe(years[1].villages.to_crs(4326), src, layer="v2020")
    specs = [f"2018={src}:v2018", f"2020={src}:v2020"]
    code, _, err = run_cli(["change", *specs, "--out", tmp_path / "c.gpkg"], capsys)
    assert code == 0, err
    changes = pyogrio.read_dataframe(tmp_path / "c.gpkg", layer="changes")
    assert pyogrio.read_info(tmp_path / "c.gpkg", layer="changes")["crs"] == "EPSG:32650"
    reference = track(years)
    assert changes["area_from_m2"].sum() == pytest.approx(reference.changes["area_from_m2"].sum(), rel=1e-6)
    code, _, err = run_cli(["change", *specs, "--out", tmp_path / "w.gpkg", "--crs", "EPSG:4326"], capsys)
    assert code == 0 and pyogrio.read_info(tmp_path / "w.gpkg", layer="changes")["crs"] == "EPSG:4326"
    code, _, err = run_cli(["change", *specs, "--out", tmp_path / "x.gpkg", "--crs", "EPSG:99999"], capsys)
    assert code == 2 and "--crs" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.gpkg").exists()
