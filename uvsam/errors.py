"""User-facing errors: one line that names the file and the problem.

Every error that bad input can cause is raised as :class:`UvsamError`; the command line turns
it into one line on stderr and exit code 2 (a traceback only with ``--debug``).
"""

from __future__ import annotations

from pathlib import Path


class UvsamError(Exception):
    """An error caused by the user's input, reported without a traceback."""

    exit_code = 2

    def __init__(self, problem: str, path: str | Path | None = None, field: str | None = None):
        self.path = None if path is None else str(path)
        self.problem = problem
        self.field = field  # the configuration field at fault (the CLI names its flag instead)
        super().__init__(self.line())

    def line(self, name: str | None = None) -> str:
        """The one line: path, then the field (or ``name``, the flag that set it), then the problem."""
        name = name or self.field
        text = f"{name} {self.problem}" if name else self.problem
        return f"{self.path}: {text}" if self.path else text


class CheckpointError(UvsamError):
    """A checkpoint file is missing, corrupt, of the wrong family or unsafe to load."""


class WeightsError(UvsamError):
    """A weights download, import or verification failed."""


class InputError(UvsamError):
    """An input raster or argument cannot be used."""


class OutputError(UvsamError):
    """An output cannot be written: missing folder, no permission, disk full."""


class ConfigError(InputError):
    """A configuration value is out of range or inconsistent (``field`` names it)."""


class ClusterError(UvsamError):
    """The Dask cluster a run was using went away mid-run (its scheduler died or was unreachable);
    finished work is journaled, so the same command resumes once the cluster is back."""
