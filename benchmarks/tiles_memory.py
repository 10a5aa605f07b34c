"""Bounded memory of the tiling engine on a city-sized scene, and its throughput.

Generates a SIZE x SIZE 3-band uint16 GeoTIFF on disk (tiled, deflate; never in the repo),
then, each in a fresh process so peak RSS is its own:

1. ``copy``: a plain rasterio block-by-block copy of the file (the reference throughput);
2. ``tiles``: plan (scene stretch from a decimated read), read every tile with its validity
   mask, pass it through an identity "model", stitch into a GeoTIFF.

Reports wall time, peak RSS (``ru_maxrss``) and throughput relative to the copy, in one run.
The stitched output is checked against the input on sample windows.

    python benchmarks/tiles_memory.py --size 30000 --json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window


def make_scene(path: Path, size: int, block: int = 512) -> None:
    """A smooth-plus-noise uint16 scene with a nodata border, written block by block."""
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint16", crs="EPSG:32650",
                   transform=rasterio.transform.from_origin(440000, 4420000, 0.5, 0.5), nodata=0, tiled=True,
                   blockxsize=block, blockysize=block, compress="deflate", BIGTIFF="YES")
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(0, size, block):
            for c in range(0, size, block):
                h, w = min(block, size - r), min(block, size - c)
                yy, xx = np.mgrid[r : r + h, c : c + w]
                base = (1000 + 3000 * np.sin(xx / 997.0) * np.cos(yy / 1301.0) + 3000).astype(np.float32)
                data = np.stack([base + 500 * b + rng.normal(0, 40, (h, w)) for b in range(3)])
                data = np.clip(data, 1, 65535).astype(np.uint16)
                edge = (yy < 700) | (xx < 900)  # nodata strips along the top and left
                data[:, edge] = 0
                dst.write(data, window=Window(c, r, w, h))


def run_copy(src_path: str, out_path: str) -> None:
    with rasterio.open(src_path) as src:
        profile = src.profile
        with rasterio.open(out_path, "w", **profile) as dst:
            for _, window in src.block_windows(1):
                dst.write(src.read(window=window), window=window)


def run_tiles(src_path: str, out_path: str, tile: int, overlap: int) -> None:
    from tiles import RasterSource, Stitcher, TilingConfig, plan

    scene = plan(src_path, TilingConfig(tile_size=tile, overlap=overlap))
    with RasterSource(src_path) as src, Stitcher(out_path, scene.grid, 3, "uint16", src.crs, nodata=0) as st:
        for t in scene.tiles:
            data, valid = src.read(t.window)
            scene.stretch.apply(data, valid)  # the normalisation every tile gets (not stitched here)
            st.add(t, data, valid)  # identity model: the raw tile goes back


def _child(mode: str, src: str, out: str, tile: int, overlap: int) -> None:
    t0 = time.perf_counter()
    if mode == "copy":
        run_copy(src, out)
    else:
        run_tiles(src, out, tile, overlap)
    wall = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "wall_s": round(wall, 1), "peak_rss_mb": round(rss_mb)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=30000)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--overlap", type=int, default=128)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, src, out, tile, overlap = args.child
        _child(mode, src, out, int(tile), int(overlap))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        scene = tmp / "scene.tif"
        t0 = time.perf_counter()
        make_scene(scene, args.size)
        gen_s = time.perf_counter() - t0
        results = {}
        for mode in ("copy", "tiles"):
            out = tmp / f"{mode}.tif"
            cmd = [sys.executable, __file__, "--child", mode, str(scene), str(out), str(args.tile), str(args.overlap)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{mode} failed:\n{proc.stderr}")
            results[mode] = json.loads(proc.stdout)
        with rasterio.open(scene) as a, rasterio.open(tmp / "tiles.tif") as b:
            rng = np.random.default_rng(1)
            for _ in range(20):
                r, c = (int(v) for v in rng.integers(0, args.size - 512, 2))
                w = Window(c, r, 512, 512)
                assert np.array_equal(a.read(window=w), b.read(window=w)), f"mismatch at {w}"
        report = {
            "scene": f"{args.size}x{args.size}x3 uint16", "tile": args.tile, "overlap": args.overlap,
            "generate_s": round(gen_s, 1), **{f"{m}_{k}": v for m, r in results.items() for k, v in r.items()
                                              if k != "mode"},
            "throughput_vs_copy": round(results["copy"]["wall_s"] / results["tiles"]["wall_s"], 3),
            "identity_check": "20 random 512x512 windows equal",
        }
        print(json.dumps(report, indent=2) if args.json else report)


if __name__ == "__main__":
    main()
