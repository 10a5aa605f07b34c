"""Where a prediction's scenes come from: rasters (files, folders, globs, URLs), the items of a
STAC source, and a tile service over an area, gathered into the one list
:func:`uvsam.prediction.run_prediction` takes (the command line and the Python API both use it)."""

from __future__ import annotations

from pathlib import Path

from tiles.service import TileService
from uvsam import __version__
from uvsam.errors import ConfigError, InputError
from uvsam.stac.scenes import StacQuery, StacScene, find_stac_scenes, parse_bbox


def scene_sources(scenes: list[str] | None = None, *, stac: str | None = None, asset: str | None = None,
                  bbox: str | tuple[float, float, float, float] | None = None, datetime: str | None = None,
                  tiles: str | None = None, zoom: int | None = None, tile_cache: str | Path | None = None,
                  max_connections: int = 2, requests_per_second: float = 8.0,
                  acquired: str | None = None) -> list[str | StacScene | TileService]:
    """The scenes named, then the items of ``stac`` (filtered by ``asset``, ``bbox``,
    ``datetime``), then the tile service ``tiles`` over ``bbox``. ConfigErrors name the field
    at fault (an option for one source given without it; ``acquired`` with STAC items, whose
    own dates are the acquisition dates; nothing to predict)."""
    out: list[str | StacScene | TileService] = [str(s) for s in scenes or []]
    for name, value in (("asset", asset), ("datetime", datetime)):
        if value is not None and stac is None:
            raise ConfigError("chooses among the items of a STAC source, and none is given", field=name)
    for name, value in (("zoom", zoom), ("tile_cache", tile_cache)):
        if value is not None and tiles is None:
            raise ConfigError("is for a tile service, and none is given", field=name)
    if bbox is not None and stac is None and tiles is None:
        raise ConfigError("is the area of a tile service or of a STAC source's items, and neither is given",
                          field="bbox")
    area = parse_bbox(bbox) if isinstance(bbox, str) else (tuple(bbox) if bbox is not None else None)
    if stac is not None:
        if acquired is not None:
            raise ConfigError("is not for STAC items: their own dates are the acquisition dates", field="acquired")
        out += find_stac_scenes(StacQuery(stac, asset, area, datetime))
    if tiles is not None:
        if area is None:
            raise ConfigError("is needed: the area (WEST,SOUTH,EAST,NORTH degrees) the tile service is read over",
                              field="bbox")
        if max_connections < 1:
            raise ConfigError(f"must be 1 or more, got {max_connections}", field="max_connections")
        if requests_per_second <= 0:
            raise ConfigError(f"must be positive, got {requests_per_second}", field="requests_per_second")
        out.append(TileService(tiles, area, zoom, Path(tile_cache) if tile_cache else None, max_connections,
                               requests_per_second, f"uvsam/{__version__} (urban village mapping)"))
    if not out:
        raise InputError("give the scenes to predict (files, folders, globs or URLs), a STAC source or a tile service")
    return out
