"""uvsam: urban-village mapping with UV-SAM on interchangeable efficient SAM encoders.

Data flows one way: raster -> harmonise -> tiles -> specialist -> prompts -> generalist ->
masks -> polygons -> layers -> change -> report. Each step lives in one module named after it.
"""

__version__ = "0.1.0"
