"""User-facing errors: one line that names the file and the problem.

Every error that bad input can cause is raised as :class:`UvsamError`; the command line turns
it into one line on stderr and exit code 2 (a traceback only with ``--debug``).
"""

from __future__ import annotations

from pathlib import Path


class UvsamError(Exception):
    """An error caused by the user's input, reported without a traceback."""

    exit_code = 2

    def __init__(self, problem: str, path: str | Path | None = None):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class CheckpointError(UvsamError):
    """A checkpoint file is missing, corrupt, of the wrong family or unsafe to load."""


class WeightsError(UvsamError):
    """A weights download, import or verification failed."""


class InputError(UvsamError):
    """An input raster or argument cannot be used."""


class OutputError(UvsamError):
    """An output cannot be written: missing folder, no permission, disk full."""
