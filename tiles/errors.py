"""Errors of the tiling engine: what is wrong, and with which file."""

from __future__ import annotations

from pathlib import Path


class TilesError(ValueError):
    """Bad input to the tiling engine. ``str()`` is one line: ``PATH: problem``."""

    def __init__(self, problem: str, path: str | Path | None = None):
        self.problem = problem
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
