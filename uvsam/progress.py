"""Progress and where the time goes.

:class:`Progress`: long work reports itself on stderr. On a terminal a live tqdm bar (done/total,
rate, derived rates such as km2/h, counters, ETA); elsewhere (nohup, cron, Slurm, a notebook's
captured stderr) one timestamped line every :data:`SETTINGS` ``.interval`` seconds, also while a
single long unit runs, and one when the work ends; nothing with ``--quiet``. Units a resumed run
finds done are shown as done but never count as throughput.

:func:`stage`: the steps of a prediction time themselves (``read``, ``vectorise``, ``write``) into
this process's :data:`STAGES`, which ``uvsam predict --local`` reports and benchmarks read: the
figures come from the code as it runs, nothing wrapped or patched.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime

from tqdm import tqdm


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StageTimes:
    """Seconds and calls per stage in this process, and the peak RSS (MB) each stage last raised."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.rss_mb: dict[str, float] = {}
        self._peak = peak_rss_mb()

    def add(self, name: str, seconds: float) -> None:
        with self.lock:
            self.seconds[name] += seconds
            self.calls[name] += 1
            peak = peak_rss_mb()
            if peak > self._peak:
                self._peak = self.rss_mb[name] = peak

    def snapshot(self) -> dict:
        with self.lock:
            return {"seconds": dict(self.seconds), "calls": dict(self.calls), "rss_mb": dict(self.rss_mb)}


STAGES = StageTimes()


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the block as stage ``name`` of this process's :data:`STAGES`."""
    t = time.perf_counter()
    try:
        yield
    finally:
        STAGES.add(name, time.perf_counter() - t)


def _interval_from_env() -> float:
    """``UVSAM_PROGRESS_SECONDS`` (a positive number), else 30."""
    try:
        value = float(os.environ.get("UVSAM_PROGRESS_SECONDS", "30"))
    except ValueError:
        return 30.0
    return value if value > 0 else 30.0


@dataclass
class ProgressSettings:
    """``quiet``: no progress at all; ``interval``: seconds between the records written when
    stderr is not a terminal (``UVSAM_PROGRESS_SECONDS``, default 30); ``bar``: force (True) or
    refuse (False) the live bar, None: a bar exactly when stderr is a terminal."""

    quiet: bool = False
    interval: float = field(default_factory=_interval_from_env)
    bar: bool | None = None


SETTINGS = ProgressSettings()


def _number(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _duration(seconds: float) -> str:
    return tqdm.format_interval(seconds) if seconds == seconds and seconds < 1e7 else "?"


class Progress:
    """``total`` units of work (tiles, steps) of a ``task`` (predict, train ...); ``rates`` adds
    derived rates, e.g. ``{"km2/h": km2 per unit * 3600}``; ``done``: units already done when
    the work starts (a resumed run). Use as a context manager or call :meth:`close`."""

    def __init__(self, total: int, unit: str, done: int = 0, rates: dict[str, float] | None = None,
                 task: str = "uvsam"):
        self.total, self.unit, self.task, self.done, self.start = total, unit, task, done, done
        self.rates = rates or {}
        self.counters: dict[str, int] = {}
        self.fields: dict[str, str] = {}
        self.t0 = time.monotonic()
        self._lock = threading.Lock()
        self._bar = self._stop = None
        if SETTINGS.quiet:
            return
        if SETTINGS.bar if SETTINGS.bar is not None else sys.stderr.isatty():
            self._bar = tqdm(total=total, initial=done, unit=f" {unit}", desc=task, file=sys.stderr,
                             dynamic_ncols=True, smoothing=0, leave=True)
        else:  # records from a heartbeat: a line even while one long tile or epoch runs
            self._stop = threading.Event()
            threading.Thread(target=self._heartbeat, name="uvsam-progress", daemon=True).start()

    # -- what the work reports ----------------------------------------------------------------
    def advance(self, n: int = 1, **fields) -> None:
        """``n`` more units done; ``fields`` (e.g. ``epoch=3``, ``loss=0.41``) shown with the counts."""
        with self._lock:
            self.done += n
            self.fields.update({k: f"{v:.4f}" if isinstance(v, float) else str(v) for k, v in fields.items()})
        if self._bar is not None:
            self._bar.update(n)
            self._postfix()

    def skip(self, n: int) -> None:
        """``n`` units a resumed run found done: counted as done, not as throughput."""
        with self._lock:
            self.done += n
            self.start += n
        if self._bar is not None:
            self._bar.n += n
            self._bar.initial += n  # tqdm's rate is (n - initial) / elapsed with smoothing 0
            self._bar.last_print_n = self._bar.n
            self._bar.refresh()

    def count(self, name: str, n: int = 1) -> None:
        """A side counter (refinement windows), shown without advancing the units."""
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + n
        if self._bar is not None:
            self._postfix()

    # -- what is shown --------------------------------------------------------------------------
    def rate(self) -> float:
        """Units per second done by this run (resumed units excluded)."""
        return (self.done - self.start) / max(time.monotonic() - self.t0, 1e-9)

    def record(self) -> str:
        """One line: time, task, done/total, rates, counters, elapsed and ETA."""
        with self._lock:
            rate, done = self.rate(), self.done
            eta = (self.total - done) / rate if rate > 0 else float("nan")
            parts = [f"{datetime.now().astimezone():%Y-%m-%d %H:%M:%S}", f"{self.task}:"]
            parts += [f"{self.unit} {done}/{self.total} ({100 * done / max(1, self.total):.0f}%)"]
            parts += [f"{k} {v}" for k, v in self.fields.items()]
            parts.append(f"{_number(rate)} {self.unit}/s")
            parts += [f"{_number(rate * f)} {name}" for name, f in self.rates.items()]
            parts += [f"{k} {v}" for k, v in self.counters.items()]
            parts += [f"elapsed {_duration(time.monotonic() - self.t0)}", f"ETA {_duration(eta)}"]
        return " ".join(parts)

    def _postfix(self) -> None:
        rate = self.rate()
        post = dict(self.fields)
        post.update({name: _number(rate * f) for name, f in self.rates.items()})
        post.update({k: str(v) for k, v in self.counters.items()})
        self._bar.set_postfix(post, refresh=False)

    def _write(self) -> None:
        sys.stderr.write(self.record() + "\n")
        sys.stderr.flush()

    def _heartbeat(self) -> None:
        while not self._stop.wait(SETTINGS.interval):
            self._write()

    def close(self, failed: bool = False) -> None:
        """The work is over: the bar closed, or (records) a last one when the work lasted long
        enough to have had one. ``failed``: stopped by an error, which speaks for itself."""
        if self._bar is not None:
            self._postfix()
            self._bar.close()
            self._bar = None
        elif self._stop is not None and not self._stop.is_set():
            self._stop.set()
            if not failed and time.monotonic() - self.t0 >= SETTINGS.interval:
                self._write()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.close(failed=kind is not None)
