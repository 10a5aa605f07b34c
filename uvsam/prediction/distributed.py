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

import contextlib
import logging
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError

from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster, WorkerPlugin
from distributed.comm.core import CommClosedError

from uvsam.errors import ClusterError, ConfigError
from uvsam.prediction.model import ModelInfo, get_model

WORKER_SETUP = "uvsam.prediction.worker_setup"  # a terminal's Ctrl-C is the uvsam process's to handle


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
        "memory_limit": "auto", "silence_logs": 40, "preload": [WORKER_SETUP]}} for g in gpus}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=40)


def make_client(scheduler: str | None = None, workers: int | None = None, threads: int = 2,
                gpus: list[int] | None = None) -> Client:
    """A client of ``scheduler`` (``tcp://host:port``), or of a local cluster sized to this machine:
    one worker per GPU in ``gpus`` (at most ``workers``), else CPU workers.

    Each local worker is a process running ``threads`` tasks at once (one computes while the
    next reads), with torch using the worker's share of the cores.
    """
    # no chatter on the user's terminal: a lost worker is recovered, a lost scheduler or worker
    # failure is reported by uvsam in one line (ClusterError); distributed's own logs say it with tracebacks
    for name in ["distributed", *[n for n in logging.Logger.manager.loggerDict if n.startswith("distributed.")]]:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if scheduler:
        return scheduler_client(scheduler)
    with _workers_ignore_ctrl_c():
        return _local_client(workers, threads, gpus)


WORKERS_TIMEOUT_S = 60  # how long a scheduler may take to show a worker (UVSAM_WORKERS_TIMEOUT)


def scheduler_client(address: str) -> Client:
    """A client of the scheduler at ``address``, once it has a worker: a scheduler that cannot be
    reached, or has no worker within :data:`WORKERS_TIMEOUT_S`, is one line, never a silent hang."""
    wait = float(os.environ.get("UVSAM_WORKERS_TIMEOUT", WORKERS_TIMEOUT_S))
    try:
        client = Client(address, timeout=min(wait, 15))
    except (OSError, TimeoutError) as e:
        raise ConfigError(f"cannot reach the Dask scheduler at {address} ({str(e).splitlines()[0][:120]})") from None
    try:
        client.wait_for_workers(1, timeout=wait)
    except (OSError, TimeoutError):
        client.close()
        raise ConfigError(f"the Dask scheduler at {address} has no worker (waited {wait:.0f} s): start some with "
                          f"`dask worker {address}`") from None
    return client


@contextlib.contextmanager
def _workers_ignore_ctrl_c():
    """Worker processes started in here never see SIGINT: each is spawned with it blocked (a
    thread's blocked signals pass to the process it starts, across exec, and Python leaves them
    so). A terminal's Ctrl-C, sent to the whole process group, is this process's to handle: it
    stops, says what was kept and closes its cluster; no worker prints a traceback of its own.
    Only the spawning thread blocks it, for the instant of the spawn (this process never misses a
    Ctrl-C). Workers a nanny restarts later ignore it once their preload has run
    (:data:`WORKER_SETUP`)."""
    from multiprocessing import util

    original = util.spawnv_passfds

    def spawn(path, args, passfds):
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return original(path, args, passfds)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    util.spawnv_passfds = spawn
    try:
        yield
    finally:
        util.spawnv_passfds = original


def _local_client(workers: int | None, threads: int, gpus: list[int] | None) -> Client:
    if gpus:
        gpus = gpus[: workers or len(gpus)]
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            return ClusterClient(per_gpu_cluster(gpus, threads))
        return ClusterClient(LocalCUDACluster(CUDA_VISIBLE_DEVICES=gpus, threads_per_worker=threads, host="127.0.0.1",
                                              dashboard_address="127.0.0.1:0", silence_logs=40,
                                              preload=[WORKER_SETUP]))
    cores = os.cpu_count() or 1
    n = workers or max(1, cores // 4)
    cluster = LocalCluster(n_workers=n, threads_per_worker=threads, processes=True, host="127.0.0.1",
                           dashboard_address="127.0.0.1:0", memory_limit="auto", silence_logs=40,
                           preload=[WORKER_SETUP])
    return ClusterClient(cluster)


def register_model(client: Client, info: ModelInfo) -> None:
    client.register_plugin(ModelPlugin(info))


def dask_runner(client: Client, in_flight: int | None = None) -> Callable[[Callable, Iterable[tuple]], Iterator]:
    """A runner for :func:`uvsam.prediction.predict_scene`: tasks on the cluster, results in order."""
    limit = in_flight or 2 * max(1, sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values()))

    def result(future):
        try:
            return future.result()
        except (CancelledError, CommClosedError) as e:  # the cluster, not the task: its own errors pass
            raise ClusterError(f"lost the Dask scheduler at {client.scheduler.address} mid-run ({type(e).__name__}); "
                               "finished work is kept: run the same command again once the scheduler is back"
                               ) from None

    def run(fn: Callable, arg_list: Iterable[tuple]) -> Iterator:
        pending: deque = deque()
        for args in arg_list:
            pending.append(client.submit(fn, *args, pure=False))
            if len(pending) >= limit:
                yield result(pending.popleft())
        while pending:
            yield result(pending.popleft())

    return run
