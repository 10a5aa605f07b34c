"""Unattended city runs (issue 26): concurrent writers, stale resumes, signals, a real cluster.

Each test drives the real commands on the real Beijing tiles with the session's test model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import torch

from tests.conftest import ROOT, run_cli

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SMALL = ["--local", "--tile", "256", "--overlap", "128"]  # the train mosaic: 16 tiles


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _frame(path: Path, layer: str):
    return pyogrio.read_dataframe(path, layer=layer).drop(columns=["run_id"], errors="ignore")


def _same(a: Path, b: Path, layer_a: str = "villages", layer_b: str | None = None) -> None:
    x, y = _frame(a, layer_a), _frame(b, layer_b or layer_a)
    assert len(x) > 0 and x.drop(columns="geometry").equals(y.drop(columns="geometry"))
    assert all(p.equals_exact(q, 1e-9) for p, q in zip(x.geometry, y.geometry, strict=True))


def _one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if not line.startswith(("note:", "warning:"))]
    assert len(lines) == 1, err
    return lines[0]


# -- concurrent writers -----------------------------------------------------------------------------------
WRITER = """
import sys
import geopandas as gpd
from shapely.geometry import box
from uvsam.layers import write_layer
out, prefix = sys.argv[1], sys.argv[2]
for i in range(8):
    frame = gpd.GeoDataFrame({"n": [i]}, geometry=[box(i, 0, i + 1, 1)], crs="EPSG:3857")
    write_layer(out, f"{prefix}{i}", frame, {"run_id": f"{prefix}{i}"}, "objects")
"""


def test_processes_adding_layers_to_one_geopackage_lose_none_and_readers_never_see_a_broken_file(tmp_path):
    """Three processes each add eight layers to one GeoPackage at the same time (a read-copy-
    replace each): every layer and every run row is there at the end (without the output lock
    most are lost: each writer replaces the file with its own copy). Meanwhile a reader opens
    the file again and again, as QGIS does, and another keeps it open throughout: each sees a
    whole GeoPackage (SQLite's check passes, every listed layer reads, layers only ever added)."""
    import sqlite3

    out = tmp_path / "shared.gpkg"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), p], env=ENV, stderr=subprocess.PIPE, text=True)
             for p in ("a", "b", "c")]
    reads, most, held = 0, 0, None
    while any(p.poll() is None for p in procs):
        if not out.exists():
            time.sleep(0.01)
            continue
        with sqlite3.connect(f"file:{out}?mode=ro", uri=True) as db:
            assert db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        layers = [name for name, _ in pyogrio.list_layers(out)]
        for name in layers:
            if name not in ("runs", "layer_styles"):
                assert len(pyogrio.read_dataframe(out, layer=name)) == 1, name
        assert len(layers) >= most
        most, reads = len(layers), reads + 1
        if held is None:  # a reader that keeps its connection (its view of the file) throughout
            held = sqlite3.connect(f"file:{out}?mode=ro", uri=True)
            held_layers = held.execute("SELECT count(*) FROM gpkg_contents").fetchone()[0]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    assert reads >= 3, reads  # the reader did read while the writers wrote
    assert held.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    assert held.execute("SELECT count(*) FROM gpkg_contents").fetchone()[0] == held_layers  # its view, whole
    held.close()
    layers = {name for name, _ in pyogrio.list_layers(out)}
    assert {f"{p}{i}" for p in "abc" for i in range(8)} <= layers
    assert len(pyogrio.read_dataframe(out, layer="runs")) == 24
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no lock or temporary left


def test_a_layer_being_written_refuses_a_second_run_at_once(beijing, model, tmp_path, capsys):
    from uvsam.files import OutputLock

    out = tmp_path / "v.gpkg"
    shutil.copyfile(beijing / "val/images/49554_107968.tif", tmp_path / "scene.tif")
    with OutputLock(out, "y2020.run", wait=False):  # another run is writing layer y2020
        t = time.monotonic()
        code, _, err = run_cli(["predict", tmp_path / "scene.tif", "--model", model, "--out", out, "--layer", "y2020",
                                "--local"], capsys)
        assert time.monotonic() - t < 30  # refused before any work
    line = _one_line(err)
    assert code == 2 and line.startswith(f"uvsam: error: {out}: layer 'y2020' is being written by another uvsam run "
                                         f"(pid {os.getpid()}, since "), line
    assert not out.exists() and not out.with_name("v.work").exists()
    # free again: the same command runs
    code, _, err = run_cli(["predict", tmp_path / "scene.tif", "--model", model, "--out", out, "--layer", "y2020",
                            "--local"], capsys)
    assert code == 0, err


