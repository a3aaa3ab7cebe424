"""Scoring shared by both front ends: validated requests in, prediction ids and outputs out.

`DataPlane` is what `servicer.py` (Cyclone's API) and `oip.py` (Open Inference Protocol) call
after reading a request: it runs onnxruntime (in a worker thread for big requests), names each
row with a prediction id and hands the batch to the sink. Which models are served, and what may
be loaded or unloaded, is the `ModelCatalog`'s. Streams read ahead with `read_ahead` and score
their backlog in one go with `score_stream`. Transport-free: no grpc, no protobuf here.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from typing import NamedTuple, TypeVar, cast

import numpy as np

from cyclone.ids import uuid7_batch
from cyclone.telemetry import current_trace_id
from services.inference.batching import Prepared, feed_of, run_batch
from services.inference.catalog import ModelCatalog
from services.inference.model import LoadedModel, Outputs
from services.inference.sink import NullSink, PredictionSink

# Requests above this many rows run in a worker thread (onnxruntime releases the GIL);
# smaller ones are cheaper inline than the thread hop.
OFFLOAD_ROWS = 256

# (prediction ids, outputs) of one scored request.
Scored = tuple[list[str], Outputs]


class StreamJob(NamedTuple):
    """One stream message, looked up and validated."""

    model: LoadedModel
    prepared: Prepared


class DataPlane:
    """Validation, onnxruntime, prediction ids and hand-off to the sink."""

    def __init__(self, catalog: ModelCatalog, sink: PredictionSink | None = None) -> None:
        self.catalog = catalog
        self.sink: PredictionSink = sink or NullSink()

    async def predict(self, model: LoadedModel, columns: Mapping[str, np.ndarray]) -> Scored:
        """Validate named feature columns, then score them."""
        started = time.perf_counter()
        quick = model.quick_validate(columns)
        job = (
            Prepared(columns, model.validate(columns))
            if quick is None
            else Prepared(columns, *quick)
        )
        return await self.score(model, job, started)

    async def score(
        self, model: LoadedModel, job: Prepared, started: float, *, record: bool = True
    ) -> Scored:
        """Score one validated request; `started` (perf_counter) is when it arrived.

        `record=False` (the monitor's known-answer probes) keeps the rows out of the sink, so
        they are neither logged as traffic nor counted in the store's metrics.
        """
        scored = self.score_inline(model, job, started, record=record)
        if scored is not None:
            return scored
        outputs = await asyncio.to_thread(model.run, feed_of(model, job), job.rows)
        return self._scored(model, job, outputs, started, record)

    def score_inline(
        self, model: LoadedModel, job: Prepared, started: float, *, record: bool = True
    ) -> Scored | None:
        """`score` without leaving the event loop, for requests small enough to run inline;
        None for bigger ones (await `score`, which runs them in a worker thread).

        Servicers call this first: most requests are one row, and an awaited coroutine per
        request is measurable at that size."""
        if job.rows > OFFLOAD_ROWS:
            return None
        outputs = model.run(feed_of(model, job), job.rows)
        return self._scored(model, job, outputs, started, record)

    def _scored(
        self, model: LoadedModel, job: Prepared, outputs: Outputs, started: float, record: bool
    ) -> Scored:
        ids = uuid7_batch(job.rows)
        if record:
            latency_ms = (time.perf_counter() - started) * 1000.0
            self.sink.submit(model, ids, job, outputs, latency_ms, current_trace_id())
        return ids, outputs

    async def score_stream(
        self, jobs: Sequence[StreamJob | Exception], started: float
    ) -> list[Scored | Exception]:
        """One result per job, in order. Runs of consecutive jobs for the same model are
        batched (so ids still increase in message order); an exception in `jobs` (a message
        that could not be read or validated) stays where it is."""
        results: list[Scored | Exception | None] = [
            job if isinstance(job, Exception) else None for job in jobs
        ]
        for model, slots in _runs_by_model(jobs):
            prepared = [cast(StreamJob, jobs[slot]).prepared for slot in slots]
            for slot, result in zip(
                slots, await self._score_run(model, prepared, started), strict=True
            ):
                results[slot] = result
        return cast(list[Scored | Exception], results)  # every slot is filled by now

    async def _score_run(
        self, model: LoadedModel, jobs: Sequence[Prepared], started: float
    ) -> list[Scored | Exception]:
        """Score validated requests of one model in order, batched; one sink hand-off each."""
        small = [job for job in jobs if job.rows <= OFFLOAD_ROWS]
        batched = iter(run_batch(model, small))
        results: list[Scored | Exception] = []
        trace_id = current_trace_id()
        for job in jobs:
            outcome: Outputs | Exception
            if job.rows <= OFFLOAD_ROWS:
                outcome = next(batched)
            else:
                try:
                    feed = feed_of(model, job)
                    outcome = await asyncio.to_thread(model.run, feed, job.rows)
                except Exception as exc:
                    outcome = exc
            if isinstance(outcome, Exception):
                results.append(outcome)
                continue
            ids = uuid7_batch(job.rows)
            latency_ms = (time.perf_counter() - started) * 1000.0
            self.sink.submit(model, ids, job, outcome, latency_ms, trace_id)
            results.append((ids, outcome))
        return results


# The name start-up code has always used for the data plane.
Scorer = DataPlane


def _runs_by_model(
    jobs: Sequence[StreamJob | Exception],
) -> list[tuple[LoadedModel, list[int]]]:
    """Slots of consecutive jobs for one model (exceptions in between do not end a run)."""
    runs: list[tuple[LoadedModel, list[int]]] = []
    for slot, job in enumerate(jobs):
        if isinstance(job, Exception):
            continue
        if runs and runs[-1][0] is job.model:
            runs[-1][1].append(slot)
        else:
            runs.append((job.model, [slot]))
    return runs


T = TypeVar("T")


async def read_ahead(messages: AsyncIterator[T], limit: int) -> AsyncGenerator[list[T], None]:
    """Everything the client has sent since the last step, as one list per step.

    A reader task runs ahead of the consumer by at most `limit` messages, so whatever piled up
    while the previous backlog was scored is scored as one batch. A failed read ends the
    iteration with its exception once the messages before it are consumed. Close it (e.g.
    `contextlib.aclosing`) so the reader stops with the stream.
    """
    backlog: collections.deque[T] = collections.deque()
    arrived, room = asyncio.Event(), asyncio.Event()
    room.set()

    async def read() -> None:
        try:
            async for message in messages:
                backlog.append(message)
                arrived.set()
                if len(backlog) >= limit:
                    room.clear()
                    await room.wait()
        finally:
            arrived.set()

    reader = asyncio.create_task(read())
    try:
        while True:
            if not backlog:
                if reader.done():
                    reader.result()  # re-raises a failed read
                    return
                arrived.clear()
                await arrived.wait()
                continue
            batch = list(backlog)
            backlog.clear()
            room.set()
            yield batch
    finally:
        if not reader.done():
            reader.cancel()
