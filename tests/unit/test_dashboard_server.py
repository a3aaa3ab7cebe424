"""The dashboard's HTTP server on a real socket, over an in-memory source (no store needed).

Many event streams at once, pages that vanish mid-stream, heartbeats, changes pushed to
every stream, static files, bad requests and a store that is down.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from services.monitor.dashboard import Dashboard
from services.monitor.records import (
    LiveCounts,
    MetricPoint,
    ModelStatus,
    QueuedAlert,
    RolloutSummary,
    TrafficPoint,
    TrainingJobSummary,
    VersionLineage,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class MemorySource:
    """A `DashboardSource` whose store can be switched off."""

    def __init__(self) -> None:
        self.store_up = True
        self.jobs_list: list[TrainingJobSummary] = []
        self.predictions = 10

    def _store(self) -> None:
        if not self.store_up:
            raise ConnectionError("store down")

    def statuses(self) -> list[ModelStatus]:
        return []

    def versions(self) -> list[VersionLineage]:
        self._store()
        return [VersionLineage("m", "2", "serving", T0, parent_version="1", family="refit")]

    def alerts(self) -> list[QueuedAlert]:
        self._store()
        return []

    def jobs(self) -> list[TrainingJobSummary]:
        self._store()
        return list(self.jobs_list)

    def rollouts(self) -> list[RolloutSummary]:
        self._store()
        return []

    def history(self, model: str, since: datetime) -> list[MetricPoint]:
        self._store()
        return [MetricPoint(T0, "accuracy", 0.9), MetricPoint(T0, "drift.psi.age", None)]

    def traffic(self, model: str, since: datetime) -> list[TrafficPoint]:
        self._store()
        return [TrafficPoint("2", T0, 10, 1.5, 1.0, float("nan"))]

    def counts(self) -> list[LiveCounts]:
        self._store()
        return [LiveCounts("m", self.predictions, 4)]


@pytest.fixture
def served() -> Iterator[tuple[Dashboard, MemorySource]]:
    source = MemorySource()
    dashboard = Dashboard(
        "127.0.0.1", 0, source, heartbeat_seconds=0.3, refresh_seconds=0.05, traffic_seconds=0.05
    )
    dashboard.start()
    try:
        yield dashboard, source
    finally:
        dashboard.stop()


def get(dashboard: Dashboard, path: str) -> tuple[int, str, bytes]:
    url = f"http://127.0.0.1:{dashboard.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


class Stream:
    """A raw event-stream client: reads events as (name, data)."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.sock = socket.create_connection(("127.0.0.1", dashboard.port), timeout=5)
        self.sock.sendall(
            b"GET /api/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
        )
        self.buffer = b""
        head = self._until(b"\r\n\r\n")
        assert b" 200 " in head.split(b"\r\n")[0] and b"text/event-stream" in head

    def _until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buffer += chunk
        head, self.buffer = self.buffer.split(marker, 1)
        return head

    def event(self) -> tuple[str, Any]:
        while True:
            block = self._until(b"\n\n").decode()
            fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            if "event" in fields:
                return fields["event"], json.loads(fields["data"])

    def next_named(self, name: str, timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            event, data = self.event()
            if event == name:
                return data
        raise AssertionError(f"no {name} event within {timeout}s")

    def close(self) -> None:
        self.sock.close()


def test_many_streams_get_snapshot_heartbeats_and_changes_and_survive_vanishing_pages(
    served: tuple[Dashboard, MemorySource],
) -> None:
    dashboard, source = served
    streams = [Stream(dashboard) for _ in range(12)]
    for s in streams:
        snapshot = s.next_named("snapshot")
        assert snapshot["versions"][0]["parent_version"] == "1" and snapshot["jobs"] == []
    # Half the pages go away without a word (abrupt close with unread data pending).
    for s in streams[:6]:
        s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    source.jobs_list = [TrainingJobSummary(7, "m", "running", created_at=T0)]
    for s in streams[6:]:
        jobs = s.next_named("jobs")
        assert [(j["id"], j["state"], j["created_at"]) for j in jobs] == [
            (7, "running", T0.isoformat())
        ]
        assert "time" in s.next_named("heartbeat", timeout=2)
    deadline = time.monotonic() + 5
    while dashboard.hub.clients != 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dashboard.hub.clients == 6  # the vanished pages were let go
    code, _, body = get(dashboard, "/api/history?model=m")
    assert code == 200
    history = json.loads(body)
    assert history["points"][1]["value"] is None
    assert history["traffic"][0]["max_latency_ms"] is None  # NaN is not JSON
    for s in streams[6:]:
        s.close()


def test_static_files_and_bad_requests(served: tuple[Dashboard, MemorySource]) -> None:
    dashboard, _ = served
    code, kind, page = get(dashboard, "/")
    assert code == 200 and kind.startswith("text/html") and b"uPlot.iife.min.js" in page
    code, kind, script = get(dashboard, "/static/vendor/uPlot.iife.min.js")
    assert code == 200 and kind.startswith("text/javascript") and len(script) > 10_000
    code, _, licence = get(dashboard, "/static/vendor/uPlot.LICENSE")
    assert code == 200 and b"MIT" in licence
    for path in ("/static/../dashboard.py", "/static/nope.js", "/api/nope"):
        assert get(dashboard, path)[0] == 404, path
    code, _, body = get(dashboard, "/api/history")
    assert (code, json.loads(body)) == (400, {"error": "model: required"})


def test_store_down_is_reported_on_reads_and_streams_then_recovers(
    served: tuple[Dashboard, MemorySource],
) -> None:
    dashboard, source = served
    stream = Stream(dashboard)
    stream.next_named("snapshot")
    source.store_up = False
    assert "store down" in stream.next_named("problem")["message"]
    code, _, body = get(dashboard, "/api/snapshot")
    assert code == 503 and "store down" in json.loads(body)["error"]
    late = Stream(dashboard)  # a page opened while the store is down still gets a stream
    assert "store down" in late.next_named("problem")["message"]
    source.store_up = True
    assert stream.next_named("problem")["message"] == ""
    assert get(dashboard, "/api/snapshot")[0] == 200
    stream.close()
    late.close()


def test_stop_ends_open_streams() -> None:
    dashboard = Dashboard("127.0.0.1", 0, MemorySource(), heartbeat_seconds=30)
    dashboard.start()
    stream = Stream(dashboard)
    stream.next_named("snapshot")
    stopper = threading.Thread(target=dashboard.stop)
    stopper.start()
    stopper.join(timeout=10)
    assert not stopper.is_alive()
    with pytest.raises((EOFError, ConnectionError)):
        stream.event()
    stream.close()


def test_live_counts_come_with_the_snapshot_and_follow_the_store(
    served: tuple[Dashboard, MemorySource],
) -> None:
    """The card's live counts are what the store holds now, not the last evaluation's window."""
    dashboard, source = served
    stream = Stream(dashboard)
    try:
        snapshot = stream.next_named("snapshot")
        assert snapshot["counts"] == {"m": {"predictions": 10, "labels": 4}}
        source.predictions = 25
        deadline = time.monotonic() + 5
        while True:
            counts = stream.next_named("counts")
            if counts["m"]["predictions"] == 25 or time.monotonic() > deadline:
                break
        assert counts == {"m": {"predictions": 25, "labels": 4}}
    finally:
        stream.close()
