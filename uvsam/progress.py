"""Progress and where the time goes.

:class:`Progress`: one line on a terminal (done/total, rate, ETA and any counters); silent when
stderr is not a terminal (batch runs and logs get the commands' own summary lines).

:func:`stage`: the steps of a prediction time themselves (``read``, ``vectorise``, ``write``) into
this process's :data:`STAGES`, which ``uvsam predict --local`` reports and benchmarks read: the
figures come from the code as it runs, nothing wrapped or patched.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator


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



class Progress:
    """``total`` units of work (tiles, steps); ``rates`` adds derived rates, e.g.
    ``{"km2/h": km2 per unit * 3600}``; ``done`` counts units already done (a resumed run)."""

    def __init__(self, total: int, unit: str, done: int = 0, rates: dict[str, float] | None = None):
        self.total, self.unit, self.done, self.start = total, unit, done, done
        self.rates = rates or {}
        self.counters: dict[str, int] = {}
        self.fields: dict[str, str] = {}
        self.t0 = time.monotonic()
        self.out = sys.stderr if sys.stderr.isatty() else None

    def advance(self, n: int = 1, **fields) -> None:
        """``n`` more units done; ``fields`` (e.g. ``epoch=3``, ``loss=0.41``) shown before the rate."""
        self.done += n
        self.fields.update({k: f"{v:.4f}" if isinstance(v, float) else str(v) for k, v in fields.items()})
        self._show()

    def count(self, name: str, n: int = 1) -> None:
        """A side counter (refinement windows), shown without advancing the units."""
        self.counters[name] = self.counters.get(name, 0) + n
        self._show()

    def _show(self) -> None:
        if self.out is None:
            return
        rate = (self.done - self.start) / max(time.monotonic() - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        parts = [f"{k} {v}" for k, v in self.fields.items()]
        parts += [f"{self.unit} {self.done}/{self.total}", f"{rate:.2f}/s"]
        parts += [f"{rate * f:.1f} {name}" for name, f in self.rates.items()]
        parts += [f"{k} {v}" for k, v in self.counters.items()]
        parts.append(f"ETA {int(eta // 60)}m{int(eta % 60):02d}s" if eta == eta else "ETA ?")
        self.out.write("\r" + " ".join(parts) + " ")
        self.out.flush()

    def line_break(self) -> None:
        """End the current line (an epoch is over, the run is over)."""
        if self.out is not None:
            self.out.write("\n")

    close = line_break