def test_two_years_predicted_at_once_into_one_file_are_each_right(beijing, model, tmp_path):
    """Two ``uvsam predict`` processes at the same time, each a year whose scene has the same
    file name (``2018/scene.tif``, ``2020/scene.tif``), into two layers of one GeoPackage: both
    layers are there, each exactly what the year predicted alone gives (its own mosaic, its own
    journal), and no work folder is left."""
    scenes = {}
    for year, tile in (("2018", "49554_107968"), ("2020", "49554_107970")):
        (tmp_path / year).mkdir()
        scenes[year] = shutil.copyfile(beijing / f"val/images/{tile}.tif", tmp_path / year / "scene.tif")
    out = tmp_path / "both.gpkg"
    procs = [subprocess.Popen([sys.executable, "-m", "uvsam", "predict", str(scenes[y]), "--model", str(model),
                               "--out", str(out), "--layer", f"y{y}", "--local", "--force-refine"],
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for y in scenes]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()
    from uvsam.prediction import PredictConfig, run_prediction

    for year, scene in scenes.items():  # each year alone, in this process
        alone = tmp_path / f"alone{year}.gpkg"
        run_prediction([str(scene)], model, alone, PredictConfig(force_refine=True), log=lambda m: None)
        _same(alone, out, "villages", f"y{year}")
    assert not (tmp_path / "both.work").exists()


# -- stale resumes -----------------------------------------------------------------------------------------
def _dying_after(n: int):
    from uvsam.prediction import run_local

    done = []

    def runner(fn, arg_list):
        for result in run_local(fn, arg_list):
            if len(done) == n:
                raise KeyboardInterrupt  # as if killed here
            done.append(fn.__name__)
            yield result
    return runner


@pytest.fixture(scope="module")
def mosaic(beijing, tmp_path_factory) -> Path:
    """A copy of the train mosaic (a VRT of six GeoTIFFs), so a test may change a source tile."""
    root = tmp_path_factory.mktemp("mosaic")
    shutil.copytree(beijing / "train", root / "train")
    return root / "train/images.vrt"


def test_a_resume_after_a_source_of_the_mosaic_changed_starts_afresh(mosaic, model, tmp_path):
    """Interrupted, then one source tile of the VRT is replaced by another image (same size and
    grid, the VRT file untouched): the re-run says why it starts afresh and writes exactly what a
    fresh run on the new pixels writes, not a mix of old tiles and new."""
    from uvsam.prediction import PredictConfig, run_prediction

    scene = tmp_path / "train"
    shutil.copytree(mosaic.parent, scene)
    cfg = PredictConfig(tile=256, overlap=128, batch_size=4, force_refine=True)
    out, notes = tmp_path / "v.gpkg", []
    with pytest.raises(KeyboardInterrupt):
        run_prediction([str(scene / "images.vrt")], model, out, cfg, runner=_dying_after(3), log=notes.append)
    journal = tmp_path / "v.work/villages/journal"
    assert len(list(journal.rglob("tiles-*.npz"))) == 3
    # a source tile's pixels change (a later image of the same place), the VRT file does not
    source = scene / "images/49566_107866.tif"
    with rasterio.open(source, "r+") as ds:
        ds.write(np.ascontiguousarray(ds.read()[:, ::-1, ::-1]))
    run_prediction([str(scene / "images.vrt")], model, out, cfg, log=notes.append)
    why = "not reused (the scene's pixels or files changed): starting this scene afresh"
    assert any(why in n for n in notes), notes
    fresh = tmp_path / "fresh.gpkg"
    run_prediction([str(scene / "images.vrt")], model, fresh, cfg, log=lambda m: None)
    _same(fresh, out)
    assert not (tmp_path / "v.work").exists()


def test_a_resume_with_other_options_or_model_never_mixes_old_results(mosaic, model, tmp_path):
    """Interrupted, then run again with an option that changes results, then with another model
    file: each re-run says why it starts afresh, and its output is that of a fresh run."""
    from uvsam.prediction import PredictConfig, run_prediction

    cfg = PredictConfig(tile=256, overlap=128, batch_size=4)
    out, notes = tmp_path / "v.gpkg", []
    with pytest.raises(KeyboardInterrupt):
        run_prediction([str(mosaic)], model, out, cfg, runner=_dying_after(2), log=notes.append)
    other = PredictConfig(tile=256, overlap=128, batch_size=4, threshold=0.6)
    with pytest.raises(KeyboardInterrupt):
        run_prediction([str(mosaic)], model, out, other, runner=_dying_after(2), log=notes.append)
    assert "options that change results changed" in notes[-1], notes
    copy = tmp_path / "retrained.ckpt"  # another model file: the same network, one weight nudged
    payload = torch.load(model, weights_only=True)
    name = next(k for k, v in payload["state"].items() if v.is_floating_point() and v.numel() > 16)
    payload["state"][name] = payload["state"][name] * 1.01
    torch.save(payload, copy)
    run_prediction([str(mosaic)], copy, out, other, log=notes.append)
    assert "the model file changed" in notes[-2], notes
    fresh = tmp_path / "fresh.gpkg"
    run_prediction([str(mosaic)], copy, fresh, other, log=lambda m: None)
    _same(fresh, out)


def test_an_unreadable_journal_entry_is_computed_again(mosaic, model, tmp_path):
    from uvsam.prediction import PredictConfig, run_prediction

    cfg = PredictConfig(tile=256, overlap=128, batch_size=4)
    ref = tmp_path / "ref.gpkg"
    run_prediction([str(mosaic)], model, ref, cfg, log=lambda m: None)
    out = tmp_path / "v.gpkg"
    with pytest.raises(KeyboardInterrupt):
        run_prediction([str(mosaic)], model, out, cfg, runner=_dying_after(3), log=lambda m: None)
    entries = sorted((tmp_path / "v.work/villages/journal").rglob("tiles-*.npz"))
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # cut short (a disk error, a full disk)
    entries[1].write_bytes(b"")
    run_prediction([str(mosaic)], model, out, cfg, log=lambda m: None)
    _same(ref, out)


def test_tile_results_are_journaled_behind_the_next_task(tmp_path):
    """The specialist's results are saved on a thread while the next task runs: every result is
    in the journal (whole, readable) once the run is through, in order; a save that fails stops
    the run at the next task; one interrupted keeps what was saved and nothing half-written."""
    import threading

    from uvsam.prediction import run_journaled, run_local
    from uvsam.prediction.journal import Journal

    rng = np.random.default_rng(0)
    data = [{"prob": rng.random((2, 64, 64), dtype=np.float32)} for _ in range(5)]
    keys = [f"{i}-{i}" for i in range(5)]
    journal = Journal(tmp_path / "j", scene="s")
    savers, overlapped = [], []

    def saving_to(j):
        def save(key, arrays):
            savers.append(threading.current_thread().name)
            time.sleep(0.05)  # a slow disk: the next task starts meanwhile
            j.save_arrays(key, arrays)
        return save

    def task(i):
        overlapped.append(any(t.name.startswith("uvsam-journal") for t in threading.enumerate()))
        return data[i]

    out = list(run_journaled(run_local, task, [(i,) for i in range(5)], keys, journal.has_arrays,
                             journal.load_arrays, saving_to(journal), save_behind=True))
    assert [o["prob"] is d["prob"] for o, d in zip(out, data, strict=True)] == [True] * 5
    assert all(name.startswith("uvsam-journal") for name in savers) and any(overlapped[1:])
    for key, d in zip(keys, data, strict=True):
        np.testing.assert_array_equal(journal.load_arrays(key)["prob"], d["prob"])
    assert not [p for p in journal.root.iterdir() if ".part" in p.name]

    failing = Journal(tmp_path / "k", scene="s")

    def full_disk(key, arrays):
        if key == "1-1":
            raise OSError(28, "No space left on device")
        failing.save_arrays(key, arrays)

    got = []
    with pytest.raises(OSError, match="No space"):
        for r in run_journaled(run_local, task, [(i,) for i in range(5)], keys, failing.has_arrays,
                               failing.load_arrays, full_disk, save_behind=True):
            got.append(r)
    assert len(got) == 2 and failing.has_arrays("0-0") and not failing.has_arrays("2-2")

    stopped = Journal(tmp_path / "m", scene="s")
    with pytest.raises(KeyboardInterrupt):
        run = run_journaled(_dying_after(3), task, [(i,) for i in range(5)], keys, stopped.has_arrays,
                            stopped.load_arrays, saving_to(stopped), save_behind=True)
        for _ in run:
            pass
    assert [stopped.has_arrays(k) for k in keys] == [True, True, True, False, False]
    assert not [p for p in stopped.root.iterdir() if ".part" in p.name]


def test_the_journal_is_compressed(mosaic, model, tmp_path):
    from uvsam.prediction import PredictConfig, run_prediction

    cfg = PredictConfig(tile=256, overlap=128, batch_size=1)
    with pytest.raises(KeyboardInterrupt):
        run_prediction([str(mosaic)], model, tmp_path / "v.gpkg", cfg, runner=_dying_after(4), log=lambda m: None)
    entries = list((tmp_path / "v.work/villages/journal").rglob("tiles-*.npz"))
    raw = 256 * 256 * 4  # one tile's float32 probabilities, as stored before (a bit more, with the header)
    sizes = [e.stat().st_size for e in entries]
    assert len(entries) == 4 and max(sizes) < 0.8 * raw and sum(sizes) < 0.6 * 4 * raw, sizes


def test_what_a_killed_writer_left_is_removed_by_the_next(tmp_path):
    from uvsam.files import atomic_path

    out = tmp_path / "v.gpkg"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    litter = tmp_path / f".v.{dead.pid}.abc123.part.gpkg"  # a SIGKILLed writer's copy
    litter.write_bytes(b"x" * 1000)
    live = tmp_path / f".v.{os.getpid()}.zzz999.part.gpkg"  # one being written now: kept
    live.write_bytes(b"x")
    with atomic_path(out) as tmp:
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new" and not litter.exists() and live.exists()


# -- a real cluster: `dask scheduler` and `dask worker` processes ---------------------------------------------
CLUSTER_ARGS = ["--tile", "256", "--overlap", "128", "--batch-size", "2", "--compile", "never"]


class Cluster:
    """``dask scheduler`` and ``dask worker`` processes on 127.0.0.1, as a user starts them (the
    workers in a folder of their own, as on another machine's)."""

    def __init__(self, root: Path, workers: int = 2):
        self.root = root
        self.file = root / "scheduler.json"
        self.procs: dict[str, subprocess.Popen] = {}
        self.workers = workers

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_" + args[0], *args[1:]],
                                            cwd=self.root / "elsewhere", env=ENV, stdout=log, stderr=log)

    def start(self) -> Cluster:
        (self.root / "elsewhere").mkdir(exist_ok=True)
        self.file.unlink(missing_ok=True)
        self._start("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                  "--scheduler-file", str(self.file)])
        deadline = time.monotonic() + 60
        while not self.file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        for i in range(self.workers):
            self._start(f"worker{i}", ["worker", "--scheduler-file", str(self.file), "--nthreads", "1",
                                       "--no-dashboard", "--host", "127.0.0.1", "--name", f"w{i}"])
        from distributed import Client

        if self.workers:
            with Client(self.address, timeout=60) as c:
                c.wait_for_workers(self.workers, timeout=120)
        return self

    @property
    def address(self) -> str:
        return json.loads(self.file.read_text())["address"]

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait()

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster")).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def two_models(model, tmp_path_factory) -> dict[str, Path]:
    """The test model, and another that finds more villages (its village logit raised), each
    under the same file name in a folder of its own (``a/model.ckpt``, ``b/model.ckpt``)."""
    root = tmp_path_factory.mktemp("models")
    (root / "a").mkdir()
    (root / "b").mkdir()
    shutil.copyfile(model, root / "a/model.ckpt")
    payload = torch.load(model, weights_only=True)
    payload["state"]["specialist.net.segmentation_head.0.bias"][1] += 1.5
    torch.save(payload, root / "b/model.ckpt")
    return {"a": root / "a/model.ckpt", "b": root / "b/model.ckpt"}


def _predict(scene: Path, model: Path, out: Path, *args, cwd: Path | None = None, check: bool = True):
    proc = subprocess.run([sys.executable, "-m", "uvsam", "predict", str(scene), "--model", str(model), "--out",
                           str(out), *CLUSTER_ARGS, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_a_real_cluster_predicts_what_this_process_does_with_each_run_s_own_model(cluster, mosaic, two_models,
                                                                                 tmp_path, capsys):
    """Two runs on one long-lived cluster, each with its own model given by the same relative name
    (``model.ckpt``, from two folders): each is exactly the in-process result of its own model."""
    scene = mosaic.parent / "images/49566_107866.tif"  # one tile of the mosaic: 4 tiles of 256 px
    local = {k: tmp_path / f"local_{k}.gpkg" for k in two_models}
    for k, m in two_models.items():
        assert run_cli(["predict", scene, "--model", m, "--out", local[k], "--local", *CLUSTER_ARGS], capsys)[0] == 0
    assert len(_frame(local["a"], "villages")) != len(_frame(local["b"], "villages"))  # the models differ
    for k, m in two_models.items():
        out = tmp_path / f"cluster_{k}.gpkg"
        _predict(scene, Path("model.ckpt"), out, "--scheduler", cluster.address, cwd=m.parent)
        _same(local[k], out)
        runs = pyogrio.read_dataframe(out, layer="runs")
        assert runs["model_sha256"][0] == hashlib.sha256(m.read_bytes()).hexdigest()


def test_a_worker_or_the_scheduler_killed_mid_run_loses_nothing(cluster, mosaic, two_models, tmp_path, capsys):
    """A worker SIGKILLed mid-run: the run completes on the other, identical. The scheduler
    SIGKILLed mid-run: one line, exit 2, the output untouched; on a restarted cluster the same
    command resumes from the journal and writes the same layers."""
    model = two_models["a"]
    ref = tmp_path / "ref.gpkg"
    assert run_cli(["predict", mosaic, "--model", model, "--out", ref, "--local", *CLUSTER_ARGS], capsys)[0] == 0
    out = tmp_path / "v.gpkg"
    journal = tmp_path / "v.work/villages/journal"

    def run_and_kill(victim: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "uvsam", "predict", str(mosaic), "--model", str(model), "--out",
                                 str(out), *CLUSTER_ARGS, "--scheduler", cluster.address], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while len(list(journal.rglob("tiles-*"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        cluster.kill(victim)
        return proc

    proc = run_and_kill("worker0")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    _same(ref, out)
    out.unlink()
    proc = run_and_kill("scheduler")
    _, err = proc.communicate(timeout=300)
    line = _one_line(err)
    assert proc.returncode == 2 and line.startswith("uvsam: error: ") and "scheduler" in line, err
    assert not out.exists() and len(list(journal.rglob("tiles-*"))) >= 2
    cluster.stop()
    cluster.start()
    _predict(mosaic, model, out, "--scheduler", cluster.address)
    _same(ref, out)


def test_a_scheduler_without_workers_or_out_of_reach_is_one_line_within_the_timeout(model, beijing, tmp_path):
    """``dask scheduler`` running with no ``dask worker``: one line within ``UVSAM_WORKERS_TIMEOUT``
    (here 3 s), exit 2, nothing written; a scheduler nobody listens for: one line as well."""
    empty = Cluster(tmp_path / "empty", workers=0)
    (tmp_path / "empty").mkdir()
    scene = beijing / "val/images/49554_107968.tif"
    try:
        empty.start()
        for address, said in ((empty.address, f"the Dask scheduler at {empty.address} has no worker (waited 3 s)"),
                              ("tcp://127.0.0.1:9", "cannot reach the Dask scheduler at tcp://127.0.0.1:9")):
            t = time.monotonic()
            proc = subprocess.run([sys.executable, "-m", "uvsam", "predict", str(scene), "--model", str(model),
                                   "--out", str(tmp_path / "v.gpkg"), "--scheduler", address], cwd=tmp_path,
                                  env={**ENV, "UVSAM_WORKERS_TIMEOUT": "3"}, capture_output=True, text=True,
                                  timeout=120)
            assert time.monotonic() - t < 45, proc.stderr
            line = _one_line(proc.stderr)
            assert proc.returncode == 2 and line.startswith("uvsam: error: ") and said in line, line
            assert not [f for f in tmp_path.iterdir() if f.name != "empty"]
    finally:
        empty.stop()


# -- signals at random moments ------------------------------------------------------------------------------
TRAIN = ["--epochs", "3", "--steps", "6", "--batch-size", "4", "--crop", "64", "--gsd", "3.7", "--sam-epochs", "0",
         "--views-per-scene", "1", "--seed", "5"]


def _crop(src: Path, dest: Path) -> Path:
    """Rows 512-1023, columns 256-767 of a Beijing val tile as a GeoTIFF: three quarters villages."""
    from rasterio.windows import Window

    window = Window(256, 512, 512, 512)
    with rasterio.open(src) as ds:
        profile = {**ds.profile, "width": 512, "height": 512, "transform": ds.window_transform(window)}
        with rasterio.open(dest, "w", **profile) as out:
            out.write(ds.read(window=window))
    return dest


def _interrupt(argv: list[str], sig: int, after_s: float, cwd: Path, group: bool = False) -> tuple[int, str]:
    """``uvsam ARGV`` sent ``sig`` after ``after_s`` seconds (to its whole process group, as a
    terminal's Ctrl-C is, with ``group``); (exit code, stderr). Exit 0 means it finished first."""
    proc = subprocess.Popen([sys.executable, "-m", "uvsam", *map(str, argv)], cwd=cwd, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=group)
    try:
        proc.wait(timeout=after_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def _timed(argv: list[str], cwd: Path) -> float:
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "uvsam", *map(str, argv)], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return time.monotonic() - t


def _check_interrupted(code: int, err: str, sig: int) -> str:
    assert code == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("uvsam:")]  # besides progress lines
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err
    line = lines[0]
    assert line.startswith(f"uvsam: interrupted ({'Ctrl-C' if sig == signal.SIGINT else 'SIGTERM'}); "), line
    return line


def test_a_signal_while_the_program_loads_is_one_line_too(tmp_path):
    """Ctrl-C or SIGTERM in the first second, while ``uvsam`` still imports its modules: one line,
    exit 130/143, no ``KeyboardInterrupt`` traceback (sent once the process catches SIGTERM, which
    Python alone does not: uvsam's first instruction has run)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = subprocess.Popen([sys.executable, "-m", "uvsam", "predict", "scene.tif", "--model", "m.ckpt", "--out",
                                 "v.gpkg"], cwd=tmp_path, env=ENV, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # SigCgt: the signals the process catches, a hex mask
            status = Path(f"/proc/{proc.pid}/status").read_text()
            if int(next(v for k, v in (ln.split(":") for ln in status.splitlines()) if k == "SigCgt"), 16) & (
                    1 << (signal.SIGTERM - 1)):
                break
            time.sleep(0.002)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        line = _check_interrupted(proc.returncode, err, sig)
        assert line.endswith("; uvsam was starting: nothing was read or written"), line  # landed while loading
        assert not list(tmp_path.iterdir())


DURING_IMPORT = """
import signal, sys, time
sys.path.insert(0, sys.argv[1])
from uvsam.cli import Interrupted, _on_signal
signal.signal(signal.SIGINT, _on_signal)
try:
    import slow_module  # sends this process SIGINT from its top level, then takes 0.3 s more
    print("imported", flush=True)
    time.sleep(5)
    print("not interrupted", flush=True)
except Interrupted as e:
    print("interrupted", e.code, flush=True)
"""


def test_a_signal_inside_an_import_waits_for_the_module_to_load(tmp_path):
    """A signal that arrives while a command imports a module (torch's C extensions load for a
    second or more) is raised once the module has loaded, not inside its initialisation: raised
    there it broke the interpreter's exit (``ImportError: initialization failed``, then a fatal
    error and exit -6, found by the random-moment test below)."""
    (tmp_path / "slow_module.py").write_text("import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\n"
                                             "time.sleep(0.3)\n")
    proc = subprocess.run([sys.executable, "-c", DURING_IMPORT, str(tmp_path)], env=ENV, capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout.split("\n")[:2] == ["imported", "interrupted 130"], (proc.stdout, proc.stderr)


@pytest.mark.parametrize("command", ["predict", "train", "change", "run"])
def test_a_signal_at_a_random_moment_keeps_the_output_and_the_next_run_completes_it(command, beijing, model, tmp_path):
    """A signal at a random moment of a command's measured run time: exit 130/143, one line saying
    what was kept, no traceback, an existing output byte for byte as it was; the command run again
    (``--resume`` for a training that kept an epoch) gives what an undisturbed run gives. predict
    gets both, SIGINT (a terminal's Ctrl-C, to the whole process group: Dask's worker processes too)
    then SIGTERM (in process); the others, which share its handling, one each: train and run
    SIGTERM (a scheduler's stop), change SIGINT."""
    import random

    scene = _crop(beijing / "val/images/49554_107968.tif", tmp_path / "scene.tif")  # 512 px, mostly villages
    rng = random.Random(command)
    if command == "predict":  # on a local Dask cluster: its workers get the Ctrl-C too
        argv = ["predict", scene, "--model", model, "--out", "v.gpkg", "--workers", "1", "--force-refine",
                "--layer", "y2020"]
        ref = ["predict", scene, "--model", model, "--out", "ref.gpkg", "--local", "--force-refine", "--layer", "y2020"]
        existing, layer = tmp_path / "v.gpkg", "y2020"
    elif command == "train":
        argv = ["train", "--images", beijing / "train/images", "--labels", beijing / "train/masks", "--out", "t.ckpt",
                *TRAIN]
        ref = [*argv[:-len(TRAIN) - 2], "--out", "ref.ckpt", *TRAIN]
        existing = layer = None
    elif command == "change":
        from uvsam.prediction import run_prediction

        for year, image in (("y2018", scene), ("y2020", _crop(beijing / "val/images/49554_107970.tif",
                                                               tmp_path / "2020.tif"))):
            run_prediction([str(image)], model, tmp_path / "y.gpkg", layer=year, log=lambda m: None, quicklook=False)
        argv = ["change", "2018=y.gpkg:y2018", "2020=y.gpkg:y2020", "--out", "c.gpkg", "--report", "c.html"]
        ref = ["change", "2018=y.gpkg:y2018", "2020=y.gpkg:y2020", "--out", "ref.gpkg", "--report", "ref.html"]
        existing, layer = tmp_path / "c.gpkg", "changes"
    else:
        (tmp_path / "w.yaml").write_text(
            f"name: signals\nmodel: {model}\nout: v.gpkg\nexecution: {{local: true}}\n"
            f"years:\n  - {{layer: y2020, scenes: [scene.tif], acquired: 2020-07-01}}\n")
        (tmp_path / "r.yaml").write_text((tmp_path / "w.yaml").read_text().replace("v.gpkg", "ref.gpkg"))
        argv, ref = ["run", "w.yaml"], ["run", "r.yaml"]
        existing, layer = tmp_path / "v.gpkg", "y2020"
    took = _timed(ref, tmp_path)  # the undisturbed run, and how long one takes
    adds_layer = command in ("predict", "run")  # into a file that holds other layers (another year's)
    signals = {"predict": (signal.SIGINT, signal.SIGTERM), "change": (signal.SIGINT,)}.get(command, (signal.SIGTERM,))
    for sig in signals:
        if command == "predict" and sig == signal.SIGTERM:  # in process (the Dask part is Ctrl-C's, above)
            argv = [*argv[:6], "--local", *argv[8:]]
        if existing is not None:  # the user's file, which an interrupted run must leave as it was
            shutil.copyfile(tmp_path / "ref.gpkg", existing)
            if adds_layer:
                pyogrio.write_dataframe(_frame(existing, layer), existing, layer="kept_2018", driver="GPKG")
            before = _digest(existing)
        if command == "train":
            (tmp_path / "t.ckpt").unlink(missing_ok=True)
        code, err = _interrupt(argv, sig, rng.uniform(0.2, 0.6) * took, tmp_path,
                               group=command == "predict" and sig == signal.SIGINT)
        line = _check_interrupted(code, err, sig)
        if existing is not None and _digest(existing) != before:  # only if the new layer had been written whole
            assert f"{existing.name} was written" in line, line
            _same(tmp_path / "ref.gpkg", existing, layer)
        again = argv + (["--resume"] if command == "train" and "--resume" in line else [])
        _timed(again, tmp_path)
        if command == "train":
            a, b = (torch.load(tmp_path / n, weights_only=True)["state"] for n in ("ref.ckpt", "t.ckpt"))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        else:
            _same(tmp_path / "ref.gpkg", existing, layer)
            if adds_layer:
                _same(tmp_path / "ref.gpkg", existing, layer, "kept_2018")


# -- hostile files and numbers at the edge: one line, exit 2, nothing written ------------------------------------
def _hostile_models(model: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """Model files made from the test model, each with one hostile or impossible property:
    {case: (file, what the line must say)}."""
    import zipfile

    payload = torch.load(model, weights_only=True)
    cases = {}

    def save(name: str, edit, expected: str) -> None:
        p = {**payload, "config": dict(payload["config"]), "state": dict(payload["state"])}
        edit(p)
        torch.save(p, root / f"{name}.ckpt")
        cases[name] = (root / f"{name}.ckpt", expected)

    for name, gsd in (("gsd_zero", 0.0), ("gsd_nan", float("nan")), ("gsd_negative", -3.7), ("gsd_huge", 1e12)):
        save(name, lambda p, g=gsd: p["config"].update(gsd_m=g), "gsd_m is")
    key = next(k for k, v in payload["state"].items() if v.ndim == 4)
    save("wrong_shape", lambda p: p["state"].update({key: torch.zeros(3, 3, 3, 3)}), f"{key} is 3 x 3 x 3 x 3")
    save("terabyte_tensor", lambda p: p["state"].update({key: torch.zeros(1).expand(10**6, 10**6)}),
         "1000000 x 1000000 tensor (4,000.0 GB)")
    shutil.copyfile(model, root / "traversal.ckpt")
    with zipfile.ZipFile(root / "traversal.ckpt", "a") as z:
        z.writestr("../../../etc/cron.d/x", "* * * * * root true\n")
    cases["traversal"] = (root / "traversal.ckpt", "'../../../etc/cron.d/x', outside the archive")
    shutil.copyfile(model, root / "zip_bomb.ckpt")
    with zipfile.ZipFile(root / "zip_bomb.ckpt", "a", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("m/extra", b"\0" * (model.stat().st_size * 8))
    cases["zip_bomb"] = (root / "zip_bomb.ckpt", "a zip bomb?")
    return cases


@pytest.fixture(scope="module")
def hostile(model, beijing, tmp_path_factory) -> dict[str, tuple[list, str]]:
    """{case: (uvsam arguments, what the one line must say)}: hostile files and impossible numbers."""
    import rasterio.transform

    root = tmp_path_factory.mktemp("hostile")
    scene = shutil.copyfile(beijing / "val/images/49554_107968.tif", root / "scene.tif")
    cases = {name: (["predict", scene, "--model", f], said) for name, (f, said) in _hostile_models(model, root).items()}
    bomb = root / "bomb.tif"  # 4 bands of 9216 x 9216 px in one deflated block: 340 MB to decode, 0.4 MB on disk
    with rasterio.open(bomb, "w", driver="GTiff", width=9216, height=9216, count=4, dtype="uint8", crs="EPSG:3857",
                       transform=rasterio.transform.from_origin(12942317, 4882797, 1.2, 1.2), compress="deflate",
                       tiled=True, blockxsize=9216, blockysize=9216) as ds:
        ds.write(np.zeros((4, 9216, 9216), np.uint8))
    cases["decompression_bomb"] = (["predict", bomb, "--model", model], "a decompression bomb?")
    vrt = (beijing / "train/images.vrt").read_text()
    (root / "mosaics").mkdir()
    (root / "mosaics/tiles").symlink_to(beijing / "train/images")  # inside the VRT's folder: allowed
    for name, source, said in (("vrt_etc_passwd", 'relativeToVRT="0">/etc/passwd', "outside its folder (/etc/passwd)"),
                               ("vrt_url", 'relativeToVRT="0">/vsicurl/http://127.0.0.1:9/x.tif', "remote source"),
                               ("vrt_outside", 'relativeToVRT="1">../../elsewhere/x.tif', "outside its folder")):
        text = vrt.replace('relativeToVRT="1">images/49566_107866.tif', source).replace(
            'relativeToVRT="1">images/', 'relativeToVRT="1">tiles/')
        (root / f"mosaics/{name}.vrt").write_text(text)
        cases[name] = (["predict", root / f"mosaics/{name}.vrt", "--model", model], said)
    shutil.copyfile(scene, root / "-dashed scene.tif")
    cases["leading_dash"] = (["predict", "-dashed scene.tif", "--model", model], "reads as an option: write ./")
    for name, extra, said in (("crs", ["--crs", "EPSG:999999"], "--crs 'EPSG:999999' is not a CRS"),
                              ("workers", ["--workers", "-1"], "--workers must be at least 1"),
                              ("scheduler", ["--scheduler", "localhost:8786"], "--scheduler must be a scheduler"),
                              ("date", ["--acquired", "2020-13-45"], "--acquired must be a date"),
                              ("overlap", ["--tile", "256", "--overlap", "300"], "--overlap must be in [0, tile"),
                              ("threshold", ["--threshold", "nan"], "--threshold must be in (0, 1)")):
        cases[name] = (["predict", scene, "--model", model, *extra], said)
    (root / "w.yaml").write_text(f"name: x\nmodel: {model}\nout: v.gpkg\n"
                                 "years:\n  - {layer: y2020, scenes: [scene.tif], acquired: 2020-13-45}\n")
    cases["workflow_date"] = (["run", root / "w.yaml"], "'2020-13-45'")
    with rasterio.open(scene) as ds:  # labels with NaN coordinates (GeoJSON as Python writes it)
        b = ds.bounds
    ring = [[b.left + 50, b.bottom + 50], [float("nan"), b.top - 50], [b.right - 50, float("inf")],
            [b.left + 50, b.bottom + 50]]
    (root / "nan.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}]}))
    cases["labels_nan"] = (["train", "--images", scene, "--labels", root / "nan.geojson", "--labels-crs", "EPSG:3857",
                            "--epochs", "1", "--steps", "1", "--sam-epochs", "0"], "NaN or infinite coordinates")
    with rasterio.open(scene) as ds:  # a VRT on the scene's grid whose one source is itself
        grid = ", ".join(repr(v) for v in ds.transform.to_gdal())
    (root / "self.vrt").write_text(
        f'<VRTDataset rasterXSize="1024" rasterYSize="1024"><SRS>EPSG:3857</SRS><GeoTransform>{grid}</GeoTransform>'
        '<VRTRasterBand dataType="Byte" band="1"><SimpleSource><SourceFilename relativeToVRT="1">self.vrt'
        '</SourceFilename><SourceBand>1</SourceBand></SimpleSource></VRTRasterBand></VRTDataset>')
    cases["labels_self"] = (["train", "--images", scene, "--labels", root / "self.vrt", "--epochs", "1", "--steps", "1",
                             "--sam-epochs", "0"], "self.vrt: not a readable raster (Recursion detected)")
    cases["scene_self"] = (["predict", root / "self.vrt", "--model", model], "Recursion detected)")
    import geopandas as gpd
    import shapely

    years = root / "years.gpkg"  # two years of one village, for `uvsam change`
    for layer in ("y2018", "y2020"):
        gpd.GeoDataFrame(geometry=[shapely.box(b.left + 100, b.bottom + 100, b.left + 300, b.bottom + 300)],
                         crs="EPSG:3857").to_file(years, layer=layer, driver="GPKG")
    pair = [f"2018={years}:y2018", f"2020={years}:y2020"]
    cases["analysis_crs"] = (["change", *pair, "--analysis-crs", "EPSG:4326"], "is geographic: areas need a projected")
    cases["change_crs"] = (["change", *pair, "--crs", "EPSG:999999"], "'EPSG:999999' is not a CRS")
    return cases


HOSTILE = ["gsd_zero", "gsd_nan", "gsd_negative", "gsd_huge", "wrong_shape", "terabyte_tensor", "traversal",
           "zip_bomb", "decompression_bomb", "vrt_etc_passwd", "vrt_url", "vrt_outside", "leading_dash", "crs",
           "workers", "scheduler", "date", "overlap", "threshold", "workflow_date", "labels_nan", "labels_self",
           "scene_self", "analysis_crs", "change_crs"]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_files_and_impossible_numbers_are_refused_in_one_line_before_any_work(hostile, case, tmp_path,
                                                                                   capsys, monkeypatch):
    argv, said = hostile[case]
    root = Path(hostile["crs"][0][1]).parent  # the hostile files' folder
    monkeypatch.chdir(root if case in ("leading_dash", "workflow_date") else tmp_path)
    out = tmp_path / "out.gpkg"
    t = time.monotonic()
    code, _, err = run_cli([*argv, *([] if argv[0] == "run" else ["--out", out])], capsys)
    assert code == 2, err
    line = _one_line(err)
    assert line.startswith("uvsam: error: ") and said in line, line
    assert time.monotonic() - t < 60  # before any work
    assert not [f for f in tmp_path.iterdir()], list(tmp_path.iterdir())  # nothing written


def test_a_vrt_may_read_outside_its_folder_when_asked(hostile, model, beijing, tmp_path, capsys):
    argv, _ = hostile["vrt_outside"]
    vrt = Path(argv[1]).with_name("sibling.vrt")  # sources in a sibling folder: outside, but real
    vrt.write_text((beijing / "train/images.vrt").read_text().replace(
        'relativeToVRT="1">images/', f'relativeToVRT="0">{beijing}/train/images/'))
    code, _, err = run_cli(["predict", vrt, "--model", model, "--out", tmp_path / "v.gpkg", "--local",
                            "--allow-outside-sources", "--tile", "256", "--overlap", "128"], capsys)
    assert code == 0, err


def test_a_multipolygon_of_twenty_thousand_copies_is_repaired_in_bounded_time(beijing, tmp_path):
    """The labels of a 1.2 MB GeoJSON: one MultiPolygon of 20,000 copies of a ring (repairing the
    whole at once unions them pairwise: tens of GB). Rasterised part by part: the one ring's mask."""
    from tiles.reader import RasterSource, ReadOptions
    from uvsam.datasets import rasterise_labels

    scene = beijing / "val/images/49554_107968.tif"
    with rasterio.open(scene) as ds:
        b = ds.bounds
    ring = [[b.left + 50, b.bottom + 50], [b.right - 50, b.bottom + 50], [b.right - 50, b.top - 50],
            [b.left + 50, b.bottom + 50]]
    for name, parts in (("one", [[ring]]), ("copies", [[ring]] * 20000)):
        (tmp_path / f"{name}.geojson").write_text(json.dumps({"type": "FeatureCollection", "crs": {
            "type": "name", "properties": {"name": "EPSG:3857"}}, "features": [{"type": "Feature", "properties": {},
                                                                                "geometry": {"type": "MultiPolygon",
                                                                                             "coordinates": parts}}]}))
    with RasterSource(scene, ReadOptions()) as src:
        t = time.monotonic()
        many = rasterise_labels(tmp_path / "copies.geojson", src)
        assert time.monotonic() - t < 30
        assert np.array_equal(many, rasterise_labels(tmp_path / "one.geojson", src)) and many.any()


def test_label_files_are_read_as_the_features_they_hold_not_the_count_they_declare(beijing, tmp_path):
    """A GeoPackage of the val tile's village polygons whose header (``gpkg_ogr_contents``) declares
    10^8 features: training labels and a change layer read from it are those of the honest file,
    in bounded memory (reading by the declared count took 3.9 GB)."""
    import sqlite3
    import tracemalloc

    import geopandas as gpd
    import shapely
    from rasterio.features import shapes

    from tiles.reader import RasterSource, ReadOptions
    from uvsam.changes.sources import read_layer
    from uvsam.datasets import rasterise_labels

    scene = beijing / "val/images/49554_107968.tif"
    with rasterio.open(beijing / "val/masks/49554_107968.tif") as ds:
        mask = ds.read(1)
        polys = [shapely.geometry.shape(g) for g, v in shapes(mask, mask=mask > 0, transform=ds.transform) if v]
        frame = gpd.GeoDataFrame({"kind": ["village"] * len(polys)}, geometry=polys, crs=ds.crs)
    for name in ("honest", "declared"):
        frame.to_file(tmp_path / f"{name}.gpkg", layer="villages", driver="GPKG")
    with sqlite3.connect(tmp_path / "declared.gpkg") as db:
        db.execute("UPDATE gpkg_ogr_contents SET feature_count = 100000000")
    assert pyogrio.read_info(tmp_path / "declared.gpkg")["features"] == 10**8
    with RasterSource(scene, ReadOptions()) as src:
        honest = rasterise_labels(tmp_path / "honest.gpkg", src)
        tracemalloc.start()
        try:
            declared = rasterise_labels(tmp_path / "declared.gpkg", src)
            changes = read_layer(f"2020={tmp_path / 'declared.gpkg'}:villages")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert np.array_equal(declared, honest) and honest.any()
    assert len(changes.villages) == len(read_layer(f"2020={tmp_path / 'honest.gpkg'}:villages").villages) > 0
    assert peak < 200e6, peak


def test_names_in_any_script_with_spaces_work_and_are_named_in_errors(beijing, model, tmp_path, capsys, monkeypatch):
    """Scene, folder, model, output and layer names in Chinese, with accents and spaces: predict
    and change run and write those names; a missing file is named as written."""
    folder = tmp_path / "北京 数据 é"
    folder.mkdir()
    scenes = {}
    for year, tile in (("年2018", "49554_107968"), ("年2020", "49554_107970")):
        scenes[year] = shutil.copyfile(beijing / f"val/images/{tile}.tif", folder / f"城中村 {year} ü.tif")
    m = shutil.copyfile(model, folder / "模型 é.ckpt")
    out = folder / "村庄 ø.gpkg"
    monkeypatch.chdir(folder)
    for year, scene in scenes.items():
        code, _, err = run_cli(["predict", scene.name, "--model", m.name, "--out", out.name, "--layer", year, "--local",
                                "--no-quicklook"], capsys)
        assert code == 0, err
    assert {"年2018", "年2020"} <= {n for n, _ in pyogrio.list_layers(out)}
    code, _, err = run_cli(["change", f"2018={out.name}:年2018", f"2020={out.name}:年2020", "--out", "变化 ø.gpkg",
                            "--report", "报告 ø.html"], capsys)
    assert code == 0, err
    assert (folder / "报告 ø.html").stat().st_size > 0 and "changes" in {n for n, _ in pyogrio.list_layers(
        folder / "变化 ø.gpkg")}
    code, _, err = run_cli(["predict", "缺失 ø.tif", "--model", m.name, "--out", "x.gpkg"], capsys)
    assert code == 2 and "缺失 ø.tif" in _one_line(err)


def test_a_workflow_naming_files_outside_its_folder_says_so_in_the_dry_run(model, beijing, tmp_path, capsys):
    (tmp_path / "w.yaml").write_text(f"name: x\nmodel: {model}\nout: v.gpkg\n"
                                     f"years:\n  - {{layer: y2020, scenes: [{beijing}/val/images/49554_107968.tif]}}\n")
    code, out, err = run_cli(["run", tmp_path / "w.yaml", "--dry-run"], capsys)
    assert code == 0, err
    assert f"note: w.yaml names 2 file(s) outside its folder: {model}, {beijing}/val/images/49554_107968.tif" in err
    assert json.loads(out)[0]["tiles"] == 1


# -- remote faults -----------------------------------------------------------------------------------------------
def test_remote_bodies_cut_short_are_read_again_and_a_replaced_object_restarts_the_resume(beijing, model, tmp_path):
    """Over HTTP (ranges, ETag): responses whose body stops half-way (the connection closed) are
    asked again and the villages are those of the local file; an object replaced between an
    interrupted run and its resume is a new scene: the resume says so and writes what a fresh run
    of the new object writes, in a new process or in one that read the old object."""
    import shapely
    from rasterio.shutil import copy as raster_copy

    from tests.servers import http_server
    from uvsam.prediction import PredictConfig, run_prediction

    served = tmp_path / "served"
    served.mkdir()
    scene = beijing / "val/images/49554_107968.tif"
    raster_copy(str(scene), str(served / "scene.tif"), driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=256)
    cfg = PredictConfig(tile=128, overlap=64, batch_size=2)  # 9 tiles in 5 tasks
    local = tmp_path / "local.gpkg"
    run_prediction([str(served / "scene.tif")], model, local, cfg, log=lambda m: None)
    with http_server(served) as server:
        url = f"{server.url}/scene.tif"
        server.faults = ["truncate", "truncate", "truncate"]
        remote = tmp_path / "remote.gpkg"
        run_prediction([url], model, remote, cfg, log=lambda m: None)
        assert not server.faults  # each was met, and asked again
        _same(local, remote)
        out, notes = tmp_path / "v.gpkg", []
        with pytest.raises(KeyboardInterrupt):
            run_prediction([url], model, out, cfg, runner=_dying_after(2), log=notes.append)
        time.sleep(1.1)  # a new Last-Modified and ETag
        flipped = shutil.copyfile(scene, tmp_path / "flipped.tif")  # the object replaced: another image
        with rasterio.open(flipped, "r+") as ds:
            ds.write(np.ascontiguousarray(ds.read()[:, ::-1, :]))
        raster_copy(str(flipped), str(served / "scene.tif"), driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=256)
        resumed = subprocess.run([sys.executable, "-m", "uvsam", "predict", url, "--model", str(model), "--out",
                                  str(out), "--local", "--tile", "128", "--overlap", "64", "--batch-size", "2"],
                                 env=ENV, capture_output=True, text=True, timeout=600)  # the next run: a new process
        assert resumed.returncode == 0 and "starting this scene afresh" in resumed.stderr, resumed.stderr
        fresh = tmp_path / "fresh.gpkg"
        run_prediction([str(served / "scene.tif")], model, fresh, cfg, log=lambda m: None)
        a, b = _frame(fresh, "villages"), _frame(out, "villages")
        assert len(a) == len(b) > 0 and sorted(a["area_m2"]) == sorted(b["area_m2"])
        # this process read the old object (GDAL cached its ranges by URL): it reads the new one too
        again = tmp_path / "again.gpkg"
        run_prediction([url], model, again, cfg, log=lambda m: None)
        c = _frame(again, "villages")
        assert sorted(a["area_m2"]) == sorted(c["area_m2"])
        assert shapely.equals_exact(shapely.union_all(a.geometry.values), shapely.union_all(c.geometry.values), 1e-6)
