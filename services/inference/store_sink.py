"""Streams served predictions to the store in the background; never blocks serving.

`submit` only appends to an in-memory list (and to a write-ahead journal, so the
requests a SIGKILLed process answered are logged by the next one: `journal.py`). A
flusher task turns what piled up into one `LogPredictions` batch every
`flush_interval` (or sooner when a batch fills). When the store is slow or down, batches go to a bounded on-disk spool and
are replayed in order when it answers again; while the spool holds anything, new
batches queue behind it so the store receives them in serving order. The store is
idempotent on prediction id, so a batch replayed after a lost acknowledgement is
stored once. A batch the store refuses as INVALID_ARGUMENT would be refused forever and
block everything behind it: it goes to a quarantine directory (`<spool>/rejected`, bounded
like the spool) for an operator to inspect, and the sink moves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import numpy as np
from grpc import aio
from prometheus_client import Counter, Gauge

from cyclone.channels import aio_channel
from cyclone.store.v1 import store_service_pb2 as pb
from cyclone.store.v1 import store_service_pb2_grpc as pb_grpc
from services.inference.batching import Prepared
from services.inference.journal import Journal
from services.inference.model import LoadedModel, Outputs
from services.inference.spool import Spool, SpoolDiskFull, SpoolFull

log = logging.getLogger(__name__)

QUEUED = Gauge("cyclone_store_sink_queued_rows", "Predictions waiting in memory for the store")
SENT = Counter("cyclone_store_sink_sent_rows", "Predictions the store acknowledged directly")
SPOOLED = Counter("cyclone_store_sink_spooled_rows", "Predictions written to the disk spool")
REPLAYED = Counter("cyclone_store_sink_replayed_rows", "Predictions replayed from the spool")
DROPPED = Counter(
    "cyclone_store_sink_dropped_rows",
    "Predictions lost because the spool (or the quarantine of rejected batches) was full",
)
REJECTED = Counter(
    "cyclone_store_sink_rejected_rows",
    "Predictions the store refused as invalid, quarantined under <spool>/rejected",
)
UNJOURNALED = Counter(
    "cyclone_store_sink_unjournaled_rows",
    "Answered predictions the journal could not write (disk full): logged from memory only",
)
SPOOL_BYTES = Gauge("cyclone_store_sink_spool_bytes", "Bytes held in the disk spool")


class Outcome(enum.Enum):
    """What became of one send."""

    STORED = "stored"
    RETRY = "retry"  # the store is down or slow: keep the batch and try again later
    REJECTED = "rejected"  # refused for good (INVALID_ARGUMENT): retrying cannot help


class Submitted(NamedTuple):
    """One scored request waiting for the store (a NamedTuple: built on the hot path)."""

    model: str
    version: str
    prediction_ids: list[str]
    job: Prepared
    outputs: Outputs
    class_labels: tuple[str, ...]
    latency_ms: float
    trace_id: str


def _json_values(column: np.ndarray) -> list[Any]:
    """Python values for JSON; NaN (missing) becomes null."""
    values: list[Any] = column.tolist()
    if column.dtype.kind == "f" and np.isnan(column).any():
        return [None if isinstance(v, float) and math.isnan(v) else v for v in values]
    return values


def _row_template(names: Sequence[str]) -> str:
    """`template % tuple(row)` is `json.dumps(dict(zip(names, row)))` for a row of finite
    floats (`%r` is the repr json writes for a float) without building a dict per row: a
    busy server's flush encodes hundreds of rows on the event loop, and requests wait."""
    return "{" + ", ".join(json.dumps(n).replace("%", "%%") + ": %r" for n in names) + "}"


def _input_json(items: list[Submitted]) -> list[bytes]:
    """One JSON object per row of a group's requests, in order."""
    first = items[0].job
    if all(item.job.whole_block for item in items):
        assert first.block is not None
        block = np.concatenate([item.job.block for item in items], axis=1)
        # Finite in practice (the requests passed the finiteness check); checked, as NaN
        # would need json's spelling.
        if block.dtype.kind == "f" and np.isfinite(block).all():
            template = _row_template(first.names)
            return [(template % tuple(row)).encode() for row in block.T.tolist()]
    names, rows = _input_rows(items)
    dumps = json.dumps
    return [dumps(dict(zip(names, row, strict=True))).encode() for row in rows]


def _value_json(values: np.ndarray) -> list[bytes]:
    """`{"value": v}` per regression output; `json.dumps` itself only for a non-finite one."""
    if values.dtype.kind == "f" and np.isfinite(values).all():
        return [b'{"value": %r}' % v for v in values.tolist()]
    return [json.dumps({"value": v}).encode() for v in values.tolist()]


def _input_rows(items: list[Submitted]) -> tuple[list[str], list[Sequence[Any]]]:
    """Feature names and one tuple of JSON-ready values per row, for a group's requests.

    Requests that arrived as one numeric block (most) are joined block-wise: one
    concatenation and one `tolist` per flush. Their values passed the finiteness check, so
    there is no NaN to turn into null."""
    first = items[0].job
    if all(item.job.whole_block for item in items):
        assert first.block is not None
        block = np.concatenate([item.job.block for item in items], axis=1)
        rows: list[Sequence[Any]] = block.T.tolist()
        return list(first.names), rows
    names = list(first.columns)
    columns = [_json_values(np.concatenate([item.job.columns[n] for item in items])) for n in names]
    return names, list(zip(*columns, strict=True))


