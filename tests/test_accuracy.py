"""Accuracy assessment by good practice (issue 22, part 6): the estimators reproduce Olofsson et
al. (2014)'s worked example, and a sample drawn from a map with known errors (the real Beijing val
masks, eroded, with a false village) and labelled from the real masks gives the textbook
estimates, computed here independently, to 1e-9."""

from __future__ import annotations

import json
import math

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from rasterio.features import shapes

from tests.conftest import run_cli
from uvsam.changes.accuracy import estimate
from uvsam.polygons import local_equal_area


def test_the_worked_example_of_olofsson_2014():
    """Table 8 of Olofsson et al. (2014): four classes, 640 points, 10 Mha mapped; the paper's
    figures (z = 1.96): deforestation 235,086 +- 68,418 ha, overall accuracy 0.95 +- 0.02,
    deforestation user's 0.88 +- 0.07 and producer's 0.75 +- 0.21."""
    counts = np.array([[66, 0, 5, 4], [0, 55, 8, 12], [1, 0, 153, 11], [2, 1, 9, 313]])
    mapped = np.array([200_000, 150_000, 3_200_000, 6_450_000.0])
    r = estimate(counts, mapped, ["deforestation", "gain", "stable forest", "stable non-forest"], z=1.96, unit="ha")
    assert round(r.area["deforestation"].value) == 235_086 and round(r.area["deforestation"].ci) == 68_418
    assert round(r.overall.value, 2) == 0.95 and round(r.overall.ci, 2) == 0.02
    assert round(r.users["deforestation"].value, 2) == 0.88 and round(r.users["deforestation"].ci, 2) == 0.07
    assert round(r.producers["deforestation"].value, 2) == 0.75 and round(r.producers["deforestation"].ci, 2) == 0.21
    assert sum(a.value for a in r.area.values()) == pytest.approx(mapped.sum(), rel=1e-12)  # areas add up


def _truth_and_map(beijing, tmp_path):
    """The real val village polygons (truth) and a map of them with known errors: every village
    eroded by 10 m, and a false 150 m square where there is none; the map as a predict
    GeoPackage (villages and the tiles that ran)."""
    with rasterio.open(beijing / "val/masks.vrt") as ds:
        mask = ds.read(1)
        truth = [shapely.geometry.shape(g) for g, v in shapes(mask, mask=mask == 1, transform=ds.transform)]
        crs, bounds = ds.crs, ds.bounds
    truth = gpd.GeoSeries(truth, crs=crs)
    eq = local_equal_area(list(truth), crs)
    t_eq = truth.to_crs(eq)
    eroded = t_eq.buffer(-10).explode(index_parts=False)
    eroded = eroded[~eroded.is_empty]
    extent = gpd.GeoSeries([shapely.box(*bounds)], crs=crs).to_crs(eq).iloc[0]
    free = extent.difference(shapely.union_all(t_eq.values).buffer(20))
    c = free.representative_point()
    false = shapely.box(c.x - 75, c.y - 75, c.x + 75, c.y + 75).intersection(free)
    mapped = gpd.GeoDataFrame({"village_id": range(len(eroded) + 1)},
                              geometry=list(eroded.values) + [false], crs=eq).to_crs(crs)
    path = tmp_path / "map.gpkg"
    pyogrio.write_dataframe(mapped, path, layer="villages")
    pyogrio.write_dataframe(gpd.GeoDataFrame({"status": ["done"]}, geometry=[shapely.box(*bounds)], crs=crs), path,
                            layer="tiles")
    return truth, mapped, extent, eq, path


