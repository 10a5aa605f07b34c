"""Shared fixtures: the real data in ../shared/data (never copied into the repository)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SCHEMAS = ROOT.parent / "shared" / "schemas"


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory):
    """The suite's caches (compiled parts, training embeddings) in a folder of its own, never the
    user's ~/.cache/uvsam."""
    import os

    before = os.environ.get("UVSAM_CACHE")
    os.environ["UVSAM_CACHE"] = str(tmp_path_factory.mktemp("uvsam-cache"))
    yield
    if before is None:
        os.environ.pop("UVSAM_CACHE", None)
    else:
        os.environ["UVSAM_CACHE"] = before


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert DATA.is_dir(), f"real data expected at {DATA} (see the README)"
    return DATA


@pytest.fixture(scope="session")
def beijing_tile(data_dir) -> np.ndarray:
    """A real 1024x1024 RGB Beijing tile (uint8, H x W x 3)."""
    return np.asarray(Image.open(data_dir / "beijing-uv/image/train/49566_107866.png").convert("RGB"))


@pytest.fixture(scope="session")
def beijing_mask(data_dir) -> np.ndarray:
    return np.asarray(Image.open(data_dir / "beijing-uv/mask/train/49566_107866.png"))


@pytest.fixture(scope="session")
def beijing(data_dir, tmp_path_factory) -> Path:
    """The Beijing train and val tiles georeferenced by `uvsam import-xyz` (EPSG:3857 GeoTIFFs):
    ``train/images``, ``train/masks``, ``train/images.vrt`` and the same under ``val/``."""
    from tiles.xyz import import_xyz

    root = tmp_path_factory.mktemp("beijing")
    for split in ("train", "val"):
        import_xyz(data_dir / f"beijing-uv/image/{split}", 17, root / split,
                   masks_dir=data_dir / f"beijing-uv/mask/{split}")
    return root


@pytest.fixture(scope="session")
def model(beijing, tmp_path_factory) -> Path:
    """A UV-SAM model file trained on the Beijing train tiles with the documented schedule (10 epochs
    x 40 steps, about 90 s: the UV-SAM path's epochs train the specialist, as the generalist is a
    random efficientvit_sam_l0, no weights being reachable here), for the prediction tests."""
    from uvsam.training import TrainConfig, train

    out = tmp_path_factory.mktemp("model") / "m.ckpt"
    train(TrainConfig(images=str(beijing / "train/images"), labels=str(beijing / "train/masks"), out=str(out),
                      encoder="efficientvit_sam_l0", views_per_scene=1), log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def mobile_sam_ckpt(tmp_path_factory) -> Path:
    """A mobile_sam checkpoint with random weights, saved in the official (flat) layout."""
    import torch

    from uvsam.checkpoint import save_official
    from uvsam.modeling import build_generalist

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "mobile_sam.pt"
    save_official(build_generalist("mobile_sam"), path)
    return path


@pytest.fixture(scope="session")
def villages(data_dir) -> gpd.GeoDataFrame:  # noqa: F821 - imported lazily
    """The five distinct villages of the Beijing masks (train and val), EPSG:3857, largest first."""
    import geopandas as gpd

    from tiles.xyz import xyz_transform
    from uvsam.polygons import clean, merge, polygonise

    polys = []
    for split in ("train", "val"):
        for p in sorted((data_dir / f"beijing-uv/mask/{split}").glob("*.png")):
            y, x = map(int, p.stem.split("_"))
            polys += polygonise(np.asarray(Image.open(p)) > 0, xyz_transform(x, y, 17))
    polys = clean(merge(polys), "EPSG:3857", 2500.0, 2.0)
    gdf = gpd.GeoDataFrame(geometry=polys, crs="EPSG:3857")
    gdf = gdf.assign(a=gdf.to_crs(gdf.estimate_utm_crs()).area).sort_values("a", ascending=False)
    assert len(gdf) == 5
    return gdf.drop(columns="a").reset_index(drop=True)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``uvsam ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from uvsam.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def outline_hits(png, polygons, colour, samples: int = 24, reach: int = 2, tolerance: int = 60) -> float:
    """Share of points along the polygons' outlines (GeoSeries in any CRS) where a map picture
    uvsam wrote shows ``colour`` (RGB) within ``reach`` px."""
    from PIL import Image

    from uvsam.pictures import Picture

    pic = Picture.read(png)
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    hits = total = 0
    for poly in polygons.to_crs(pic.crs):
        ring = poly.exterior
        for k in range(samples):
            pt = ring.interpolate(k / samples, normalized=True)
            col, row = pic.pixel(pt.x, pt.y)
            patch = rgb[max(0, row - reach):row + reach + 1, max(0, col - reach):col + reach + 1]
            total += 1
            hits += bool((np.abs(patch - np.array(colour)).sum(axis=-1) < tolerance).any())
    return hits / max(1, total)