def _add_group(items: list[Submitted], request: pb.LogPredictionsRequest) -> None:
    """Rows of several scored requests of one model version, columns joined first so the
    numpy work is per flush, not per request (most requests are one row)."""
    first = items[0]
    inputs = _input_json(items)
    ids = [pid for item in items for pid in item.prediction_ids]
    latency = [item.latency_ms for item in items for _ in item.prediction_ids]
    traces = [item.trace_id for item in items for _ in item.prediction_ids]
    dumps = json.dumps
    results = [item.outputs for item in items]
    if first.outputs.values is not None:
        outputs = _value_json(np.concatenate([r.values for r in results if r.values is not None]))
    else:
        labels = np.concatenate([r.labels for r in results if r.labels is not None])
        probabilities = np.concatenate(
            [r.probabilities for r in results if r.probabilities is not None]
        )
        outputs = [
            dumps(
                {
                    "label": label,
                    "probabilities": dict(zip(first.class_labels, probs, strict=True)),
                }
            ).encode()
            for label, probs in zip(labels.tolist(), probabilities.tolist(), strict=True)
        ]
    add = request.records.add
    for i, input_json in enumerate(inputs):
        add(
            prediction_id=ids[i],
            model=first.model,
            version=first.version,
            input_json=input_json,
            output_json=outputs[i],
            latency_ms=latency[i],
            trace_id=traces[i],
        )


def _same_group(a: Submitted, b: Submitted) -> bool:
    """Same model version with the same features (order included)."""
    if a.model != b.model or a.version != b.version:
        return False
    if a.job.whole_block and b.job.whole_block:
        return a.job.names == b.job.names
    return list(a.job.columns) == list(b.job.columns)


def encode_items(items: list[Submitted]) -> pb.LogPredictionsRequest:
    """One LogPredictions batch from scored requests, in serving order."""
    request = pb.LogPredictionsRequest()
    group: list[Submitted] = []
    for item in items:
        # A group is a run of requests that encode together.
        if group and not _same_group(group[0], item):
            _add_group(group, request)
            group = []
        group.append(item)
    if group:
        _add_group(group, request)
    return request


