"""Running prediction on Dask: a local cluster or an existing scheduler, the model loaded once per worker.

Tasks are the plain functions of :mod:`uvsam.prediction` (a batch of tiles, a refinement window);
:func:`dask_runner` submits them with a bounded number in flight (so image blocks are read
ahead while the model computes, without flooding memory) and yields results in submission
order. The local cluster binds its scheduler and dashboard to 127.0.0.1 only.

On a machine with GPUs (``--device auto`` or ``cuda``), the local cluster is one worker per GPU,
each seeing only its own (``CUDA_VISIBLE_DEVICES``), so the model's ``cuda:0`` is a different
GPU in every worker: dask-cuda's ``LocalCUDACluster`` when installed, else the same layout built
from distributed's own parts (:func:`per_gpu_cluster`). ``--device cuda:N`` keeps one GPU. On a
cluster of your own (``--scheduler``), start one worker per GPU (``dask cuda worker``, or
``dask worker`` with ``CUDA_VISIBLE_DEVICES`` set per worker).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster, WorkerPlugin

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


class ClusterClient(Client):
    """A client of a local cluster it was made for: closing it (``with``, ``close()``) closes the
    cluster too, whose worker processes would otherwise outlive the run (a Client closes only a
    cluster it started itself, not one it was handed)."""

    def close(self, *args, **kwargs):
        cluster = self.cluster
        try:
            return super().close(*args, **kwargs)
        finally:
            if cluster is not None:
                cluster.close()


def per_gpu_cluster(gpus: list[int], threads: int = 2) -> SpecCluster:
    """A local cluster of one worker process per GPU in ``gpus``, each started with
    ``CUDA_VISIBLE_DEVICES`` set to its GPU alone (what dask-cuda's LocalCUDACluster does)."""
    workers = {f"gpu-{g}": {"cls": Nanny, "options": {
        "nthreads": threads, "env": {"CUDA_VISIBLE_DEVICES": str(g)}, "host": "127.0.0.1",
        "memory_limit": "auto", "silence_logs": 40}} for g in gpus}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=40)


def make_client(scheduler: str | None = None, workers: int | None = None, threads: int = 2,
                gpus: list[int] | None = None) -> Client:
    """A client of ``scheduler`` (``tcp://host:port``), or of a local cluster sized to this machine:
    one worker per GPU in ``gpus`` (at most ``workers``), else CPU workers.

    Each local worker is a process running ``threads`` tasks at once (one computes while the
    next reads), with torch using the worker's share of the cores.
    """
    if scheduler:
        return Client(scheduler)
    logging.getLogger("distributed").setLevel(logging.WARNING)  # no INFO chatter on the user's terminal
    if gpus:
        gpus = gpus[: workers or len(gpus)]
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            return ClusterClient(per_gpu_cluster(gpus, threads))
        return ClusterClient(LocalCUDACluster(CUDA_VISIBLE_DEVICES=gpus, threads_per_worker=threads, host="127.0.0.1",
                                       dashboard_address="127.0.0.1:0", silence_logs=40))
    cores = os.cpu_count() or 1
    n = workers or max(1, cores // 4)
    cluster = LocalCluster(n_workers=n, threads_per_worker=threads, processes=True, host="127.0.0.1",
                           dashboard_address="127.0.0.1:0", memory_limit="auto", silence_logs=40)
    return ClusterClient(cluster)


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
