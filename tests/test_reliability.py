"""Bad inputs through every command they can reach (issue 7).

Every bad input must give exit code 2, one line on stderr that names the file, no traceback,
and leave the output folder exactly as it was (an existing output byte for byte). Unusual but
valid inputs (16-bit, float, 1/2/4/8 bands, rotated or sheared transforms) must be handled.
The corpus is generated from the real data by tests/badinputs.py; docs/reliability.md counts it.
"""

from __future__ import annotations

import hashlib
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pyogrio
import pytest
import rasterio
import torch

from tests import badinputs
from tests.conftest import run_cli

RASTER_COMMANDS = ("segment", "train", "evaluate", "predict", "change", "run")


@pytest.fixture(scope="module")
def corpus(data_dir, tmp_path_factory, mobile_sam_ckpt, model):
    root = tmp_path_factory.mktemp("corpus")
    c = badinputs.build(root, data_dir)
    from uvsam.checkpoint import save_official
    from uvsam.modeling import build_generalist

    save_official(build_generalist("efficientvit_sam_l0"), root / "ckpt_wrong_family.pt")
    c["ckpt_wrong_family"] = root / "ckpt_wrong_family.pt"
    c["ckpt_good"] = mobile_sam_ckpt
    c["ckpt_truncated"] = root / "ckpt_truncated.pt"
    c["ckpt_truncated"].write_bytes(mobile_sam_ckpt.read_bytes()[: mobile_sam_ckpt.stat().st_size // 2])
    torch.save(torch.nn.Linear(2, 2), root / "ckpt_pickled_model.pt")  # a whole pickled module: code
    c["ckpt_pickled_model"] = root / "ckpt_pickled_model.pt"
    c["ckpt_text"] = root / "ckpt_text.pt"
    c["ckpt_text"].write_text("<html>404 Not Found</html>\n")  # what a failed download leaves
    c["model"] = model
    c["model_truncated"] = root / "model_truncated.ckpt"
    c["model_truncated"].write_bytes(model.read_bytes()[: model.stat().st_size // 3])
    years = root / "years.gpkg"
    mask_polys = _square_villages(c["good"])
    for y in ("2018", "2020"):
        pyogrio.write_dataframe(mask_polys, years, layer=f"v{y}", driver="GPKG")
    c["years"] = years
    for name, data in (("zero_byte_png", b""), ("text_png", b"not an image\n")):
        d = root / name
        d.mkdir()
        (d / "49566_107866.png").write_bytes(data)
        c[name] = d
    return c


def _square_villages(raster: Path):
    import geopandas as gpd
    import shapely

    with rasterio.open(raster) as ds:
        b = ds.bounds
        crs = ds.crs
    return gpd.GeoDataFrame({"name": ["a", "b"]}, geometry=[shapely.box(b.left + 50, b.bottom + 50, b.left + 200,
                                                                         b.bottom + 200),
                                                            shapely.box(b.right - 200, b.top - 200, b.right - 60,
                                                                        b.top - 60)], crs=crs)


def _argv(command: str, c: dict, out: Path, image=None, *, labels=None, checkpoint=None, model=None,
          encoder=None, wf_dir: Path | None = None) -> list:
    """``uvsam`` arguments running COMMAND on IMAGE (default: the good raster) into folder OUT."""
    image = image or c["good"]
    if command == "segment":
        return ["segment", image, "--encoder", encoder or "mobile_sam", "--checkpoint", checkpoint or c["ckpt_good"],
                "--out", out / "mask.tif", "--box", "10,10,200,200"]
    if command == "train":
        args = ["train", "--images", image, "--labels", labels or c["mask"], "--out", out / "m.ckpt", "--epochs", "1",
                "--steps", "1", "--sam-epochs", "0", "--batch-size", "2", "--encoder", encoder or "efficientvit_sam_l0"]
        return args + (["--checkpoint", checkpoint] if checkpoint else [])
    if command == "evaluate":
        args = ["evaluate", "--model", model or c["model"], "--images", image, "--labels", labels or c["mask"],
                "--specialist-only"]
        return args + (["--checkpoint", checkpoint] if checkpoint else [])
    if command == "predict":
        args = ["predict", image, "--model", model or c["model"], "--out", out / "v.gpkg", "--local", "--no-refine"]
        return args + (["--checkpoint", checkpoint] if checkpoint else [])
    if command == "change":
        return ["change", f"2018={c['years']}:v2018", f"2020={c['years']}:v2020", "--out", out / "c.gpkg",
                "--image", f"2018={c['good']}", "--image", f"2020={image}"]
    if command == "run":
        wf = (wf_dir or out.parent) / "workflow.yaml"  # outside the output folder, which must stay untouched
        wf.write_text(f"name: t\nmodel: {model or c['model']}\nout: {out / 'w.gpkg'}\nexecution:\n  local: true\n"
                      f"predict:\n  refine: false\nyears:\n  - layer: y2020\n    scenes: [{image}]\n")
        return ["run", wf]
    if command == "import-xyz":
        return ["import-xyz", image, "--zoom", "17", "--out", out / "xyz"]
    raise AssertionError(command)


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _refused(argv: list, names: str, tmp_path: Path, capsys, expected: str | None = None) -> str:
    """Run ``uvsam ARGV``: exit 2, one line naming ``names``, nothing created or altered under
    the output folder (which holds an existing output to guard)."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "existing.gpkg").write_bytes(b"an output the user already has")
    before = _snapshot(out)
    code, _, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("uvsam: error: "), err
    assert "Traceback" not in err
    assert names in lines[0], lines[0]
    if expected:
        assert expected in lines[0], lines[0]
    assert _snapshot(out) == before
    return lines[0]


CASES = [(case, cmd) for case in badinputs.BAD_RASTERS for cmd in RASTER_COMMANDS
         if not (case == "no_crs" and cmd == "segment")]  # segment prompts in pixels: no CRS needed


@pytest.mark.parametrize("case,command", CASES)
def test_bad_rasters_are_refused_by_every_command(corpus, case, command, tmp_path, capsys):
    argv = _argv(command, corpus, tmp_path / "out", corpus[case])
    _refused(argv, corpus[case].name, tmp_path, capsys)


@pytest.mark.parametrize("case", ["zero_byte_png", "text_png"])
def test_import_xyz_refuses_broken_images(corpus, case, tmp_path, capsys):
    _refused(_argv("import-xyz", corpus, tmp_path / "out", corpus[case]), "49566_107866.png", tmp_path, capsys,
             "not a readable image")


LABEL_CASES = [("labels_no_crs_member", "train", "give --labels-crs"),
               ("labels_no_crs_member", "evaluate", "give --labels-crs"),
               ("labels_outside", "train", "overlaps"), ("labels_outside", "evaluate", "overlaps"),
               ("labels_all_empty", "train", "no village pixel")]


@pytest.mark.parametrize("case,command,expected", LABEL_CASES)
def test_bad_labels_are_refused(corpus, data_dir, case, command, expected, tmp_path, capsys):
    # the Albers fields belong to the Albers Landsat scene; the others to the Beijing tile
    image = data_dir / "odd-inputs/landsat_albers_int16.tif" if case == "labels_no_crs_member" else corpus["good"]
    argv = _argv(command, corpus, tmp_path / "out", image, labels=corpus[case])
    if case == "labels_no_crs_member":
        argv += ["--gsd", "native"] if command == "train" else []
    _refused(argv, corpus[case].name, tmp_path, capsys, expected)


def test_no_crs_labels_are_used_once_their_crs_is_given(corpus, data_dir, tmp_path, capsys):
    """The same Albers file with --labels-crs taken from the scene it belongs to: accepted."""
    image = data_dir / "odd-inputs/landsat_albers_int16.tif"
    with rasterio.open(image) as ds:
        crs = ds.crs.to_wkt()
    argv = _argv("train", corpus, tmp_path, image, labels=corpus["labels_no_crs_member"]) + [
        "--gsd", "native", "--labels-crs", crs]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err


def test_invalid_and_empty_geometries_are_repaired_or_skipped(corpus, tmp_path, capsys):
    """A self-intersecting polygon is made valid and a null geometry skipped: training runs."""
    code, _, err = run_cli(_argv("train", corpus, tmp_path, labels=corpus["labels_invalid"]), capsys)
    assert code == 0, err
    assert (tmp_path / "m.ckpt").is_file()


@pytest.mark.parametrize("case,expected", [("bad_yaml", "not valid YAML at line 5"),
                                           ("yaml_code", "not valid YAML at line 1")])
def test_bad_workflow_yaml_is_refused_and_never_runs_code(corpus, case, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused(["run", corpus[case]], corpus[case].name, tmp_path, capsys, expected)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("command", ["segment", "train"])
def test_unknown_encoder_names_are_refused(corpus, command, tmp_path, capsys):
    _refused(_argv(command, corpus, tmp_path / "out", encoder="mobilesam2"), "mobilesam2", tmp_path, capsys,
             "unknown encoder")


CKPT_CASES = [("ckpt_wrong_family", "does not fit encoder"), ("ckpt_truncated", "truncated or corrupt"),
              ("ckpt_pickled_model", "pickled Python object"), ("ckpt_text", "not a PyTorch file")]


@pytest.mark.parametrize("case,expected", CKPT_CASES)
@pytest.mark.parametrize("command", ["segment", "train"])
def test_bad_generalist_checkpoints_are_refused(corpus, case, expected, command, tmp_path, capsys):
    argv = _argv(command, corpus, tmp_path / "out", checkpoint=corpus[case], encoder="mobile_sam")
    _refused(argv, corpus[case].name, tmp_path, capsys, expected)


@pytest.mark.parametrize("case,expected", [("model_truncated", "not a readable uvsam model"),
                                           ("ckpt_pickled_model", "pickled Python objects"),
                                           ("ckpt_good", "not a uvsam model file"),
                                           ("ckpt_text", "not a PyTorch file")])
@pytest.mark.parametrize("command", ["predict", "evaluate", "run", "train --resume"])
def test_bad_model_files_are_refused(corpus, case, expected, command, tmp_path, capsys):
    if command == "train --resume":
        resumed = tmp_path / "out" / "m.ckpt"
        resumed.parent.mkdir()
        resumed.write_bytes(corpus[case].read_bytes())
        argv = _argv("train", corpus, tmp_path / "out") + ["--resume"]
        name = "m.ckpt"
    else:
        argv, name = _argv(command, corpus, tmp_path / "out", model=corpus[case]), corpus[case].name
    _refused(argv, name, tmp_path, capsys, expected)


def test_a_checkpoint_the_model_would_not_use_is_refused(corpus, tmp_path, capsys):
    argv = _argv("predict", corpus, tmp_path / "out", checkpoint=corpus["ckpt_good"])
    _refused(argv, corpus["model"].name, tmp_path, capsys, "--checkpoint would not be used")


OUT_CASES = [(cmd, where) for cmd in ("segment", "train", "predict", "change", "import-xyz", "run")
             for where in ("read-only", "under-a-file", "missing-folder")
             # a workflow creates its output folder, import-xyz its output folder's parents
             if not (cmd in ("run", "import-xyz") and where == "missing-folder")]


@pytest.mark.parametrize("command,where", OUT_CASES)
def test_unwritable_outputs_are_refused_before_any_work(corpus, data_dir, command, where, tmp_path, capsys):
    """/sys is read-only even for root; a file cannot hold a folder; a folder must exist."""
    out = {"read-only": Path("/sys"), "under-a-file": corpus["good"], "missing-folder": tmp_path / "nowhere"}[where]
    image = data_dir / "beijing-uv/image/val" if command == "import-xyz" else None
    argv = _argv(command, corpus, out, image, wf_dir=tmp_path)
    expected = {"read-only": "cannot", "under-a-file": "is a file", "missing-folder": "does not exist"}[where]
    _refused(argv, str(out), tmp_path, capsys, expected)


def _union(gpkg: Path, layer: str = "villages"):
    import shapely

    return shapely.union_all(pyogrio.read_dataframe(gpkg, layer=layer).geometry.values)


@pytest.fixture(scope="module")
def good_villages(corpus, tmp_path_factory):
    from uvsam.cli import main

    out = tmp_path_factory.mktemp("good")
    assert main([str(a) for a in _argv("predict", corpus, out)]) == 0
    return _union(out / "v.gpkg")


@pytest.mark.parametrize("case", badinputs.UNUSUAL_RASTERS)
def test_unusual_rasters_are_handled(corpus, good_villages, case, tmp_path, capsys):
    """16-bit, signed, float, 1/2/4/8 bands and rotated or sheared grids are predicted, not
    refused; the villages lie inside the scene's footprint and, where the pixels are the same
    picture, agree with those of the plain 8-bit RGB file."""
    import shapely

    code, _, err = run_cli(_argv("predict", corpus, tmp_path, corpus[case]), capsys)
    assert code == 0, err
    got = _union(tmp_path / "v.gpkg")
    with rasterio.open(corpus[case]) as ds:
        t, w, h = ds.transform, ds.width, ds.height
    footprint = shapely.Polygon([t @ (0, 0), t @ (w, 0), t @ (w, h), t @ (0, h)])
    assert got.area > 0 and got.difference(footprint.buffer(10)).area < 1e-6 * got.area
    if case not in ("rotated", "sheared", "bands1", "bands2"):  # same picture, another encoding
        iou = got.intersection(good_villages).area / got.union(good_villages).area
        print(case, "IoU with the 8-bit RGB result", round(iou, 3))
        assert iou > 0.8, iou


@pytest.mark.parametrize("case", ["rotated", "bands8", "int16"])
@pytest.mark.parametrize("command", ["segment", "train"])
def test_unusual_rasters_segment_and_train(corpus, case, command, tmp_path, capsys):
    code, _, err = run_cli(_argv(command, corpus, tmp_path, corpus[case]), capsys)
    assert code == 0, err
    out = tmp_path / ("mask.tif" if command == "segment" else "m.ckpt")
    assert out.is_file()
    if command == "segment":
        with rasterio.open(out) as m, rasterio.open(corpus[case]) as src:
            assert (m.width, m.height, m.transform, m.crs) == (src.width, src.height, src.transform, src.crs)
            assert 0 < (m.read(1) > 0).mean() < 1


def _limited(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("command,limit", [("segment", 3_000), ("train", 200_000), ("predict", 20_000),
                                           ("change", 20_000), ("import-xyz", 20_000)])
def test_a_full_disk_fails_in_one_line_and_leaves_no_partial_file(corpus, data_dir, command, limit, tmp_path):
    """A real process whose files cannot grow past LIMIT bytes (RLIMIT_FSIZE: writes fail as on
    a full disk): exit 2, the last line names what could not be written, no traceback, nothing
    half-written under the output's name, the existing output intact. (GDAL may print its own
    messages first.)"""
    out = tmp_path / "out"
    out.mkdir()
    image = data_dir / "beijing-uv/image/val" if command == "import-xyz" else None
    argv = [str(a) for a in _argv(command, corpus, out, image)]
    target = {"segment": "mask.tif", "train": "m.ckpt", "predict": "v.gpkg", "change": "c.gpkg",
              "import-xyz": "xyz"}[command]
    (out / "existing.gpkg").write_bytes(b"an output the user already has")
    r = subprocess.run([sys.executable, "-m", "uvsam", *argv], preexec_fn=_limited(limit), capture_output=True,
                       text=True, timeout=600)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and last.startswith("uvsam: error: ") and "cannot write" in last, last
    assert str(out) in last
    assert not (out / target).exists() or command == "import-xyz" and not any((out / target).rglob("*.tif"))
    assert (out / "existing.gpkg").read_bytes() == b"an output the user already has"
    assert not [p for p in out.iterdir() if ".part" in p.name]  # no temporary left behind
