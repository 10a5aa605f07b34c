"""City-scale throughput of `uvsam predict` against the reference UV-SAM configuration, in one run.

Status (issue 8, in progress): the scene build and the model training run; the first full run
at --size 8192 did not finish within 10 minutes on the 2-core machine, so no figures are in
docs/benchmarks.md yet.

    python benchmarks/pipeline.py [--size 8192] [--model MODEL.ckpt] [--reference-tiles 2] [--json]

1. The standard scene: a SIZE x SIZE px mosaic (default 8192, about 56 km2) built on disk from
   the eight real Beijing tiles of ../shared/data/beijing-uv (flipped and rotated copies, EPSG:3857
   at zoom-17 resolution), cached in --work.
2. The machine: dense fp32 matmul GFLOP/s (torch.mm 2048 x 2048, best of 5).
3. Default: `uvsam predict` in process (--local) on the whole scene with the model (default: one
   trained briefly on the Beijing train tiles, cached), in a child process so its peak RSS is its
   own. Seconds per stage are taken with forward hooks and wrappers, without changing the code
   measured: read (window reads + radiometry), specialist, encoder, decoder (prompt encoder + mask
   decoder), vectorise (candidates, polygons, cleaning), write (mosaic and GeoPackage).
4. Reference, as the official code does it, on the first --reference-tiles 1024 px tiles of the
   same scene: SegFormer-B0 at 1024 px on the native grid, a SAM ViT-L image encoder on every tile,
   one decoder call per village box, fp32, eager, no batching, no caching.

Prints km2/h of both, their ratio, overhead_ratio (end-to-end wall / model compute), peak RSS,
model GFLOPs per km2 and the stage table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "beijing-uv"
ZOOM17_M = 40075016.686 / 2**17 / 256  # EPSG:3857 metres per pixel of the Beijing tiles


# -- the scene ----------------------------------------------------------------------------------
def build_scene(dest: Path, size: int) -> Path:
    """SIZE x SIZE px of real Beijing imagery, written block by block (bounded memory)."""
    import rasterio
    from PIL import Image
    from rasterio.windows import Window

    if dest.exists():
        return dest
    tiles = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(DATA.glob("image/*/*.png"))]
    assert len(tiles) >= 8, f"expected the Beijing tiles under {DATA}"
    x0, y0 = 107866 * 256 * ZOOM17_M - 20037508.343, 20037508.343 - 49566 * 256 * ZOOM17_M
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:3857",
                   transform=rasterio.transform.from_origin(x0, y0, ZOOM17_M, ZOOM17_M), tiled=True,
                   blockxsize=512, blockysize=512, compress="deflate", BIGTIFF="IF_SAFER")
    part = dest.with_suffix(".part.tif")
    with rasterio.open(part, "w", **profile) as dst:
        for r in range(0, size, 1024):
            for c in range(0, size, 1024):
                k = (r // 1024) * 7 + c // 1024
                img = np.rot90(tiles[k % len(tiles)], k // len(tiles) % 4)
                img = img[:, ::-1] if (k // 3) % 2 else img
                h, w = min(1024, size - r), min(1024, size - c)
                dst.write(np.ascontiguousarray(img[:h, :w].transpose(2, 0, 1)), window=Window(c, r, w, h))
    part.rename(dest)
    return dest


def scene_km2(path: Path) -> float:
    from tiles.reader import RasterSource

    with RasterSource(path) as src:
        gx, gy = src.ground_res
        return src.width * src.height * gx * gy / 1e6


def train_model(dest: Path) -> Path:
    """The default model: efficientvit_sam_l0 generalist, SegFormer-B0 at 3.7 m, trained briefly."""
    if dest.exists():
        return dest
    from tiles.xyz import import_xyz
    from uvsam.train import TrainConfig, train

    geo = dest.parent / "beijing_train"
    if not geo.exists():
        import_xyz(DATA / "image/train", 17, geo, masks_dir=DATA / "mask/train")
    train(TrainConfig(images=str(geo / "images"), labels=str(geo / "masks"), out=str(dest),
                      encoder="efficientvit_sam_l0", gsd_m=3.7, crop=128, batch_size=4, epochs=4, steps_per_epoch=20,
                      sam_epochs=1, views_per_scene=1, warmup_steps=2, lr=2e-3), log=lambda m: None)
    return dest


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# -- stage timing without touching the code measured ----------------------------------------------
class Stages:
    """Seconds per stage: forward hooks on modules, wrappers around module-level functions."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._t0: dict[int, float] = {}

    def hook(self, module, stage: str) -> None:
        def pre(mod, args):
            self._t0[id(mod)] = time.perf_counter()

        def post(mod, args, out):
            self.seconds[stage] += time.perf_counter() - self._t0.pop(id(mod))
            self.calls[stage] += 1

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def wrap(self, owner, name: str, stage: str) -> None:
        fn = getattr(owner, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[stage] += time.perf_counter() - t

        setattr(owner, name, timed)


def run_default(scene: Path, model: Path, out: Path, tile: int, overlap: int) -> dict:
    import torch

    import tiles.stitch
    import uvsam.layers
    import uvsam.predict as P
    from uvsam.predict import PredictConfig, get_model, model_info, run_prediction

    stages = Stages()
    net = get_model(model_info(model))  # the instance predict will use (loaded once per process)
    stages.hook(net.specialist, "specialist")
    stages.hook(net.generalist.image_encoder, "encoder")
    stages.hook(net.generalist.prompt_encoder, "decoder")
    stages.hook(net.generalist.mask_decoder, "decoder")
    stages.wrap(P, "read_tile", "read")
    for name in ("candidates_from_mosaic", "clean", "merge", "mean_probability", "polygonise"):
        stages.wrap(P, name, "vectorise")
    stages.wrap(tiles.stitch.Stitcher, "add", "write")
    stages.wrap(uvsam.layers, "write_geopackage", "write")
    cfg = PredictConfig(tile=tile, overlap=overlap)
    t = time.perf_counter()
    summary = run_prediction([str(scene)], model, out, cfg, log=lambda m: None)
    wall = time.perf_counter() - t
    flops = model_flops(net, tile, cfg.window)
    return {"wall_s": wall, "stages_s": dict(stages.seconds), "calls": dict(stages.calls),
            "villages": summary["villages"], "flops": flops, "threads": torch.get_num_threads()}


def model_flops(net, tile: int, window: int) -> dict:
    """FLOPs of the specialist on one tile and on one refinement window, of one generalist
    encoder pass and of one decoder call."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def count(fn) -> int:
        with FlopCounterMode(display=False) as fc, torch.inference_mode():
            fn()
        return fc.get_total_flops()

    x = torch.rand(1, 3, tile, tile) * 255
    win = torch.rand(1, 3, window, window) * 255
    spec_win = count(lambda: net.run_specialist(win))
    enc = count(lambda: net.embeddings(win))
    box = [np.array([[100, 100, 300, 300]], np.float32)]
    dec = count(lambda: net.refine(win, box)) - enc - spec_win
    return {"specialist_tile": count(lambda: net.run_specialist(x)), "specialist_window": spec_win,
            "encoder_window": enc, "decoder_call": max(dec, 0)}


def run_reference(scene: Path, tiles: int) -> dict:
    """SegFormer-B0 + SAM ViT-L at 1024 px, one decoder call per village box, fp32 eager."""
    import rasterio
    import torch
    from rasterio.windows import Window
    from scipy import ndimage

    from uvsam.modeling import build_generalist
    from uvsam.modeling.specialist import Specialist

    torch.manual_seed(0)
    spec, gen = Specialist("mit_b0").eval(), build_generalist("sam_vit_l").eval()
    t = time.perf_counter()
    boxes_total = 0
    with rasterio.open(scene) as src:
        for k in range(tiles):
            img = src.read(window=Window(1024 * k, 0, 1024, 1024)).astype(np.float32)
            x = torch.from_numpy(img)[None]
            with torch.no_grad():
                logits, _ = spec((x - 127.5) / 64)
                labels, n = ndimage.label(logits.argmax(1)[0].numpy())
                emb = gen.image_encoder((x - 127.5) / 64)
                for sl in ndimage.find_objects(labels):
                    box = torch.tensor([[sl[1].start, sl[0].start, sl[1].stop, sl[0].stop]], dtype=torch.float32)
                    sparse, dense = gen.prompt_encoder(points=None, boxes=box, masks=None)
                    gen.mask_decoder(image_embeddings=emb, image_pe=gen.prompt_encoder.get_dense_pe(),
                                     sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                     multimask_output=False)
                    boxes_total += 1
    wall = time.perf_counter() - t
    with rasterio.open(scene) as src:
        from tiles.reader import ground_resolution

        gx, gy = ground_resolution(src.crs, src.transform, src.width, src.height)
    return {"wall_s": wall, "tiles": tiles, "boxes": boxes_total, "km2": tiles * 1024 * 1024 * gx * gy / 1e6}


def _child(args) -> None:
    if args.child == "default":
        res = run_default(Path(args.scene), Path(args.model), Path(args.out), args.tile, args.overlap)
    else:
        res = run_reference(Path(args.scene), args.reference_tiles)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res))


def _spawn(*argv: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--model", default=None)
    ap.add_argument("--work", default=None, help="Folder for the scene and model (cached between runs).")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=256)
    ap.add_argument("--reference-tiles", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=["default", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--scene", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)
    work = Path(args.work or Path(tempfile.gettempdir()) / "uvsam-bench")
    work.mkdir(parents=True, exist_ok=True)
    scene = build_scene(work / f"beijing_{args.size}.tif", args.size)
    model = Path(args.model) if args.model else train_model(work / "default.ckpt")
    km2 = scene_km2(scene)
    gflops = matmul_gflops()
    with tempfile.TemporaryDirectory() as tmp:
        d = _spawn("--child", "default", "--scene", str(scene), "--model", str(model), "--out",
                   str(Path(tmp) / "v.gpkg"), "--tile", str(args.tile), "--overlap", str(args.overlap))
    r = _spawn("--child", "reference", "--scene", str(scene), "--reference-tiles", str(args.reference_tiles))
    compute = sum(d["stages_s"].get(s, 0.0) for s in ("specialist", "encoder", "decoder"))
    f = d["flops"]
    windows = d["calls"].get("encoder", 0)  # each refinement window runs the specialist and the encoder once
    model_flops_total = (f["specialist_tile"] * (d["calls"].get("specialist", 0) - windows)
                         + (f["specialist_window"] + f["encoder_window"]) * windows
                         + f["decoder_call"] * d["calls"].get("decoder", 0) / 2)  # prompt encoder + mask decoder
    result = {
        "scene_px": args.size, "scene_km2": round(km2, 2), "machine_matmul_gflops": round(gflops, 1),
        "km2_per_h_default": round(km2 / d["wall_s"] * 3600, 2),
        "km2_per_h_reference": round(r["km2"] / r["wall_s"] * 3600, 2),
        "speedup": round((km2 / d["wall_s"]) / (r["km2"] / r["wall_s"]), 1),
        "overhead_ratio": round(d["wall_s"] / compute, 2) if compute else None,
        "peak_rss_mb": round(d["peak_rss_mb"]),
        "model_gflops_per_km2": round(model_flops_total / 1e9 / km2, 1),
        "mask_iou_optimised_vs_fp32": None,  # the default path is fp32: no reduced-precision path yet
        "default": {"wall_s": round(d["wall_s"], 1), "stages_s": {k: round(v, 1) for k, v in d["stages_s"].items()},
                    "calls": d["calls"], "villages": d["villages"], "threads": d["threads"]},
        "reference": {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()},
    }
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
