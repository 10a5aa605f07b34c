"""Scenes from STAC: the imagery of a STAC Item, ItemCollection, Catalog or Collection (a file or a
URL), or of a search of a STAC API, filtered by ``bbox`` and ``datetime``.

Each :class:`StacScene` is one item's raster asset (its absolute href: a URL or a path GDAL reads
by ranges) and the date the item says it was acquired, which fills the villages' ``acquired``.
The asset is the one named, else the item's ``visual`` asset (by key or role), else its only
GeoTIFF/JPEG 2000 data asset; an item with several candidates and none named is refused with
their names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pystac
import shapely

from tiles.remote import is_remote
from uvsam.errors import ConfigError, InputError

RASTER_TYPES = ("image/tiff", "image/jp2", "application/x-geotiff")
RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".vrt")


@dataclass(frozen=True)
class StacScene:
    """One item's raster: what the reader opens (``href``), when it was acquired (YYYY-MM-DD),
    and where it came from (item id, the item's own href, its collection, the asset's key)."""

    href: str
    acquired: str | None
    item_id: str
    item_href: str | None
    asset: str
    collection: str | None = None


@dataclass(frozen=True)
class StacQuery:
    """What to take from a STAC source: ``asset`` (None: the visual asset), ``bbox`` (west,
    south, east, north in degrees) and ``datetime`` (a date, a year, YYYY-MM, an RFC 3339
    instant or an interval ``A/B`` with ``..`` for an open end)."""

    source: str
    asset: str | None = None
    bbox: tuple[float, float, float, float] | None = None
    datetime: str | None = None

    def __post_init__(self):
        if self.bbox is not None:
            w, s, e, n = self.bbox
            if not (-180 <= w < e <= 180 and -90 <= s < n <= 90):
                raise ConfigError(f"{','.join(map(str, self.bbox))}: give WEST,SOUTH,EAST,NORTH in degrees",
                                  field="bbox")
        if self.datetime is not None:
            interval(self.datetime)


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    """``"W,S,E,N"`` -> floats (degrees); a ConfigError naming ``bbox`` otherwise."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise ConfigError(f"{text!r}: give WEST,SOUTH,EAST,NORTH in degrees", field="bbox")
    return values  # type: ignore[return-value]


def interval(text: str) -> tuple[datetime | None, datetime | None]:
    """``A/B``, ``../B``, ``A/..`` or one value -> (start, end) in UTC, an open end None; a year,
    YYYY-MM or a date covers the whole of it."""
    def bound(part: str, end: bool) -> datetime | None:
        part = part.strip()
        if part in ("", ".."):
            return None
        try:
            if len(part) == 4 and part.isdigit():
                lo, hi = datetime(int(part), 1, 1), datetime(int(part) + 1, 1, 1)
            elif len(part) == 7:
                y, m = map(int, part.split("-"))
                lo, hi = datetime(y, m, 1), datetime(y + m // 12, m % 12 + 1, 1)
            elif len(part) == 10:
                lo = datetime.combine(date.fromisoformat(part), datetime.min.time())
                hi = lo + timedelta(days=1)
            else:
                lo = hi = datetime.fromisoformat(part.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(f"{text!r}: give a date, a year, YYYY-MM, an RFC 3339 time or an interval A/B "
                              "(.. for an open end)", field="datetime") from None
        value = hi - timedelta(microseconds=1) if end and hi != lo else (hi if end else lo)
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)

    parts = text.split("/")
    if len(parts) > 2:
        raise ConfigError(f"{text!r}: an interval has one '/'", field="datetime")
    start, end = bound(parts[0], False), bound(parts[-1], True)
    if start and end and start > end:
        raise ConfigError(f"{text!r}: the interval ends before it starts", field="datetime")
    return start, end


def find_stac_scenes(query: StacQuery) -> list[StacScene]:
    """The scenes ``query`` selects, oldest first (then by item id); InputError naming the source
    when it cannot be read, is not STAC, or selects nothing."""
    items = _items(query)
    start, end = interval(query.datetime) if query.datetime else (None, None)
    area = shapely.box(*query.bbox) if query.bbox else None
    chosen = []
    for item in items:
        t0, t1 = _item_times(item)
        if (start and t1 and t1 < start) or (end and t0 and t0 > end):
            continue
        if area is not None:
            shape = shapely.geometry.shape(item.geometry) if item.geometry else (
                shapely.box(*item.bbox) if item.bbox else None)
            if shape is not None and not shape.intersects(area):
                continue
        chosen.append((t0 or datetime.min.replace(tzinfo=timezone.utc), item))
    if not chosen:
        what = ", ".join(f"{k} {v}" for k, v in (("bbox", query.bbox), ("datetime", query.datetime)) if v)
        raise InputError(f"no STAC item {'matches ' + what if what else 'found'} ({len(items)} read)", query.source)
    chosen.sort(key=lambda pair: (pair[0], pair[1].id))
    return [_scene(item, query) for _, item in chosen]


def _items(query: StacQuery) -> list[pystac.Item]:
    source = query.source
    remote = is_remote(source)
    if not remote and not Path(source).is_file():
        raise InputError("STAC source does not exist", source)
    try:
        raw = json.loads(pystac.StacIO.default().read_text(source))
    except (OSError, ValueError) as e:  # urllib's errors are OSErrors
        raise InputError(f"cannot read the STAC source ({str(e).splitlines()[0][:160]})", source) from None
    if not isinstance(raw, dict):
        raise InputError("not a STAC document (JSON object expected)", source)
    try:
        if any(c.endswith("/item-search") for c in raw.get("conformsTo", [])):
            return _search(query)
        kind = raw.get("type")
        if kind == "Feature":
            return [pystac.Item.from_dict(raw, href=source if remote else str(Path(source).resolve()))]
        if kind == "FeatureCollection":
            collection = pystac.ItemCollection.from_dict(raw, preserve_dict=False)
            base = source if remote else str(Path(source).resolve())
            for item in collection:  # relative asset hrefs are relative to the collection's file
                if item.get_self_href() is None:
                    item.set_self_href(base)
            return list(collection)
        if kind in ("Catalog", "Collection"):
            catalog = pystac.read_file(source if remote else str(Path(source).resolve()))
            return list(catalog.get_items(recursive=True))
    except pystac.STACError as e:
        raise InputError(f"not valid STAC ({str(e).splitlines()[0][:160]})", source) from None
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"cannot read the STAC catalogue ({str(e).splitlines()[0][:160]})", source) from None
    raise InputError(f"not a STAC Item, ItemCollection, Catalog, Collection or API (type {kind!r})", source)


