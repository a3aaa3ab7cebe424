"""Delivers queued alerts to their sinks, with retries and exponential backoff.

Alerts are claimed from the store's outbox under a lease, so two monitors never
deliver the same alert at once and a monitor that dies mid-delivery hands it on
when the lease ends. Sinks receive the alert id; a sink that starts work (the
trainer) uses it to ignore a repeat of an alert it already took.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime, timedelta

import grpc

from cyclone import telemetry, wire
from cyclone.plugin_api import Alert
from cyclone.plugins import alert_sinks
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from services.monitor import convert
from services.monitor.records import QueuedAlert

log = logging.getLogger(__name__)


# A claimed alert is delivered only while this much of its lease is left: a batch whose
# sinks are slow stops before another dispatcher may claim the rest (they are re-claimed
# when the lease ends), so no alert goes out from two monitors.
LEASE_MARGIN_SECONDS = 5.0


def backoff_seconds(attempts: int, cap: float = 300.0) -> float:
    return float(min(cap, 2 ** min(attempts, 16)))


class AlertDispatcher:
    def __init__(
        self,
        store: store_grpc.StoreServiceStub,
        *,
        interval: float = 1.0,
        lease_seconds: int = 60,
        max_attempts: int = 100,
    ) -> None:
        self.store = store
        self.interval = interval
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="alert-dispatcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                await self.dispatch_once()
            except grpc.RpcError as exc:
                log.warning("alert outbox unavailable (%s); retrying", exc.code().name)
            except Exception:
                log.exception("alert dispatch failed")
            await asyncio.sleep(self.interval)

    async def dispatch_once(self) -> int:
        """Deliver what is due; returns how many alerts were delivered."""
        claimed_at = time.monotonic()
        claimed = await self.store.ClaimAlerts(
            store_pb.ClaimAlertsRequest(limit=50, lease_seconds=self.lease_seconds), timeout=10
        )
        # Counted from before the claim: never later than the store's end of the lease.
        margin = min(LEASE_MARGIN_SECONDS, self.lease_seconds / 4)
        deliver_until = claimed_at + self.lease_seconds - margin
        delivered = 0
        for index, record in enumerate(claimed.alerts):
            if time.monotonic() >= deliver_until:
                log.warning(
                    "alert lease nearly over; %d alert(s) left for the next claim",
                    len(claimed.alerts) - index,
                )
                break
            alert = convert.alert_from_store(record)
            # Delivery continues the trace of the evaluation that raised the alert.
            with telemetry.span(
                "monitor.deliver_alert",
                parent=record.traceparent,
                attributes={"cyclone.alert_id": alert.id, "cyclone.model": alert.model},
            ):
                error = await self._deliver(alert)
            if error is None:
                await self.store.CompleteAlert(
                    store_pb.CompleteAlertRequest(alert_id=alert.id, delivered=True), timeout=10
                )
                delivered += 1
                continue
            attempts = alert.attempts + 1
            request = store_pb.CompleteAlertRequest(
                alert_id=alert.id, delivered=False, error=error[:2000]
            )
            if attempts < self.max_attempts:
                retry_at = datetime.now(UTC) + timedelta(seconds=backoff_seconds(attempts))
                request.next_attempt_at.CopyFrom(wire.ts(retry_at))
            log.warning("alert %d delivery failed (attempt %d): %s", alert.id, attempts, error)
            await self.store.CompleteAlert(request, timeout=10)
        return delivered

    async def _deliver(self, queued: QueuedAlert) -> str | None:
        """Run every target of the alert; the first error, or None when all took it."""
        sinks = alert_sinks()
        for target in queued.targets:
            spec = sinks.get(target.sink)
            if spec is None:
                return f"unknown alert sink {target.sink!r} (known: {', '.join(sorted(sinks))})"
            alert = Alert(
                id=str(queued.id),
                model=queued.model,
                version=queued.version,
                level=queued.level,
                previous_level=queued.previous_level,
                reasons=queued.reasons,
                actions=[target.action],
                created_at=queued.created_at or datetime.fromtimestamp(0, UTC),
            )
            try:
                # Sinks do blocking I/O (HTTP); keep them off the event loop.
                await asyncio.to_thread(spec.deliver, alert, dict(target.config))
            except Exception as exc:
                return f"{target.sink}: {type(exc).__name__}: {exc}"
        return None
