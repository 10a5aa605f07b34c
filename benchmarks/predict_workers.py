"""`uvsam predict` in process vs on 1 and 2 local Dask workers: wall time and peak memory, in one run.

    python benchmarks/predict_workers.py SCENE... --model MODEL.ckpt [--tile 256 --overlap 128]
        [--cluster 1x2 --cluster 2x1 ...] [--no-refine] [--json]

``--cluster WxT``: W local Dask workers of T task threads each (default 1x1, 1x2, 2x1), after
an in-process run (``--local``) that is the reference.

Each configuration predicts the same scenes from scratch (fresh output and journal). Peak
memory is the largest sum of resident set sizes over this process and all its children
(the Dask nannies and workers), sampled every 0.2 s. Polygons are checked to be the same in
every configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyogrio

from uvsam.prediction import PredictConfig, run_prediction


class PeakRSS:
    """Peak summed RSS of this process tree, sampled in a thread."""

    def __init__(self, every: float = 0.2):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process(os.getpid())
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenes", nargs="+")
    ap.add_argument("--model", required=True)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=128)
    ap.add_argument("--cluster", action="append", help="WORKERSxTHREADS, e.g. 2x1 (repeatable)")
    ap.add_argument("--no-refine", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cfg = PredictConfig(tile=args.tile, overlap=args.overlap, refine=not args.no_refine)
    rows, outputs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        clusters = [tuple(int(v) for v in c.split("x")) for c in (args.cluster or ["1x1", "1x2", "2x1"])]
        for mode in ["local", *clusters]:
            out = Path(tmp) / f"{mode}.gpkg"
            with PeakRSS() as mem:
                t = time.perf_counter()
                if mode == "local":
                    summary = run_prediction(args.scenes, args.model, out, cfg, log=lambda m: None)
                else:
                    from uvsam.prediction import model_info
                    from uvsam.prediction.distributed import dask_runner, make_client, register_model

                    with make_client(workers=mode[0], threads=mode[1]) as client:
                        register_model(client, model_info(args.model))
                        t = time.perf_counter()  # cluster start-up is reported apart
                        summary = run_prediction(args.scenes, args.model, out, cfg, runner=dask_runner(client),
                                                 log=lambda m: None)
                wall = time.perf_counter() - t
            outputs.append(pyogrio.read_dataframe(out, layer="villages"))
            name = "in process" if mode == "local" else f"{mode[0]} worker(s) x {mode[1]} thread(s)"
            rows.append({"mode": name, "seconds": round(wall, 1), "peak_rss_mb": round(mem.peak / 2**20),
                         "villages": summary["villages"]})
    base = rows[1]["seconds"]
    for r in rows:
        r["speedup_vs_first_cluster"] = round(base / r["seconds"], 2)
    same = all(o.drop(columns="geometry").equals(outputs[0].drop(columns="geometry")) for o in outputs)
    result = {"scenes": args.scenes, "tile": args.tile, "overlap": args.overlap, "refine": cfg.refine,
              "cpus": os.cpu_count(), "same_polygons": same, "runs": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{len(args.scenes)} scene(s), tile {args.tile}/{args.overlap}, refine={cfg.refine}, "
          f"{os.cpu_count()} CPUs, same polygons everywhere: {same}")
    for r in rows:
        speedup = r["speedup_vs_first_cluster"]
        print(f"  {r['mode']:<28} {r['seconds']:>7.1f} s  x{speedup:<5} peak RSS {r['peak_rss_mb']} MB")


if __name__ == "__main__":
    main()
