"""`uvsam bench-prompts` for every registered encoder on SpaceNet footprints (random weights).

    python benchmarks/prompt_protocol.py [--max-objects 20] [--encoders sam_vit_b,mobile_sam]
                                         [--rio sam_vit_b] [--json]

No official weights can be downloaded here: each encoder gets weights drawn at random with seed
0 and saved in its family's official layout (what a user's file looks like), so the numbers show
that the protocol runs on every family and what it costs, not how good any family is. Objects:
SpaceNet Atlanta's footprints (`atlanta_buildings.geojson` on `atlanta_pan_uint16.tif`, 0.5 m);
with ``--rio`` also SpaceNet Rio's, polygonised from its building masks (15 chips, 0.45 m).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import shapely
import torch
from rasterio.features import shapes

from uvsam.checkpoint import save_official
from uvsam.modeling.registry import ENCODERS
from uvsam.modeling.sam import build_generalist
from uvsam.prompt_bench import bench_prompts

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def rio_footprints(path: Path) -> None:
    """SpaceNet Rio's building masks (0/255) as polygons, one GeoPackage in WGS 84."""
    geoms = []
    for mask in sorted((DATA / "spacenet-rio/mask").glob("*.tif")):
        with rasterio.open(mask) as src:
            data = src.read(1) > 0
            geoms += [shapely.geometry.shape(g) for g, v in shapes(data.astype(np.uint8), data, transform=src.transform)
                      if v == 1]
            crs = src.crs
    gpd.GeoDataFrame(geometry=geoms, crs=crs).to_file(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoders", default=",".join(sorted(ENCODERS)))
    ap.add_argument("--max-objects", type=int, default=20)
    ap.add_argument("--rio", default="", help="encoders to run on the Rio footprints too")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    runs = [(e, "atlanta") for e in args.encoders.split(",") if e] + [(e, "rio") for e in args.rio.split(",") if e]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rio = Path(tmp) / "rio_buildings.gpkg"
        if any(where == "rio" for _, where in runs):
            rio_footprints(rio)
        for encoder, where in runs:
            ckpt = Path(tmp) / f"{encoder}_seed0.pt"
            if not ckpt.exists():
                torch.manual_seed(0)
                save_official(build_generalist(encoder), ckpt)
            images, objects = ((DATA / "spacenet-atlanta/atlanta_pan_uint16.tif",
                                DATA / "spacenet-atlanta/atlanta_buildings.geojson") if where == "atlanta"
                               else (DATA / "spacenet-rio/image", rio))
            t = time.perf_counter()
            r = bench_prompts(encoder, ckpt, str(images), str(objects), max_objects=args.max_objects, device="cpu")
            rows.append({"encoder": encoder, "objects": f"{where} ({r['objects']})",
                         **{k: v["all"] for k, v in r["miou"].items()}, "seconds": round(time.perf_counter() - t, 1)})
            if not args.json:
                print(" | ".join(str(v) for v in rows[-1].values()), flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
