"""tiles: a bounded-memory tiling engine for city-scale rasters.

One concept per module, in the order data flows through them:

- :mod:`tiles.reader` — a raster as the model sees it (bands, ground resolution, CRS), window by
  window, with a validity mask from nodata, internal masks and alpha;
- :mod:`tiles.radiometry` — one scene-level normalisation applied to every tile;
- :mod:`tiles.grid` — the tile grid (full coverage, exact overlaps);
- :mod:`tiles.plan` — the scene plan: grid, normalisation, non-empty tiles (the manifest);
- :mod:`tiles.dataset` — a torch ``Dataset`` of tiles (imports torch; everything else does not);
- :mod:`tiles.stitch` — per-tile outputs blended into a mosaic written as it completes;
- :mod:`tiles.xyz` and :mod:`tiles.vrt` — XYZ tile folders to GeoTIFFs and VRT mosaics.
"""

from tiles.errors import TilesError
from tiles.grid import Tile, TileGrid
from tiles.plan import ScenePlan, TilingConfig, dataset_stretch, plan
from tiles.radiometry import Stretch, compute_stretch
from tiles.reader import RasterSource, ReadOptions, ground_resolution
from tiles.stitch import Stitcher, blend_weights

__all__ = [
    "RasterSource", "ReadOptions", "ScenePlan", "Stitcher", "Stretch", "Tile", "TileDataset", "TileGrid",
    "TilesError", "TilingConfig", "blend_weights", "compute_stretch", "dataset_stretch", "ground_resolution",
    "plan",
]


def __getattr__(name):  # TileDataset needs torch: import it only when asked for
    if name == "TileDataset":
        from tiles.dataset import TileDataset

        return TileDataset
    raise AttributeError(f"module 'tiles' has no attribute {name!r}")
