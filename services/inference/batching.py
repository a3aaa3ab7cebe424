"""Batching of already-validated requests into as few onnxruntime calls as possible.

onnxruntime's per-call cost dwarfs its per-row cost for small requests (one row
≈ 6 µs, 32 rows ≈ 22 µs), so a PredictStream scores the backlog its client has
already sent as one batch. Validation happens before a request joins a batch, so
one bad request cannot fail the others; if onnxruntime fails on a batch, its
requests are rerun one by one.

Unary calls are not batched: measured on the inference bench (grpc.aio, 2 cores),
concurrent unary RPCs almost never overlap at this point (mean batch ≈ 1.02 at
concurrency 32), so a batcher only added an event-loop pass per call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from services.inference.model import LoadedModel, Outputs

# Rows of one onnxruntime call when a stream's backlog is batched (a single bigger request
# still runs alone): bigger calls gain little per row and would hold the event loop for
# longer. Not the per-request limit, which is the `max_batch_rows` setting.
ROWS_PER_BATCHED_RUN = 256


class Prepared:
    """One validated request: its columns (what the sink gets) and, when all numeric
    checks ran on it, its (numeric features, rows) float block (float32 or float64; often a
    transposed view of the request's own [rows, features] tensor, so feeding it copies nothing).

    An all-numeric request may come as the block alone (`columns=None`, with `names` naming
    its rows): its columns are views of the block, made only if something asks for them.
    Most requests never need them (the sink reads the block), and they are per-request work
    on the hottest path.
    """

    __slots__ = ("_columns", "block", "names", "rows")

    def __init__(
        self,
        columns: Mapping[str, np.ndarray] | None,
        rows: int,
        block: np.ndarray | None = None,
        names: tuple[str, ...] = (),
    ) -> None:
        if columns is None and (block is None or len(names) != len(block)):
            raise ValueError("a request given as a block alone needs one name per block row")
        self._columns = columns
        self.rows = rows
        self.block = block
        self.names = names

    @property
    def columns(self) -> Mapping[str, np.ndarray]:
        if self._columns is None:
            assert self.block is not None
            self._columns = dict(zip(self.names, self.block, strict=True))
        return self._columns

    @property
    def whole_block(self) -> bool:
        """True when the block holds every feature, in `names` order (no other columns)."""
        return self._columns is None


def feed_of(model: LoadedModel, job: Prepared) -> dict[str, np.ndarray]:
    """onnxruntime's feed for one request: from its block when the model takes one, without
    making the request's per-feature columns (`job.columns` would make them, and a request
    that has them no longer counts as `whole_block`: the journal and the store sink then
    take their slower per-column paths, ~15 µs more a logged request)."""
    if model.takes_block and job.block is not None:
        return model.feed_block(job.block, {})
    return model.feed(job.columns)


def _concat_columns(model: LoadedModel, jobs: Sequence[Prepared]) -> dict[str, np.ndarray]:
    return {
        name: np.concatenate([job.columns[name] for job in jobs]) for name in model.feature_names
    }


def _run_one(model: LoadedModel, job: Prepared) -> Outputs:
    return model.run(feed_of(model, job), job.rows)


def run_batch(model: LoadedModel, jobs: Sequence[Prepared]) -> list[Outputs | Exception]:
    """Score `jobs` with as few onnxruntime calls as possible; one result per job, in order."""
    results: list[Outputs | Exception] = []
    start = 0
    while start < len(jobs):
        # Greedy chunks of at most ROWS_PER_BATCHED_RUN rows (a bigger single job runs alone).
        stop, rows = start + 1, jobs[start].rows
        while stop < len(jobs) and rows + jobs[stop].rows <= ROWS_PER_BATCHED_RUN:
            rows += jobs[stop].rows
            stop += 1
        chunk = jobs[start:stop]
        start = stop
        if len(chunk) == 1:
            try:
                results.append(_run_one(model, chunk[0]))
            except Exception as exc:
                results.append(exc)
            continue
        try:
            blocks = [job.block for job in chunk if job.block is not None]
            if model.takes_block and len(blocks) == len(chunk):
                feed = model.feed_block(np.concatenate(blocks, axis=1), {})
            else:
                feed = model.feed(_concat_columns(model, chunk))
            outputs = model.run(feed, rows)
        except Exception:
            # Whatever broke the batch, each request gets its own answer (or error).
            for job in chunk:
                try:
                    results.append(_run_one(model, job))
                except Exception as exc:
                    results.append(exc)
            continue
        offset = 0
        for job in chunk:
            results.append(model.slice(outputs, offset, offset + job.rows))
            offset += job.rows
    return results
