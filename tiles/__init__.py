"""tiles: the bounded-memory tiling engine for city-scale rasters (issue 3, not yet built).

The package is declared now so that ``pip install`` ships both top-level packages; its API
(windows, grids, readers, stitchers) lands with the tiling-engine issue.
"""