class StoreSink:
    def __init__(
        self,
        address: str,
        spool_dir: Path,
        *,
        flush_interval: float = 0.2,
        batch_rows: int = 5000,
        spool_max_bytes: int = 1 << 30,
        send_timeout: float = 5.0,
        retry_interval: float = 1.0,
        journal: bool = True,
    ) -> None:
        self.address = address
        self.flush_interval = flush_interval
        self.batch_rows = batch_rows
        self.send_timeout = send_timeout
        self.retry_interval = retry_interval
        self.spool = Spool(spool_dir, spool_max_bytes)
        # Batches the store refused for good: kept (not replayed) so nothing answered is lost.
        self.rejected = Spool(spool_dir / "rejected", spool_max_bytes)
        SPOOL_BYTES.set(self.spool.bytes)
        self._pending: list[Submitted] = []
        self._pending_rows = 0
        # Under the spool's directory lock, so one process writes it.
        self.journal = Journal(spool_dir / "journal") if journal else None
        # Journal segments whose requests are in the batch being flushed (released after).
        self._sealed: list[Path] = []
        # Read at scrape time: setting a gauge on every request would cost the hot path a lock.
        QUEUED.set_function(lambda: self._pending_rows)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flushing: asyncio.Future[None] | None = None
        self._channel: aio.Channel | None = None
        self._stub: pb_grpc.StoreServiceStub | None = None
        self._store_up = True
        self._next_retry = 0.0

    # -- the hot path ---------------------------------------------------------------------

    def submit(
        self,
        model: LoadedModel,
        prediction_ids: list[str],
        job: Prepared,
        outputs: Outputs,
        latency_ms: float,
        trace_id: str,
    ) -> None:
        self._pending.append(
            Submitted(
                model.name,
                model.version,
                prediction_ids,
                job,
                outputs,
                model.schema.class_labels,
                latency_ms,
                trace_id,
            )
        )
        self._pending_rows += len(prediction_ids)
        if self.journal is not None and not self.journal.append(self._pending[-1]):
            UNJOURNALED.inc(len(prediction_ids))
        if self._pending_rows >= self.batch_rows:
            self._wake.set()

    # -- background ---------------------------------------------------------------------------

    async def start(self) -> None:
        # gRPC's default reconnect backoff grows to 120 s: after a long outage the sink would
        # notice the store is back only minutes later. Cap it near retry_interval.
        backoff_ms = max(100, int(self.retry_interval * 1000))
        self._channel = aio_channel(
            self.address,
            options=[
                ("grpc.initial_reconnect_backoff_ms", backoff_ms),
                ("grpc.min_reconnect_backoff_ms", backoff_ms),
                ("grpc.max_reconnect_backoff_ms", 2 * backoff_ms),
            ],
        )
        self._stub = pb_grpc.StoreServiceStub(self._channel)
        if self.journal is not None:
            # Answered before the last process died: logged first, in serving order.
            recovered = [Submitted(*fields) for fields in self.journal.recover()]
            self._pending[:0] = recovered
            self._pending_rows += sum(len(item.prediction_ids) for item in recovered)
            self._sealed += self.journal.left_behind
            if recovered:
                self._wake.set()  # logged at once, not at the next interval
        self._task = asyncio.create_task(self._run(), name="store-sink")

    async def stop(self) -> None:
        """Flush what is pending (to the store, else to the spool), then close."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._flushing is not None:
            # A send cancelled half-way would lose its drained batch: let it finish first.
            try:
                await self._flushing
            except Exception:
                log.exception("store sink flush failed while stopping")
            self._flushing = None
        await self.flush(replay=True)
        if self.journal is not None:
            self.journal.close()
        self.spool.close()
        self.rejected.close()
        if self._channel is not None:
            await self._channel.close()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval)
            self._wake.clear()
            # Shielded: stop() cancels this loop but waits for a flush in progress to end.
            self._flushing = asyncio.ensure_future(self.flush())
            try:
                await asyncio.shield(self._flushing)
            except Exception:
                log.exception("store sink flush failed; will retry")
            self._flushing = None

    def _drain(self) -> tuple[pb.LogPredictionsRequest | None, list[Path]]:
        """The pending requests as one batch, and the journal segments holding them."""
        sealed, self._sealed = self._sealed, []
        if self.journal is not None and (segment := self.journal.seal()) is not None:
            sealed.append(segment)
        if not self._pending:
            return None, sealed
        items, self._pending, self._pending_rows = self._pending, [], 0
        return encode_items(items), sealed

    async def flush(self, *, replay: bool = False) -> None:
        """Send what is pending; replay the spool when the store may be back."""
        request, sealed = self._drain()
        if len(self.spool) and (replay or time.monotonic() >= self._next_retry):
            await self._replay()
        if request is not None and not await self._deliver(request):
            # The disk refused the spool: the journal's copy (written before it filled) is
            # left for the next start to log.
            return
        # The batch is in the store or the spool (or refused for good): its journal can go.
        Journal.release(sealed)

    async def _deliver(self, request: pb.LogPredictionsRequest) -> bool:
        """Store or spool the batch; False when only the journal may still hold it."""
        rows = len(request.records)
        if not len(self.spool):
            outcome = await self._send(request)
            if outcome is Outcome.STORED:
                SENT.inc(rows)
                return True
            if outcome is Outcome.REJECTED:
                self._quarantine(request.SerializeToString(), rows)
                return True
        try:
            self.spool.append(request.SerializeToString())
            SPOOLED.inc(rows)
        except SpoolFull as exc:
            DROPPED.inc(rows)
            log.error("dropping %d predictions: %s", rows, exc)
            return not isinstance(exc, SpoolDiskFull)
        finally:
            SPOOL_BYTES.set(self.spool.bytes)
        return True

    async def _replay(self) -> None:
        while (data := self.spool.peek()) is not None:
            request = pb.LogPredictionsRequest.FromString(data)
            outcome = await self._send(request)
            if outcome is Outcome.RETRY:
                self._next_retry = time.monotonic() + self.retry_interval
                return
            if outcome is Outcome.REJECTED:
                self._quarantine(data, len(request.records))
            else:
                REPLAYED.inc(len(request.records))
            self.spool.pop()
            SPOOL_BYTES.set(self.spool.bytes)
        log.info("spool replayed; store is caught up")

    def _quarantine(self, data: bytes, rows: int) -> None:
        """Keep a batch the store refused for good where an operator can look at it."""
        REJECTED.inc(rows)
        try:
            self.rejected.append(data)
        except SpoolFull as exc:
            DROPPED.inc(rows)
            log.error("dropping %d rejected predictions: %s", rows, exc)
            return
        log.error(
            "quarantined %d predictions the store rejected in %s", rows, self.rejected.directory
        )

    async def _send(self, request: pb.LogPredictionsRequest) -> Outcome:
        assert self._stub is not None

        async def one() -> AsyncIterator[pb.LogPredictionsRequest]:
            yield request

        try:
            await self._stub.LogPredictions(one(), timeout=self.send_timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                # The store will never take this batch; retrying would block all behind it.
                log.error(
                    "store rejected a batch of %d predictions: %s",
                    len(request.records),
                    exc.details(),
                )
                return Outcome.REJECTED
            if self._store_up:
                log.warning(
                    "store %s unavailable (%s); spooling predictions", self.address, exc.code().name
                )
            self._store_up = False
            self._next_retry = time.monotonic() + self.retry_interval
            return Outcome.RETRY
        if not self._store_up:
            log.info("store %s is back", self.address)
        self._store_up = True
        return Outcome.STORED
