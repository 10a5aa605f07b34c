"""City-scale throughput of `uvsam predict` against the reference UV-SAM configuration, in one run.

    python benchmarks/pipeline.py [--sizes 4096 8192] [--model MODEL.ckpt] [--reference-tiles 2]
                                  [--opt-in bf16] [--json] [--write-docs docs/benchmarks.md]

1. The standard scenes: SIZE x SIZE px mosaics (8192 px is about 56 km2) built on disk from the
   eight real Beijing tiles of ../shared/data/beijing-uv (flipped and rotated copies, EPSG:3857 at
   zoom-17 resolution), cached in --work.
2. The machine: dense fp32 matmul GFLOP/s (torch.mm 2048 x 2048, best of 5).
3. Default: `uvsam predict` as it runs on this machine (in process below 8 cores) on each scene
   with the model (default: one trained briefly on the Beijing train tiles, cached), refinement
   forced (``--force-refine``: the generalist here has random weights, and the whole UV-SAM path
   is what runs with the official ones), each in a
   child process so its peak RSS is its own. Seconds per stage: the model's parts by PyTorch
   forward hooks (specialist, encoder, decoder = prompt encoder + mask decoder), the others as the
   step modules of uvsam.prediction time themselves (uvsam.progress.stage): read (window reads and
   preprocessing), vectorise (candidates, refined outlines, cleaning), write (mosaic tiles and
   the GeoPackage). Nothing is wrapped or patched. Model FLOPs by torch's FlopCounterMode,
   times what ran.
4. Plain fp32: the same prediction of the smaller scene without batching (one tile per
   specialist call, one box per decoder call) and with smp's own SegFormer decoder order
   (``Specialist.reordered = False``) instead of the reordered one;
   ``mask_iou_optimised_vs_fp32`` is the IoU of the village areas of the two runs.
5. Reference, as the official code does it, on the first --reference-tiles 1024 px tiles of the
   largest scene: SegFormer-B0 at 1024 px on the native grid, a SAM ViT-L image encoder on every
   tile, one decoder call per village box, fp32, eager, no batching, no caching.
6. ``--opt-in bf16``: predict's opt-in reduced precision on the largest scene (a first run that
   builds its own compiled parts, then a warm one) and its villages compared with the plain fp32
   ones on the smaller scene (the default rule, and every generalist outline kept).

Prints one JSON object: km2_per_h_default (largest scene), km2_per_h_reference, speedup,
overhead_ratio (end-to-end wall / model compute), peak_rss_mb (largest over the scene sizes),
model_gflops_per_km2, compute_bound_fraction (model GFLOP/s achieved / dense matmul GFLOP/s),
mask_iou_optimised_vs_fp32, and per scene the stage table. ``--write-docs`` rewrites the
generated block of docs/benchmarks.md with the same figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from uvsam.progress import peak_rss_mb

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
    from uvsam.training import TrainConfig, train

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


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# -- stage timing: the step modules time themselves, the model's parts by forward hooks --------------
class Stages:
    """Seconds per stage: the model's parts by PyTorch forward hooks (specialist, encoder, decoder);
    read, vectorise and write by the step modules themselves (:data:`uvsam.progress.STAGES`).

    ``rss_mb``: the process's peak RSS when each stage last raised it (which stage sets the peak).
    """

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.items: dict[str, int] = defaultdict(int)
        self.rss_mb: dict[str, float] = {}
        self._t0: dict[int, float] = {}
        self._peak = self.rss_mb["before"] = peak_rss_mb()

    def pre(self, module, part) -> None:
        """A module call starts; ``part``: (stage, items) when it is one of the model's timed parts."""
        if part is None:
            return
        _sync()  # on a GPU, work queued before this module is not this module's
        self._t0[id(module)] = (time.perf_counter(), *part)

    def post(self, module, args) -> None:
        if id(module) not in self._t0:
            return
        _sync()
        t0, stage, items = self._t0.pop(id(module))
        self.seconds[stage] += time.perf_counter() - t0
        self.calls[stage] += 1
        if items is not None:
            self.items[stage] += int(items(args))
        peak = peak_rss_mb()
        if peak > self._peak:
            self._peak = self.rss_mb[stage] = peak

    def merge(self, steps: dict) -> None:
        """Add the step modules' own timings (a :meth:`uvsam.progress.StageTimes.snapshot`)."""
        for name, seconds in steps["seconds"].items():
            self.seconds[name] += seconds
            self.calls[name] += steps["calls"][name]
        self.rss_mb.update(steps["rss_mb"])