def test_a_sample_labelled_from_the_real_masks_gives_the_textbook_estimates(beijing, tmp_path, capsys):
    truth, mapped, extent, eq, path = _truth_and_map(beijing, tmp_path)
    sample_file = tmp_path / "sample.gpkg"
    code, stdout, err = run_cli(["sample", path, "--out", sample_file, "--n", "160", "--min-per-stratum", "60",
                                 "--seed", "7"], capsys)
    assert code == 0, err
    sample = pyogrio.read_dataframe(sample_file, layer="sample")
    strata = pyogrio.read_dataframe(sample_file, layer="strata", read_geometry=False)
    assert len(sample) == 160 and sample["reference"].isna().all()
    assert dict(sample["stratum"].value_counts()) == {"not village": 100, "village": 60}
    # every point lies in its stratum
    in_map = shapely.union_all(mapped.geometry.values)
    inside = shapely.contains(in_map, sample.to_crs(mapped.crs).geometry.values)
    assert (inside == (sample["stratum"] == "village")).all()
    # unlabelled: refused in one line
    code, _, err = run_cli(["accuracy", sample_file], capsys)
    assert code == 2 and err.count("\n") == 1 and "160 of 160 points have no reference label" in err

    # the analyst: each point labelled from the real masks
    real = shapely.union_all(truth.geometry.values if hasattr(truth, "geometry") else truth.values)
    pts = sample.to_crs(truth.crs).geometry.values
    sample["reference"] = np.where(shapely.contains(real, pts), "village", "not village")
    pyogrio.write_dataframe(sample, sample_file, layer="sample")
    code, stdout, err = run_cli(["accuracy", sample_file], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    by_class = {row["class"]: row for row in result["classes_detail"]}

    # the textbook estimators, written out for two classes (0 village, 1 not village)
    a = strata.set_index("stratum").loc[["village", "not village"], "area_m2"].to_numpy(float)
    m_eq = mapped.to_crs(eq)
    assert a[0] == pytest.approx(shapely.union_all(m_eq.geometry.values).intersection(extent).area, rel=1e-6)
    assert a.sum() == pytest.approx(extent.area, rel=1e-6)
    n = np.zeros((2, 2))
    for m_cls, r_cls in zip(sample["map_class"], sample["reference"], strict=True):
        n[0 if m_cls == "village" else 1, 0 if r_cls == "village" else 1] += 1
    w = a / a.sum()
    ni = n.sum(1)
    p = w[:, None] * n / ni[:, None]
    z = 1.959963984540054
    overall = p[0, 0] + p[1, 1]
    se_overall = math.sqrt(sum(w[i] ** 2 * (n[i, i] / ni[i]) * (1 - n[i, i] / ni[i]) / (ni[i] - 1) for i in range(2)))
    assert result["overall_accuracy"]["value"] == pytest.approx(overall, abs=1e-9)
    assert result["overall_accuracy"]["ci"] == pytest.approx(z * se_overall, abs=1e-9)
    for j, name in enumerate(["village", "not village"]):
        pj = p[0, j] + p[1, j]
        se = math.sqrt(sum(w[i] ** 2 * (n[i, j] / ni[i]) * (1 - n[i, j] / ni[i]) / (ni[i] - 1) for i in range(2)))
        row = by_class[name]
        assert row["estimated_m2"] == pytest.approx(a.sum() * pj, abs=1e-9 * a.sum())
        assert row["estimated_m2_ci"] == pytest.approx(z * a.sum() * se, abs=1e-9 * a.sum())
        u = n[j, j] / ni[j]
        assert row["users_accuracy"] == pytest.approx(u, abs=1e-9)
        assert row["users_accuracy_ci"] == pytest.approx(z * math.sqrt(u * (1 - u) / (ni[j] - 1)), abs=1e-9)
        prod = p[j, j] / pj
        k = 1 - j  # eq. 7 with two classes: the other row is the only i != j
        var = (a[j] ** 2 * (1 - prod) ** 2 * u * (1 - u) / (ni[j] - 1)
               + prod ** 2 * a[k] ** 2 * (n[k, j] / ni[k]) * (1 - n[k, j] / ni[k]) / (ni[k] - 1)) / (
            a[0] * n[0, j] / ni[0] + a[1] * n[1, j] / ni[1]) ** 2
        assert row["producers_accuracy"] == pytest.approx(prod, abs=1e-9)
        assert row["producers_accuracy_ci"] == pytest.approx(z * math.sqrt(var), abs=1e-9)
    # the eroded map under-states the villages; the estimate corrects towards the truth
    true_area = shapely.union_all(truth.to_crs(eq).values).intersection(extent).area
    assert a[0] < true_area and abs(by_class["village"]["estimated_m2"] - true_area) < true_area - a[0]


def test_the_change_report_shows_estimated_areas_beside_mapped_ones(beijing, tmp_path, capsys):
    truth, mapped, extent, eq, path = _truth_and_map(beijing, tmp_path)
    sample_file = tmp_path / "sample.gpkg"
    code, _, err = run_cli(["sample", f"{path}:villages", "--out", sample_file, "--n", "120", "--seed", "3"], capsys)
    assert code == 0, err
    sample = pyogrio.read_dataframe(sample_file, layer="sample")
    real = shapely.union_all(truth.values)
    sample["reference"] = np.where(shapely.contains(real, sample.to_crs(truth.crs).geometry.values), "village",
                                   "not village")
    pyogrio.write_dataframe(sample, sample_file, layer="sample")
    report = tmp_path / "report.html"
    code, _, err = run_cli(["change", f"2018={path}:villages", f"2020={path}:villages", "--out", tmp_path / "c.gpkg",
                            "--report", report, "--accuracy", f"2020={sample_file}"], capsys)
    assert code == 0, err
    table = pyogrio.read_dataframe(tmp_path / "c.gpkg", layer="accuracy", read_geometry=False)
    row = table[(table["year"] == "2020") & (table["class"] == "village")].iloc[0]
    text = report.read_text()
    assert "Accuracy and estimated village area" in text
    assert f"<strong>{row['estimated_m2'] / 1e6:,.3f}</strong> &plusmn; {row['estimated_m2_ci'] / 1e6:,.3f}" in text
    summary = text[text.index("id='summary'"):text.index("</section>")]
    assert "Estimated village area 2020" in summary
    code, _, err = run_cli(["change", f"2018={path}:villages", f"2020={path}:villages", "--out", tmp_path / "d.gpkg",
                            "--accuracy", f"2019={sample_file}"], capsys)
    assert code == 2 and "--accuracy" in err and "2019" in err and not (tmp_path / "d.gpkg").exists()


def test_a_change_sample_is_stratified_by_the_change_classes(beijing, tmp_path, capsys):
    """``uvsam sample EARLIER --later LATER``: strata are the change classes (village both years,
    lost, gained, neither); points labelled from a known true change give Olofsson's estimators
    for four classes to 1e-9 (written out here for any number of classes)."""
    truth, mapped, extent, eq, later = _truth_and_map(beijing, tmp_path)
    earlier = tmp_path / "earlier.gpkg"  # the earlier map: the real villages themselves
    pyogrio.write_dataframe(gpd.GeoDataFrame({"village_id": range(len(truth))}, geometry=truth.values,
                                             crs=truth.crs), earlier, layer="villages")
    bounds = truth.to_crs(mapped.crs).total_bounds
    pyogrio.write_dataframe(gpd.GeoDataFrame({"status": ["done"]}, geometry=[shapely.box(*bounds).buffer(500)],
                                             crs=mapped.crs), earlier, layer="tiles")
    sample_file = tmp_path / "change_sample.gpkg"
    code, stdout, err = run_cli(["sample", earlier, "--later", later, "--out", sample_file, "--n", "240",
                                 "--min-per-stratum", "40", "--seed", "3"], capsys)
    assert code == 0, err
    classes = ["village both years", "village lost", "village gained", "no village either year"]
    assert json.loads(stdout)["classes"] == classes
    sample = pyogrio.read_dataframe(sample_file, layer="sample")
    strata = pyogrio.read_dataframe(sample_file, layer="strata", read_geometry=False)
    assert set(sample["stratum"]) == set(classes) and (sample["stratum"].value_counts() >= 40).all()
    first = shapely.union_all(truth.to_crs(eq).values)
    second = shapely.union_all(mapped.to_crs(eq).geometry.values)
    pts = sample.to_crs(eq).geometry.values
    in1, in2 = shapely.contains(first, pts), shapely.contains(second, pts)
    where = np.select([in1 & in2, in1 & ~in2, ~in1 & in2], classes[:3], classes[3])
    assert (where == sample["stratum"].to_numpy()).all()  # every point lies in its stratum
    qml = pyogrio.read_dataframe(sample_file, layer="layer_styles", read_geometry=False)["styleQML"].iloc[0]
    assert all(f'value="{c}"' in qml for c in classes)  # the drop-down offers the change classes

    # the true change: the first village really demolished, nothing else changed
    demolished = truth.to_crs(eq).iloc[0]
    t1, t2 = first, first.difference(demolished)
    r1, r2 = shapely.contains(t1, pts), shapely.contains(t2, pts)
    sample["reference"] = np.select([r1 & r2, r1 & ~r2, ~r1 & r2], classes[:3], classes[3])
    pyogrio.write_dataframe(sample, sample_file, layer="sample")
    code, stdout, err = run_cli(["accuracy", sample_file], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    by_class = {row["class"]: row for row in result["classes_detail"]}
    a = strata.set_index("stratum").loc[classes, "area_m2"].to_numpy(float)
    q = len(classes)
    n = np.zeros((q, q))
    for m_cls, r_cls in zip(sample["map_class"], sample["reference"], strict=True):
        n[classes.index(m_cls), classes.index(r_cls)] += 1
    w, ni = a / a.sum(), n.sum(1)
    p = w[:, None] * n / ni[:, None]
    z = 1.959963984540054
    assert result["overall_accuracy"]["value"] == pytest.approx(np.trace(p), abs=1e-9)
    for j, name in enumerate(classes):
        se = math.sqrt(sum(w[i] ** 2 * (n[i, j] / ni[i]) * (1 - n[i, j] / ni[i]) / (ni[i] - 1) for i in range(q)))
        assert by_class[name]["estimated_m2"] == pytest.approx(a.sum() * p[:, j].sum(), abs=1e-9 * a.sum())
        assert by_class[name]["estimated_m2_ci"] == pytest.approx(z * a.sum() * se, abs=1e-9 * a.sum())
        assert by_class[name]["users_accuracy"] == pytest.approx(n[j, j] / ni[j], abs=1e-9)
    # the map's gained square is no real gain: its user's accuracy is 0 and the estimate moves the lost area up
    assert by_class["village gained"]["users_accuracy"] == 0
    assert by_class["village lost"]["estimated_m2"] > by_class["village lost"]["mapped_m2"]
    # the change report shows the change classes' estimates beside their mapped areas
    report = tmp_path / "report.html"
    years = [f"2018={earlier}:villages", f"2020={later}:villages"]
    code, _, err = run_cli(["change", *years, "--out", tmp_path / "c.gpkg", "--report", report,
                            "--accuracy", f"2018-2020={sample_file}"], capsys)
    assert code == 0, err
    table = pyogrio.read_dataframe(tmp_path / "c.gpkg", layer="accuracy", read_geometry=False)
    lost = table[(table["year"] == "2018-2020") & (table["class"] == "village lost")].iloc[0]
    assert lost["estimated_m2"] == pytest.approx(by_class["village lost"]["estimated_m2"], rel=1e-12)
    text = report.read_text()
    assert "Change 2018 → 2020, estimated" in text
    assert f"<strong>{lost['estimated_m2'] / 1e6:,.3f}</strong> &plusmn; {lost['estimated_m2_ci'] / 1e6:,.3f}" in text
    summary = text[text.index("id='summary'"):text.index("</section>")]
    assert "Estimated lost village area 2018 → 2020" in summary
    code, _, err = run_cli(["change", *years, "--out", tmp_path / "d.gpkg", "--accuracy", f"2020={sample_file}"],
                           capsys)
    assert code == 2 and f"{sample_file}: is a sample of the change" in err and err.count("\n") == 1
    assert not (tmp_path / "d.gpkg").exists()
