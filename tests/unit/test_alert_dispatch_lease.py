"""The alert dispatcher delivers a claimed batch only while the claim's lease lasts: with slow
sinks, the rest of the batch is left for the next claim (by any monitor) instead of going out
after another monitor may have claimed it too."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import pytest

from cyclone.plugin_api import Alert
from cyclone.specs import AlertSinkSpec
from cyclone.store.v1 import store_service_pb2 as store_pb
from services.monitor import dispatcher as dispatch

SINK_SECONDS = 0.4


class FakeOutbox:
    """ClaimAlerts hands out three alerts once; CompleteAlert records what was completed."""

    def __init__(self) -> None:
        self.completed: list[int] = []
        self.claims = 0

    async def ClaimAlerts(
        self, request: store_pb.ClaimAlertsRequest, timeout: float
    ) -> store_pb.ClaimAlertsResponse:
        self.claims += 1
        target = store_pb.AlertTarget(action="notify", sink="slow")
        alerts = [
            store_pb.AlertRecord(id=i, model="m", level="RED", targets=[target]) for i in (1, 2, 3)
        ]
        return store_pb.ClaimAlertsResponse(alerts=alerts)

    async def CompleteAlert(
        self, request: store_pb.CompleteAlertRequest, timeout: float
    ) -> store_pb.CompleteAlertResponse:
        assert request.delivered
        self.completed.append(request.alert_id)
        return store_pb.CompleteAlertResponse()


@pytest.fixture
def delivered(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []

    def slow(alert: Alert, config: Mapping[str, Any]) -> None:
        time.sleep(SINK_SECONDS)
        seen.append(alert.id)

    monkeypatch.setattr(dispatch, "alert_sinks", lambda: {"slow": AlertSinkSpec("slow", slow)})
    return seen


async def test_a_batch_stops_before_its_lease_ends(delivered: list[str]) -> None:
    outbox = FakeOutbox()
    # Lease 1 s, margin a quarter of it: delivery may start until 0.75 s after the claim.
    dispatcher = dispatch.AlertDispatcher(outbox, lease_seconds=1)  # type: ignore[arg-type]
    assert await dispatcher.dispatch_once() == 2
    assert delivered == ["1", "2"]
    assert outbox.completed == [1, 2]  # the third is re-claimed when the lease ends


async def test_a_long_lease_delivers_the_whole_batch(delivered: list[str]) -> None:
    outbox = FakeOutbox()
    dispatcher = dispatch.AlertDispatcher(outbox, lease_seconds=60)  # type: ignore[arg-type]
    assert await dispatcher.dispatch_once() == 3
    assert outbox.completed == [1, 2, 3]