def part_of(mod, model) -> tuple[str, object] | None:
    """Which timed stage a module call is (``specialist``, ``encoder``, ``decoder``) and how to count
    what it processed, or None: the eager parts of ``model`` or the compiled ones standing in for them."""
    from uvsam.compiled import CompiledPart

    if isinstance(mod, CompiledPart):
        return mod.name, (lambda a: a[1].shape[0]) if mod.name == "decoder" else (lambda a: a[0].shape[0])
    if mod is model.specialist or mod is model.generalist.image_encoder:
        return ("specialist" if mod is model.specialist else "encoder"), lambda a: a[0].shape[0]
    if mod is model.generalist.mask_decoder:
        return "decoder", lambda a: a[2].shape[0]  # boxes decoded
    if mod is model.generalist.prompt_encoder:
        return "decoder", None
    return None


def run_default(scene: Path, model: Path, out: Path, tile: int, overlap: int, plain: bool = False,
                device: str = "auto", precision: str = "auto", compile: str = "auto", keep_all: bool = False) -> dict:
    """``uvsam predict --local`` on ``scene``, timed by stage. ``plain``: without the batching
    (one tile per specialist call, one box per decoder call), with smp's own SegFormer decoder
    order and without compiled parts, the fp32 eager path to compare with. ``keep_all``: every
    outline the generalist draws replaces its candidate (the refinement rule's thresholds at 0), so
    that comparing two runs compares the generalist's masks: with random weights the rule rejects
    nearly all of them, and the villages would be the specialist's whatever the generalist computed.

    The model's parts are timed by global module hooks, which find the model predict loaded (its
    eager parts, or the compiled ones it installed): nothing is wrapped or patched."""
    import torch

    from uvsam.prediction import PredictConfig, run_prediction
    from uvsam.prediction import model as loaded
    from uvsam.progress import STAGES

    stages = Stages()
    current: list = []  # the model predict uses (loaded once per process)

    def pick(mod):
        if not loaded._MODELS:
            return None
        net = next(iter(loaded._MODELS.values()))
        if not current or current[0] is not net:
            current[:] = [net]
            if plain:
                net.decode_chunk = 1
                net.specialist.reordered = False
        return part_of(mod, net)

    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: stages.pre(m, pick(m))),
             torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: stages.post(m, a))]
    # The generalist here has random weights (none can be downloaded offline): predict would keep the
    # specialist's outlines; forced, it runs the whole UV-SAM path, as with the official weights.
    rule = {"refine_min_iou": 0.0, "refine_min_stability": 0.0, "refine_min_overlap": 0.0} if keep_all else {}
    cfg = PredictConfig(tile=tile, overlap=overlap, force_refine=True, device=device, precision=precision,
                        compile=compile, **rule)
    if plain:
        cfg = PredictConfig(tile=tile, overlap=overlap, batch_size=1, force_refine=True, device=device,
                            precision=precision, compile="never", **rule)
    STAGES.reset()
    t = time.perf_counter()
    summary = run_prediction([str(scene)], model, out, cfg, log=lambda m: None)
    wall = time.perf_counter() - t
    for h in hooks:
        h.remove()
    stages.merge(STAGES.snapshot())
    net = current[0]
    info = next(iter(loaded._MODELS))
    res = {"wall_s": wall, "stages_s": dict(stages.seconds), "calls": dict(stages.calls), "items": dict(stages.items),
           "rss_mb_by_stage": dict(stages.rss_mb), "peak_rss_mb": peak_rss_mb(), "villages": summary["villages"],
           "threads": torch.get_num_threads(), "device": summary.get("device") or str(info[3]),
           "compiled": summary.get("compiled"),
           "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None}
    net.compiled = {}  # FLOPs of the eager parts (the compiled ones compute the same)
    res["flops"] = model_flops(net, cfg.tile, cfg.window)  # after the timings: the counter's runs are not the run's
    return res


def model_flops(net, tile: int, window: int) -> dict:
    """FLOPs of the specialist on one tile and on one refinement window, of one generalist
    encoder pass and of decoding one box (prompt encoder + mask decoder)."""
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
            "encoder_window": enc, "decoder_box": max(dec, 0)}


