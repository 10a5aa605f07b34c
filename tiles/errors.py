"""Errors of the tiling engine: what is wrong, and with which file."""

from __future__ import annotations

from pathlib import Path


class TilesError(ValueError):
    """Bad input to the tiling engine. ``str()`` is one line: ``PATH: problem``."""

    def __init__(self, problem: str, path: str | Path | None = None, transient: bool = False):
        self.problem = problem
        self.path = None if path is None else str(path)
        self.transient = transient  # a read that may succeed when asked again (a remote transfer cut short)
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


def write_failure(e: BaseException) -> str:
    """The most specific line about a failed write: GDAL's own message ("_tiffWriteProc: No space
    left on device") rather than rasterio's "Write failed. See previous exception"."""
    best = ""
    while e is not None:
        text = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)).strip().splitlines()
        line = text[0][:200] if text else type(e).__name__
        if "previous exception" not in line:
            best = line
        e = e.__cause__ or e.__context__
    return best or "write failed"


def first_line(e: BaseException) -> str:
    """The first line of what went wrong: GDAL's own reason, where rasterio's message only points to
    it ("Read failed. See previous exception for details.": the chained exception holds it)."""
    seen = 0
    while "previous exception" in str(e) and (e.__cause__ or e.__context__) is not None and seen < 8:
        e, seen = e.__cause__ or e.__context__, seen + 1
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
