"""Step 1, the specialist: village probabilities of the scene's tiles, in batches, on any worker."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import shapely
import torch
from affine import Affine
from rasterio.windows import Window

from tiles.grid import Tile
from tiles.stitch import Stitcher
from uvsam.config import PredictConfig
from uvsam.prediction.execution import Runner, run_journaled
from uvsam.prediction.journal import Journal
from uvsam.prediction.model import ModelInfo, get_gate, get_model
from uvsam.prediction.scene import ScenePrep, open_source, read_tile
from uvsam.progress import stage


def specialist_batch(prep: ScenePrep, info: ModelInfo, windows: list[tuple[int, int, int, int]]) -> dict:
    """Village probabilities of tile windows (col, row, w, h), read and computed together.

    Returns ``prob`` (n, size, size) float32, NaN where the input was invalid or the tile gate
    (``info.gate``) rejected the tile, ``gate`` (n,) the gate's scores (NaN without a gate) and
    ``seconds`` the batch took on its worker (reading included), for the tiles layer.
    """
    t0 = time.perf_counter()
    model = get_model(info)
    src = open_source(prep)
    tiles = [read_tile(prep, info, Window(*w), src) for w in windows]
    x = torch.from_numpy(np.stack([t[0] for t in tiles])).to(info.device.torch)
    valid = np.stack([valid for _, valid in tiles])
    gate = np.full(len(tiles), np.nan, np.float32)
    keep = np.ones(len(tiles), bool)
    if info.gate is not None:
        with torch.inference_mode(), info.device.autocast():
            gate = get_gate(info).tile_scores(x, info.gate.crop).float().cpu().numpy().astype(np.float32)
        keep = gate >= info.gate.threshold
    prob = np.full(valid.shape, np.nan, np.float32)
    if keep.any():
        with torch.inference_mode(), info.device.autocast():
            logits, _ = model.run_specialist(x[torch.from_numpy(keep).to(x.device)])
        prob[keep] = torch.softmax(logits.float(), 1)[:, 1].cpu().numpy()
    prob[~valid] = np.nan
    return {"prob": prob, "gate": gate, "seconds": np.float64(time.perf_counter() - t0)}


def tile_windows(scene) -> list[tuple[Tile, tuple[int, int, int, int]]]:
    return [(t, (int(t.window.col_off), int(t.window.row_off), int(t.window.width), int(t.window.height)))
            for t in scene.tiles]


def batches(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def specialist_mosaic(scene, prep: ScenePrep, info: ModelInfo, cfg: PredictConfig, mosaic: Path, runner: Runner,
                      journal: Journal, progress: Callable[[str, int], None] | None = None) -> list[dict]:
    """Write the scene's village probability mosaic (a COG, NaN where no tile saw valid data)
    from tile batches run as journaled tasks; returns the tiles layer's rows."""
    jobs = tile_windows(scene)
    rows = []
    with Stitcher(mosaic, scene.grid, channels=1, dtype="float32", crs=prep.crs, nodata=float("nan"),
                  driver="COG") as stitcher:
        groups = list(batches(jobs, cfg.batch_size or info.device.tile_batch(scene.grid.size)))
        keys = [f"{g[0][0].index}-{g[-1][0].index}" for g in groups]
        resumed = {k for k in keys if journal.has_arrays(k)}
        results = run_journaled(runner, specialist_batch, [(prep, info, [w for _, w in g]) for g in groups], keys,
                                journal.has_arrays, journal.load_arrays, journal.save_arrays, save_behind=True)
        for group, key, result in zip(groups, keys, results, strict=True):
            if progress is not None:
                progress("tiles_resumed" if key in resumed else "tiles", len(group))
            seconds = float(result["seconds"]) / len(group)
            gates = result.get("gate", np.full(len(group), np.nan))
            for (tile, _), p, g in zip(group, result["prob"], gates, strict=True):
                valid = np.isfinite(p)
                gated = info.gate is not None and bool(g < info.gate.threshold)
                with stage("write"):
                    stitcher.add(tile, p[None], valid)
                rows.append(tile_row(tile, scene.grid, "gated" if gated else "done", round(seconds, 3),
                                     float(valid.mean()), None if np.isnan(g) else round(float(g), 4)))
    done = {r["index"] for r in rows}
    rows += [tile_row(t, scene.grid, "nodata", None, 0.0) for t in scene.grid if t.index not in done]
    return sorted(rows, key=lambda r: r["index"])


def tile_row(tile: Tile, grid, status: str, seconds: float | None, valid_fraction: float,
             gate_score: float | None = None) -> dict:
    """A feature of the tiles layer: where the tile is, whether it ran (``done``; ``gated``: the
    tile gate rejected it, ``gate_score`` below its threshold), how long it took."""
    return {"index": tile.index, "row": tile.row, "col": tile.col, "status": status, "seconds": seconds,
            "valid_fraction": round(valid_fraction, 4), "gate_score": gate_score,
            "geometry": shapely.box(*window_bounds(tile.window, grid.transform))}


def window_bounds(window: Window, transform: Affine) -> tuple[float, float, float, float]:
    """(minx, miny, maxx, maxy) of a pixel window (rasterio.windows.bounds, without its deprecated ``*``)."""
    c0, r0 = window.col_off, window.row_off
    (xa, ya), (xb, yb) = transform @ (c0, r0), transform @ (c0 + window.width, r0 + window.height)
    return min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)