def run_reference(scene: Path, tiles: int) -> dict:
    """SegFormer-B0 + SAM ViT-L at 1024 px, one decoder call per village box (the official size
    limit: boxes of at least 100 x 100 px at 0.916 m), fp32 eager. The specialist is untrained
    (seeded): how many villages it finds is arbitrary, so the box count is reported."""
    import rasterio
    import torch
    from rasterio.windows import Window

    from tiles.reader import ground_resolution
    from uvsam.modeling import build_generalist
    from uvsam.modeling.prompts import village_boxes
    from uvsam.modeling.specialist import Specialist

    torch.manual_seed(0)
    spec, gen = Specialist("mit_b0").eval(), build_generalist("sam_vit_l").eval()
    with rasterio.open(scene) as src:
        gx, gy = ground_resolution(src.crs, src.transform, src.width, src.height)
    t = time.perf_counter()
    boxes_total = 0
    with rasterio.open(scene) as src:
        for k in range(tiles):
            img = src.read(window=Window(1024 * k, 0, 1024, 1024)).astype(np.float32)
            x = torch.from_numpy(img)[None]
            with torch.no_grad():
                logits, _ = spec((x - 127.5) / 64)
                villages = village_boxes(logits.argmax(1)[0].numpy().astype(bool), gx)  # the official size limit
                emb = gen.image_encoder((x - 127.5) / 64)
                for b in villages.boxes[villages.large]:
                    box = torch.from_numpy(b[None])
                    sparse, dense = gen.prompt_encoder(points=None, boxes=box, masks=None)
                    gen.mask_decoder(image_embeddings=emb, image_pe=gen.prompt_encoder.get_dense_pe(),
                                     sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                     multimask_output=False)
                    boxes_total += 1
    wall = time.perf_counter() - t
    return {"wall_s": wall, "tiles": tiles, "boxes": boxes_total, "km2": tiles * 1024 * 1024 * gx * gy / 1e6}


def _child(args) -> None:
    if args.child in ("default", "plain"):
        res = run_default(Path(args.scene), Path(args.model), Path(args.out), args.tile, args.overlap,
                          plain=args.child == "plain", device=args.device, precision=args.precision,
                          compile=args.compile, keep_all=args.keep_all)
    else:
        res = run_reference(Path(args.scene), args.reference_tiles)
    res.setdefault("peak_rss_mb", peak_rss_mb())
    print(json.dumps(res))


def _spawn(*argv: str, cache: Path | None = None) -> dict:
    """A child process (so that each run's peak RSS is its own); its last stdout line is JSON.
    ``cache``: its UVSAM_CACHE (where the compiled parts are kept)."""
    env = {**os.environ, **({"UVSAM_CACHE": str(cache)} if cache else {})}
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"benchmark child {argv[1]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def refined_count(gpkg: Path) -> int:
    """How many villages of a GeoPackage the generalist drew."""
    import pyogrio

    return int(pyogrio.read_dataframe(gpkg, layer="villages", columns=["refined"], read_geometry=False)
               ["refined"].sum())


def villages_iou(a: Path, b: Path) -> float:
    """IoU of the village areas of two GeoPackages (the masks the two runs drew)."""
    import geopandas as gpd

    ua, ub = (gpd.read_file(p, layer="villages").union_all() for p in (a, b))
    union = ua.union(ub).area
    return 1.0 if union == 0 else ua.intersection(ub).area / union


