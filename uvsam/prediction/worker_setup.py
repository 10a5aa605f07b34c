"""Dask preload for the worker processes of uvsam's own local clusters.

A terminal's Ctrl-C reaches every process of its foreground group: the workers as well as the
uvsam process that started them. The workers ignore it (the uvsam process stops, says what was
kept and closes its cluster), so no worker prints a traceback of its own.
"""

from __future__ import annotations

import signal
import threading


def dask_setup(worker) -> None:  # noqa: ARG001 - distributed's preload hook
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