def _search(query: StacQuery) -> list[pystac.Item]:
    """A STAC API's item search (pystac-client), by the query's bbox and datetime."""
    from pystac_client import Client
    from pystac_client.exceptions import APIError

    try:
        search = Client.open(query.source).search(bbox=query.bbox, datetime=query.datetime, max_items=10_000)
        return list(search.items())
    except APIError as e:
        raise InputError(f"the STAC API refused the search ({str(e).splitlines()[0][:160]})", query.source) from None


def _item_times(item: pystac.Item) -> tuple[datetime | None, datetime | None]:
    if item.datetime is not None:
        t = item.datetime if item.datetime.tzinfo else item.datetime.replace(tzinfo=timezone.utc)
        return t, t
    props = item.common_metadata
    return props.start_datetime, props.end_datetime


def _scene(item: pystac.Item, query: StacQuery) -> StacScene:
    key = choose_asset(item, query.asset, query.source)
    href = item.assets[key].get_absolute_href() or item.assets[key].href
    t0, _ = _item_times(item)
    return StacScene(href=href, acquired=t0.date().isoformat() if t0 else None, item_id=item.id,
                     item_href=item.get_self_href(), asset=key, collection=item.collection_id)


def choose_asset(item: pystac.Item, name: str | None, source: str) -> str:
    """The key of ``item``'s raster asset to read (see the module docstring)."""
    assets = item.assets
    if name is not None:
        if name not in assets:
            raise InputError(f"item {item.id} has no asset {name!r} (it has {', '.join(assets) or 'none'})", source)
        return name
    if "visual" in assets:
        return "visual"
    visual = [k for k, a in assets.items() if "visual" in (a.roles or [])]
    if len(visual) == 1:
        return visual[0]
    rasters = [k for k, a in assets.items()
               if (a.media_type or "").split(";")[0].strip() in RASTER_TYPES
               or Path(a.href.split("?")[0]).suffix.lower() in RASTER_SUFFIXES]
    data = [k for k in rasters if "data" in (assets[k].roles or [])] or rasters
    if len(data) == 1:
        return data[0]
    raise InputError(f"item {item.id} has no visual asset and {len(data)} raster assets; choose one with --asset "
                     f"({', '.join(data or assets) or 'none'})", source)