def summarise(d: dict, km2: float) -> dict:
    """One default run: km2/h, stage seconds, overhead ratio, model GFLOPs and achieved GFLOP/s."""
    compute = sum(d["stages_s"].get(s, 0.0) for s in ("specialist", "encoder", "decoder"))
    f, n = d["flops"], d["items"]
    windows = n.get("encoder", 0)  # each refinement window runs the specialist and the encoder once
    flops = (f["specialist_tile"] * (n.get("specialist", 0) - windows) + (f["specialist_window"] + f["encoder_window"])
             * windows + f["decoder_box"] * n.get("decoder", 0))
    return {"km2": round(km2, 2), "wall_s": round(d["wall_s"], 1), "km2_per_h": round(km2 / d["wall_s"] * 3600, 1),
            "model_s": round(compute, 1), "overhead_ratio": round(d["wall_s"] / compute, 2),
            "stages_s": {k: round(v, 1) for k, v in sorted(d["stages_s"].items())},
            "tiles": n.get("specialist", 0) - windows, "windows": windows, "boxes": n.get("decoder", 0),
            "villages": d["villages"], "peak_rss_mb": round(d["peak_rss_mb"]), "device": d["device"],
            "peak_gpu_mb": d["peak_gpu_mb"],
            "rss_mb_by_stage": {k: round(v) for k, v in d["rss_mb_by_stage"].items()},
            "model_gflops": round(flops / 1e9, 1), "model_gflops_per_s": round(flops / 1e9 / compute, 1),
            "threads": d["threads"], "compiled": d.get("compiled")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192],
                    help="Scene sizes in px (the largest gives the headline figures).")
    ap.add_argument("--model", default=None)
    ap.add_argument("--work", default=None, help="Folder for the scenes and model (cached between runs).")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=256)
    ap.add_argument("--reference-tiles", type=int, default=2)
    ap.add_argument("--device", default="auto", help="Where predict runs: auto, cpu, cuda[:N], mps.")
    ap.add_argument("--precision", default="auto", help="auto (fp32), fp32, bf16, fp16.")
    ap.add_argument("--compile", default="auto", choices=["auto", "always", "never"],
                    help="predict's --compile for the default runs (the plain fp32 run is always eager).")
    ap.add_argument("--opt-in", default=None, metavar="PRECISION",
                    help="Also time predict's opt-in --precision PRECISION (e.g. bf16) on the largest scene (first "
                         "run on its own artefacts, then warm) and compare its villages on the smaller scene with "
                         "the plain fp32 ones (the default rule, and every generalist outline kept).")
    ap.add_argument("--keep-cache", action="store_true",
                    help="Skip the first run on a fresh cache of compiled parts (use the cache as it is).")
    ap.add_argument("--json", action="store_true", help="One line of JSON (default: indented).")
    ap.add_argument("--write-docs", type=Path, default=None, metavar="MD",
                    help="Also rewrite the generated table in this Markdown file (docs/benchmarks.md).")
    ap.add_argument("--child", choices=["default", "plain", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--keep-all", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scene", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)
    work = Path(args.work or Path(tempfile.gettempdir()) / "uvsam-bench")
    work.mkdir(parents=True, exist_ok=True)
    sizes = sorted(set(args.sizes))
    scenes = {n: build_scene(work / f"beijing_{n}.tif", n) for n in sizes}
    model = Path(args.model) if args.model else train_model(work / "default.ckpt")
    gflops = matmul_gflops()
    common = ["--model", str(model), "--tile", str(args.tile), "--overlap", str(args.overlap),
              "--device", args.device, "--precision", args.precision, "--compile", args.compile]
    cache = work / "cache"  # the children's UVSAM_CACHE: compiled parts built once, then reused
    runs, first = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        if args.compile != "never" and not args.keep_cache:  # the first run on a fresh cache builds them
            shutil.rmtree(cache / "compiled", ignore_errors=True)
            n = sizes[-1]
            d = _spawn("--child", "default", "--scene", str(scenes[n]), "--out", f"{tmp}/first.gpkg", *common,
                       cache=cache)
            first = {**summarise(d, scene_km2(scenes[n])), "scene_px": n}
        for n in sizes:  # warm: the compiled parts come from the cache
            d = _spawn("--child", "default", "--scene", str(scenes[n]), "--out", f"{tmp}/default_{n}.gpkg", *common,
                       cache=cache)
            runs[n] = summarise(d, scene_km2(scenes[n]))
        small = sizes[0]  # the fp32 eager path without batching, on the smaller scene
        plain = _spawn("--child", "plain", "--scene", str(scenes[small]), "--out", f"{tmp}/plain.gpkg", *common)
        iou = villages_iou(Path(f"{tmp}/default_{small}.gpkg"), Path(f"{tmp}/plain.gpkg"))
        # the same two paths with every generalist outline kept: their masks compared, not the rule's verdicts
        for child in ("default", "plain"):
            _spawn("--child", child, "--scene", str(scenes[small]), "--out", f"{tmp}/{child}_kept.gpkg", *common,
                   "--keep-all", cache=cache)
        iou_kept = villages_iou(Path(f"{tmp}/default_kept.gpkg"), Path(f"{tmp}/plain_kept.gpkg"))
        refined_kept = refined_count(Path(f"{tmp}/default_kept.gpkg"))
        opt_in = None
        if args.opt_in:  # the same runs in the opt-in precision, on artefacts of its own in the same cache
            other = [*common[: common.index("--precision") + 1], args.opt_in, *common[common.index("--precision") + 2:]]
            n, km2 = sizes[-1], scene_km2(scenes[sizes[-1]])
            runs_in = {"first": _spawn("--child", "default", "--scene", str(scenes[n]), "--out", f"{tmp}/o_first.gpkg",
                                       *other, cache=cache)}
            runs_in["warm"] = _spawn("--child", "default", "--scene", str(scenes[n]), "--out", f"{tmp}/o_warm.gpkg",
                                     *other, cache=cache)
            for child, extra in (("o_small", []), ("o_kept", ["--keep-all"])):
                _spawn("--child", "default", "--scene", str(scenes[small]), "--out", f"{tmp}/{child}.gpkg", *other,
                       *extra, cache=cache)
            opt_in = {"precision": args.opt_in, "scene_px": n,
                      "first": summarise(runs_in["first"], km2), "warm": summarise(runs_in["warm"], km2),
                      "mask_iou_vs_plain_fp32": round(villages_iou(Path(f"{tmp}/o_small.gpkg"),
                                                                   Path(f"{tmp}/plain.gpkg")), 4),
                      "mask_iou_generalist_kept_vs_plain_fp32": round(villages_iou(Path(f"{tmp}/o_kept.gpkg"),
                                                                                   Path(f"{tmp}/plain_kept.gpkg")), 4),
                      "refined_when_kept": refined_count(Path(f"{tmp}/o_kept.gpkg")),
                      "mask_iou_largest_scene_vs_default": round(villages_iou(Path(f"{tmp}/o_warm.gpkg"),
                                                                              Path(f"{tmp}/default_{n}.gpkg")), 4)}
        cpu = None
        if not runs[small]["device"].startswith("cpu") or not runs[small]["device"].endswith("fp32"):
            # on an accelerator or in reduced precision: the same scene on the CPU in fp32, the reference masks
            base = ["--model", str(model), "--tile", str(args.tile), "--overlap", str(args.overlap)]
            d = _spawn("--child", "default", "--scene", str(scenes[small]), "--out", f"{tmp}/cpu.gpkg", *base,
                       "--device", "cpu", "--precision", "fp32", "--compile", "never")
            cpu = {**summarise(d, scene_km2(scenes[small])), "scene_px": small,
                   "mask_iou_vs_cpu_fp32": round(villages_iou(Path(f"{tmp}/default_{small}.gpkg"),
                                                              Path(f"{tmp}/cpu.gpkg")), 4)}
    r = _spawn("--child", "reference", "--scene", str(scenes[sizes[-1]]),
               "--reference-tiles", str(args.reference_tiles))
    head = runs[sizes[-1]]
    ref_km2_h = r["km2"] / r["wall_s"] * 3600
    result = {
        "machine_matmul_gflops": round(gflops, 1),
        "km2_per_h_default": head["km2_per_h"],
        "km2_per_h_reference": round(ref_km2_h, 1),
        "speedup": round(head["km2_per_h"] / ref_km2_h, 1),
        "overhead_ratio": head["overhead_ratio"],
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs.values()),
        "model_gflops_per_km2": round(head["model_gflops"] / head["km2"], 1),
        "compute_bound_fraction": round(head["model_gflops_per_s"] / gflops, 2),
        "mask_iou_optimised_vs_fp32": round(iou, 4),
        "mask_iou_generalist_kept_vs_fp32": round(iou_kept, 4),
        "refined_when_kept": refined_kept,
        "plain_fp32": {"scene_px": small, "wall_s": round(plain["wall_s"], 1), "villages": plain["villages"],
                       "peak_rss_mb": round(plain["peak_rss_mb"])},
        "device": head["device"],
        "peak_gpu_mb": max((run["peak_gpu_mb"] or 0) for run in runs.values()) or None,
        "cpu_fp32": cpu,
        "first_run_fresh_cache": first,
        "opt_in": opt_in,
        "scenes": {str(n): run for n, run in runs.items()},
        "reference": {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()},
    }
    if opt_in:
        opt_in["speedup"] = round(opt_in["warm"]["km2_per_h"] / ref_km2_h, 1)
    print(json.dumps(result, indent=None if args.json else 2))
    if args.write_docs:
        write_docs(args.write_docs, result, sys.argv[1:])


