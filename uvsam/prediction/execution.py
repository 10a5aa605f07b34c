"""Where prediction's tasks run: in this process or on Dask (:mod:`uvsam.prediction.distributed`),
and how finished tasks are journaled so an interrupted run resumes."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

from uvsam.errors import ConfigError

Runner = Callable[[Callable, Iterable[tuple]], Iterator]


LOCAL_CLUSTER_MIN_CORES = 8
SCHEDULER_SCHEMES = ("tcp://", "tls://", "inproc://", "ws://", "wss://")


def runs_in_process(local: bool | None, scheduler: str | None = None, workers: int | None = None,
                    gpus: int = 0) -> bool:
    """Where a prediction runs when the user did not say (``local`` None): on a named scheduler
    or a requested number of workers, Dask; with ``gpus`` GPUs to use, Dask (a worker per GPU)
    when there are several and this process when one; otherwise in this process on machines
    with fewer than ``LOCAL_CLUSTER_MIN_CORES`` cores, where one model's threads already use
    every core and a local cluster only adds processes and memory (docs/benchmarks.md), else a
    local cluster."""
    if workers is not None and workers < 1:
        raise ConfigError(f"must be at least 1, got {workers}", field="workers")
    if scheduler is not None and not scheduler.startswith(SCHEDULER_SCHEMES):
        raise ConfigError(f"must be a scheduler address such as tcp://HOST:8786, got {scheduler!r}", field="scheduler")
    if local is not None:
        return local
    if scheduler or workers:
        return False
    if gpus:
        return gpus == 1
    return (os.cpu_count() or 1) < LOCAL_CLUSTER_MIN_CORES


def run_local(fn: Callable, arg_list: Iterable[tuple]) -> Iterator:
    """Run tasks in this process, in order (the runner used without a cluster)."""
    for args in arg_list:
        yield fn(*args)


def run_journaled(runner: Runner, fn: Callable, arg_list: list[tuple], keys: list[str], exists: Callable,
                  load: Callable, save: Callable, save_behind: bool = False) -> Iterator:
    """``runner`` over the tasks the journal does not hold yet; all results in order.

    Finished results are read back lazily, so memory holds no more than the runner does; one
    that cannot be read back (``load`` returns None) is computed again, here.

    ``save_behind``: a result is saved on a thread of its own while the next task starts (its
    reading, single-threaded, then overlaps the saving, also single-threaded, on another core),
    one save at a time, each finished before the next is started and before the last result is
    handed on; for results nobody changes once yielded. A save cut short leaves nothing (the
    journal's writes are atomic), so an interrupted run recomputes that task, as without.
    """
    todo = [i for i, k in enumerate(keys) if not exists(k)]
    computed = iter(zip(todo, runner(fn, (arg_list[i] for i in todo)), strict=True))
    pending = set(todo)
    with ThreadPoolExecutor(1, thread_name_prefix="uvsam-journal") if save_behind and todo else nullcontext() as saver:
        saving = None
        for i, key in enumerate(keys):
            if i in pending:
                j, result = next(computed)
                if saving is not None:
                    saving.result()  # its error (a full disk) raised here, before anything more is saved
                    saving = None
                if saver is None:
                    save(keys[j], result)
                else:
                    saving = saver.submit(save, keys[j], result)
                    if j == todo[-1]:  # the last one: saved before the run goes on
                        saving.result()
                        saving = None
                yield result
            else:
                result = load(key)
                if result is None:
                    result = next(iter(runner(fn, [arg_list[i]])))
                    save(key, result)
                yield result
