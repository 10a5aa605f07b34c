"""uvsam: urban-village mapping with UV-SAM on interchangeable efficient SAM encoders.

Data flows one way: raster -> harmonise -> tiles -> specialist -> prompts -> generalist ->
masks -> polygons -> layers -> change -> report. Each step lives in one module named after it.

The Python API is flat, one function per command, with the command's options as keywords::

    import uvsam

    model = uvsam.train("labels/images", "labels/masks", "villages.ckpt")
    villages = uvsam.predict("city_2020.tif", model, "villages.gpkg", layer="y2020", acquired="2020-06-01")
    scores = uvsam.evaluate(model, "test/images", "test/masks")
    changes = uvsam.change({"2018": "villages.gpkg:y2018", "2020": villages}, "change.gpkg")

``import uvsam`` stays light: the functions live in :mod:`uvsam.api`, loaded on first use.
"""

__version__ = "0.1.0"

API = ("change", "evaluate", "predict", "train")
__all__ = ["__version__", *API]


def __getattr__(name: str):
    """``uvsam.predict`` and the other API functions, loading :mod:`uvsam.api` on first use (PEP 562)."""
    if name in API:
        from uvsam import api

        return getattr(api, name)
    raise AttributeError(f"module 'uvsam' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API])
