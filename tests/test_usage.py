"""A GIS analyst's first contact: every usage error of every command is one line on stderr and exit 2
(no traceback unless --debug), and `uvsam --version` answers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import run_cli

USAGE_ERRORS = [
    (["nosuch"], "No such command 'nosuch'"),
    (["predict"], "Missing option '--model'"),
    (["predict", "a.tif"], "Missing option '--model'"),
    (["predict", "a.tif", "--model"], "requires an argument"),
    (["predict", "a.tif", "--model", "m.ckpt", "--out", "v.gpkg", "--tile", "big"], "Invalid value for '--tile'"),
    (["predict", "a.tif", "--model", "m.ckpt", "--out", "v.gpkg", "--bogus", "1"], "No such option: --bogus"),
    (["predict", "a.tif", "--model", "m.ckpt", "--out", "v.gpkg", "--threshold", "x"], "'--threshold'"),
    (["train"], "Missing option '--images'"),
    (["train", "--images", "a", "--labels", "b", "--out", "c", "--epochs", "abc"], "Invalid value for '--epochs'"),
    (["train", "--images", "a", "--labels", "b", "--out", "c", "--harmonise", "yes"], "Got unexpected extra argument"),
    (["evaluate"], "Missing option '--model'"),
    (["evaluate", "--model", "m.ckpt", "--window", "1.5"], "Invalid value for '--window'"),
    (["segment"], "Missing argument 'image'"),
    (["segment", "a.tif", "--encoder", "mobile_sam"], "Missing option"),
    (["change"], "Missing argument 'years'"),
    (["change", "2018=a.gpkg", "2020=b.gpkg", "--out", "c.gpkg", "--stable-pct", "ten"], "'--stable-pct'"),
    (["run"], "Missing argument 'workflow'"),
    (["import-xyz", "tiles/"], "Missing option '--zoom'"),
    (["import-xyz", "tiles/", "--zoom", "seventeen", "--out", "o"], "Invalid value for '--zoom'"),
    (["plan-tiles"], "Missing argument 'image'"),
    (["weights", "fetch"], "Missing argument 'name'"),
    (["weights", "nosuch"], "No such command 'nosuch'"),
    (["encoders", "--repeats", "many"], "Invalid value for '--repeats'"),
    (["demo", "--local", "--out"], "requires an argument"),
]


@pytest.mark.parametrize(("args", "says"), USAGE_ERRORS, ids=[" ".join(a)[:40] for a, _ in USAGE_ERRORS])
def test_a_usage_error_is_one_line_and_exit_2(args, says, capsys):
    code, out, err = run_cli(args, capsys)
    assert code == 2, (code, err)
    assert err.count("\n") == 1 and err.startswith("uvsam: error: "), err
    assert says in err and "Traceback" not in err and out == ""
    assert "--help" in err  # it says where to read on


def test_usage_errors_from_the_installed_command_and_version():
    """Through the console entry point as a user runs it (the exit code is the process's)."""
    run = subprocess.run([sys.executable, "-m", "uvsam", "predict", "a.tif", "--tile", "big"], capture_output=True,
                         text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and run.stdout == ""
    run = subprocess.run([sys.executable, "-m", "uvsam", "--debug", "nosuch"], capture_output=True, text=True)
    assert run.returncode != 0 and "Traceback" in run.stderr  # --debug shows where it came from
    run = subprocess.run([sys.executable, "-m", "uvsam", "--version"], capture_output=True, text=True)
    from uvsam import __version__

    assert run.returncode == 0 and run.stdout.strip() == f"uvsam {__version__}"


def test_the_output_format_follows_the_extension_and_a_contradiction_is_refused(tmp_path, capsys):
    from uvsam.layers import format_for

    assert [format_for(tmp_path / f"v{suffix}") for suffix in (".gpkg", ".geojson", ".parquet", ".fgb")] == [
        "gpkg", "geojson", "parquet", "fgb"]
    assert format_for(tmp_path / "v.json", "geojson") == "geojson"  # an extension no format claims: as asked
    for out, extra, says in ((tmp_path / "v.geojson", ["--format", "gpkg"], "--format 'gpkg' but the file name ends"),
                             (tmp_path / "villages", [], "--format not given, and the extension (none)")):
        code, _, err = run_cli(["predict", tmp_path, "--model", tmp_path / "m.ckpt", "--out", out, *extra], capsys)
        assert code == 2 and err.count("\n") == 1 and says in err, err
        assert not out.exists()


def test_every_output_format_is_written_and_keeps_the_acquisition_date(villages, tmp_path):
    """GeoJSON (WGS84), GeoParquet and FlatGeobuf hold the villages with ``acquired`` a date,
    read back by GDAL / geopandas."""
    import geopandas as gpd
    import pandas as pd
    import pyogrio

    from uvsam.layers import date_column, write_vector

    v = villages.assign(acquired=date_column("2020-07-01", len(villages)))
    for fmt, suffix in (("geojson", ".geojson"), ("parquet", ".parquet"), ("fgb", ".fgb")):
        out = tmp_path / f"v{suffix}"
        write_vector(out, fmt, v)
        back = gpd.read_parquet(out) if fmt == "parquet" else pyogrio.read_dataframe(out)
        assert len(back) == len(villages) and back.crs.to_epsg() == (4326 if fmt == "geojson" else 3857), fmt
        assert (pd.to_datetime(back["acquired"]) == pd.Timestamp("2020-07-01")).all(), fmt


def test_every_command_has_help_examples_that_use_its_real_options(capsys):
    """Each command's --help ends with examples, and every option an example uses is one the
    command has (the examples cannot drift from the interface)."""
    import shlex

    import typer

    from uvsam.cli import EXAMPLES, app

    group = typer.main.get_command(app)
    names = {n for n in group.commands if n != "weights"} | {f"weights {n}" for n in group.commands["weights"].commands}
    assert names == set(EXAMPLES)
    for name, lines in EXAMPLES.items():
        parts = name.split()
        command = group.commands[parts[0]] if len(parts) == 1 else group.commands["weights"].commands[parts[1]]
        options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        for line in lines:
            words = shlex.split(line, comments=True)
            assert words[:1 + len(parts)] == ["uvsam", *parts], line
            used = {w.split("=")[0] for w in words if w.startswith("--")}
            assert used <= options, (name, used - options)
        code, out, _ = run_cli([*parts, "--help"], capsys)
        assert code == 0 and "Examples:" in out and f"$ uvsam {name}" in out, name
