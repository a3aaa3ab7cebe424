"""The default `Worker`: fits and conversions in spawned worker processes."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any, TypeVar

from services.trainer.fit import (
    FitOutcome,
    FitTask,
    WrittenVersion,
    fit_and_evaluate,
    warm_up,
    write_version,
)

from .model import WorkerDied

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)
T = TypeVar("T")


def spawn_pool(workers: int) -> Executor:
    # spawn: a forked child would inherit the gRPC event loop and threads.
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _log_warm_up_failure(future: Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        # Not fatal: the job that needs the worker meets (and records) the same problem.
        log.warning("trainer worker warm-up failed: %s", future.exception())


class ProcessWorker:
    """`workers` processes from `pool_factory`; with `warm`, one starts (and imports
    scikit-learn, skl2onnx and onnxruntime, seconds of the first job's fit) at once."""

    def __init__(
        self,
        workers: int,
        pool_factory: Callable[[int], Executor] = spawn_pool,
        *,
        warm: bool = True,
    ) -> None:
        self._pool = pool_factory(workers)
        if warm:
            self._pool.submit(warm_up).add_done_callback(_log_warm_up_failure)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except BrokenProcessPool:
            raise WorkerDied("the worker process died") from None

    async def fit(self, task: FitTask) -> FitOutcome:
        return await self._run(fit_and_evaluate, task)

    async def write_version(
        self,
        pipeline: bytes,
        model: str,
        repository: str,
        version: str,
        sample: pd.DataFrame,
        extra: dict[str, Any],
    ) -> WrittenVersion:
        return await self._run(write_version, pipeline, model, repository, version, sample, extra)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
