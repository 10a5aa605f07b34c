"""Running prediction on Dask: a local cluster or an existing scheduler, the model loaded once per worker.

Tasks are the plain functions of :mod:`uvsam.prediction` (a batch of tiles, a refinement window);
:func:`dask_runner` submits them with a bounded number in flight (so image blocks are read
ahead while the model computes, without flooding memory) and yields results in submission
order. The local cluster binds its scheduler and dashboard to 127.0.0.1 only.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from distributed import Client, LocalCluster, WorkerPlugin

from uvsam.prediction.model import ModelInfo, get_model


class ModelPlugin(WorkerPlugin):
    """Loads the model when a worker starts (and again on a worker that replaces a lost one)."""

    name = "uvsam-model"

    def __init__(self, info: ModelInfo):
        self.info = info

    def setup(self, worker):
        import torch

        # the worker's cores shared among its task threads (computed where it runs)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, worker.state.nthreads)))
        get_model(self.info)


def make_client(scheduler: str | None = None, workers: int | None = None, threads: int = 2) -> Client:
    """A client of ``scheduler`` (``tcp://host:port``), or of a local cluster sized to this machine.

    Each local worker is a process running ``threads`` tasks at once (one computes while the
    next reads), with torch using the worker's share of the cores.
    """
    if scheduler:
        return Client(scheduler)
    logging.getLogger("distributed").setLevel(logging.WARNING)  # no INFO chatter on the user's terminal
    cores = os.cpu_count() or 1
    n = workers or max(1, cores // 4)
    cluster = LocalCluster(n_workers=n, threads_per_worker=threads, processes=True, host="127.0.0.1",
                           dashboard_address="127.0.0.1:0", memory_limit="auto", silence_logs=40)
    return Client(cluster)


def register_model(client: Client, info: ModelInfo) -> None:
    client.register_plugin(ModelPlugin(info))


def dask_runner(client: Client, in_flight: int | None = None) -> Callable[[Callable, Iterable[tuple]], Iterator]:
    """A runner for :func:`uvsam.prediction.predict_scene`: tasks on the cluster, results in order."""
    limit = in_flight or 2 * max(1, sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values()))

    def run(fn: Callable, arg_list: Iterable[tuple]) -> Iterator:
        pending: deque = deque()
        for args in arg_list:
            pending.append(client.submit(fn, *args, pure=False))
            if len(pending) >= limit:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    return run