BEGIN, END = "<!-- pipeline.py: begin -->", "<!-- pipeline.py: end -->"


def write_docs(md: Path, r: dict, argv: list[str]) -> None:
    """Replace the generated block of ``md`` with the tables of this run (atomically)."""
    rows = ["| run | km2 | wall s | km2/h | model s | overhead | tiles | windows | boxes | villages | peak RSS MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    named = [(f"{n} x {n} px", s) for n, s in r["scenes"].items()]
    if r.get("first_run_fresh_cache"):
        f = r["first_run_fresh_cache"]
        named.append((f"{f['scene_px']} x {f['scene_px']} px, first run on a fresh cache (builds the parts)", f))
    o = r.get("opt_in")
    if o:
        named += [(f"{o['scene_px']} x {o['scene_px']} px, --precision {o['precision']} (opt-in)", o["warm"]),
                  (f"{o['scene_px']} x {o['scene_px']} px, --precision {o['precision']} (opt-in) first run "
                   "(builds its parts)", o["first"])]
    for name, s in named:
        rows.append(f"| {name} | {s['km2']} | {s['wall_s']} | {s['km2_per_h']} | {s['model_s']} | "
                    f"{s['overhead_ratio']} | {s['tiles']} | {s['windows']} | {s['boxes']} | {s['villages']} | "
                    f"{s['peak_rss_mb']} |")
    stages = sorted({k for _, s in named for k in s["stages_s"]})
    rows += ["", "| run | " + " | ".join(f"{k} s" for k in stages) + " |", "|---" * (len(stages) + 1) + "|"]
    short = [(name.split(",")[0] + (f" {o['precision']}" if "opt-in" in name else "")
              + (" first" if "first" in name else ""), s) for name, s in named]
    for name, s in short:
        rows.append(f"| {name} | " + " | ".join(str(s["stages_s"].get(k, 0)) for k in stages) + " |")
    rows += ["", "Compiled parts: " + "; ".join(f"{name}: {s.get('compiled')}" for name, s in short) + "."]
    ref = r["reference"]
    rows += ["", "| figure | value |", "|---|---|",
             f"| default km2/h (largest scene) | {r['km2_per_h_default']} |",
             f"| reference km2/h ({ref['tiles']} tiles of 1024 px, {ref['boxes']} decoder calls, "
             f"{ref['wall_s']} s) | {r['km2_per_h_reference']} |",
             f"| speed-up | {r['speedup']}x |",
             f"| overhead ratio (wall / model compute) | {r['overhead_ratio']} |",
             f"| peak RSS, largest of the scene sizes | {r['peak_rss_mb']} MB |",
             f"| model GFLOPs per km2 | {r['model_gflops_per_km2']} |",
             f"| machine dense matmul | {r['machine_matmul_gflops']} GFLOP/s |",
             f"| model compute achieved / matmul | {r['compute_bound_fraction']} |",
             "| mask IoU, default vs plain fp32 eager (batch 1, one box a call, smp's decoder, not compiled) | "
             f"{r['mask_iou_optimised_vs_fp32']} |",
             f"| the same with every generalist outline kept ({r['refined_when_kept']} villages drawn by the "
             f"generalist) | {r['mask_iou_generalist_kept_vs_fp32']} |"]
    if o:
        p = o["precision"]
        rows += [f"| --precision {p} (opt-in): km2/h, largest scene | {o['warm']['km2_per_h']} |",
                 f"| --precision {p} (opt-in): speed-up over the reference | {o['speedup']}x |",
                 f"| --precision {p} (opt-in): overhead ratio | {o['warm']['overhead_ratio']} |",
                 f"| --precision {p} (opt-in): mask IoU vs plain fp32 eager (smaller scene) | "
                 f"{o['mask_iou_vs_plain_fp32']} |",
                 f"| the same with every generalist outline kept ({o['refined_when_kept']} villages drawn by the "
                 f"generalist) | {o['mask_iou_generalist_kept_vs_plain_fp32']} |",
                 f"| --precision {p} (opt-in): mask IoU vs the default, largest scene | "
                 f"{o['mask_iou_largest_scene_vs_default']} |"]
    block = "\n".join([BEGIN, "", "```bash", "python benchmarks/pipeline.py " + " ".join(argv), "```", "", *rows, "",
                       END])
    text = md.read_text()
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = md.with_name(f".{md.name}.part")
    tmp.write_text(text)
    tmp.replace(md)


if __name__ == "__main__":
    main()
