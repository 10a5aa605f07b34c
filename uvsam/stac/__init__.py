"""STAC, the catalogues imagery comes in and the records uvsam's outputs go out as.

- :mod:`uvsam.stac.scenes` (in): the scenes of a STAC Item, ItemCollection, Catalog, Collection
  or API search (pystac, pystac-client), each with its asset's href and acquisition date;
- :mod:`uvsam.stac.items` (out): a STAC Item describing a prediction's outputs (GeoPackage,
  probability COG, quicklook) with the projection, raster and file extensions, validated offline
  against the official schemas shipped in ``schemas/``.
"""
