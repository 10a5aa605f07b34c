"""`uvsam demo`: the whole pipeline, offline, on a small synthetic city it draws itself.

A new user sees every stage work in a few minutes on a laptop, without downloading imagery or
weights: two synthetic scenes are drawn (one to train on, one to map), a UV-SAM model is
trained on the first, and the second is predicted to a GeoPackage exactly as a real city would
be (`uvsam predict`'s code, on a local Dask cluster), then scored against the truth the
drawing knows. Everything printed says it is synthetic: the numbers show the pipeline works,
not how well it maps real villages (docs/results.md has those).

The scenes: a UTM zone 50N (Beijing) grid at 1 m; background land, fields, roads, blocks of
large modern buildings, and urban villages: irregular patches packed with small roofs and
narrow alleys, the texture that sets them apart in real imagery.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from scipy import ndimage

from uvsam.errors import WeightsError
from uvsam.files import read_features
from uvsam.metrics import SegmentationCounts
from uvsam.prediction import PredictConfig, model_info, run_prediction
from uvsam.prediction.distributed import dask_runner, make_client, register_model
from uvsam.training import TrainConfig, train
from uvsam.weights import resolve

CRS = "EPSG:32650"
ORIGIN = (448_000.0, 4_422_000.0)  # eastern Beijing, UTM 50N


@dataclass(frozen=True)
class SyntheticScene:
    image: Path
    mask: Path
    village_fraction: float


def _blob(rng: np.random.Generator, h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    """An irregular patch: a disc of radius ``r`` with a wobbly edge."""
    yy, xx = np.mgrid[0:h, 0:w]
    ang = np.arctan2(yy - cy, xx - cx)
    wobble = sum(rng.uniform(0.05, 0.18) * np.sin(k * ang + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    return np.hypot(yy - cy, xx - cx) < r * (1 + wobble)


def draw_city(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(3, size, size) uint8 image and (size, size) uint8 village mask of a synthetic city at 1 m."""
    rng = np.random.default_rng(seed)
    img = np.empty((3, size, size), np.float32)
    noise = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 12)
    noise /= noise.std() + 1e-6
    for b, base in enumerate((118, 122, 104)):  # dusty green-grey land
        img[b] = base + 10 * noise + rng.normal(0, 3, (size, size))
    # fields: large flat rectangles
    for _ in range(size // 120):
        y, x = rng.integers(0, size - 150, 2)
        h, w = rng.integers(80, 220, 2)
        img[:, y : y + h, x : x + w] = np.array(rng.choice([(96, 128, 78), (150, 140, 104), (110, 120, 90)]),
                                                np.float32)[:, None, None] + rng.normal(0, 2, (3, 1, 1))
    # roads: a grid of grey lines
    for pos in range(rng.integers(60, 140), size, rng.integers(260, 360)):
        width = int(rng.integers(10, 18))
        img[:, pos : pos + width, :] = 92
        img[:, :, pos : pos + width] = 92
    # modern blocks: large buildings, well spaced, with shadows
    for _ in range(size // 90):
        y, x = rng.integers(0, size - 120, 2)
        for by in range(3):
            for bx in range(2):
                yy, xx = y + by * 40, x + bx * 60
                img[:, yy + 4 : yy + 30, xx + 4 : xx + 48] = 60  # shadow
                img[:, yy : yy + 26, xx : xx + 44] = rng.uniform(170, 215)
    # urban villages: irregular patches packed with small roofs and 1-3 m alleys
    mask = np.zeros((size, size), bool)
    for _ in range(rng.integers(4, 7)):
        cy, cx = rng.uniform(0.12, 0.88, 2) * size
        patch = _blob(rng, size, size, cy, cx, rng.uniform(45, 110))
        mask |= patch
    ys, xs = np.nonzero(mask)
    roofs = np.zeros((size, size), bool)
    colour = np.zeros((3, size, size), np.float32)
    for _ in range(int(mask.sum() / 28)):
        i = rng.integers(len(ys))
        y, x = ys[i], xs[i]
        h, w = rng.integers(4, 9, 2)
        c = np.array(rng.choice([(150, 82, 70), (120, 110, 108), (170, 160, 150), (95, 96, 110)]), np.float32)
        colour[:, y : y + h, x : x + w] = (c + rng.normal(0, 8, 3))[:, None, None]
        roofs[y : y + h, x : x + w] = True
    roofs &= mask
    alleys = mask & ~roofs
    img[:, alleys] = 88 + rng.normal(0, 4, (3, int(alleys.sum())))
    img[:, roofs] = colour[:, roofs]
    img = ndimage.gaussian_filter(img, (0, 0.6, 0.6))  # the sensor's blur
    return np.clip(img, 0, 255).astype(np.uint8), mask.astype(np.uint8)


def write_scene(folder: Path, name: str, size: int, seed: int, shift_px: int = 0) -> SyntheticScene:
    """The synthetic city as GeoTIFFs ``images/NAME.tif`` and ``masks/NAME.tif`` (UTM 50N, 1 m)."""
    img, mask = draw_city(size, seed)
    transform = Affine(1.0, 0, ORIGIN[0] + shift_px, 0, -1.0, ORIGIN[1])
    paths = []
    for sub, data in (("images", img), ("masks", mask[None])):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        path = folder / sub / f"{name}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=data.shape[0],
                           dtype="uint8", crs=CRS, transform=transform, tiled=True, compress="deflate",
                           photometric="RGB" if data.shape[0] == 3 else "MINISBLACK") as dst:
            dst.write(data)
        paths.append(path)
    return SyntheticScene(paths[0], paths[1], float(mask.mean()))


def score(gpkg: Path, layer: str, truth: Path) -> dict:
    """Pixel IoU / precision / recall of the villages layer against the truth mask."""
    from rasterio.features import rasterize

    villages = read_features(gpkg, layer)
    with rasterio.open(truth) as ds:
        gt = ds.read(1) > 0
        geoms = list(villages.to_crs(ds.crs).geometry)
        pred = rasterize(geoms, out_shape=gt.shape, transform=ds.transform).astype(bool) if geoms else \
            np.zeros_like(gt)
    counts = SegmentationCounts()
    counts.update(pred, gt.astype(np.uint8))
    summary = counts.summary()
    return {**{k: round(summary[k], 3) for k in ("iou", "precision", "recall")}, "villages": len(villages)}


def _trained_already(out: Path, model: Path, config: dict) -> bool:
    """Whether an earlier demo in ``out`` trained the same model (a re-run skips training)."""
    previous = out / "demo.json"
    return model.is_file() and previous.is_file() and json.loads(previous.read_text()).get("train_config") == config


def run_demo(out: str | Path, log=print, local: bool = False, workers: int = 1, size: int = 1024,
             epochs: int = 8, steps: int = 25) -> dict:
    """Draw, train, predict, score; everything under ``out``. Returns the summary (also in demo.json)."""

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t = time.perf_counter()
    log("uvsam demo: SYNTHETIC imagery drawn by this command (not a real city); every stage of the real "
        "pipeline runs on it.")
    log(f"[1/4] drawing two synthetic {size} x {size} m scenes at 1 m (UTM 50N): one to train on, one to map")
    train_scene = write_scene(out / "train", "synthetic_train", size, seed=1)
    city = write_scene(out / "city", "synthetic_city", size, seed=2, shift_px=3 * size)
    times["draw_s"] = time.perf_counter() - t

    encoder = "efficientvit_sam_l0"
    try:
        weights = resolve(encoder)
    except WeightsError:
        weights = None
    if weights is None:
        log(f"      no official {encoder} weights in the cache: UV-SAM is trained and run without its generalist "
            f"(random weights would draw random boundaries); bring its official weights to enable it: `uvsam "
            f"weights fetch {encoder} --sha256 DIGEST` with a digest you trust (its authors publish none)")
    t = time.perf_counter()
    model = out / "model.ckpt"
    what = f"specialist + fusion, frozen generalist {encoder}" if weights else "specialist only"
    log(f"[2/4] training UV-SAM ({what}) - about a minute")
    cfg = TrainConfig(images=str(train_scene.image), labels=str(train_scene.mask), out=str(model), encoder=encoder,
                      checkpoint=str(weights) if weights else None, gsd_m=2.0, crop=192 if weights else 128,
                      batch_size=4, epochs=epochs + (2 if weights else 0), steps_per_epoch=steps,
                      sam_epochs=2 if weights else 0, views_per_scene=8, warmup_steps=5, lr=2e-3)
    if not _trained_already(out, model, cfg.to_dict()):
        model.unlink(missing_ok=True)
        train(cfg, log=lambda m: None)
    times["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    gpkg = out / "villages.gpkg"
    where = "in this process" if local else f"on a local Dask cluster ({workers} worker)"
    stages = "specialist mosaic -> candidates -> " + ("generalist -> " if weights else "") + "polygons -> layers"
    log(f"[3/4] predicting the synthetic city {where}: {stages}")
    kwargs = {}
    if not local:

        client = make_client(workers=workers)
        register_model(client, model_info(model))
        kwargs["runner"] = dask_runner(client)
    try:
        summary = run_prediction([str(city.image)], model, gpkg,
                                 PredictConfig(tile=256, overlap=128, refine=weights is not None),
                                 layer="villages", log=lambda m: log("      " + m), run_extra={"synthetic": True},
                                 **kwargs)
    finally:
        if not local:
            client.close()  # and its local cluster
    times["predict_s"] = time.perf_counter() - t

    log("[4/4] scoring the villages layer against the synthetic truth")
    result = score(gpkg, "villages", city.mask)
    report = {"synthetic": True, "out": str(out), "geopackage": str(gpkg), "model": str(model),
              "generalist": encoder, "generalist_weights": str(weights) if weights else "random (none cached)",
              "truth_village_fraction": round(city.village_fraction, 3), "score": result,
              "seconds": {k: round(v, 1) for k, v in times.items()}, "run_id": summary["run_id"],
              "train_config": cfg.to_dict()}
    (out / "demo.json").write_text(json.dumps(report, indent=2))
    log(f"      SYNTHETIC scene: {result['villages']} villages, pixel IoU {result['iou']} "
        f"(precision {result['precision']}, recall {result['recall']})")
    log(f"done in {sum(times.values()):.0f} s. Open {gpkg} in QGIS (layers villages, candidates, tiles; "
        f"styled), or read {out / 'demo.json'}.")
    return report
